"""Pipelines: pre/post-processing and glue per task. ``PIPELINES`` maps a task to its class."""
from .captioning import CaptioningPipeline
from .detokenizer import ImageDetokenizer
from .speech_to_gesture import SpeechToGesturePipeline
from .text_to_image import TextToImagePipeline

PIPELINES = {"captioning": CaptioningPipeline, "image-detokenizer": ImageDetokenizer,
             "speech-to-gesture": SpeechToGesturePipeline, "text-to-image": TextToImagePipeline}

__all__ = ["CaptioningPipeline", "ImageDetokenizer", "PIPELINES", "SpeechToGesturePipeline", "TextToImagePipeline"]
