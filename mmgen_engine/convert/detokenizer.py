"""What the stand-alone image-detokenizer converters share: the engine config of a converted VQGAN or
dVAE decoder and its tensors, cast and checked against the model built from that config."""
from __future__ import annotations

import torch

from ..config import DetokenizerConfig, from_dict
from ..errors import CheckpointError, ConversionError
from ..models import build_detokenizer
from .keymap import finish, header


def state_names(architecture: str, model_config: dict, where: str) -> list[str]:
    """The state-dict names of the ``architecture`` model ``model_config`` describes (validated)."""
    try:
        cfg = from_dict(DetokenizerConfig, {"architecture": architecture, architecture: model_config}, where)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return list(build_detokenizer(cfg, device="meta").state_dict())


def checkpoint(source_format: str, architecture: str, model_config: dict, tensors: dict[str, torch.Tensor],
               dtype: str | None, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, tensors)`` of an ``image-detokenizer`` checkpoint: ``model_config`` is the
    VQGANConfig / DVAEConfig dict, ``tensors`` the model's state dict; floating tensors are cast to
    ``dtype`` (None: the dtype most of them have). Any inconsistency raises ConversionError."""
    config = {**header("image-detokenizer", architecture, source_format, dtype),
              "detokenizer": {"architecture": architecture, architecture: model_config}}
    return finish(config, tensors, dtype, where)
