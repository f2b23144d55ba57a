"""Export of a converted checkpoint's one-shot stages with ``torch.onnx.export`` (see :mod:`mmgen_engine.onnx`)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import read_config, remove_stale_writes, writing_directory
from ..config import DTYPES
from ..errors import InputError, MMGenError, one_line
from ..ops.registry import ENV_VAR
from ..pipelines import load
from ..pipelines.audio import log_mel_400
from ..runtime.limits import MAX_TOKEN_GRID_SIDE
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, checkpoint_identity, require, sha256

MIN_OPSET = 18  # the torch.export-based exporter's lowest
BATCH = "batch"
# the batch the stages are traced at: a traced size of 1 would be specialized (torch.export treats
# sizes 0 and 1 as constants), so the symbolic batch is traced at 2 and runs at any size >= 1
TRACE_BATCH = 2


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


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Only errors from logger ``name`` (and its children) while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
    onnx = require("onnx")
    require("onnxscript")
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
                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256(tmp / f)} for f in files},
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
        # the exporter prints its progress, warns about its own internals (torch's deprecations) and
        # logs the torchvision ops it skips; its failures raise
        with _reference_backend(), torch.no_grad(), contextlib.redirect_stdout(None), warnings.catch_warnings(), \
                _quiet_logger("torch.onnx"):
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
