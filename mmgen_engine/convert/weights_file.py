"""Single-file sources: one safetensors or ``torch.save`` file holding a state dict, a Lightning
checkpoint (``{"state_dict": ..., ...}``) or a pickled ``nn.Module``; given as the file itself or as
a directory with exactly one such file in it.

What a file is comes from its first bytes, never its name: safetensors starts with an 8-byte header
length and a JSON object, a ``torch.save`` zip archive with ``PK``, a legacy one with the pickle
protocol opcode. :func:`names` lists what a file holds without executing any of it (the safetensors
header, or the strings and imported class names of the pickle), for converters' ``detect``, reading
a bounded amount: a zip archive's member sizes are checked before anything is unpacked and at most
:data:`MAX_PICKLE_BYTES` of pickle are scanned.
"""
from __future__ import annotations

import io
import pickletools
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ConversionError
from . import hf

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
# legacy torch.save writes a magic number, the protocol version and system info before the object
LEGACY_PICKLES = 4
# the pickle bytes scanned for names (a state dict's pickle takes ~100 bytes per tensor)
MAX_PICKLE_BYTES = 64 * 2 ** 20


def kind(path: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` or None (unreadable or neither), from the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return None
    # safetensors first: its header length may start with the pickle protocol byte
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return "safetensors"
    if head.startswith(ZIP_MAGIC) or head[:1] == bytes([PICKLE_PROTO]):
        return "torch"
    return None


def find(src: Path) -> Path:
    """``src`` if it is a file, else the one safetensors or torch file directly inside it."""
    if src.is_file():
        return src
    found = sorted(p for p in src.iterdir() if p.is_file() and kind(p))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found[:3])})"
        raise ConversionError(f"{src}: expected one safetensors or PyTorch weights file in the directory, "
                              f"found {what}; pass the file itself")
    return found[0]


def read(src: Path, trust_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """``(the file, its state dict on CPU)``. A Lightning checkpoint gives its ``state_dict``, a
    pickled module (only with ``trust_pickle``) its ``state_dict()``."""
    path = find(src)
    what = kind(path)
    if what == "safetensors":
        return path, hf.load_safetensors(path)
    if what is None:
        raise ConversionError(f"{path}: not a safetensors or PyTorch weights file")
    data = hf.load_torch_object(path, trust_pickle)
    if isinstance(data, torch.nn.Module):
        data = data.state_dict()
    elif isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise ConversionError(f"{path}: expected a state dict of tensors, a Lightning checkpoint or a "
                              f"pickled module")
    return path, dict(data)


def names(src: Path) -> set[str]:
    """Tensor names of a safetensors file; string constants and imported ``module.Class`` names of a
    torch file's pickle (which include a state dict's keys). Nothing is executed; a source that is
    no single weights file, or an unreadable or corrupt one, gives the empty set; a decompression
    bomb raises ConversionError (see :func:`hf.check_archive`)."""
    try:
        path = find(src)
    except ConversionError:
        return set()
    try:
        what = kind(path)
        if what == "safetensors":
            with safe_open(str(path), "pt") as f:
                return set(f.keys())
        if what == "torch":
            return _pickle_names(path)
    except (OSError, ValueError, RuntimeError, EOFError, NotImplementedError, SafetensorError, zipfile.BadZipFile,
            zlib.error):  # NotImplementedError: an unknown zip compression; RuntimeError: an encrypted member
        pass
    return set()


def _pickle_names(path: Path) -> set[str]:
    """The names in the first :data:`MAX_PICKLE_BYTES` of the pickle(s) of torch file ``path``."""
    if zipfile.is_zipfile(path):
        hf.check_archive(path)
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                return set()
            with z.open(pkl[0]) as f:
                return _scan(io.BytesIO(f.read(MAX_PICKLE_BYTES)), 1)
    with open(path, "rb") as f:
        return _scan(io.BytesIO(f.read(MAX_PICKLE_BYTES)), LEGACY_PICKLES)


def _scan(stream, count: int) -> set[str]:
    """Strings and ``GLOBAL`` / ``STACK_GLOBAL`` names of the next ``count`` pickles in ``stream``."""
    found: set[str] = set()
    strings: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pickletools decoding odd STRING arguments
        try:
            for _ in range(count):
                for op, arg, _pos in pickletools.genops(stream):
                    if isinstance(arg, str):
                        if op.name == "GLOBAL":
                            found.add(arg.replace(" ", "."))
                        else:
                            strings.append(arg)
                            found.add(arg)
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.add(f"{strings[-2]}.{strings[-1]}")
        except (ValueError, EOFError, struct.error, UnicodeDecodeError):
            pass  # past the last pickle, or a damaged one: keep what was read
    return found
