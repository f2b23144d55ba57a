"""Pipelines: pre/post-processing and glue per task. ``PIPELINES`` maps a task to its class."""
from .captioning import CaptioningPipeline

PIPELINES = {"captioning": CaptioningPipeline}

__all__ = ["CaptioningPipeline", "PIPELINES"]
