"""Pipelines: pre/post-processing and glue per task. ``PIPELINES`` maps a task to its class."""
from .captioning import CaptioningPipeline
from .detokenizer import ImageDetokenizer
from .text_to_image import TextToImagePipeline

PIPELINES = {"captioning": CaptioningPipeline, "image-detokenizer": ImageDetokenizer,
             "text-to-image": TextToImagePipeline}

__all__ = ["CaptioningPipeline", "ImageDetokenizer", "PIPELINES", "TextToImagePipeline"]
