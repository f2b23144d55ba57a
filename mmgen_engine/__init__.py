"""mmgen_engine: a fast inference engine for multimodal generation.

    import mmgen_engine as mm
    mm.convert("hf_vit_gpt2/", "converted/")
    pipe = mm.load("converted/")
    pipe.caption(["photo.jpg"])
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch

from .checkpoint import read_config, torch_dtype
from .convert import convert
from .demo import demo_model
from .errors import BackendError, CheckpointError, ConversionError, InputError, MMGenError
from .ops import available_backends
from .pipelines import (PIPELINES, CaptioningPipeline, ImageDetokenizer, SpeechToGesturePipeline,
                        TextToImagePipeline)
from .runtime import SamplingParams

__version__ = importlib.metadata.version("mmgen-engine")


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


def load(path, device="cpu", dtype=None, cuda_graphs=True):
    """Load a converted checkpoint directory as its task's pipeline.

    ``device`` "cpu" | "cuda" | "cuda:N"; ``dtype`` "float32" | "float16" | "bfloat16" casts the
    weights (None keeps the checkpoint's); ``cuda_graphs`` replays decode steps from CUDA graphs on
    a CUDA device (False: eager steps, the same tokens). Returns e.g. a :class:`CaptioningPipeline`.
    """
    if not isinstance(cuda_graphs, bool):
        raise InputError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    path = Path(path)
    dev = _device(device)
    try:
        target = torch_dtype(dtype)
    except CheckpointError as e:
        raise InputError(str(e)) from None
    config = read_config(path)
    pipe = PIPELINES[config.task].from_checkpoint(path, config, dev, target)
    pipe.use_cuda_graphs = cuda_graphs and dev.type == "cuda"
    return pipe


def build_info() -> dict:
    """What this installation can run: version, compiled CUDA kernels, Triton, backends per op."""
    from ._native import native_info

    info = {"version": __version__, **native_info(),
            "triton": importlib.util.find_spec("triton") is not None,
            "backends": available_backends()}
    return info


__all__ = ["BackendError", "build_info", "CaptioningPipeline", "CheckpointError", "ConversionError",
           "convert", "demo_model", "ImageDetokenizer", "InputError", "load", "MMGenError", "SamplingParams",
           "SpeechToGesturePipeline", "TextToImagePipeline"]
