"""mmgen_engine: a fast inference engine for multimodal generation.

    import mmgen_engine as mm
    mm.convert("hf_vit_gpt2/", "converted/")
    pipe = mm.load("converted/")
    pipe.caption(["photo.jpg"])
"""
from __future__ import annotations

import importlib.metadata
import importlib.util

from .convert import convert
from .demo import demo_model
from .errors import (
    BackendError,
    CheckpointError,
    ConversionError,
    DeadlineExceeded,
    EngineClosed,
    EngineFailed,
    EngineOverloaded,
    InputError,
    MMGenError,
)
from .onnx import export_onnx
from .onnx.backend import load
from .ops import available_backends
from .pipelines import CaptioningPipeline, ImageDetokenizer, SpeechToGesturePipeline, TextToImagePipeline
from .runtime import SamplingParams
from .serving import (
    CaptionRequest,
    Engine,
    GestureRequest,
    ImageRequest,
    PartialImage,
    PoseChunk,
    RequestHandle,
    TextDelta,
)

__version__ = importlib.metadata.version("mmgen-engine")


def build_info() -> dict:
    """What this installation can run: version, compiled CUDA kernels, Triton, backends per op."""
    from ._native import native_info

    info = {"version": __version__, **native_info(),
            "triton": importlib.util.find_spec("triton") is not None,
            "backends": available_backends()}
    return info


__all__ = ["BackendError", "build_info", "CaptioningPipeline", "CaptionRequest", "CheckpointError", "ConversionError",
           "convert", "DeadlineExceeded", "demo_model", "Engine", "EngineClosed", "EngineFailed", "EngineOverloaded",
           "export_onnx", "GestureRequest", "ImageDetokenizer", "ImageRequest", "InputError", "load", "MMGenError",
           "PartialImage", "PoseChunk", "RequestHandle", "SamplingParams", "SpeechToGesturePipeline", "TextDelta",
           "TextToImagePipeline"]
