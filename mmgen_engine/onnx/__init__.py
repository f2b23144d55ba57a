"""ONNX export of a converted checkpoint's one-shot stages, and ONNX Runtime sessions over the export.

:func:`export_onnx` (``mmgen export-onnx``) traces each stage with ``torch.onnx.export`` (the
torch.export-based exporter, which needs ``onnxscript``) on the reference backend, with a symbolic
``batch`` dimension, the weights as external data (``PART.onnx.data``) and every file checked with
``onnx.checker``. ``manifest.json`` describes the export: its format version, the checkpoint's
identity (SHA-256 of its config and weights, so an export is never paired with another checkpoint),
and per part its files (size, SHA-256), the engine stage it replaces and its inputs and outputs
(name, shape with ``"batch"`` for the dynamic dimension, dtype). :func:`load_session` checks a part
against the manifest and opens it as an ``onnxruntime.InferenceSession``.

The parts (:data:`PARTS`) are the stages that run once per request; the autoregressive decoders
(prefill / decode step with explicit caches) are not exported yet.

``onnx``, ``onnxscript`` and ``onnxruntime`` are the ``[onnx]`` extra: this package imports without
them and raises a one-line :class:`MMGenError` naming the extra when a function needs them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_config, read_json, remove_stale_writes, writing_directory
from ..config import DTYPES
from ..errors import CheckpointError, InputError, MMGenError, one_line
from ..ops.registry import ENV_VAR
from ..pipelines import load
from ..pipelines.audio import log_mel_400
from ..runtime.limits import MAX_TOKEN_GRID_SIDE

FORMAT_NAME = "mmgen-onnx"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MIN_OPSET = 18  # the torch.export-based exporter's lowest
BATCH = "batch"
# the batch the stages are traced at: a traced size of 1 would be specialized (torch.export treats
# sizes 0 and 1 as constants), so the symbolic batch is traced at 2 and runs at any size >= 1
TRACE_BATCH = 2
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def _require(module: str):
    """``module`` of the ``[onnx]`` extra, or a one-line MMGenError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MMGenError(f"ONNX export and ONNX Runtime need the [onnx] extra ({module} is not installed): "
                         f"pip install 'mmgen-engine[onnx]'") from None


@dataclasses.dataclass(frozen=True)
class Part:
    """An exportable stage: ``stage`` is the engine call it replaces; ``module(pipe)`` the module to
    trace; ``example(pipe)`` its inputs ``{name: tensor}`` at batch :data:`TRACE_BATCH` (dimension 0 of
    every input is the batch); ``outputs`` the output names; ``dims`` further symbolic input
    dimensions ``{index: name}`` (the stand-alone detokenizer's token grid)."""

    stage: str
    module: Callable[[object], nn.Module]
    example: Callable[[object], dict[str, torch.Tensor]]
    outputs: tuple[str, ...]
    dims: dict[int, str] = dataclasses.field(default_factory=dict)


class _Stage(nn.Module):
    """``call(model, *inputs)`` as a module, with ``model``'s weights registered (exported once)."""

    def __init__(self, model: nn.Module, call: Callable):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, *inputs):
        return self.call(self.model, *inputs)


def _text_encoder(model, tokens):
    # the pipeline's lengths: the row's non-pad tokens (rows are "<s> ... </s>" then pad)
    pad = model.cfg.generation.text_pad_token_id
    return model.encoder(tokens, (tokens != pad).sum(1))


def _pixels(pipe) -> torch.Tensor:
    enc = pipe.config.encoder
    return torch.randn(TRACE_BATCH, enc.num_channels, enc.image_size, enc.image_size, dtype=pipe.dtype)


def _grid(codebook_size: int, side: int) -> torch.Tensor:
    return torch.randint(0, codebook_size, (TRACE_BATCH, side, side))


def _text(pipe) -> torch.Tensor:
    rows = pipe.tokenize(["a red circle", "a green square"])
    return rows[:TRACE_BATCH]


def _mel(pipe) -> torch.Tensor:
    mel = log_mel_400(np.zeros(pipe.plan.window_samples, dtype=np.float32))  # (F, n_mels)
    return torch.randn(TRACE_BATCH, *mel.shape, dtype=pipe.dtype)


PARTS: dict[str, dict[str, Part]] = {
    "captioning": {
        "image_encoder": Part("model.encode", lambda p: _Stage(p.model, lambda m, x: m.encode(x)),
                              lambda p: {"pixel_values": _pixels(p)}, ("image_states",)),
    },
    "text-to-image": {
        "text_encoder": Part("model.encoder", lambda p: _Stage(p.model, _text_encoder),
                             lambda p: {"text_tokens": _text(p)}, ("text_states",)),
        "detokenizer": Part("model.detokenizer", lambda p: _Stage(p.model.detokenizer, lambda m, t: m(t).float()),
                            lambda p: {"image_tokens": _grid(p.config.detokenizer.codebook_size,
                                                             p.config.generation.grid_size)}, ("pixels",)),
    },
    "image-detokenizer": {
        "detokenizer": Part("model", lambda p: _Stage(p.model, lambda m, t: m(t).float()),
                            lambda p: {"image_tokens": _grid(p.codebook_size, 4)}, ("pixels",),
                            {1: "grid_height", 2: "grid_width"}),
    },
    "speech-to-gesture": {
        "audio_encoder": Part("model.encode", lambda p: _Stage(p.model, lambda m, x: m.encode(x)),
                              lambda p: {"mel": _mel(p)}, ("audio_states",)),
        "motion_decoder": Part("model.poses", lambda p: _Stage(p.model, lambda m, c: m.poses(c)),
                               lambda p: {"motion_tokens": torch.randint(0, p.config.motion.codebook_size,
                                                                         (TRACE_BATCH, p.config.window_tokens))},
                               ("poses",)),
    },
}


@contextlib.contextmanager
def _reference_backend():
    """Every op on its ``reference`` implementation (plain torch, which the exporter traces) while the
    block runs: ``MMGEN_BACKEND``, the registry's one switch, set for the process and then restored.
    torch runs on one thread meanwhile, so that the CPU reference's row-count-dependent split of
    few-row products over threads (:func:`mmgen_engine.ops.linear.linear_reference`) is not traced:
    it would put a guard on the symbolic batch into the graph, and ONNX Runtime threads on its own."""
    before, threads = os.environ.get(ENV_VAR), torch.get_num_threads()
    os.environ[ENV_VAR] = "reference"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if before is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = before


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_identity(checkpoint_dir: Path) -> dict[str, str]:
    """``{file: sha256}`` of the checkpoint's config and weights: what an export was made from."""
    try:
        return {name: _sha256(checkpoint_dir / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    except OSError as e:
        raise CheckpointError(f"{checkpoint_dir}: cannot read the checkpoint ({one_line(e)})") from None


def supported_parts(task: str) -> tuple[str, ...]:
    """The part names :func:`export_onnx` exports for a checkpoint of ``task``."""
    return tuple(PARTS.get(task, ()))


def _check_request(checkpoint_dir, out_dir, parts, dtype, opset) -> tuple[Path, Path, str, list[str]]:
    for name, value in (("checkpoint_dir", checkpoint_dir), ("out_dir", out_dir)):
        if not isinstance(value, (str, os.PathLike)):
            raise InputError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    src, out = Path(checkpoint_dir), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if opset is not None and (type(opset) is not int or opset < MIN_OPSET):
        raise InputError(f"opset must be an integer >= {MIN_OPSET} (the torch.export-based exporter's lowest), "
                         f"got {opset!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: already exists and is not empty; choose another output directory")
    task = read_config(src).task
    supported = supported_parts(task)
    if isinstance(parts, str):
        parts = [parts]
    if parts is None:
        parts = list(supported)
    elif not isinstance(parts, (list, tuple)) or not all(isinstance(p, str) for p in parts) or not parts:
        raise InputError(f"parts must be a non-empty list of part names or None, got {parts!r}")
    for part in parts:
        if part not in supported:
            raise InputError(f"unknown or unsupported part {part!r} for a {task} checkpoint; supported: "
                             f"{', '.join(supported) or 'none'} (the decoders are not exported yet)")
    return src, out, task, list(dict.fromkeys(parts))


def _io(values) -> list[dict]:
    """Name, shape (ints, the symbolic dimensions as names) and dtype of graph inputs or outputs."""
    from onnx import helper

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name})
    return out


def export_onnx(checkpoint_dir, out_dir, parts=None, dtype=None, opset=None) -> Path:
    """Export the one-shot stages of the converted checkpoint ``checkpoint_dir`` as ONNX models into
    the new directory ``out_dir`` (``PART.onnx`` + ``PART.onnx.data`` each, and ``manifest.json``).

    ``parts`` None exports every part of the checkpoint's task (:data:`PARTS`: ``image_encoder``;
    ``text_encoder``, ``detokenizer``; ``audio_encoder``, ``motion_decoder``); ``dtype`` casts the
    weights as :func:`mmgen_engine.load` does (None: the checkpoint's); ``opset`` the ONNX opset
    (None: the exporter's default). Dimension 0 of every input and output is the symbolic ``batch``.
    ``out_dir`` must not exist or be empty; it appears complete or not at all. Returns ``out_dir``."""
    src, out, task, names = _check_request(checkpoint_dir, out_dir, parts, dtype, opset)
    onnx = _require("onnx")
    _require("onnxscript")
    pipe = load(src, dtype=dtype)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "task": task,
                "checkpoint": checkpoint_identity(src), "dtype": str(_weights_dtype(pipe)).removeprefix("torch."),
                "parts": {}}
    remove_stale_writes(out)
    with writing_directory(out, "ONNX export") as tmp:
        for name in names:
            part = PARTS[task][name]
            file = tmp / f"{name}.onnx"
            _export_part(part, pipe, file, opset)
            try:
                onnx.checker.check_model(str(file), full_check=True)  # by path: the external data too
                model = onnx.load(str(file), load_external_data=False)
            except Exception as e:  # onnx raises its own ValidationError and plain exceptions
                raise MMGenError(f"{src}: the exported {name} fails onnx.checker ({one_line(e)})") from None
            files = sorted(p.name for p in tmp.iterdir() if p.name == file.name or p.name.startswith(file.name + "."))
            manifest["parts"][name] = {
                "file": file.name, "stage": part.stage,
                "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                "inputs": _io(model.graph.input), "outputs": _io(model.graph.output),
                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files},
            }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def _weights_dtype(pipe) -> torch.dtype:
    """The weight dtype of a loaded pipeline."""
    return next(pipe.model.parameters()).dtype


def _export_part(part: Part, pipe, file: Path, opset: int | None) -> None:
    inputs = part.example(pipe)
    module = part.module(pipe).eval()
    dims = {0: torch.export.Dim(BATCH, min=1),
            **{i: torch.export.Dim(name, min=2, max=MAX_TOKEN_GRID_SIDE) for i, name in part.dims.items()}}
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        # the exporter prints its progress and warns about its own internals (torch's deprecations)
        with _reference_backend(), torch.no_grad(), contextlib.redirect_stdout(None), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(module, tuple(inputs.values()), str(file), input_names=list(inputs),
                              output_names=list(part.outputs),
                              dynamic_shapes=(tuple(dims for _ in inputs),),  # forward(*inputs)
                              dynamo=True, external_data=True, optimize=True, verbose=False, **kwargs)
    except MMGenError:
        raise
    except Exception as e:  # the exporter raises many types; the stage cannot be exported
        cause = e.__cause__ or e  # torch.onnx wraps torch.export's error in a long how-to
        raise MMGenError(f"exporting {part.stage} to ONNX failed ({type(cause).__name__}: {one_line(cause)})") from None


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
            if size != want.get("bytes") or _sha256(path) != want.get("sha256"):
                raise CheckpointError(f"{path}: {size} bytes that do not match {MANIFEST_FILE} "
                                      f"({want.get('bytes')} bytes, sha256 {str(want.get('sha256'))[:12]}...): "
                                      f"truncated or modified; export again")
    if checkpoint_dir is not None:
        have = checkpoint_identity(Path(checkpoint_dir))
        if have != manifest["checkpoint"]:
            raise CheckpointError(f"{out}: this ONNX export was made from another checkpoint than {checkpoint_dir} "
                                  f"(config/weights SHA-256 differ); export it again")
    return manifest


def load_session(out_dir, part: str, device: str = "cpu", checkpoint_dir=None):
    """An ``onnxruntime.InferenceSession`` of ``part`` of the export ``out_dir`` (checked first, see
    :func:`check_export`; ``checkpoint_dir`` given: against that checkpoint too). ``device`` "cpu":
    the CPU execution provider (the only one so far)."""
    if device != "cpu":
        raise InputError(f"device {device!r}: ONNX Runtime sessions run on 'cpu' so far")
    ort = _require("onnxruntime")
    out = Path(out_dir)
    manifest = check_export(out, checkpoint_dir, part)
    file = out / manifest["parts"][part]["file"]
    try:
        return ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / ...
        raise CheckpointError(f"{file}: ONNX Runtime cannot open it ({one_line(e)})") from None


__all__ = ["check_export", "export_onnx", "load_session", "PARTS", "read_manifest", "supported_parts"]
