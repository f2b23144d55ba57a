"""Serving: :class:`Engine` (request queue, one scheduler thread per model, continuous batching)
and the request, event and handle types it speaks."""
from .engine import Engine
from .requests import CaptionRequest, GestureRequest, ImageRequest, PartialImage, PoseChunk, RequestHandle, TextDelta

__all__ = ["CaptionRequest", "Engine", "GestureRequest", "ImageRequest", "PartialImage", "PoseChunk",
           "RequestHandle", "TextDelta"]
