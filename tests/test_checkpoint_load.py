"""Loading checks an engine checkpoint fully before allocating anything: config.json's bounds, types
and nesting, the weights' headers against the config (before any module is built), a memory
estimate, NaN/inf weights and the tokenizer against the vocabulary. Each failure is one
CheckpointError line naming the file and field."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import cli_error
from tokenizers import Tokenizer, models

import mmgen_engine as mm
import mmgen_engine.checkpoint as checkpoint
from mmgen_engine import CheckpointError
from mmgen_engine.checkpoint import is_checkpoint, load_model, read_config, read_header, read_json
from mmgen_engine.config import CaptioningConfig, from_dict

DEMO_VOCAB = 316  # the demo captioner's decoder vocabulary; its start, eos and pad id is 0


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A copy of the demo captioning checkpoint."""
    return Path(shutil.copytree(mm.demo_model("captioning"), tmp_path / "ckpt"))


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "img.png"
    PIL.Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(path)
    return path


def edit_config(ckpt: Path, edit) -> dict:
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    return config


def write_tokenizer(ckpt: Path, ids) -> None:
    Tokenizer(models.WordLevel({f"t{i}": i for i in ids}, unk_token=f"t{min(ids)}")).save(str(ckpt / "tokenizer.json"))


# --- config.json ---------------------------------------------------------------------------------

def test_a_huge_layer_count_is_refused_before_anything_is_built(ckpt, image_file, capsys):
    """10**5 decoder layers used to be built (on the meta device) before any check: minutes and 3-6 GB
    until the process was killed. Now the bound refuses it at once, in a process that stays small."""
    edit_config(ckpt, lambda c: c["decoder"].update(num_layers=10 ** 5))
    # VmHWM, not ru_maxrss: the latter carries the parent's (this test run's) peak over fork and exec
    code = ("import sys, mmgen_engine as mm\n"
            "try:\n    mm.load(sys.argv[1])\nexcept mm.CheckpointError as e:\n    print(e)\n"
            "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))")
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=120)
    message, peak_kib = proc.stdout.strip().splitlines()
    assert "config.json.decoder.num_layers" in message and "less than or equal to 512" in message, proc.stderr
    assert int(peak_kib) < 1024 ** 2, f"peak RSS {int(peak_kib) // 1024} MiB"
    assert "num_layers" in cli_error(capsys, ["caption", image_file, "--model", ckpt])


def test_more_blocks_than_tensors_is_refused_before_building(ckpt):
    """Within the bounds, a config describing more layers than the weights hold tensors is refused
    from the header alone: the model is never built."""
    config = from_dict(CaptioningConfig, edit_config(ckpt, lambda c: c["decoder"].update(num_layers=500)))

    def build(*args, **kwargs):
        raise AssertionError("the model was built")

    with pytest.raises(CheckpointError, match="describes 504 layers and blocks, but the weights hold only 120 tensors"):
        load_model(ckpt, config, build, torch.device("cpu"))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["decoder"].update(hidden_size=2 ** 40), r"decoder.hidden_size: .*less than or equal to 131072"),
    (lambda c: c["decoder"].update(vocab_size=2 ** 70), r"decoder.vocab_size: .*less than or equal to 1048576"),
    (lambda c: c["encoder"].update(image_size=-(2 ** 64)), r"encoder.image_size: .*greater than 0"),
    (lambda c: c["generation"].update(eos_token_id=2 ** 63), r"generation.eos_token_id: .*less than 1048576"),
    (lambda c: c["preprocess"].update(image_mean=[0.5] * 4), r"preprocess.image_mean: .*at most 3 items"),
    (lambda c: c["preprocess"].update(image_std=[0.5, 0.0, 0.5]), r"preprocess.image_std\[1\]: .*greater than 0"),
    (lambda c: c["decoder"].update(activation="relu"), r"decoder.activation: Input should be 'gelu'"),
    (lambda c: c["decoder"].update(tie_word_embeddings=1), r"decoder.tie_word_embeddings: .*valid boolean"),
    (lambda c: c["decoder"].pop("num_heads"), r"decoder: missing field 'num_heads'"),
])
def test_out_of_range_and_mistyped_values(ckpt, edit, match):
    """A width of 2**40 used to reach torch ("Storage size calculation overflowed"), an integer past
    int64 a TypeError: now every size is bounded and typed, with the bound in the message."""
    edit_config(ckpt, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        mm.load(ckpt)
    assert "\n" not in str(e.value) and str(ckpt / "config.json") in str(e.value)


@pytest.mark.parametrize("field", [("decoder", "layer_norm_eps"), ("encoder", "layer_norm_eps"),
                                   ("preprocess", "rescale_factor"), ("preprocess", "image_mean"),
                                   ("preprocess", "image_std")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(ckpt, field, value):
    """NaN and infinite floats used to be accepted and gave degenerate captions. In config.json they
    are not JSON numbers at all; given as Python floats, the schema refuses them."""
    part, name = field
    config = json.loads((ckpt / "config.json").read_text())
    config[part][name] = [0.5, value, 0.5] if name.startswith("image_") else value
    (ckpt / "config.json").write_text(json.dumps(config))  # writes NaN / Infinity
    with pytest.raises(CheckpointError, match="not valid JSON .*is not a JSON number"):
        mm.load(ckpt)
    with pytest.raises(CheckpointError, match=rf"{part}.{name}(\[1\])?: Input should be a finite number"):
        from_dict(CaptioningConfig, config, "config.json")


def test_numbers_out_of_float_range_are_refused(ckpt):
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace('"rescale_factor": 0.00392156862745098', '"rescale_factor": 1e999'))
    with pytest.raises(CheckpointError, match="not valid JSON .*1e999 is out of range"):
        mm.load(ckpt)


def test_deep_nesting_is_refused_before_parsing(ckpt, image_file, capsys):
    """A deeply nested array used to raise RecursionError from the JSON parser."""
    (ckpt / "config.json").write_text('{"format": "mmgen", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested deeper than the limit of 32 levels"):
        mm.load(ckpt)
    assert "nested deeper" in cli_error(capsys, ["caption", image_file, "--model", ckpt])
    assert not is_checkpoint(ckpt)
    # brackets inside strings do not count
    (ckpt / "config.json").write_text(json.dumps({"format": "mmgen", "note": "[" * 100}))
    assert is_checkpoint(ckpt)


def test_oversized_json_is_refused(ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_JSON_BYTES", 1000)
    with pytest.raises(CheckpointError, match="larger than the limit of 1000 bytes"):
        read_config(ckpt)


# --- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused(ckpt, value, image_file, capsys):
    """A checkpoint of NaN weights used to load and caption ''."""
    state = load_file(str(ckpt / "model.safetensors"))
    state["decoder.ln_f.weight"][3] = value
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'decoder.ln_f.weight' holds NaN or infinite values"):
        mm.load(ckpt)
    assert "decoder.ln_f.weight" in cli_error(capsys, ["caption", image_file, "--model", ckpt])


def test_large_finite_weights_whose_sum_overflows_load(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    state["decoder.ln_f.weight"][:2] = 3e38
    save_file(state, str(ckpt / "model.safetensors"))
    assert mm.load(ckpt).model.decoder.ln_f.weight[0] == 3e38


def test_a_header_over_the_limit_is_refused_unread(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes((2 ** 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated .*header of 1099511627776 bytes is over the limit"):
        mm.load(ckpt)


def test_the_memory_estimate_comes_before_building(ckpt, monkeypatch):
    """The bytes the weights take at the load dtype come from the header: over the limit, nothing is
    built or read. float32 weights loaded as bfloat16 take half."""
    total = sum(t.nbytes for t in read_header(ckpt / "model.safetensors").values())
    monkeypatch.setattr(checkpoint, "MAX_MODEL_BYTES", total - 1)
    with pytest.raises(CheckpointError, match=f"weights need {total:,} bytes, more than the limit of {total - 1:,}"):
        mm.load(ckpt)
    monkeypatch.setenv("MMGEN_CPU_BF16_COMPUTE", "bfloat16")  # the whole model in bf16 (CPU default: bf16 storage)
    assert mm.load(ckpt, dtype="bfloat16").model.decoder.wte.dtype == torch.bfloat16


def test_the_header_is_checked_against_the_config(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    state["decoder.extra"] = torch.zeros(2)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor.*decoder.extra"):
        mm.load(ckpt)


# --- tokenizer -----------------------------------------------------------------------------------

def test_a_tokenizer_far_smaller_than_the_vocabulary_is_refused(ckpt, image_file, capsys):
    """A valid 3-token tokenizer.json for the 316-token decoder used to load and caption ''."""
    write_tokenizer(ckpt, range(3))
    with pytest.raises(CheckpointError, match="3 tokens, less than 50% of the model's vocabulary of 316"):
        mm.load(ckpt)
    assert "tokenizer.json" in cli_error(capsys, ["caption", image_file, "--model", ckpt])


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(ckpt):
    write_tokenizer(ckpt, range(DEMO_VOCAB + 4))
    with pytest.raises(CheckpointError, match="ids outside the model's vocabulary of 316"):
        mm.load(ckpt)


def test_the_special_tokens_must_exist(ckpt):
    write_tokenizer(ckpt, range(1, DEMO_VOCAB))
    with pytest.raises(CheckpointError, match="no token for decoder_start_token_id 0"):
        mm.load(ckpt)


def test_a_tokenizer_a_little_smaller_than_a_padded_vocabulary_loads(ckpt):
    """Models pad their vocabulary (GPT-2's 50257 tokens to 50304): a tokenizer covering most of it
    is fine, as in Hugging Face."""
    write_tokenizer(ckpt, range(DEMO_VOCAB - 20))
    assert mm.load(ckpt).tokenizer.get_vocab_size() == DEMO_VOCAB - 20


def test_the_text_to_image_vocabulary_is_checked(tmp_path):
    ckpt = Path(shutil.copytree(mm.demo_model("text-to-image"), tmp_path / "t2i"))
    vocab = json.loads((ckpt / "vocab.json").read_text())
    vocab["extra"] = 500
    (ckpt / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match="vocab.json: .* ids outside the model's vocabulary of 141"):
        mm.load(ckpt)


def test_a_fifo_among_the_checkpoint_files_is_refused_without_blocking(tmp_path):
    """A FIFO named like a weights file or a JSON file would block the open (or be read forever)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mm.demo_model("captioning"), ckpt)
    os.mkfifo(ckpt / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra.safetensors: not a regular file \(a FIFO"):
        mm.load(ckpt)
    (ckpt / "extra.safetensors").unlink()
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        mm.load(ckpt)


def test_a_min_dalle_vocabulary_with_a_non_integer_id_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mm.demo_model("text-to-image"), ckpt)
    vocab = json.loads((ckpt / "vocab.json").read_text())
    (ckpt / "vocab.json").write_text(json.dumps({**vocab, "zzz": [1]}))
    with pytest.raises(CheckpointError, match="not a min-dalle vocabulary"):
        mm.load(ckpt)


def test_an_unterminated_string_in_a_json_file_is_refused_quickly(tmp_path):
    """The nesting pre-check strips strings with a regex; an unterminated one must not make it
    backtrack over the rest of the file (60 KB took 10 s, the 16 MiB limit would take days)."""
    path = tmp_path / "config.json"
    path.write_text('"' + '\\"' * 200_000)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_json(path)
    assert time.perf_counter() - start < 30  # a hang guard, not a timing: the old regex took minutes here


def test_a_token_grid_beyond_the_new_token_limit_is_refused_at_load(tmp_path):
    """A 65x65 grid (4225 image tokens) passes the schema but could never be generated: refused at
    load, not at every call as a max_new_tokens the caller never set."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mm.demo_model("text-to-image"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["generation"]["grid_size"], config["decoder"]["max_positions"] = 65, 65 ** 2
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="65x65 token grid is 4225 image tokens, over the limit of 4096"):
        mm.load(ckpt)
