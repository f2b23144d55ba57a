"""Property-based fuzzing of what loading and conversion read from untrusted files: config.json
(random JSON, and mutations of a valid config), the safetensors header of a tiny converted
checkpoint (random fields, entries, bytes, lengths, truncations) and format detection (random and
damaged weights files). Whatever the input, the only exceptions are MMGenError subclasses, and no
example takes long."""
from __future__ import annotations

import io
import json
import shutil
import struct
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hf_models import make_model, save
from hypothesis import given
from hypothesis import strategies as st

import mmgen_engine as mm
from mmgen_engine import MMGenError

SLOW = 30  # seconds: an example taking longer counts as a hang

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
# values near the valid ones: small and boundary integers, lists of them
near_values = (st.integers(-2, 2 ** 20 + 2) | st.sampled_from([0, -1, 2 ** 31, 2 ** 63, 2 ** 64, 1.5, True, "1"])
               | st.lists(st.integers(-1, 2 ** 64), max_size=4))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny converted captioning checkpoint (ViT + GPT-2, a few hundred kB)."""
    root = tmp_path_factory.mktemp("fuzz")
    return mm.convert(save(make_model(seed=5), root / "hf"), root / "engine")


def load_outcome(ckpt: Path) -> None:
    """Load ``ckpt``: success or an MMGenError, quickly; anything else fails the example."""
    start = time.monotonic()
    try:
        mm.load(ckpt)
    except MMGenError:
        pass
    assert time.monotonic() - start < SLOW


def paths(value, prefix=()):
    """Every position in a JSON value: ``(key or index, ...)`` tuples, the root first."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths(child, (*prefix, key))


def mutate(value, path, action, new):
    """``value`` with ``new`` put at ``path`` ("replace"), the item there removed ("delete"), or
    ``new`` added under an unknown key of the object there ("add")."""
    if not path:
        return new if action == "replace" else value
    *parent_path, last = path
    parent = value
    for key in parent_path:
        parent = parent[key]
    if action == "replace":
        parent[last] = new
    elif action == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last]["unexpected_field"] = new
    return value


@given(value=json_values)
def test_random_json_configs(base, value):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(shutil.copytree(base, Path(tmp) / "ckpt"))
        (ckpt / "config.json").write_text(json.dumps(value))
        with pytest.raises(MMGenError):
            mm.load(ckpt)


@given(data=st.data())
def test_mutated_configs(base, data):
    config = json.loads((base / "config.json").read_text())
    path = data.draw(st.sampled_from(list(paths(config))), label="path")
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    new = data.draw(json_values | near_values, label="value")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(shutil.copytree(base, Path(tmp) / "ckpt"))
        (ckpt / "config.json").write_text(json.dumps(mutate(config, path, action, new)))
        load_outcome(ckpt)


@given(data=st.data())
def test_mutated_safetensors_headers(base, data):
    raw = (base / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    kind = data.draw(st.sampled_from(["field", "entry", "bytes", "length", "truncate"]), label="kind")
    if kind == "field":
        name = data.draw(st.sampled_from(sorted(header)), label="tensor")
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
        new = data.draw(json_values | near_values | st.sampled_from(["F16", "BF16", "I64", "F8_E4M3", "U64"]))
        if isinstance(header[name], dict) and name != "__metadata__":
            header[name][field] = new
        else:
            header[name] = new
    elif kind == "entry":
        name = data.draw(st.sampled_from(sorted(header)), label="tensor")
        if data.draw(st.booleans(), label="delete"):
            del header[name]
        else:
            header[data.draw(st.text(max_size=20), label="new name")] = data.draw(json_values, label="entry")
    if kind in ("field", "entry"):
        head = json.dumps(header).encode()
        raw = struct.pack("<Q", len(head)) + head + body
    elif kind == "bytes":
        for _ in range(data.draw(st.integers(1, 4), label="count")):
            at = data.draw(st.integers(0, 8 + n - 1), label="offset")
            raw = raw[:at] + bytes([data.draw(st.integers(0, 255), label="byte")]) + raw[at + 1:]
    elif kind == "length":
        raw = struct.pack("<Q", data.draw(st.integers(0, 2 ** 64 - 1), label="length")) + raw[8:]
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(shutil.copytree(base, Path(tmp) / "ckpt"))
        (ckpt / "model.safetensors").write_bytes(raw)
        load_outcome(ckpt)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory) -> list[bytes]:
    """A small ``torch.save`` zip of a state dict (its members stored), and the same members deflated."""
    path = tmp_path_factory.mktemp("torchfile") / "state.pt"
    torch.save({f"decoder.up.{i}.block.0.conv1.weight": torch.randn(4, 4) for i in range(3)}, path)
    deflated = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return [path.read_bytes(), deflated.getvalue()]


@given(prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]),
       rest=st.binary(max_size=200))
def test_random_weights_files_in_format_detection(prefix, rest):
    convert_outcome(prefix + rest)


@given(data=st.data())
def test_damaged_torch_files_in_format_detection(torch_files, data):
    raw = bytearray(data.draw(st.sampled_from(torch_files), label="file"))
    for _ in range(data.draw(st.integers(1, 8), label="count")):
        raw[data.draw(st.integers(0, len(raw) - 1), label="offset")] = data.draw(st.integers(0, 255), label="byte")
    convert_outcome(bytes(raw[:data.draw(st.integers(1, len(raw)), label="cut")]))


def convert_outcome(content: bytes) -> None:
    """Convert a file holding ``content`` with format detection: ConversionError (or success)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "weights.bin"
        src.write_bytes(content)
        start = time.monotonic()
        try:
            mm.convert(src, Path(tmp) / "out")
        except MMGenError:
            pass
        assert time.monotonic() - start < SLOW
