"""Export of a converted checkpoint's one-shot stages and autoregressive decoder with ``torch.onnx.export``
(see :mod:`mmgen_engine.onnx` for the parts and their inputs and outputs).

The decoder parts wrap the model's own ``prefill`` / ``decode_step`` (:class:`_Prefill`,
:class:`_Step`): the wrapper allocates the caches the runtime would hand in (one tensor per layer),
lets the decoder fill them, and returns them; the step first grows the past cache by the slot it
writes. No attention is written twice."""
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
from ..runtime.kv_cache import CrossKVCache, KVCache
from ..runtime.limits import MAX_TOKEN_GRID_SIDE
from . import manifest as manifest_file
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, checkpoint_identity, require, sha256

MIN_OPSET = 18  # the torch.export-based exporter's lowest
BATCH = "batch"
# the sizes the parts are traced at: torch.export treats sizes 0 and 1 as constants, so every symbolic
# dimension is traced at >= 2 (and at sizes that differ, so that no two are taken for one) and runs
# at any size in its range (DIMS)
TRACE_BATCH = 2
TRACE_PROMPT = 3
TRACE_PAST = 4

# the symbolic dimensions of the parts' inputs and their ranges (min, max; None: unbounded)
DIMS: dict[str, tuple[int, int | None]] = {
    BATCH: (1, None),
    "grid_height": (2, MAX_TOKEN_GRID_SIDE),  # the stand-alone detokenizer's token grid
    "grid_width": (2, MAX_TOKEN_GRID_SIDE),
    "prompt_len": (0, None),  # a prefix decoder's prompt may be empty (ClipCap: the image prefix alone)
    "past_len": (1, None),
    "encoder_len": (1, None),
    "prefix_len": (1, None),
    "sequence": (1, None),
}
DECODER_PARTS = ("decoder_prefill", "decoder_step")


@dataclasses.dataclass(frozen=True)
class Part:
    """An exportable stage. ``stage``: the engine call it replaces; ``module(pipe)``: the module to
    trace, called as ``module(*inputs)``; ``example(pipe)``: its inputs ``{name: tensor}`` at batch
    :data:`TRACE_BATCH`; ``outputs(pipe)``: the output names; ``dims(pipe)``: the symbolic
    dimensions ``{input: {axis: name}}`` (names from :data:`DIMS`; an axis not listed is static, and
    inputs sharing a name share its size); ``applies(config)``: whether a checkpoint of the part's
    task has this part (LLaVA's ``token_embedding``)."""

    stage: str
    module: Callable[[object], nn.Module]
    example: Callable[[object], dict[str, torch.Tensor]]
    outputs: Callable[[object], tuple[str, ...]]
    dims: Callable[[object], dict[str, dict[int, str]]]
    applies: Callable[[object], bool] = lambda config: True


class _Stage(nn.Module):
    """``call(model, *inputs)`` as a module, with ``model``'s weights registered (exported once)."""

    def __init__(self, model: nn.Module, call: Callable):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, *inputs):
        return self.call(self.model, *inputs)


def _names(*names: str) -> Callable[[object], tuple[str, ...]]:
    return lambda pipe: names


def _batched(*inputs: str) -> Callable[[object], dict[str, dict[int, str]]]:
    """Dims of a one-shot part: axis 0 of every input is the batch."""
    return lambda pipe: {name: {0: BATCH} for name in inputs}


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


# ---- the autoregressive decoders: prefill and one decode step, the caches as inputs and outputs

def _self_kv(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _all_kv(prefix: str, layers: int, cross: bool) -> list[str]:
    """Per layer ``{prefix}.{i}.key``, ``.value`` and, with ``cross``, ``.encoder.key``, ``.encoder.value``."""
    kinds = ("key", "value", "encoder.key", "encoder.value") if cross else ("key", "value")
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in kinds]


def _caches(cache: KVCache, cross: CrossKVCache | None) -> list[torch.Tensor]:
    """The per-layer tensors in :func:`_all_kv`'s order."""
    out = []
    for i in range(len(cache.k)):
        out += [cache.k[i], cache.v[i]]
        if cross is not None:
            out += [cross.k[i], cross.v[i]]
    return out


class _Prefill(nn.Module):
    """``decoder.prefill`` on caches it allocates, returned as outputs: ``(input_ids,
    encoder_hidden_states, encoder_lengths)`` (cross-attention) or ``(input_ids, prefix_embeds)``
    (prefix) -> ``(logits, *present)`` in :func:`_all_kv`'s order."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, *inputs):  # *inputs, as every part: the exporter's dynamic_shapes take one form
        input_ids, states, *encoder_lengths = inputs
        dec = self.decoder
        layers, heads, head_dim, _ = dec.cache_geometry()
        batch, dtype = input_ids.shape[0], dec.wte.dtype

        def zeros(slots):
            return [states.new_zeros(batch, heads, slots, head_dim, dtype=dtype) for _ in range(layers)]

        slots = input_ids.shape[1] + (states.shape[1] if dec.uses_prefix else 0)
        cache = KVCache(zeros(slots), zeros(slots))
        cross = None if dec.uses_prefix else CrossKVCache(zeros(states.shape[1]), zeros(states.shape[1]),
                                                          *encoder_lengths)
        none = [None] * layers  # a prefix decoder reads no cross cache (its blocks are handed None)
        logits = dec.prefill(input_ids, states, cache, cross or CrossKVCache(none, none, None))
        return logits, *_caches(cache, cross)


class _Step(nn.Module):
    """``decoder.decode_step`` of one token per row at position ``past_len`` (every row's: rows share
    their length), the self-attention cache grown by that slot: ``(input_ids [B], *past, (encoder
    lengths))`` with ``past`` in :func:`_all_kv`'s order -> ``(logits, *present)``, the self-attention
    K/V only (the encoder's are read, not changed)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, *inputs):
        input_ids, *past = inputs
        for x in past:
            # one symbol for the batch: the tracer keeps one per input until told, and decode_step
            # divides the token rows by the cache rows (cross-attention's group, 1)
            torch._check(x.shape[0] == input_ids.shape[0])
        dec = self.decoder
        layers = dec.cache_geometry()[0]
        per = 2 if dec.uses_prefix else 4
        k, v, ck, cv = [], [], [], []
        for i in range(layers):
            layer = past[per * i: per * (i + 1)]
            # the new token's slot, which decode_step writes
            k.append(torch.cat([layer[0], torch.zeros_like(layer[0][:, :, :1])], dim=2))
            v.append(torch.cat([layer[1], torch.zeros_like(layer[1][:, :, :1])], dim=2))
            if not dec.uses_prefix:
                ck.append(layer[2])
                cv.append(layer[3])
        past_len = past[0].shape[2]
        positions = torch.zeros_like(input_ids) + past_len
        cache = KVCache(k, v, span=past_len + 1)
        lengths = None if dec.uses_prefix else past[-1]
        cross = CrossKVCache(ck or [None] * layers, cv or [None] * layers, lengths)
        logits = dec.decode_step(input_ids, positions, cache, cross)
        return logits, *_caches(cache, None)


# the one-shot part whose output the decoder reads (its encoder side)
_ENCODER_PART = {"captioning": "image_encoder", "text-to-image": "text_encoder", "speech-to-gesture": "audio_encoder"}


def _encoder_side(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [TRACE_BATCH, S, D], lengths)`` as the pipeline hands them to the decoder: the
    encoder part run on its example (LLaVA: the image's states alone; its text before the image
    joins them at run time, prefix_len is symbolic)."""
    part = PARTS[pipe.task][_ENCODER_PART[pipe.task]]
    inputs = part.example(pipe)
    with torch.no_grad():
        states = part.module(pipe)(*inputs.values()).to(_weights_dtype(pipe))
    lengths = torch.full((TRACE_BATCH,), states.shape[1], dtype=torch.int64)
    if pipe.task == "text-to-image":  # rows have different valid lengths
        lengths = (inputs["text_tokens"] != pipe.config.generation.text_pad_token_id).sum(1)
    return states, lengths


def _decoder(pipe) -> nn.Module:
    return pipe.model.decoder


def _tokens(pipe, *shape) -> torch.Tensor:
    return torch.randint(0, _decoder(pipe).cfg.vocab_size, shape)


def _fixed_prefix(pipe) -> int:
    """GIT's decoder takes exactly its ``prefix_length`` image states (0: any prefix, or none)."""
    return getattr(_decoder(pipe), "prefix_length", 0)


def _prefill_example(pipe) -> dict[str, torch.Tensor]:
    states, lengths = _encoder_side(pipe)
    tokens = _tokens(pipe, TRACE_BATCH, TRACE_PROMPT)
    if _decoder(pipe).uses_prefix:
        return {"input_ids": tokens, "prefix_embeds": states}
    return {"input_ids": tokens, "encoder_hidden_states": states, "encoder_lengths": lengths}


def _prefill_dims(pipe) -> dict[str, dict[int, str]]:
    if _decoder(pipe).uses_prefix:
        prefix = {0: BATCH} if _fixed_prefix(pipe) else {0: BATCH, 1: "prefix_len"}
        return {"input_ids": {0: BATCH, 1: "prompt_len"}, "prefix_embeds": prefix}
    return {"input_ids": {0: BATCH, 1: "prompt_len"}, "encoder_hidden_states": {0: BATCH, 1: "encoder_len"},
            "encoder_lengths": {0: BATCH}}


def _prefill_outputs(pipe) -> tuple[str, ...]:
    dec = _decoder(pipe)
    return ("logits", *_all_kv("present", dec.cache_geometry()[0], not dec.uses_prefix))


def _step_example(pipe) -> dict[str, torch.Tensor]:
    dec = _decoder(pipe)
    layers, heads, head_dim, _ = dec.cache_geometry()
    dtype = _weights_dtype(pipe)
    inputs = {"input_ids": _tokens(pipe, TRACE_BATCH)}
    if dec.uses_prefix:
        shapes = {"key": TRACE_PAST, "value": TRACE_PAST}
    else:
        states, lengths = _encoder_side(pipe)
        cross = states.shape[1]
        shapes = {"key": TRACE_PAST, "value": TRACE_PAST, "encoder.key": cross, "encoder.value": cross}
    for i in range(layers):
        for kind, slots in shapes.items():
            inputs[f"past_key_values.{i}.{kind}"] = torch.randn(TRACE_BATCH, heads, slots, head_dim, dtype=dtype)
    if not dec.uses_prefix:
        inputs["encoder_lengths"] = lengths
    return inputs


def _step_dims(pipe) -> dict[str, dict[int, str]]:
    dec = _decoder(pipe)
    dims = {"input_ids": {0: BATCH}}
    for name in _all_kv("past_key_values", dec.cache_geometry()[0], not dec.uses_prefix):
        dims[name] = {0: BATCH, 2: "encoder_len" if ".encoder." in name else "past_len"}
    if not dec.uses_prefix:
        dims["encoder_lengths"] = {0: BATCH}
    return dims


def _step_outputs(pipe) -> tuple[str, ...]:
    return ("logits", *_self_kv("present", _decoder(pipe).cache_geometry()[0]))


_DECODER = {
    "decoder_prefill": Part("model.decoder.prefill", lambda p: _Prefill(_decoder(p)), _prefill_example,
                            _prefill_outputs, _prefill_dims),
    "decoder_step": Part("model.decoder.decode_step", lambda p: _Step(_decoder(p)), _step_example, _step_outputs,
                         _step_dims),
}


PARTS: dict[str, dict[str, Part]] = {
    "captioning": {
        "image_encoder": Part("model.encode", lambda p: _Stage(p.model, lambda m, x: m.encode(x)),
                              lambda p: {"pixel_values": _pixels(p)}, _names("image_states"),
                              _batched("pixel_values")),
        **_DECODER,
        # LLaVA's prefix starts with the embeddings of the prompt's text before <image> (Llava.prefix)
        "token_embedding": Part("model.decoder.embed", lambda p: _Stage(_decoder(p), lambda m, t: m.embed(t)),
                                lambda p: {"input_ids": _tokens(p, TRACE_BATCH, TRACE_PROMPT)},
                                _names("inputs_embeds"), lambda p: {"input_ids": {0: BATCH, 1: "sequence"}},
                                applies=lambda config: config.llava is not None),
    },
    "text-to-image": {
        "text_encoder": Part("model.encoder", lambda p: _Stage(p.model, _text_encoder),
                             lambda p: {"text_tokens": _text(p)}, _names("text_states"), _batched("text_tokens")),
        "detokenizer": Part("model.detokenizer", lambda p: _Stage(p.model.detokenizer, lambda m, t: m(t).float()),
                            lambda p: {"image_tokens": _grid(p.config.detokenizer.codebook_size,
                                                             p.config.generation.grid_size)}, _names("pixels"),
                            _batched("image_tokens")),
        **_DECODER,
    },
    "image-detokenizer": {
        "detokenizer": Part("model", lambda p: _Stage(p.model, lambda m, t: m(t).float()),
                            lambda p: {"image_tokens": _grid(p.codebook_size, 4)}, _names("pixels"),
                            lambda p: {"image_tokens": {0: BATCH, 1: "grid_height", 2: "grid_width"}}),
    },
    "speech-to-gesture": {
        "audio_encoder": Part("model.encode", lambda p: _Stage(p.model, lambda m, x: m.encode(x)),
                              lambda p: {"mel": _mel(p)}, _names("audio_states"), _batched("mel")),
        "motion_decoder": Part("model.poses", lambda p: _Stage(p.model, lambda m, c: m.poses(c)),
                               lambda p: {"motion_tokens": torch.randint(0, p.config.motion.codebook_size,
                                                                         (TRACE_BATCH, p.config.window_tokens))},
                               _names("poses"), _batched("motion_tokens")),
        **_DECODER,
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


def supported_parts(config) -> tuple[str, ...]:
    """The part names :func:`export_onnx` exports for a checkpoint of config ``config``
    (:func:`mmgen_engine.checkpoint.read_config`)."""
    return tuple(name for name, part in PARTS.get(config.task, {}).items() if part.applies(config))


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
    config = read_config(src)
    task, supported = config.task, supported_parts(config)
    quantized = getattr(config, "quantization", None)
    if quantized is not None:  # int8 decoder weights: the float one-shot stages export, the decoder does not
        supported = tuple(p for p in supported if p not in DECODER_PARTS)
    if isinstance(parts, str):
        parts = [parts]
    if parts is None:
        parts = list(supported)
    elif not isinstance(parts, (list, tuple)) or not all(isinstance(p, str) for p in parts) or not parts:
        raise InputError(f"parts must be a non-empty list of part names or None, got {parts!r}")
    for part in parts:
        if quantized is not None and part in DECODER_PARTS:
            raise InputError(f"{src}: the decoder of a quantized checkpoint ({quantized.spec}) is not exported to "
                             f"ONNX; export the float checkpoint, or --parts {' '.join(supported)}")
        if part not in supported:
            raise InputError(f"unknown or unsupported part {part!r} for a {task} checkpoint; supported: "
                             f"{', '.join(supported) or 'none'}")
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
    """Export parts of the converted checkpoint ``checkpoint_dir`` as ONNX models into the new
    directory ``out_dir`` (``PART.onnx`` + ``PART.onnx.data`` each, and ``manifest.json``).

    ``parts`` None exports every part of the checkpoint (:func:`supported_parts`: ``image_encoder``;
    ``text_encoder``, ``detokenizer``; ``audio_encoder``, ``motion_decoder``; and with a decoder
    ``decoder_prefill``, ``decoder_step``, LLaVA's ``token_embedding``); ``dtype`` casts the
    weights as :func:`mmgen_engine.load` does (None: the checkpoint's); ``opset`` the ONNX opset
    (None: the exporter's default). Dimension 0 of every input and output is the symbolic ``batch``;
    the other symbolic dimensions are in :data:`DIMS`. ``out_dir`` must not exist or be empty; it
    appears complete or not at all. Returns ``out_dir``."""
    src, out, task, names = _check_request(checkpoint_dir, out_dir, parts, dtype, opset)
    onnx = require("onnx")
    require("onnxscript")
    pipe = load(src, dtype=dtype)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "task": task,
                "checkpoint": checkpoint_identity(src, known=True),
                "dtype": str(_weights_dtype(pipe)).removeprefix("torch."),
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
            if name in DECODER_PARTS:
                manifest["decoder"] = _decoder_entry(pipe)
            manifest["parts"][name] = {
                "file": file.name, "stage": part.stage,
                "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                "inputs": _io(model.graph.input), "outputs": _io(model.graph.output),
                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256(tmp / f)}
                          for f in files},
            }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for entry in manifest["parts"].values():  # a load that checks the export need not read it again
        for file, want in entry["files"].items():
            manifest_file.KNOWN_HASHES.remember(out / file, want["sha256"])
    return out


def _decoder_entry(pipe) -> dict:
    """The manifest's ``decoder``: what a generation loop over the decoder parts needs to know."""
    dec = _decoder(pipe)
    layers, heads, head_dim, max_positions = dec.cache_geometry()
    return {"kind": "prefix" if dec.uses_prefix else "cross", "num_layers": layers, "num_kv_heads": heads,
            "head_dim": head_dim, "max_positions": max_positions, "vocab_size": dec.cfg.vocab_size,
            "prefix_length": _fixed_prefix(pipe) or None}


def _weights_dtype(pipe) -> torch.dtype:
    """The weight dtype of a loaded pipeline."""
    return next(pipe.model.parameters()).dtype


def _export_part(part: Part, pipe, file: Path, opset: int | None) -> None:
    inputs = part.example(pipe)
    module = part.module(pipe).eval()
    symbols = {}  # one torch.export.Dim per name: inputs that share a name share its size
    dynamic = []
    for name in inputs:
        axes = part.dims(pipe).get(name, {})
        for dim in axes.values():
            if dim not in symbols:
                low, high = DIMS[dim]
                symbols[dim] = torch.export.Dim(dim, min=low, **({} if high is None else {"max": high}))
        dynamic.append({axis: symbols[dim] for axis, dim in axes.items()} or None)
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        # the exporter prints its progress, warns about its own internals (torch's deprecations) and
        # logs the torchvision ops it skips; its failures raise
        with _reference_backend(), torch.no_grad(), contextlib.redirect_stdout(None), warnings.catch_warnings(), \
                _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore", FutureWarning)
            # inputs that share a symbolic dimension (the batch) make it say that it names it once
            warnings.filterwarnings("ignore", "# The axis name", UserWarning)
            torch.onnx.export(module, tuple(inputs.values()), str(file), input_names=list(inputs),
                              output_names=list(part.outputs(pipe)),
                              dynamic_shapes=(tuple(dynamic),),  # forward(*inputs)
                              dynamo=True, external_data=True, optimize=True, verbose=False, **kwargs)
    except MMGenError:
        raise
    except Exception as e:  # the exporter raises many types; the stage cannot be exported
        cause = e.__cause__ or e  # torch.onnx wraps torch.export's error in a long how-to
        raise MMGenError(f"exporting {part.stage} to ONNX failed ({type(cause).__name__}: {one_line(cause)})") from None
