"""Bad input: each case is one clear line from the CLI with a non-zero exit, and a specific
exception type from Python. Nothing is left half-written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from hf_models import IMAGE, make_model, save

import mmgen_engine as mm
from mmgen_engine import CheckpointError, ConversionError, InputError, SamplingParams
from mmgen_engine.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save(make_model(seed=9), tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def engine_dir(hf_dir, tmp_path_factory):
    return mm.convert(hf_dir, tmp_path_factory.mktemp("engine") / "ckpt")


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def copy_dir(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edited_copy(src, tmp_path, edit, file="config.json"):
    """A copy of directory ``src`` whose JSON ``file`` went through ``edit(dict)``."""
    dst = copy_dir(src, tmp_path)
    data = json.loads((dst / file).read_text())
    edit(data)
    (dst / file).write_text(json.dumps(data))
    return dst


def cli_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("mmgen: error: "), err
    assert "Traceback" not in err
    return err


# --- checkpoints ---------------------------------------------------------------------------------

def test_truncated_weights(engine_dir, tmp_path, capsys, image_file):
    bad = copy_dir(engine_dir, tmp_path)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        mm.load(bad)
    assert "corrupt or truncated" in cli_error(capsys, ["caption", image_file, "--model", bad])


def test_garbage_weights(engine_dir, tmp_path):
    bad = copy_dir(engine_dir, tmp_path)
    (bad / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        mm.load(bad)


def test_missing_files(engine_dir, tmp_path, capsys, image_file):
    for name, match in [("config.json", "no config.json"), ("model.safetensors", "no \\*.safetensors"),
                        ("tokenizer.json", "no tokenizer.json")]:
        bad = copy_dir(engine_dir, tmp_path, name)
        (bad / name).unlink()
        with pytest.raises(CheckpointError, match=match):
            mm.load(bad)
    assert "not a checkpoint directory" in cli_error(capsys, ["caption", image_file, "--model", tmp_path / "nope"])


def test_future_format_version(engine_dir, tmp_path, capsys, image_file):
    bad = edited_copy(engine_dir, tmp_path, lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="newer than this mmgen_engine"):
        mm.load(bad)
    assert "format_version 99" in cli_error(capsys, ["caption", image_file, "--model", bad])


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(format="other"), "not an mmgen checkpoint"),
    (lambda c: c.update(task="painting"), "unknown task"),
    (lambda c: c["decoder"].update(num_heads="4"), "num_heads: Input should be a valid integer"),
    (lambda c: c["decoder"].update(num_heads=5), "not divisible"),
    (lambda c: c["encoder"].update(colour=1), "unknown field"),
    (lambda c: c["generation"].update(eos_token_id=10_000), "outside the vocabulary"),
])
def test_invalid_config(engine_dir, tmp_path, edit, match):
    bad = edited_copy(engine_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        mm.load(bad)


def test_shape_mismatch(engine_dir, tmp_path, capsys, image_file):
    bad = edited_copy(engine_dir, tmp_path, lambda c: c["decoder"].update(vocab_size=c["decoder"]["vocab_size"] + 1))
    with pytest.raises(CheckpointError, match="has shape .* the config implies"):
        mm.load(bad)
    assert "has shape" in cli_error(capsys, ["caption", image_file, "--model", bad])


def test_unconverted_hf_directory_is_refused(hf_dir, image_file, capsys):
    assert "convert" in cli_error(capsys, ["caption", image_file, "--model", hf_dir])


def test_invalid_load_options(engine_dir):
    with pytest.raises(InputError, match="dtype"):
        mm.load(engine_dir, dtype="float64")
    with pytest.raises(InputError, match="device"):
        mm.load(engine_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            mm.load(engine_dir, device="cuda")


# --- conversion ----------------------------------------------------------------------------------

def test_unsupported_architecture(hf_dir, tmp_path, capsys):
    bad = edited_copy(hf_dir, tmp_path, lambda c: c["decoder"].update(model_type="bert"))
    with pytest.raises(ConversionError, match="unsupported VisionEncoderDecoder"):
        mm.convert(bad, tmp_path / "out")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "unrecognized or unsupported" in cli_error(capsys, ["convert", other, tmp_path / "out2"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_missing_and_unused_source_tensors(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    for change, match in [("drop", "missing tensor"), ("extra", "unused tensor")]:
        bad = copy_dir(hf_dir, tmp_path, change)
        state = load_file(str(bad / "model.safetensors"))
        if change == "drop":
            del state["decoder.transformer.h.1.mlp.c_fc.weight"]
        else:
            state["decoder.transformer.h.7.mlp.c_fc.weight"] = torch.zeros(2)
        save_file(state, str(bad / "model.safetensors"))
        with pytest.raises(ConversionError, match=match):
            mm.convert(bad, tmp_path / f"out_{change}")


def test_corrupt_source_weights(hf_dir, tmp_path, capsys):
    bad = copy_dir(hf_dir, tmp_path)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert "corrupt or truncated" in cli_error(capsys, ["convert", bad, tmp_path / "out"])
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ConversionError, match="corrupt or truncated PyTorch file"):
        mm.convert(bad, tmp_path / "out")


class Payload:
    """An arbitrary class: unpickling it would run import machinery of the file's choosing."""


def test_pickled_objects_are_refused(hf_dir, tmp_path):
    bad = copy_dir(hf_dir, tmp_path)
    (bad / "model.safetensors").unlink()
    torch.save({"weights": {"a": torch.zeros(1)}, "payload": Payload()}, bad / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="refused to load"):
        mm.convert(bad, tmp_path / "out")


def test_existing_output_is_kept(hf_dir, engine_dir, tmp_path, capsys):
    out = copy_dir(engine_dir, tmp_path, "existing")
    before = sorted(p.name for p in out.iterdir())
    assert "already exists" in cli_error(capsys, ["convert", hf_dir, out])
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["convert", str(hf_dir), str(out), "--overwrite"]) == 0
    mm.load(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".existing")]


def test_bad_source_format_and_missing_source(hf_dir, tmp_path, capsys):
    assert "unknown source format" in cli_error(capsys, ["convert", hf_dir, tmp_path / "o", "--from", "onnx"])
    assert "not found" in cli_error(capsys, ["convert", tmp_path / "missing", tmp_path / "o"])


# --- requests ------------------------------------------------------------------------------------

def test_unreadable_and_non_image_files(engine_dir, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    truncated = tmp_path / "cut.png"
    PIL.Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    pipe = mm.load(engine_dir)
    for path in (text, truncated, tmp_path / "absent.jpg"):
        with pytest.raises(InputError):
            pipe.caption([path])
        cli_error(capsys, ["caption", path, "--model", engine_dir])
    with pytest.raises(InputError, match="HxWx3 uint8"):
        pipe.caption([np.zeros((4, 4), dtype=np.float32)])
    with pytest.raises(InputError, match="unsupported image input"):
        pipe.caption([42])
    with pytest.raises(InputError, match="no images"):
        pipe.caption([])


def test_out_of_range_options(engine_dir, image_file, capsys):
    pipe = mm.load(engine_dir)
    px = torch.zeros(1, 3, IMAGE, IMAGE)
    for n in (0, -3, 10_000):
        with pytest.raises(InputError, match="max_new_tokens"):
            pipe.generate_ids(px, n)
    with pytest.raises(InputError, match="min_new_tokens"):
        pipe.generate_ids(px, 4, min_new_tokens=5)
    with pytest.raises(InputError, match="pixel_values"):
        pipe.generate_ids(torch.zeros(1, 3, IMAGE + 1, IMAGE), 4)
    with pytest.raises(InputError, match="guidance"):
        pipe.generate_ids(px, 4, sampling=SamplingParams(guidance_scale=2.0))
    assert "max_new_tokens" in cli_error(capsys, ["caption", image_file, "--model", engine_dir,
                                                  "--max-new-tokens", "-1"])
    assert "exceeds the model's" in cli_error(capsys, ["caption", image_file, "--model", engine_dir,
                                                       "--max-new-tokens", "1000"])
    assert "max_new_tokens must be an integer in [1, 4096]" in cli_error(
        capsys, ["caption", image_file, "--model", engine_dir, "--max-new-tokens", "100000"])


def test_cli_process_exit_code_and_single_line(engine_dir, tmp_path):
    """The installed entry point: real process, real exit status, no traceback."""
    text = tmp_path / "x.txt"
    text.write_text("no image")
    proc = subprocess.run([sys.executable, "-m", "mmgen_engine.cli", "caption", str(text), "--model", str(engine_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unreadable image" in proc.stderr


def test_wrong_tensor_dtype_in_checkpoint(engine_dir, tmp_path, capsys, image_file):
    from safetensors.torch import load_file, save_file
    bad = copy_dir(engine_dir, tmp_path)
    state = load_file(str(bad / "model.safetensors"))
    state["decoder.ln_f.weight"] = state["decoder.ln_f.weight"].half()
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.ln_f.weight.*float16, expected float32"):
        mm.load(bad)
    state["decoder.ln_f.weight"] = state["decoder.ln_f.weight"].to(torch.int32)
    save_file(state, str(bad / "model.safetensors"))
    assert "expected float32" in cli_error(capsys, ["caption", image_file, "--model", bad])


def test_overwrite_never_replaces_other_directories(hf_dir, tmp_path, capsys):
    src = copy_dir(hf_dir, tmp_path, "src")
    with pytest.raises(ConversionError, match="replace the source"):
        mm.convert(src, src, overwrite=True)
    with pytest.raises(ConversionError, match="replace the source"):
        mm.convert(src, tmp_path, overwrite=True)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    assert "not an mmgen checkpoint" in cli_error(capsys, ["convert", src, other, "--overwrite"])
    assert (other / "holiday.jpg").read_bytes() == b"precious" and (src / "config.json").is_file()


def test_unwritable_output_is_one_line(hf_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot create the output directory" in cli_error(capsys, ["convert", hf_dir, blocker / "sub"])
    with pytest.raises(ConversionError):
        mm.convert(hf_dir, blocker / "sub")


def test_usage_errors_are_one_line(engine_dir, image_file):
    for argv in (["caption", str(image_file), "--model", str(engine_dir), "--dtype", "float64"],
                 ["caption", str(image_file), "--model", str(engine_dir), "--max-new-tokens", "abc"],
                 ["frobnicate"]):
        proc = subprocess.run([sys.executable, "-m", "mmgen_engine.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "error:" in proc.stderr, proc.stderr


@pytest.mark.parametrize("file,edit,match", [
    ("config.json", lambda c: c["encoder"].update(num_hidden_layers="2"), "num_layers: Input should be a valid int"),
    ("config.json", lambda c: c.update(encoder=[1, 2]), "encoder"),
    ("config.json", lambda c: c["decoder"].update(n_embd=40), "has shape"),
    ("preprocessor_config.json", lambda c: c.update(size={"height": 48, "width": 48}), "makes 48x48 images"),
])
def test_inconsistent_source_config(hf_dir, tmp_path, file, edit, match):
    bad = edited_copy(hf_dir, tmp_path, edit, file)
    with pytest.raises(ConversionError, match=match):
        mm.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
