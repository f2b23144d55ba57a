"""Model families. ``ARCHITECTURES`` maps a checkpoint's ``architecture`` to its model class;
``DETOKENIZERS`` (:mod:`.detokenizers`) maps an image detokenizer's architecture to its class."""
from .a2g_gpt import A2GGpt
from .bert import BertDecoder
from .blip import Blip
from .blip2 import Blip2
from .clipcap import ClipCap
from .dalle_bart import DalleBart
from .detokenizers import DETOKENIZERS, build_detokenizer
from .dvae import DVAEDecoder
from .git import Git
from .gpt2 import GPT2Decoder
from .llama import LlamaDecoder
from .llava import Llava
from .opt import OPTDecoder
from .quantize import head_weight, quantize_model, quantize_tensors
from .vit import ViTEncoder
from .vit_gpt2 import VitGpt2
from .vqgan import VQGANDecoder

ARCHITECTURES = {"vit-gpt2": VitGpt2, "blip": Blip, "git": Git, "clipcap": ClipCap, "dalle-bart": DalleBart,
                 "a2g-gpt": A2GGpt, "blip2": Blip2, "llava": Llava}


def build_model(cfg, device=None):
    """The model of a top-level checkpoint config (``device="meta"`` to assign weights afterwards),
    its decoder quantized where ``cfg.quantization`` says so (:func:`.quantize.quantize_model`)."""
    if cfg.task == "image-detokenizer":
        return build_detokenizer(cfg.detokenizer, device)
    model = ARCHITECTURES[cfg.architecture](cfg, device)
    if cfg.quantization is not None:
        quantize_model(model, cfg.quantization)
    return model


__all__ = [
    "A2GGpt",
    "ARCHITECTURES",
    "BertDecoder",
    "Blip",
    "Blip2",
    "ClipCap",
    "DalleBart",
    "Git",
    "build_detokenizer",
    "build_model",
    "DETOKENIZERS",
    "DVAEDecoder",
    "GPT2Decoder",
    "head_weight",
    "LlamaDecoder",
    "Llava",
    "OPTDecoder",
    "quantize_model",
    "quantize_tensors",
    "ViTEncoder",
    "VitGpt2",
    "VQGANDecoder",
]
