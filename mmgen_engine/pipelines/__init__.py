"""Pipelines: pre/post-processing and glue per task. ``PIPELINES`` maps a task to its class;
:func:`load` opens a converted checkpoint as its task's pipeline (``mm.load``)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

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
    "weight_format",
]
