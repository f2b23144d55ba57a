"""Image inputs: every PIL mode becomes 8-bit RGB by value (16-bit data scaled, not clipped;
transparency composited onto white as transformers' processors do), and a path that is not a
regular file, an empty or closed image is one InputError, never a hang. Files are real PNG / TIFF /
JPEG files written by Pillow."""
from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import PIL.Image
import pytest
from transformers.image_transforms import convert_to_rgb

from mmgen_engine import InputError
from mmgen_engine.pipelines.captioning import load_image


def gradient(height=24, width=40) -> np.ndarray:
    """An 8-bit gray ramp over the whole 0..255 range with some texture."""
    y, x = np.mgrid[:height, :width]
    return ((x * 255 // (width - 1) + 17 * y) % 256).astype(np.uint8)


def saved(im: PIL.Image.Image, path) -> PIL.Image.Image:
    """``im`` written to ``path`` by Pillow and opened again (so tests see what a file gives)."""
    im.save(path)
    return PIL.Image.open(path)


def rgb(im: PIL.Image.Image) -> np.ndarray:
    return np.asarray(load_image(im))


def test_16_bit_png_is_scaled_to_8_bit_not_clipped(tmp_path, captioner):
    gray8 = gradient()
    png16 = tmp_path / "gray16.png"
    with saved(PIL.Image.fromarray(gray8.astype(np.uint16) * 257), png16) as im:  # 8-bit v -> 16-bit v * 257
        assert im.mode == "I;16"
        assert np.asarray(im.convert("RGB")).mean() > 250  # PIL's (and transformers') clipping: nearly all white
    png8 = tmp_path / "gray8.png"
    PIL.Image.fromarray(gray8, "L").save(png8)
    expected = np.repeat(gray8[:, :, None], 3, axis=2)
    assert np.array_equal(np.asarray(load_image(png16)), expected)
    assert np.array_equal(captioner.preprocess([png16]), captioner.preprocess([png8]))


def test_every_16_bit_layout_rounds_to_nearest(tmp_path):
    values = np.array([[0, 128, 129, 385, 386, 32767, 65406, 65407, 65535]], dtype=np.uint16)
    expected = np.round(values / 257).astype(np.uint8)  # v / 257 never ends in .5
    assert expected.tolist() == [[0, 0, 1, 1, 2, 127, 254, 255, 255]]
    for mode, dtype in [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")]:
        im = PIL.Image.frombytes(mode, (values.shape[1], 1), values.astype(dtype).tobytes())
        assert np.array_equal(rgb(im)[..., 0], expected), mode
    with saved(PIL.Image.frombytes("I;16B", (9, 1), values.astype(">u2").tobytes()), tmp_path / "b.png") as im:
        assert np.array_equal(rgb(im)[..., 0], expected)


def test_32_bit_int_and_float_tiffs(tmp_path):
    """"I" is read as 16-bit data (clipped to 0..65535), "F" as [0, 1] (clipped; NaN as 0)."""
    ints = np.array([[-5, 0, 257, 32768, 65535, 70000]], dtype=np.int32)
    with saved(PIL.Image.fromarray(ints, "I"), tmp_path / "i.tif") as im:
        assert im.mode == "I"
        assert rgb(im)[0, :, 0].tolist() == [0, 0, 1, 128, 255, 255]
    floats = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float32)
    with saved(PIL.Image.fromarray(floats, "F"), tmp_path / "f.tif") as im:
        assert im.mode == "F"
        assert rgb(im)[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0]


def test_transparency_is_composited_onto_white_as_transformers_does(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent: white, whatever color it hides
    la = rng.integers(0, 256, (9, 11, 2), dtype=np.uint8)
    palette = PIL.Image.fromarray(rgba[..., :3]).quantize(8)
    palette.info["transparency"] = 3  # palette entry 3 is transparent
    images = {"rgba.png": PIL.Image.fromarray(rgba, "RGBA"), "la.png": PIL.Image.fromarray(la, "LA"),
              "p.png": palette}
    for name, image in images.items():
        with saved(image, tmp_path / name) as im:
            assert im.mode in ("RGBA", "LA", "P")
            assert np.array_equal(rgb(im), convert_to_rgb(im, return_numpy=True)), name
    with PIL.Image.open(tmp_path / "rgba.png") as im:
        assert rgb(im)[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode,suffix", [("1", "png"), ("L", "png"), ("P", "png"), ("RGB", "png"),
                                         ("CMYK", "jpg"), ("CMYK", "tif"), ("YCbCr", "jpg")])
def test_opaque_modes_match_pil_and_transformers(tmp_path, mode, suffix):
    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 256, (13, 7, 3), dtype=np.uint8)).convert(mode)
    with saved(image, tmp_path / f"x.{suffix}") as im:
        ours = rgb(im)
        assert ours.dtype == np.uint8 and ours.shape == (13, 7, 3)
        assert np.array_equal(ours, np.asarray(im.convert("RGB")))
        assert np.array_equal(ours, convert_to_rgb(im, return_numpy=True))


def test_unconvertible_mode_is_an_input_error():
    with pytest.raises(InputError, match="unsupported image mode La"):
        load_image(PIL.Image.new("La", (4, 4)))


def test_empty_and_closed_pil_images():
    for size in [(0, 0), (0, 5), (5, 0)]:
        with pytest.raises(InputError, match=r"empty \(\d+x\d+ pixels\)"):
            load_image(PIL.Image.new("RGB", size))
    closed = PIL.Image.new("RGB", (8, 8))
    closed.close()
    with pytest.raises(InputError, match="closed image"):
        load_image(closed)


def test_devices_directories_and_fifos_are_not_image_files(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        load_image("/dev/zero")
    with pytest.raises(InputError, match=r"not a regular file \(a directory\)"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="image file not found"):
        load_image(tmp_path / "absent.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            load_image(fifo)
        except InputError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=read, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # unblock the reader before failing: open the FIFO's other end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert outcome and "not a regular file" in outcome[0] and time.monotonic() - start < 30


def test_an_extreme_aspect_ratio_is_refused_before_a_shortest_edge_resize(captioner, monkeypatch):
    """CLIP-style preprocessing scales the shorter side first: a 1 x 40000 PNG of a few hundred bytes
    would become 64 x 2560000 here (at CLIP's 224: 224 x 8960000, 5.6 GiB) before the center crop."""
    p = captioner.config.preprocess
    config = dataclasses.replace(captioner.config, preprocess=dataclasses.replace(p, shortest_edge=p.height))
    monkeypatch.setattr(captioner, "config", config)
    assert captioner.preprocess([PIL.Image.new("RGB", (p.width * 3, p.height), "red")]).shape[-2:] == (p.height,
                                                                                                      p.width)
    with pytest.raises(InputError, match=r"1x40000 image would be resized to .* over the limit of 67108864 pixels"):
        captioner.preprocess([PIL.Image.new("RGB", (1, 40000), "red")])
