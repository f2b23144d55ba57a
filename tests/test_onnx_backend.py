"""ONNX Runtime inside the engine: ``mm.load(..., stage_backend="onnxruntime", runtime="onnxruntime")``.

On the three demo models (copies in a temporary directory, so that the exports made beside them stay
there) the ORT-run stages give the engine's captions, image tokens (pixels within 1e-4: fp32) and
gesture tokens (poses within 1e-4 of their scale, as tests/test_onnx_export.py); the export is made
once and kept; a tampered kept export is made again (with a warning), a directory that is not an
export is never replaced; a checkpoint directory that cannot be written sends the export to
``$MMGEN_CACHE_DIR``; bad options are one-line errors; the CLI flags; mm.Engine serves ORT stages and
refuses the ORT runtime. The CUDA execution provider (I/O binding, torch's stream, ORT's CUDA
graphs) is tested on a GPU only (marked gpu).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmgen_engine as mm
from mmgen_engine.demo import gesture_world
from mmgen_engine.demo.world import HELD_OUT_SEED, sample
from mmgen_engine.onnx import backend, check_export
from mmgen_engine.onnx.manifest import checkpoint_identity

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4  # fp32, relative to the output's scale max(1, max|engine|), as tests/test_onnx_export.py
PROMPTS = ["a green square"]


def _copy(task: str, root: Path) -> Path:
    return Path(shutil.copytree(mm.demo_model(task), root / task))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``{task: (checkpoint copy, engine pipeline, pipeline with ORT stages)}``, and
    ``"captioning-ort"``: the captioner with its stages and decode loop on ORT (loaded first: its
    export, with the decoder parts, serves the stages-only load too)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for task in ("captioning", "text-to-image", "speech-to-gesture"):
        ckpt = _copy(task, root)
        if task == "captioning":
            out["captioning-ort"] = mm.load(ckpt, stage_backend="onnxruntime", runtime="onnxruntime")
        out[task] = (ckpt, mm.load(ckpt), mm.load(ckpt, stage_backend="onnxruntime"))
    return out


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().clamp(min=1)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=TOL, atol=TOL)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_ort_stages_give_the_engines_captions(demo):
    ckpt, engine, ort = demo["captioning"]
    assert ort.stage_backend == "onnxruntime" and ort.runtime == "engine"
    assert ort.onnx_dir == ckpt / "onnx" / "float32"  # beside the (writable) checkpoint
    assert type(ort.stages["image_encoder"]) is backend.OrtStage
    images = [image for image, _ in sample(6, HELD_OUT_SEED + 77)]
    assert ort.caption(images) == engine.caption(images)
    pixels = engine.preprocess(images)
    with torch.inference_mode():
        _close(ort.stages["image_encoder"](pixels), engine.model.encode(pixels))


def test_ort_runtime_gives_the_engines_greedy_captions(demo, monkeypatch):
    ckpt, engine, _ = demo["captioning"]
    both = demo["captioning-ort"]
    assert both.runtime == both.stage_backend == "onnxruntime" and engine.default_sampling.do_sample is False
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: pytest.fail("exported"))
    decoder_only = mm.load(ckpt, runtime="onnxruntime")  # the kept export has every part
    assert decoder_only.stage_backend == "engine" and decoder_only.onnx_dir == both.onnx_dir
    images = [image for image, _ in sample(6, HELD_OUT_SEED + 31)]
    want = engine.caption(images)
    assert both.caption(images) == want and decoder_only.caption(images) == want
    with pytest.raises(mm.InputError) as e:  # OrtGenerator's: greedy only
        both.caption(images[:1], sampling=mm.SamplingParams(do_sample=True, top_k=5))
    assert "greedy only" in _one_line(e)


def test_ort_stages_give_the_engines_images(demo):
    _, engine, ort = demo["text-to-image"]
    assert sorted(ort.stages) == ["detokenizer", "text_encoder"]
    text = engine.tokenize(PROMPTS)
    sampling = mm.SamplingParams(do_sample=True, top_k=256, guidance_scale=16.0, seed=5)
    tokens = ort.generate_tokens(text, sampling)
    assert torch.equal(tokens, engine.generate_tokens(text, sampling))
    _close(ort.decode_tokens(tokens), engine.decode_tokens(tokens))


def test_ort_stages_give_the_engines_poses(demo):
    _, engine, ort = demo["speech-to-gesture"]
    audio, _ = gesture_world.clip(gesture_world.HELD_OUT_SEED + 3, 3.0)
    rate = gesture_world.SAMPLE_RATE
    assert ort.generate_tokens(audio, rate) == engine.generate_tokens(audio, rate)
    _close(torch.from_numpy(ort.generate(audio, rate)), torch.from_numpy(engine.generate(audio, rate)))


def test_the_export_is_kept(demo, monkeypatch):
    ckpt, engine, _ = demo["captioning"]
    manifest = ckpt / "onnx" / "float32" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: calls.append(a))
    pipe = mm.load(ckpt, stage_backend="onnxruntime")
    assert calls == [] and manifest.stat().st_mtime_ns == before
    image = sample(1, HELD_OUT_SEED + 5)[0][0]
    assert pipe.caption([image]) == engine.caption([image])


def test_a_tampered_export_is_made_again(tmp_path):
    ckpt = _copy("captioning", tmp_path)
    out = mm.load(ckpt, stage_backend="onnxruntime").onnx_dir
    data = out / "image_encoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="exporting the ONNX parts again .*do not match"):
        pipe = mm.load(ckpt, stage_backend="onnxruntime")
    assert pipe.onnx_dir == out
    check_export(out, ckpt)  # whole again
    assert sorted(p.name for p in out.parent.iterdir()) == ["float32"]  # no temporary directory left
    image = sample(1, HELD_OUT_SEED + 9)[0][0]
    assert pipe.caption([image]) == mm.load(ckpt).caption([image])


def test_a_load_does_not_hash_unchanged_files_again(tmp_path, monkeypatch):
    """A kept export is checked against the hashes of its files and the checkpoint's recorded in the
    user's cache by stat (device, inode, size, mtime, ctime): a second load reads none of them; a file
    rewritten in place is hashed again even with its mtime put back (its ctime moved)."""
    from mmgen_engine.onnx import manifest

    monkeypatch.setenv("MMGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(manifest, "KNOWN_HASHES", manifest._KnownHashes())
    ckpt = _copy("captioning", tmp_path)
    out = mm.load(ckpt, stage_backend="onnxruntime").onnx_dir
    assert (tmp_path / "cache" / manifest.HASHES_FILE).is_file()
    monkeypatch.setattr(manifest, "KNOWN_HASHES", manifest._KnownHashes())  # a new process: from the file
    hashed = []
    real = manifest.sha256
    monkeypatch.setattr(manifest, "sha256", lambda path: hashed.append(Path(path).name) or real(path))
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: pytest.fail("exported"))
    assert mm.load(ckpt, stage_backend="onnxruntime").onnx_dir == out and hashed == []
    data = out / "image_encoder.onnx.data"
    stat, raw = data.stat(), bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only ctime tells
    with pytest.raises(mm.CheckpointError, match="do not match"):
        check_export(out, None, "image_encoder", known=True)
    assert "image_encoder.onnx.data" in hashed


def test_a_loader_that_finishes_second_keeps_the_first_export(demo, tmp_path, monkeypatch):
    """Concurrent loaders: each exports into its own temporary sibling and renames it into place; the
    rename of the second fails on the first's export, which it keeps when good and replaces when not."""
    ckpt, _, _ = demo["captioning"]
    made = ckpt / "onnx" / "float32"
    out = tmp_path / "onnx"
    shutil.copytree(made, out)
    monkeypatch.setattr(backend, "export_onnx", lambda src, tmp, **k: shutil.copytree(made, tmp, dirs_exist_ok=True))
    identity, before = checkpoint_identity(ckpt), (out / "manifest.json").stat().st_mtime_ns
    backend._export_into(ckpt, out, "float32", ["image_encoder"], identity)
    assert (out / "manifest.json").stat().st_mtime_ns == before  # the first one's, kept
    (out / "image_encoder.onnx.data").write_bytes(b"broken")
    backend._export_into(ckpt, out, "float32", ["image_encoder"], identity)
    check_export(out, ckpt)  # a broken first one is replaced
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # no temporary directory left


def test_an_export_of_another_dtype_or_checkpoint_is_not_used(demo, tmp_path):
    ckpt, _, _ = demo["captioning"]
    other = _copy("text-to-image", tmp_path)
    state, why = backend._state(ckpt / "onnx" / "float32", checkpoint_identity(other), "float32",
                                ["image_encoder"])
    assert state == "stale" and "another checkpoint" in why
    identity = checkpoint_identity(ckpt)
    assert backend._state(ckpt / "onnx" / "float32", identity, "float16", ["image_encoder"])[0] == "stale"
    assert backend._state(ckpt / "onnx" / "float32", identity, "float32", ["image_encoder"]) == ("good", "")


def test_an_onnx_dir_that_is_not_an_export_is_refused(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: pytest.fail("exported"))
    with pytest.raises(mm.InputError) as e:
        mm.load(mm.demo_model("captioning"), stage_backend="onnxruntime", onnx_dir=mine)
    assert "not an ONNX export" in _one_line(e)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_read_only_checkpoint_exports_to_the_cache(tmp_path, monkeypatch):
    ckpt = _copy("captioning", tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MMGEN_CACHE_DIR", str(cache))
    ckpt.chmod(0o555)
    try:
        if os.access(ckpt, os.W_OK):  # root writes anywhere: the permission check is what is tested
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ckpt else real(p, mode))
        pipe = mm.load(ckpt, stage_backend="onnxruntime")
    finally:
        ckpt.chmod(0o755)
    assert not (ckpt / "onnx").exists()
    assert pipe.onnx_dir.parent == cache / "onnx" and pipe.onnx_dir.name.endswith("-float32")
    check_export(pipe.onnx_dir, ckpt)
    calls = []
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: calls.append(a))
    assert mm.load(ckpt, stage_backend="onnxruntime").onnx_dir == pipe.onnx_dir and calls == []


def test_auto_runs_large_encoders_on_ort_and_leaves_small_ones(tmp_path, monkeypatch):
    """stage_backend="auto" (the default): ONNX Runtime for the stages of AUTO_CPU_STAGES from their
    measured size on, on CPU in float32 with the [onnx] extra installed; the engine otherwise."""
    ckpt = _copy("captioning", tmp_path)
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: pytest.fail("exported"))
    small = mm.load(ckpt)  # the demo encoder (~0.5M parameters) is below the measured size
    assert small.stage_backend == "engine" and small.onnx_dir is None and not (ckpt / "onnx").exists()
    monkeypatch.undo()
    measured = dict(backend.AUTO_CPU_STAGES)
    monkeypatch.setattr(backend, "AUTO_CPU_STAGES", {"image_encoder": (measured["image_encoder"][0], 1)})
    assert backend.auto_stages(mm.load(ckpt, dtype="float16")) == []  # float32 only
    pipe = mm.load(ckpt)
    assert pipe.stage_backend == "onnxruntime" and pipe.onnx_dir == ckpt / "onnx" / "float32"
    assert repr(pipe.stages["image_encoder"]).startswith("<OrtStage image_encoder")
    images = [image for image, _ in sample(3, HELD_OUT_SEED + 21)]
    assert pipe.caption(images) == mm.load(ckpt, stage_backend="engine").caption(images)
    q = mm.load(ckpt, quantize="int8")  # the float encoder of an int8 decoder runs on ORT too
    assert q.stage_backend == "onnxruntime" and q.caption(images) == mm.load(ckpt, quantize="int8",
                                                                            stage_backend="engine").caption(images)
    monkeypatch.setattr(backend, "AUTO_CPU_STAGES", {k: (v[0], 1) for k, v in measured.items()})
    t2i = mm.load(mm.demo_model("text-to-image"), stage_backend="engine")
    assert backend.auto_stages(t2i) == ["text_encoder"]  # not the detokenizer (not faster on ORT)
    real = backend.importlib.util.find_spec
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda m: None if m == "onnxscript" else real(m))
    assert mm.load(ckpt).stage_backend == "engine"  # without the [onnx] extra


def test_auto_falls_back_to_the_engine_with_a_warning(tmp_path, monkeypatch):
    ckpt = _copy("captioning", tmp_path)
    monkeypatch.setattr(backend, "AUTO_CPU_STAGES", {"image_encoder": (lambda name: True, 1)})

    def fail(*args, **kwargs):
        raise mm.MMGenError("no space left")

    monkeypatch.setattr(backend, "export_onnx", fail)
    with pytest.warns(UserWarning, match="keeps the engine's image_encoder .*no space left"):
        pipe = mm.load(ckpt)
    assert pipe.stage_backend == "engine" and pipe.onnx_dir is None
    assert not (ckpt / "onnx").exists()  # nothing left behind
    image = sample(1, HELD_OUT_SEED + 23)[0][0]
    assert pipe.caption([image]) == mm.load(ckpt, stage_backend="engine").caption([image])


@pytest.mark.parametrize("options, message", [
    ({"stage_backend": "ort"}, "stage_backend must be one of 'auto', 'engine', 'onnxruntime'"),
    ({"runtime": None}, "runtime must be one of"),
    ({"stage_backend": "onnxruntime", "onnx_dir": 3}, "onnx_dir must be a directory path"),
    ({"onnx_dir": "somewhere"}, "onnx_dir is used with stage_backend='onnxruntime' or runtime='onnxruntime' only"),
    ({"stage_backend": "onnxruntime", "dtype": "bfloat16"}, "no bfloat16 MatMul"),
])
def test_bad_options_are_one_line_errors(options, message, monkeypatch):
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: pytest.fail("exported"))
    with pytest.raises(mm.InputError) as e:
        mm.load(mm.demo_model("captioning"), **options)
    assert message in _one_line(e)


def test_cuda_without_onnxruntime_gpu_names_the_extra(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(mm.MMGenError) as e:
        backend.require_provider(torch.device("cuda"))
    assert "[onnx-gpu] extra" in _one_line(e)
    backend.require_provider(torch.device("cpu"))


def test_output_dims_follow_the_inputs():
    assert backend.output_dim("8*grid_height", {"grid_height": 3, "batch": 2}) == 24
    assert backend.output_dim("batch", {"batch": 5}) == 5 and backend.output_dim(7, {}) == 7
    with pytest.raises(mm.CheckpointError) as e:
        backend.output_dim("__import__('os')", {"batch": 1})
    assert "not an expression of the input dimensions" in _one_line(e)


def _fake_runtime(pipe):
    """``pipe`` with another decode loop (one that yields nothing) in place of the engine's."""
    pipe.use_runtime(lambda *args, **options: iter(()), "onnxruntime")
    return pipe


def test_beam_search_with_another_runtime_is_refused_before_encoding():
    pipe = _fake_runtime(mm.load(mm.demo_model("captioning")))
    pipe.stages["image_encoder"] = lambda x: pytest.fail("encoded")
    with pytest.raises(mm.InputError) as e:
        pipe.caption([sample(1, HELD_OUT_SEED)[0][0]], sampling=mm.SamplingParams(num_beams=3))
    assert "num_beams=1" in _one_line(e)


def test_the_engine_serves_ort_stages_and_refuses_the_ort_runtime(demo):
    _, engine, ort = demo["captioning"]
    image = np.asarray(sample(1, HELD_OUT_SEED + 11)[0][0])
    with mm.Engine(ort, slots=2) as served:
        assert served.submit(mm.CaptionRequest(image)).result(timeout=60) == engine.caption([image])[0]
    with pytest.raises(mm.InputError) as e:
        mm.Engine(_fake_runtime(mm.load(mm.demo_model("captioning"))))
    assert "runtime='engine'" in _one_line(e)


def test_cli_stage_backend(demo, tmp_path):
    ckpt, engine, _ = demo["captioning"]
    image = sample(1, HELD_OUT_SEED + 13)[0][0]
    image.save(tmp_path / "scene.png")
    cli = [sys.executable, "-m", "mmgen_engine.cli", "caption", str(tmp_path / "scene.png"), "--model"]
    kept = ckpt / "onnx" / "float32"  # the fixture's export, given as --onnx-dir: used as it is
    before = (kept / "manifest.json").stat().st_mtime_ns
    r = subprocess.run([*cli, str(ckpt), "--stage-backend", "onnxruntime", "--onnx-dir", str(kept)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == engine.caption([image])[0]
    assert (kept / "manifest.json").stat().st_mtime_ns == before
    r = subprocess.run([*cli, str(ckpt), "--runtime", "tensorrt"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid choice: 'tensorrt'" in r.stderr
    r = subprocess.run([*cli, str(ckpt), "--onnx-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "onnx_dir is used with" in r.stderr


@pytest.mark.gpu
def test_cuda_execution_provider(demo):
    """ORT's CUDA provider on the torch tensors' memory: the engine's captions and states."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (the [onnx-gpu] extra)")
    ckpt, _, _ = demo["captioning"]
    engine = mm.load(ckpt, device="cuda")
    images = [image for image, _ in sample(4, HELD_OUT_SEED + 21)]
    pixels = engine.preprocess(images).cuda()
    for graphs in (False, True):
        ort = mm.load(ckpt, device="cuda", stage_backend="onnxruntime", cuda_graphs=graphs)
        assert ort.caption(images) == engine.caption(images)
        stage = ort.stages["image_encoder"]
        for batch in (1, 3, 1):  # a second call of a shape replays ORT's graph where it made one
            with torch.inference_mode():
                got, want = stage(pixels[:batch]), engine.model.encode(pixels[:batch])
            assert got.device == want.device
            _close(got, want)
