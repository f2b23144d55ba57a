"""Pipelines: pre/post-processing and glue per task. ``PIPELINES`` maps a task to its class;
:func:`load` opens a converted checkpoint as its task's pipeline (``mm.load``)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_config, torch_dtype
from ..config import QuantizationConfig
from ..errors import CheckpointError, InputError
from ..layers import QuantizedLinear
from ..models import head_weight, quantize_model
from .captioning import CaptioningPipeline
from .detokenizer import ImageDetokenizer
from .speech_to_gesture import SpeechToGesturePipeline
from .text_to_image import TextToImagePipeline

PIPELINES = {"captioning": CaptioningPipeline, "image-detokenizer": ImageDetokenizer,
             "speech-to-gesture": SpeechToGesturePipeline, "text-to-image": TextToImagePipeline}


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return dev


def load(path, device="cpu", dtype=None, cuda_graphs=True, quantize=None):
    """Load a converted checkpoint directory as its task's pipeline.

    ``device`` "cpu" | "cuda" | "cuda:N"; ``dtype`` "float32" | "float16" | "bfloat16" casts the
    weights (None keeps the checkpoint's); ``cuda_graphs`` replays decode steps from CUDA graphs on
    a CUDA device (False: eager steps, the same tokens). ``quantize`` None | "int8" | "int8-g128"
    (any "int8-gN", N >= 16): weight-only int8 for the decoder's linear layers and head, per output
    channel or per group of N input columns, made from the floating weights as they are read (see
    :class:`~mmgen_engine.config.QuantizationConfig`); a checkpoint converted with ``--quantize``
    loads as it is stored (None or its own setting). Returns e.g. a :class:`CaptioningPipeline`.

    bfloat16 on CPU (``dtype="bfloat16"``, or a bfloat16 checkpoint loaded as stored) without
    ``quantize`` stores the decoder's linear weights and its head in bfloat16 and, where
    :func:`cpu_bf16_compute` says float32 (the default, see there), computes in float32: the rest of
    the model (encoders, embeddings, norms, biases, the KV cache) is float32 and each decode-step
    product streams the bfloat16 weight (op ``linear_bf16_weight``). A head tied to the token
    embeddings gets a bfloat16 copy (``decoder.lm_head``) beside the float32 table the lookups read.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a checkpoint directory (str or os.PathLike), got {type(path).__name__}")
    if not isinstance(cuda_graphs, bool):
        raise InputError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    path = Path(path)
    dev = _device(device)
    try:
        target = torch_dtype(dtype)
    except CheckpointError as e:
        raise InputError(str(e)) from None
    quantization = QuantizationConfig.parse(quantize, InputError)
    config = read_config(path)
    kwargs = {}
    if (dev.type == "cpu" and (target or torch_dtype(config.dtype)) == torch.bfloat16 and quantization is None
            and config.quantization is None and config.task != "image-detokenizer"
            and cpu_bf16_compute() == torch.float32):
        target, kwargs["rebuild"] = torch.bfloat16, bf16_weight_storage
    if quantization is not None and quantization != config.quantization:
        if config.quantization is not None:
            raise InputError(f"{path}: the checkpoint is quantized as {config.quantization.spec!r}; load it with "
                             f"quantize=None (or {config.quantization.spec!r}), or requantize from a floating one")
        if config.task == "image-detokenizer":
            raise InputError(f"{path}: an image-detokenizer checkpoint has no decoder to quantize")
        kwargs["rebuild"] = functools.partial(quantize_model, quantization=quantization)
    pipe = PIPELINES[config.task].from_checkpoint(path, config, dev, target, **kwargs)
    pipe.use_cuda_graphs = cuda_graphs and dev.type == "cuda"
    return pipe


BF16_COMPUTE_ENV = "MMGEN_CPU_BF16_COMPUTE"


def cpu_bf16_compute() -> torch.dtype:
    """What a model loaded as bfloat16 on CPU computes in: ``$MMGEN_CPU_BF16_COMPUTE`` ("float32" or
    "bfloat16") where set, else float32, on every CPU.

    float32 compute is the default even where the CPU has bf16 arithmetic, so nothing is detected:
    on the AMD EPYC box, which has avx512_bf16, each GPT-2 decode product streams its bf16 weight
    faster into float32 activations (the native kernel) than torch's bf16 product does with bf16
    activations (one row, one thread: 768->2304 307 against 423 us, 3072->768 322 against 451,
    768->50257 6.6 against 8.4 ms; loaded box), and ViT-B/16 + GPT-2 small decodes faster end to
    end (benchmarks/bench_caption.py, ``engine-bfloat16-compute``). bf16 compute wins the encoder
    (a large matrix product: first token 0.58 against 1.05 s there), so it stays one switch away for
    CPUs and workloads where it measures faster."""
    forced = os.environ.get(BF16_COMPUTE_ENV)
    if forced is not None:
        if forced not in ("float32", "bfloat16"):
            raise InputError(f"${BF16_COMPUTE_ENV} must be 'float32' or 'bfloat16', got {forced!r}")
        return torch_dtype(forced)
    return torch.float32


def bf16_weight_storage(model: nn.Module) -> dict:
    """``load_model``'s ``rebuild`` for bfloat16 weights under float32 compute (see :func:`load`):
    every floating tensor is float32 (the model's ``fp32_tensors``) except the decoder's linear
    weights and its head, which keep the load dtype, bfloat16. A head tied to ``decoder.wte`` gets
    its own parameter ``decoder.lm_head`` (what :func:`~mmgen_engine.models.head_weight` returns
    first), made from the table as it is read."""
    decoder, maps = model.decoder, {}
    keep = {f"decoder.{name}.weight" for name, m in decoder.named_modules() if isinstance(m, nn.Linear)}
    if getattr(decoder, "lm_head", None) is None:  # the head is the token table
        decoder.lm_head = nn.Parameter(torch.empty_like(decoder.wte, device="meta"), requires_grad=False)
        maps["decoder.wte"] = lambda table: {"decoder.wte": table, "decoder.lm_head": table}
    keep.add("decoder.lm_head")
    model.fp32_tensors = frozenset(name for name, t in model.state_dict().items() if t.is_floating_point()) - keep
    return maps


def weight_format(pipe) -> dict:
    """How ``pipe`` computes and holds its decoder's weights, read from its layers (so it holds
    however the pipeline was loaded): ``{"dtype": the compute dtype ("float32", ...),
    "decoder_weights": what the decoder's products stream ("float32", "bfloat16", "int8", ...),
    "quantization": None, "int8" or "int8-gN"}``. ``mmgen serve`` reports it in ``/v1/models``."""
    decoder = pipe.model.decoder
    layer = next((m for m in decoder.modules() if isinstance(m, QuantizedLinear)), None)
    spec = None if layer is None else QuantizationConfig(method="int8", group_size=layer.group_size).spec
    weights = "int8" if layer is not None else str(head_weight(decoder).dtype).removeprefix("torch.")
    return {"dtype": str(pipe.dtype).removeprefix("torch."), "decoder_weights": weights, "quantization": spec}


__all__ = [
    "CaptioningPipeline",
    "ImageDetokenizer",
    "load",
    "PIPELINES",
    "SpeechToGesturePipeline",
    "TextToImagePipeline",
    "bf16_weight_storage",
    "cpu_bf16_compute",
    "weight_format",
]
