"""The image detokenizer families: ``DETOKENIZERS`` maps a detokenizer's architecture to its class
(used by text-to-image models, which own one, and by the stand-alone detokenizer pipeline)."""
from ..config import DetokenizerConfig
from .dvae import DVAEDecoder
from .vqgan import VQGANDecoder

DETOKENIZERS = {"vqgan": VQGANDecoder, "dvae": DVAEDecoder}


def build_detokenizer(cfg: DetokenizerConfig, device=None) -> VQGANDecoder | DVAEDecoder:
    """The image detokenizer ``cfg`` describes (``device="meta"`` to assign weights afterwards)."""
    return DETOKENIZERS[cfg.architecture](cfg.model, device)
