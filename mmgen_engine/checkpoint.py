"""The engine checkpoint format: a directory with ``config.json`` and ``*.safetensors`` weights.

``config.json`` holds ``{"format": "mmgen", "format_version": 1, "task", "architecture", ...}``;
the weights are read with safetensors (memory-mapped), never unpickled. Tokenizer and
preprocessing files the task needs sit beside them.

Loading (:func:`load_model`) treats every file as untrusted and checks it fully before allocating
anything: JSON files are read with bounds on size and nesting, the config's sizes are bounded (see
:mod:`mmgen_engine.config`), the weights' headers are checked against the config and a memory
estimate before any module is built, and every tensor is checked for NaN and infinities as it is read.

Writing (:func:`save_checkpoint`) goes to a temporary sibling directory that is renamed into place
only when complete, so a failed conversion never leaves a half checkpoint and never destroys an
existing one. Its name carries the writer's process id, so that the next write into the same
directory can remove what a killed writer left (:func:`remove_stale_writes`); SIGTERM removes it
at once.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from .config import CONFIG_CLASSES, DTYPES, FORMAT_NAME, FORMAT_VERSION, TASKS, from_dict
from .errors import CheckpointError, MMGenError, one_line
from .files import open_regular_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
# safetensors' dtype names of the torch dtypes a checkpoint may hold
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

MAX_JSON_BYTES = 16 * 2 ** 20      # a JSON file (config, preprocessor, shard index); configs are kilobytes
MAX_JSON_DEPTH = 32                # nesting of JSON arrays and objects; configs nest 4 deep
MAX_HEADER_BYTES = 16 * 2 ** 20    # a safetensors header: ~100 bytes per tensor, so 100k+ tensors
MAX_MODEL_BYTES = 256 * 2 ** 30    # the weights of one model, at the dtype they are loaded in
# a tokenizer may cover less than the model's vocabulary, which models pad to a multiple of 64 or
# more (GPT-2 variants 50257 -> 50304, Phi-2 50295 -> 51200, Qwen2 151646 -> 151936): a few percent
# at most. One that covers less than this fraction belongs to another model; the ids it lacks would
# decode to nothing.
MIN_TOKENIZER_COVERAGE = 0.5

# the closing quote is optional, so that an unterminated string never makes the match backtrack
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"float16"`` (or a torch dtype, or None) to a torch dtype; reject anything else."""
    if name is None or (isinstance(name, torch.dtype) and name in TORCH_DTYPES.values()):
        return name
    if not isinstance(name, str) or name not in TORCH_DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: Path, error: type[MMGenError] = CheckpointError):
    """The JSON value in file ``path``, read with bounds: at most :data:`MAX_JSON_BYTES` bytes and
    :data:`MAX_JSON_DEPTH` levels of nesting (checked before parsing, so deep nesting cannot exhaust
    the stack), finite numbers only (no ``NaN``, ``Infinity`` or ``1e999``). Any problem raises
    ``error`` with one line naming the file."""
    try:
        with open_regular_file(path, "JSON file", error) as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise error(f"{path}: unreadable ({one_line(e)})") from None
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{path}: larger than the limit of {MAX_JSON_BYTES} bytes for a JSON file")
    try:
        text = data.decode("utf-8")
        brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
        if max(itertools.accumulate(map(_NESTING.__getitem__, brackets), initial=0)) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than the limit of {MAX_JSON_DEPTH} levels")
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{path}: not valid JSON ({one_line(e)})") from None


def read_config(path: str | os.PathLike):
    """Read and validate ``path/config.json``; returns the task's config dataclass."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (does not exist or is a file)")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; is this a converted mmgen checkpoint? "
                              f"(convert it first with `mmgen convert`)")
    raw = read_json(cfg_file)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{cfg_file}: not an mmgen checkpoint (\"format\" is not \"{FORMAT_NAME}\"); "
                              f"convert the source model with `mmgen convert` first")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{cfg_file}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format_version {version} is newer than this mmgen_engine "
                              f"supports ({FORMAT_VERSION}); upgrade mmgen_engine")
    task = raw.get("task")
    if task not in TASKS:
        raise CheckpointError(f"{cfg_file}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task not in CONFIG_CLASSES:
        raise CheckpointError(f"{cfg_file}: task {task!r} is not supported by this build")
    return from_dict(CONFIG_CLASSES[task], raw, where=str(cfg_file))


class TensorInfo(NamedTuple):
    """A tensor as a safetensors header describes it (what :func:`check_tensors` compares)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of the tensors in safetensors ``file``, from its header alone (no
    tensor data is read): at most :data:`MAX_HEADER_BYTES`, parsed and checked by safetensors
    (offsets inside the file, no overlaps)."""
    try:
        with open_regular_file(file, "safetensors weights file", CheckpointError) as f:
            head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"a header of {size} bytes is over the limit of {MAX_HEADER_BYTES}")
        with safe_open(str(file), "pt") as f:
            raw = {name: f.get_slice(name) for name in f.keys()}
            found = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in raw.items()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({one_line(e)})") from None
    for name, (dtype, _) in found.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {dtype}, which mmgen does not load")
    return {name: TensorInfo(SAFETENSORS_DTYPES[dtype], shape) for name, (dtype, shape) in found.items()}


def tensor_dtype(module: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype floating tensor ``name`` of ``module`` is stored and run in when the weights are
    ``dtype``: float32 for the few a model lists in its ``fp32_tensors`` (statistics whose rounding
    would show in the output), ``dtype`` for the rest."""
    return torch.float32 if name in getattr(module, "fp32_tensors", ()) else dtype


def check_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor | TensorInfo], where: str,
                  stored_dtype: torch.dtype) -> None:
    """Check that ``tensors`` (tensors, or :class:`TensorInfo` of a header) are exactly the state of
    ``module`` (built on the meta device): same names, same shapes, floating-point where the
    module's are, stored as ``stored_dtype`` (see :func:`tensor_dtype`).
    Any difference raises :class:`CheckpointError` naming the tensor."""
    expected = module.state_dict()
    for kind, names in (("missing", expected.keys() - tensors.keys()),
                        ("unexpected", tensors.keys() - expected.keys())):
        names = sorted(names)
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise CheckpointError(f"{where}: {kind} tensor(s) {', '.join(names[:5])}{more}")
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, "
                                  f"the config implies {tuple(ref.shape)}")
        want = tensor_dtype(module, name, stored_dtype) if ref.is_floating_point() else ref.dtype
        if t.dtype != want:
            raise CheckpointError(f"{where}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, "
                                  f"expected {str(want).removeprefix('torch.')}")


def check_tokenizer(where: str, token_ids: Collection[int], vocab_size: int, special: dict[str, int]) -> None:
    """Check that a tokenizer with ``token_ids`` fits a model with ``vocab_size`` token embeddings:
    every id inside the vocabulary (a larger tokenizer's ids would index past the embeddings), at
    least :data:`MIN_TOKENIZER_COVERAGE` of the vocabulary covered, and a token for each of the
    ``special`` ids the model generates with (``{"eos_token_id": 2, ...}``)."""
    ids = set(token_ids)
    if not all(type(i) is int and 0 <= i < vocab_size for i in ids):
        raise CheckpointError(f"{where}: the tokenizer has ids outside the model's vocabulary of {vocab_size}")
    if len(ids) < MIN_TOKENIZER_COVERAGE * vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {len(ids)} tokens, less than {MIN_TOKENIZER_COVERAGE:.0%} "
                              f"of the model's vocabulary of {vocab_size}; it is another model's tokenizer")
    for name, i in special.items():
        if i not in ids:
            raise CheckpointError(f"{where}: the tokenizer has no token for {name} {i}")


def load_model(path: Path, config, build: Callable, device: torch.device,
               dtype: torch.dtype | None = None, rebuild: Callable | None = None) -> torch.nn.Module:
    """The model of checkpoint directory ``path`` (``build(config, device="meta")`` builds it), its
    weights read from every ``*.safetensors`` file (memory-mapped on CPU) and cast to ``dtype`` (None:
    keep the checkpoint's floating tensors as they are stored).

    ``rebuild(model)``, when given, is called on the meta model once its tensors are checked against
    the headers: it may change the model's structure (quantize its decoder, as
    ``mm.load(quantize=...)`` does) and returns ``{stored tensor name: f}``, ``f(tensor as read)``
    giving the tensors put into the model in its place (``{name: tensor}``), each stored tensor
    transformed as it is read, before the cast. Nothing is allocated before the checkpoint is known to
    be consistent:

    1. the files' headers give each tensor's name, dtype and shape (:func:`read_header`);
    2. the config's repeated blocks (``config.blocks``, each holds at least one tensor) must not
       outnumber the tensors, checked before any module is built, even on the meta device;
    3. the bytes the weights take at ``dtype`` must stay under :data:`MAX_MODEL_BYTES` and, on a
       GPU, its free memory;
    4. the model built on the meta device must have exactly the headers' tensors
       (:func:`check_tensors`), so the header's bytes are the model's;
    5. each tensor is read, refused if it holds NaN or infinities, cast and put into the model.
    """
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights file")
    header: dict[str, TensorInfo] = {}
    for f in files:
        part = read_header(f)
        dup = header.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: tensor {sorted(dup)[0]!r} appears in more than one weights file")
        header.update(part)
    if config.blocks > len(header):
        raise CheckpointError(f"{path}: {CONFIG_FILE} describes {config.blocks} layers and blocks, but the weights "
                              f"hold only {len(header)} tensors")
    _check_memory(path, header, device, dtype)
    model = build(config, device="meta")
    stored = torch_dtype(config.dtype)
    check_tensors(model, header, str(path), stored)
    maps = rebuild(model) if rebuild is not None else {}
    tensors = {}
    for f in files:
        with safe_open(str(f), "pt", device=str(device)) as weights:
            for name in weights.keys():
                t = weights.get_tensor(name)
                if t.is_floating_point() and not _all_finite(t):
                    raise CheckpointError(f"{f}: tensor {name!r} holds NaN or infinite values")
                for key, value in (maps[name](t) if name in maps else {name: t}).items():
                    if dtype is not None and value.is_floating_point():
                        value = value.to(tensor_dtype(model, key, dtype))
                    tensors[key] = value
    model.load_state_dict(tensors, assign=True)
    return model


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or infinity. A NaN or infinity makes the sum non-finite, so a finite
    sum (one fast pass, ~10 GB/s) decides; a non-finite one may be an overflow of large finite values,
    which the exact check (~20x slower) then tells apart."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_memory(path: Path, header: dict[str, TensorInfo], device: torch.device, dtype: torch.dtype | None):
    """The bytes of the weights at ``dtype`` (floating tensors cast to it, as nearly all are) against
    :data:`MAX_MODEL_BYTES` and, on a GPU, its free memory."""
    needed = sum(math.prod(t.shape) * dtype.itemsize if dtype is not None and t.dtype.is_floating_point else t.nbytes
                 for t in header.values())
    limit, what = MAX_MODEL_BYTES, "the limit"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if free < limit:
            limit, what = free, f"the free memory of {device}"
    if needed > limit:
        raise CheckpointError(f"{path}: the weights need {needed:,} bytes, more than {what} of {limit:,} bytes")


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory holding an mmgen ``config.json`` (any version)."""
    try:
        raw = read_json(path / CONFIG_FILE)
    except MMGenError:
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT_NAME


# The temporary siblings of a checkpoint ``out`` being written: ``.{out.name}.new.{pid}.{8 random}``
# (the new checkpoint, marked by a _MARKER file naming the writer's host until it is renamed into
# place) and ``.{out.name}.old.{pid}`` (the checkpoint it replaces, while it does).
_MARKER = ".mmgen-write"
_LIVE: set[Path] = set()  # this process's temporaries while they are in use (writers in other threads)


def _temporary(out: Path) -> re.Pattern:
    return re.compile(r"\..+\.new\.(?P<new>[0-9]+)\.[a-z0-9_]{8}|" + re.escape(f".{out.name}.old.") + "(?P<old>[0-9]+)")


def remove_stale_writes(out: Path) -> None:
    """Clean up, before writing checkpoint ``out``, after writers killed before they could (SIGKILL,
    a crash) in its parent directory, of processes that are gone (or are this process, which is not
    using them: the id was reused): a new checkpoint's directory ``.NAME.new.PID.RANDOM`` is removed
    when its marker file names this host (a writer on another host sharing the directory may be
    alive; a directory without the marker is not ours); ``out``'s replaced checkpoint
    ``.OUT.old.PID`` is put back as ``out`` if ``out`` is missing (the writer died between its two
    renames), else removed. Nothing else is touched."""
    if os.name != "posix":  # os.kill(pid, 0) checks for a process only on POSIX
        return
    pattern, host = _temporary(out), socket.gethostname()
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or entry in _LIVE or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match["new"] or match["old"])
        if pid != os.getpid() and _process_exists(pid):
            continue
        try:
            if match["new"]:
                if (entry / _MARKER).read_text(encoding="utf-8").strip() == host:
                    shutil.rmtree(entry, ignore_errors=True)
            elif is_checkpoint(entry):
                if out.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.rename(out)
        except OSError:
            continue


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any process id
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _Terminated(BaseException):
    """SIGTERM arrived while a checkpoint was being written (a BaseException: nothing swallows it)."""


@contextlib.contextmanager
def _cleanup_on_sigterm():
    """While the body runs, SIGTERM raises :class:`_Terminated` in it, so that its ``finally`` blocks
    remove the temporary directories; then the signal is raised again under the previous handler
    (by default: the process ends as killed by SIGTERM). Only the main thread can handle signals,
    and a SIGTERM that is ignored, or handled outside Python, stays as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None):
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: a second must not cut the cleanup short
        raise _Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)
        raise CheckpointError("writing the checkpoint was interrupted by SIGTERM") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def writing_directory(out: Path, what: str):
    """Yields a new temporary sibling directory of ``out`` (``.NAME.new.PID.RANDOM``, see
    :func:`remove_stale_writes`) to write ``what`` ("checkpoint", "ONNX export") into; when the
    block ends normally it is renamed to ``out`` (an existing ``out`` is swapped out and removed,
    put back if the rename fails), else removed: ``out`` appears complete or not at all, SIGTERM
    included. An OSError in the block or the renames is a :class:`CheckpointError`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create the output directory ({one_line(e)})") from None
    with _cleanup_on_sigterm():
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new.{os.getpid()}.", dir=out.parent))
        except OSError as e:
            raise CheckpointError(f"{out}: cannot create the output directory ({one_line(e)})") from None
        _LIVE.add(tmp)
        try:
            (tmp / _MARKER).write_text(socket.gethostname() + "\n", encoding="utf-8")
            yield tmp
            (tmp / _MARKER).unlink()
            _default_permissions(tmp)
            if out.exists():
                _replace(out, tmp)
            else:
                tmp.rename(out)
        except OSError as e:
            raise CheckpointError(f"{out}: cannot write the {what} ({one_line(e)})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _LIVE.discard(tmp)


def save_checkpoint(out: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                    files: dict[str, Path] | None = None, overwrite: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write an engine checkpoint directory atomically.

    ``config`` must carry format, format_version and task; ``files`` maps a file name in the
    checkpoint to a source file to copy (tokenizer, preprocessor config). The directory appears
    complete or not at all. An existing non-empty ``out`` is replaced only with ``overwrite`` and
    only if it is an mmgen checkpoint itself; if replacing fails, the old one is put back.
    ``progress(done, total)`` is called with the bytes of tensor data written so far and in all,
    first with ``done`` 0 and then after each tensor.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise CheckpointError(f"{out}: already exists and is not empty; choose another output "
                                  f"directory or pass overwrite (--overwrite)")
        if not is_checkpoint(out):
            raise CheckpointError(f"{out}: refusing to replace it: it is not an mmgen checkpoint")
    with writing_directory(out, "checkpoint") as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": FORMAT_NAME}, progress)
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``tensors`` as safetensors ``file`` one tensor at a time: the layout safetensors writes
    (8-byte little-endian header length, the JSON header padded with spaces to a multiple of 8, the
    data ordered by decreasing element size, then name, so that each tensor is aligned), without
    safetensors' ``save_file`` copy of the whole model in memory, and with ``progress(done, total)``
    in bytes after each tensor. Like safetensors, it assumes a little-endian machine."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, total = {"__metadata__": metadata}, 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [total, total + size]}
        total += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        done = 0
        if progress:
            progress(done, total)
        for name in order:
            data = tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            done += data.nbytes
            if progress:
                progress(done, total)


def _replace(out: Path, new: Path) -> None:
    backup = out.with_name(f".{out.name}.old.{os.getpid()}")
    _LIVE.add(backup)
    try:
        out.rename(backup)
        try:
            new.rename(out)
        except BaseException:
            backup.rename(out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        _LIVE.discard(backup)


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes a private directory; give it and its files the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)
