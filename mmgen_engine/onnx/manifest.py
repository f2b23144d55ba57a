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
import json
import os
import tempfile
import threading
from pathlib import Path

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_json
from ..errors import CheckpointError, InputError, MMGenError, one_line

CACHE_ENV = "MMGEN_CACHE_DIR"
HASHES_FILE = "file_hashes.json"  # in cache_root(): SHA-256 of files hashed before, by their stat
MAX_HASHES = 1024  # the most recently hashed files kept there
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


def cache_root() -> Path:
    """``$MMGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmgen_engine``, else ``~/.cache/mmgen_engine``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mmgen_engine"


class _KnownHashes:
    """SHA-256 of files this user hashed before, reused while ``stat`` says the file is the same one,
    unchanged: device, inode, size, modification and status-change times (the last cannot be set
    back by a writer, so a rewrite that restores the mtime still misses). A load of an export would
    otherwise hash the checkpoint and the export again every time (~1 s per GB). Kept in memory and
    in ``cache_root()/file_hashes.json`` (written atomically; a lost race or an unwritable cache only
    costs a hash again). :func:`check_export` and :func:`checkpoint_identity` hash in full unless
    asked for ``known=True``."""

    def __init__(self):
        self._lock = threading.Lock()
        # "dev:ino" -> [size, mtime_ns, ctime_ns, sha256]: by inode, not path, so that a file hashed
        # where it was written (an export's temporary directory) is known after the rename
        self._table: dict[str, list] | None = None

    def _file(self) -> Path:
        return cache_root() / HASHES_FILE

    def _load(self) -> dict[str, list]:
        if self._table is None:
            try:
                table = json.loads(self._file().read_text())
                self._table = {k: v for k, v in table.items() if isinstance(v, list) and len(v) == 4}
            except (OSError, ValueError, AttributeError):
                self._table = {}
        return self._table

    def sha256(self, path: Path) -> str:
        st = Path(path).stat()
        inode, key = f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        with self._lock:
            known = self._load().get(inode)
        if known is not None and known[:3] == key:
            return known[3]
        digest = sha256(path)
        self.remember(path, digest)
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Record ``digest`` as the SHA-256 of ``path`` as it is now (its writer hashed it just before
        a change of metadata only, e.g. its permissions)."""
        st = Path(path).stat()
        with self._lock:
            table = self._load()
            table.pop(f"{st.st_dev}:{st.st_ino}", None)
            table[f"{st.st_dev}:{st.st_ino}"] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest]
            while len(table) > MAX_HASHES:
                table.pop(next(iter(table)))
            self._save(table)

    def _save(self, table: dict) -> None:
        file = self._file()
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{HASHES_FILE}.", dir=file.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(table, f)
            os.replace(tmp, file)
        except OSError:
            pass


KNOWN_HASHES = _KnownHashes()


def checkpoint_identity(checkpoint_dir: Path, known: bool = False) -> dict[str, str]:
    """``{file: sha256}`` of the checkpoint's config and weights: what an export was made from.
    ``known``: reuse a hash of an unchanged file (:class:`_KnownHashes`)."""
    digest = KNOWN_HASHES.sha256 if known else sha256
    try:
        return {name: digest(checkpoint_dir / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
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


def check_export(out_dir, checkpoint_dir=None, part: str | None = None, known: bool = False) -> dict:
    """The manifest of ``out_dir`` after checking that ``part``'s files (every part's with None) have
    the recorded sizes and SHA-256, and, given ``checkpoint_dir``, that the export was made from
    that checkpoint. Any mismatch is a one-line CheckpointError. ``known``: reuse the hash of a file
    unchanged since it was last hashed (:class:`_KnownHashes`) instead of reading it again."""
    digest = KNOWN_HASHES.sha256 if known else sha256
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
            if size != want.get("bytes") or digest(path) != want.get("sha256"):
                raise CheckpointError(f"{path}: {size} bytes that do not match {MANIFEST_FILE} "
                                      f"({want.get('bytes')} bytes, sha256 {str(want.get('sha256'))[:12]}...): "
                                      f"truncated or modified; export again")
    if checkpoint_dir is not None:
        have = checkpoint_identity(Path(checkpoint_dir), known)
        if have != manifest["checkpoint"]:
            raise CheckpointError(f"{out}: this ONNX export was made from another checkpoint than {checkpoint_dir} "
                                  f"(config/weights SHA-256 differ); export it again")
    return manifest
