"""The manifest of an ONNX export (``manifest.json``) and the checks that pair an export with its files
and its checkpoint.

``{"format": "mmgen-onnx", "format_version": 1, "task", "dtype", "checkpoint": {file: sha256} (the
checkpoint's config.json and model.safetensors), "parts": {name: {"file", "stage" (the engine call it
replaces), "opset", "inputs" / "outputs": [{"name", "shape" (ints; symbolic dimensions by name or
expression, "batch" first, e.g. "past_len + 1"), "dtype"}], "files": {file: {"bytes", "sha256"}}
(the .onnx and its external data)}}, "decoder": {...}}``. ``decoder``, present when a decoder part
is exported: ``{"kind": "cross" | "prefix", "num_layers", "num_kv_heads", "head_dim",
"max_positions", "vocab_size", "prefix_length" (GIT's fixed prefix, else null)}``; the decoder
parts' inputs and outputs are named as :mod:`mmgen_engine.onnx` describes (``past_key_values.{i}.key``,
``present.{i}.key``, ``present.{i}.encoder.key``, ...).
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_json
from ..errors import CheckpointError, InputError, MMGenError, one_line

FORMAT_NAME = "mmgen-onnx"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


def require(module: str):
    """``module`` of the ``[onnx]`` extra, or a one-line MMGenError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MMGenError(f"ONNX export and ONNX Runtime need the [onnx] extra ({module} is not installed): "
                         f"pip install 'mmgen-engine[onnx]'") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_identity(checkpoint_dir: Path) -> dict[str, str]:
    """``{file: sha256}`` of the checkpoint's config and weights: what an export was made from."""
    try:
        return {name: sha256(checkpoint_dir / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    except OSError as e:
        raise CheckpointError(f"{checkpoint_dir}: cannot read the checkpoint ({one_line(e)})") from None


def read_manifest(out_dir) -> dict:
    """The checked ``manifest.json`` of an export directory (CheckpointError if missing, unreadable or of
    another format or version)."""
    out = Path(out_dir)
    manifest = read_json(out / MANIFEST_FILE)
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME
            or not isinstance(manifest.get("parts"), dict) or not isinstance(manifest.get("checkpoint"), dict)):
        raise CheckpointError(f"{out / MANIFEST_FILE}: not an mmgen ONNX export manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{out / MANIFEST_FILE}: export format version {manifest.get('format_version')!r}; "
                              f"this engine reads version {FORMAT_VERSION} (export again)")
    return manifest


def check_export(out_dir, checkpoint_dir=None, part: str | None = None) -> dict:
    """The manifest of ``out_dir`` after checking that ``part``'s files (every part's with None) have
    the recorded sizes and SHA-256, and, given ``checkpoint_dir``, that the export was made from
    that checkpoint. Any mismatch is a one-line CheckpointError."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    names = list(manifest["parts"]) if part is None else [part]
    for name in names:
        entry = manifest["parts"].get(name)
        if not isinstance(entry, dict):
            raise InputError(f"{out}: no part {name!r} in this export; it has {', '.join(manifest['parts']) or 'none'}")
        files = entry.get("files")
        if not isinstance(files, dict) or entry.get("file") not in files:
            raise CheckpointError(f"{out / MANIFEST_FILE}: part {name!r} lists no files")
        for file, want in files.items():
            path = out / file
            if not isinstance(want, dict) or Path(file).name != file:
                raise CheckpointError(f"{out / MANIFEST_FILE}: part {name!r} lists {file!r} without a size and hash")
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE})")
            size = path.stat().st_size
            if size != want.get("bytes") or sha256(path) != want.get("sha256"):
                raise CheckpointError(f"{path}: {size} bytes that do not match {MANIFEST_FILE} "
                                      f"({want.get('bytes')} bytes, sha256 {str(want.get('sha256'))[:12]}...): "
                                      f"truncated or modified; export again")
    if checkpoint_dir is not None:
        have = checkpoint_identity(Path(checkpoint_dir))
        if have != manifest["checkpoint"]:
            raise CheckpointError(f"{out}: this ONNX export was made from another checkpoint than {checkpoint_dir} "
                                  f"(config/weights SHA-256 differ); export it again")
    return manifest
