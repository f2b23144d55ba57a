"""ONNX export of the one-shot stages (mm.export_onnx, mmgen export-onnx) and ONNX Runtime sessions
over it: every part of the demo models and of tiny converted captioners of each family, ORT CPU
against the engine's own stage, a dynamic batch, and bad input (one-line errors, nothing written).

Tolerance (ORT CPU vs the engine's reference stage on CPU), relative to the output's scale
``s = max(1, max|engine|)``: ``|ort - engine| / s <= ATOL + RTOL * |engine| / s`` with ATOL and RTOL
1e-4 for fp32 weights, 1e-2 for fp16 (bf16 exports, but ONNX Runtime's CPU provider has no bf16
MatMul). Summation order differs between ORT's kernels and torch's, so the error grows with the
magnitude of the values summed: the tiny random BLIP-2's states reach ~8 (error ~5e-4), the poses
~270 units; the demo encoders' states and the pixels in [0, 1] are of unit scale (s = 1).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_models import make_blip, make_clipcap, make_git, make_model, save, save_blip, save_clipcap, save_git
from llava_models import make_llava, save_llava
from test_convert_blip2 import make_blip2, save_blip2  # its tiny BLIP-2 builders
from test_detokenizers import VQGAN_CASES, dalle_decoder, save_state, taming_vqmodel

import mmgen_engine as mm
from mmgen_engine.checkpoint import read_config
from mmgen_engine.onnx import PARTS, load_session, supported_parts

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

RTOL = {torch.float32: 1e-4, torch.float16: 1e-2}
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2}
RUN_BATCHES = (1, 3)
FAMILIES = ("vit-gpt2", "blip", "git", "clipcap", "llava", "blip2")  # traced at TRACE_BATCH (2): the batch is symbolic
# the stages that run once per request (the decoder parts are tested in test_onnx_decoders.py)
ONE_SHOT = ("image_encoder", "text_encoder", "detokenizer", "audio_encoder", "motion_decoder")


def _captioner(tmp_path, family: str):
    if family == "vit-gpt2":
        src = save(make_model(), tmp_path / "hf")
    elif family == "blip":
        src = save_blip(make_blip(), tmp_path / "hf")
    elif family == "git":
        src = save_git(make_git(), tmp_path / "hf")
    elif family == "blip2":
        src = save_blip2(make_blip2(), tmp_path / "hf")
    elif family == "llava":
        src = save_llava(make_llava(), tmp_path / "hf")
    else:
        src = save_clipcap(*make_clipcap(), tmp_path / "hf")
    return mm.convert(src, tmp_path / "engine")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``{name: (checkpoint, export)}`` of the three demo models and one tiny converted captioner per
    family, every one-shot part exported."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for task in ("captioning", "text-to-image", "speech-to-gesture"):
        out[task] = (mm.demo_model(task), _export(mm.demo_model(task), root / task))
    for family in FAMILIES:
        ckpt = _captioner(root / family, family)
        out[family] = (ckpt, _export(ckpt, root / family / "onnx"))
    return out


def _export(ckpt, out):
    return mm.export_onnx(ckpt, out, parts=[p for p in supported_parts(read_config(ckpt)) if p in ONE_SHOT])


def _inputs(pipe, name: str, batch: int) -> dict[str, np.ndarray]:
    """Real-looking inputs of part ``name`` at ``batch``, as the pipeline hands them to the stage."""
    g = torch.Generator().manual_seed(batch)
    if name == "image_encoder":
        enc = pipe.config.encoder
        return {"pixel_values": torch.randn(batch, enc.num_channels, enc.image_size, enc.image_size, generator=g)}
    if name == "text_encoder":
        prompts = ["a red circle", "a green square", "a blue triangle on the left"]
        return {"text_tokens": pipe.tokenize((prompts * batch)[:batch])}
    if name == "detokenizer":
        side = pipe.config.generation.grid_size
        return {"image_tokens": torch.randint(0, pipe.config.detokenizer.codebook_size, (batch, side, side),
                                              generator=g)}
    if name == "audio_encoder":
        mel = PARTS["speech-to-gesture"]["audio_encoder"].example(pipe)["mel"]
        return {"mel": torch.randn(batch, *mel.shape[1:], generator=g)}
    return {"motion_tokens": torch.randint(0, pipe.config.motion.codebook_size, (batch, pipe.config.window_tokens),
                                           generator=g)}


def _engine(pipe, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The engine's own stage, as the pipeline calls it."""
    (x,) = inputs.values()
    with torch.inference_mode():
        if name in ("image_encoder", "audio_encoder"):
            return pipe.model.encode(x)
        if name == "text_encoder":
            return pipe.model.encoder(x, (x != pipe.config.generation.text_pad_token_id).sum(1))
        if name == "detokenizer":
            return pipe.decode_tokens(x)
        return pipe.model.poses(x)


@pytest.mark.parametrize("name", ["captioning", "text-to-image", "speech-to-gesture", *FAMILIES])
def test_ort_matches_engine(exports, name):
    ckpt, out = exports[name]
    pipe = mm.load(ckpt)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["parts"]) == [p for p in PARTS[pipe.task] if p in ONE_SHOT]
    for part, entry in manifest["parts"].items():
        session = load_session(out, part, checkpoint_dir=ckpt)
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in entry["inputs"]]
        assert all(io["shape"][0] == "batch" for io in entry["inputs"] + entry["outputs"])
        for batch in RUN_BATCHES:
            inputs = _inputs(pipe, part, batch)
            (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
            want = _engine(pipe, part, inputs).float()
            got = torch.from_numpy(got)
            assert got.shape == want.shape and list(got.shape[1:]) == entry["outputs"][0]["shape"][1:]
            scale = want.abs().max().clamp(min=1)
            torch.testing.assert_close(got / scale, want / scale, rtol=RTOL[torch.float32],
                                       atol=ATOL[torch.float32])


@pytest.mark.parametrize("arch", ["vqgan", "dvae"])
def test_standalone_detokenizer_any_grid(arch, tmp_path):
    """A stand-alone VQGAN / dVAE: its token grid is symbolic too (grid_height, grid_width)."""
    if arch == "vqgan":
        state, _ = taming_vqmodel(*VQGAN_CASES["attn-top-level-ckpt"][:7], seed=5)
        src = save_state(state, tmp_path / "vq.pt", "pt")
    else:
        src = save_state(dalle_decoder(1, seed=1)[0].state_dict(), tmp_path / "dvae.pt", "pt")
    ckpt = mm.convert(src, tmp_path / "engine")
    out = mm.export_onnx(ckpt, tmp_path / "onnx")
    entry = json.loads((out / "manifest.json").read_text())["parts"]["detokenizer"]
    assert entry["inputs"][0]["shape"] == ["batch", "grid_height", "grid_width"]
    pipe, session = mm.load(ckpt), load_session(out, "detokenizer", checkpoint_dir=ckpt)
    for grid in ((1, 4, 4), (3, 3, 5)):
        tokens = torch.randint(0, pipe.codebook_size, grid, generator=torch.Generator().manual_seed(grid[0]))
        (got,) = session.run(None, {"image_tokens": tokens.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), pipe.decode_tokens(tokens), rtol=RTOL[torch.float32],
                                   atol=ATOL[torch.float32])


def test_float16_export(tmp_path):
    ckpt = mm.demo_model("captioning")
    out = mm.export_onnx(ckpt, tmp_path / "onnx", parts=["image_encoder"], dtype="float16")
    entry = json.loads((out / "manifest.json").read_text())["parts"]["image_encoder"]
    assert entry["inputs"][0]["dtype"] == entry["outputs"][0]["dtype"] == "float16"
    pipe, session = mm.load(ckpt, dtype="float16"), load_session(out, "image_encoder")
    x = _inputs(pipe, "image_encoder", 3)["pixel_values"].half()
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    want = _engine(pipe, "image_encoder", {"pixel_values": x}).float()
    scale = want.abs().max().clamp(min=1)
    torch.testing.assert_close(torch.from_numpy(got).float() / scale, want / scale, rtol=RTOL[torch.float16],
                               atol=ATOL[torch.float16])


def test_manifest_describes_the_export(exports):
    ckpt, out = exports["text-to-image"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["task"] == "text-to-image"
    assert set(manifest["checkpoint"]) == {"config.json", "model.safetensors"}
    det = manifest["parts"]["detokenizer"]
    assert det["stage"] == "model.detokenizer" and det["inputs"][0]["dtype"] == "int64"
    assert det["outputs"][0] == {"name": "pixels", "shape": ["batch", 3, 64, 64], "dtype": "float32"}
    assert set(det["files"]) == {"detokenizer.onnx", "detokenizer.onnx.data"}  # weights as external data
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(f for part in manifest["parts"].values() for f in part["files"])])


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_existing_non_empty_out_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(mm.InputError) as e:
        mm.export_onnx(mm.demo_model("captioning"), out)
    assert "not empty" in _one_line(e)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unknown_part_lists_the_supported_ones(tmp_path):
    with pytest.raises(mm.InputError) as e:
        mm.export_onnx(mm.demo_model("text-to-image"), tmp_path / "out", parts=["decoder"])
    assert "text_encoder, detokenizer" in _one_line(e)
    assert not any(tmp_path.iterdir())


def test_bad_options_are_refused_before_loading(tmp_path):
    with pytest.raises(mm.InputError):
        mm.export_onnx(mm.demo_model("captioning"), tmp_path / "out", opset=9)
    with pytest.raises(mm.InputError):
        mm.export_onnx(mm.demo_model("captioning"), tmp_path / "out", dtype="float64")
    assert not any(tmp_path.iterdir())


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    real, calls = torch.onnx.export, []

    def fail_second(*args, **kwargs):  # the first part is written, the second fails
        calls.append(args[2])
        if len(calls) > 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fail_second)
    with pytest.raises(mm.MMGenError) as e:
        mm.export_onnx(mm.demo_model("speech-to-gesture"), tmp_path / "out")
    assert "boom" in _one_line(e) and len(calls) == 2
    assert not any(tmp_path.iterdir())


@pytest.fixture
def copied_export(exports, tmp_path):
    import shutil

    ckpt, out = exports["captioning"]
    return ckpt, shutil.copytree(out, tmp_path / "copy")


@pytest.mark.parametrize("damage", ["truncate", "truncate_data"])
def test_truncated_onnx_is_refused(copied_export, damage):
    ckpt, out = copied_export
    file = out / ("image_encoder.onnx" if damage == "truncate" else "image_encoder.onnx.data")
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(mm.CheckpointError) as e:
        load_session(out, "image_encoder")
    assert "truncated" in _one_line(e)


def test_manifest_of_another_format_version_is_refused(copied_export):
    _, out = copied_export
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(mm.CheckpointError) as e:
        load_session(out, "image_encoder")
    assert "version 99" in _one_line(e)


def test_export_of_another_checkpoint_is_refused(exports, copied_export):
    _, out = copied_export
    other, _ = exports["vit-gpt2"]
    with pytest.raises(mm.CheckpointError) as e:
        load_session(out, "image_encoder", checkpoint_dir=other)
    assert "another checkpoint" in _one_line(e)


def test_unknown_part_of_an_export(exports):
    _, out = exports["captioning"]
    with pytest.raises(mm.InputError) as e:
        load_session(out, "decoder")
    assert "image_encoder" in _one_line(e)


def test_without_the_onnx_extra(tmp_path):
    # the package imports without onnx / onnxscript / onnxruntime; using it names the extra
    code = ("import sys; sys.modules.update(onnx=None, onnxscript=None, onnxruntime=None)\n"
            "import mmgen_engine as mm\n"
            "from mmgen_engine.onnx import load_session\n"
            "try:\n"
            f"    mm.export_onnx(mm.demo_model('captioning'), {str(tmp_path / 'out')!r})\n"
            "except mm.MMGenError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[onnx] extra" in r.stdout and r.stdout.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_cli_export_onnx(tmp_path):
    cmd = [sys.executable, "-m", "mmgen_engine.cli", "export-onnx", str(mm.demo_model("speech-to-gesture")),
           str(tmp_path / "out"), "--parts", "motion_decoder"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert list(json.loads((tmp_path / "out" / "manifest.json").read_text())["parts"]) == ["motion_decoder"]
    r = subprocess.run(cmd, capture_output=True, text=True)  # OUT is now non-empty
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not empty" in r.stderr
    bad = [*cmd[:5], str(tmp_path / "new"), "--parts", "decoder"]
    r = subprocess.run(bad, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "supported: audio_encoder, motion_decoder" in r.stderr
    assert not (tmp_path / "new").exists()

