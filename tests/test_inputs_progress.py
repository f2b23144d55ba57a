"""Progress: ``TextToImagePipeline.generate(progress=...)`` reports the image tokens as they are
drawn, and the CLI draws tqdm bars from such callbacks on stderr only when stderr is a terminal and
``--quiet`` is not given."""
from __future__ import annotations

import json
import shutil
import sys
import wave
from argparse import Namespace

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import mmgen_engine as mm
from mmgen_engine import InputError
from mmgen_engine.cli import main
from mmgen_engine.demo import gesture_world as world
from mmgen_engine.pipelines.text_to_image import PROGRESS_EVERY

SAMPLING = mm.SamplingParams(do_sample=True, top_k=4, guidance_scale=2.0, seed=3)


@pytest.fixture(scope="module")
def small_txt2img(tmp_path_factory):
    """The demo text-to-image model cut to a 4x4 token grid (the grid is read from the decoder's
    positions), so that a generation takes 16 steps."""
    path = tmp_path_factory.mktemp("t2i") / "model"
    shutil.copytree(mm.demo_model("text-to-image"), path)
    config = json.loads((path / "config.json").read_text())
    config["decoder"]["max_positions"], config["generation"]["grid_size"] = 16, 4
    (path / "config.json").write_text(json.dumps(config))
    state = load_file(path / "model.safetensors")
    state["decoder.wpe"] = state["decoder.wpe"][:16].clone()
    save_file(state, path / "model.safetensors")
    return path


def test_generate_reports_increasing_tokens_of_the_grid(small_txt2img):
    pipe = mm.load(small_txt2img)
    calls = []
    images = pipe.generate(["a red circle", "a blue square"], 2, SAMPLING, progress=lambda *a: calls.append(a))
    assert calls == [(done, 16) for done in range(PROGRESS_EVERY, 17, PROGRESS_EVERY)]
    plain = pipe.generate(["a red circle", "a blue square"], 2, SAMPLING)  # reporting changes nothing
    assert [np.asarray(im).tolist() for im in images] == [np.asarray(im).tolist() for im in plain]
    with pytest.raises(InputError, match="progress must be a callable or None, got int"):
        pipe.generate("a red circle", progress=1)


def txt2img(model, tmp_path, *extra):
    return main(["txt2img", "a red circle", "--model", str(model), "-o", str(tmp_path / "g.png"), "--top-k", "4",
                 "--guidance", "2", "--seed", "1", *extra])


def test_txt2img_bar_only_on_a_terminal_without_quiet(small_txt2img, tmp_path, capsys, monkeypatch):
    assert txt2img(small_txt2img, tmp_path) == 0  # not a terminal: no bar
    out, err = capsys.readouterr()
    assert err == "" and "g.png: 1x1 grid" in out
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert txt2img(small_txt2img, tmp_path, "--quiet") == 0
    assert capsys.readouterr().err == ""
    assert txt2img(small_txt2img, tmp_path) == 0
    out, err = capsys.readouterr()
    assert "image tokens" in err and "/16" in err and "\r" in err  # tqdm's bar, redrawn in place
    assert "image tokens" not in out


def write_wav(path, seconds=2.0):
    audio, _ = world.clip(world.HELD_OUT_SEED + 7, seconds)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(world.SAMPLE_RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def test_gesture_bar_only_on_a_terminal_without_quiet(tmp_path, capsys, monkeypatch):
    wav = tmp_path / "speech.wav"
    write_wav(wav)
    argv = ["gesture", str(wav), "--model", str(mm.demo_model("speech-to-gesture")), "-o", str(tmp_path / "p.npz")]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "gesture windows" in err and "\r" in err


def test_bar_follows_the_callback(monkeypatch):
    """The callback the CLI hands out moves one tqdm bar to ``done`` of ``total`` (None: unknown)."""
    import mmgen_engine.cli as cli
    bars = []

    class Recorded(cli.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(cli, "tqdm", Recorded)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with cli._progress_bar(Namespace(quiet=False), "steps", "step") as progress:
        progress(1, None)
        assert (bars[0].n, bars[0].total) == (1, None)
        progress(3, 10)
        progress(10, 10)
    assert len(bars) == 1 and (bars[0].n, bars[0].total) == (10, 10)
    with cli._progress_bar(Namespace(quiet=True), "steps", "step") as progress:
        assert progress is None
    assert len(bars) == 1


def test_convert_bar_only_on_a_terminal_without_quiet(tmp_path, capsys, monkeypatch):
    from hf_models import make_model, save
    src = save(make_model(seed=4), tmp_path / "hf")
    capsys.readouterr()  # what transformers printed while saving the source
    assert main(["convert", str(src), str(tmp_path / "a")]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["convert", str(src), str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["convert", str(src), str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert "converting" in err and "B" in err and "converted" in out
