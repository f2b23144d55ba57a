"""Model families. ``ARCHITECTURES`` maps a checkpoint's ``architecture`` to its model class."""
from .gpt2 import GPT2Decoder
from .vit import ViTEncoder
from .vit_gpt2 import VitGpt2

ARCHITECTURES = {"vit-gpt2": VitGpt2}

__all__ = ["ARCHITECTURES", "GPT2Decoder", "ViTEncoder", "VitGpt2"]
