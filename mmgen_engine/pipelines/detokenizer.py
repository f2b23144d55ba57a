"""Image detokenizer: image token ids -> RGB pixels, with a converted VQGAN or dVAE decoder alone.

:func:`check_image_tokens` and :func:`to_pil` serve every pipeline that ends in image tokens.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..checkpoint import load_model
from ..config import ImageDetokenizerConfig
from ..errors import InputError, one_line
from ..models import build_model
from ..runtime.layout import channels_last_weights
from ..runtime.limits import MAX_IMAGE_TOKENS_PER_CALL, MAX_TOKEN_GRID_SIDE, check_count
from .stages import Stages


def check_image_tokens(tokens, codebook_size: int) -> torch.Tensor:
    """Integer ids ``[B, h, w]``, or ``[B, n]`` with ``n = s * s`` (a row-major ``s x s`` grid), each
    in ``[0, codebook_size)`` -> int64 ``[B, h, w]`` on the same device. A torch tensor or numpy
    array; anything else (float or bool ids, another rank, a non-square count, an empty batch, an id
    out of range) raises :class:`InputError`, and so does a request over the limits of
    :mod:`~mmgen_engine.runtime.limits` (``h, w <= MAX_TOKEN_GRID_SIDE``, ``B <=
    MAX_IMAGES_PER_CALL``, ``B * h * w <= MAX_IMAGE_TOKENS_PER_CALL``), checked before the ids are
    read."""
    if isinstance(tokens, np.ndarray):
        try:
            tokens = torch.from_numpy(tokens)
        except (TypeError, ValueError) as e:  # object or string dtypes, negative strides
            raise InputError(f"image tokens must be an integer array ({one_line(e)})") from None
    if not isinstance(tokens, torch.Tensor):
        raise InputError(f"image tokens must be an integer tensor [B, h, w] or [B, h*w], got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputError(f"image tokens must have an integer dtype, got {str(tokens.dtype).removeprefix('torch.')}")
    if tokens.dim() not in (2, 3):
        raise InputError(f"image tokens must be [B, h, w] or [B, h*w], got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise InputError(f"image tokens are empty (shape {tuple(tokens.shape)})")
    if tokens.dim() == 2:
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise InputError(f"{tokens.shape[1]} image tokens per row are not a square grid; pass [B, h, w]")
        batch, h, w = tokens.shape[0], side, side
    else:
        batch, h, w = tokens.shape
    if max(h, w) > MAX_TOKEN_GRID_SIDE:
        raise InputError(f"image token grids of {h}x{w}; at most {MAX_TOKEN_GRID_SIDE} tokens a side")
    check_count("images", batch)
    check_count("image tokens", tokens.numel(), MAX_IMAGE_TOKENS_PER_CALL)
    tokens = tokens.reshape(batch, h, w).long()
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= codebook_size:
        raise InputError(f"image token ids must be in [0, {codebook_size}), got values in [{lo}, {hi}]")
    return tokens


# Pixels decoded per forward pass: the decoder's activations at full resolution are about a hundred
# channels, so a batch is decoded in chunks (min-dalle's 256x256 images: 16 at a time, ~0.5 GB per
# activation) instead of all at once (256 images: ~8 GB each).
DECODE_PIXELS = 2 ** 20


def decode(stage: Callable[[torch.Tensor], torch.Tensor], image_tokens, codebook_size: int, downsample_factor: int,
           device: torch.device) -> torch.Tensor:
    """Pixels ``[B, 3, H, W]`` float32 in ``[0, 1]`` on ``device`` of checked image tokens (see
    :func:`check_image_tokens`) through a detokenizer ``stage`` (ids ``[b, h, w]`` -> pixels ``[b, 3,
    h * f, w * f]``, ``f = downsample_factor``), :data:`DECODE_PIXELS` at a time."""
    tokens = check_image_tokens(image_tokens, codebook_size).to(device)
    pixels = tokens.shape[1] * tokens.shape[2] * downsample_factor ** 2
    with torch.inference_mode():
        return torch.cat([stage(chunk).float() for chunk in tokens.split(max(1, DECODE_PIXELS // pixels))])


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """Pixels ``[B, 3, H, W]`` in ``[0, 1]`` -> ``B`` RGB images (``round(255 * x)``, clamped)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a [B, 3, H, W] tensor, got {shape}")
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(np.ascontiguousarray(p), "RGB") for p in pixels]


class ImageDetokenizer(Stages):
    """Decodes image tokens with a converted VQGAN or dVAE (see :func:`mmgen_engine.load`)."""

    task = "image-detokenizer"
    to_pil = staticmethod(to_pil)

    def __init__(self, model: torch.nn.Module, config: ImageDetokenizerConfig, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.codebook_size = config.detokenizer.codebook_size
        self.downsample_factor = config.detokenizer.downsample_factor
        self._init_stages({"detokenizer": model})

    @classmethod
    def from_checkpoint(cls, path: Path, config: ImageDetokenizerConfig, device: torch.device,
                        dtype: torch.dtype | None) -> ImageDetokenizer:
        model = load_model(path, config, build_model, device, dtype)
        channels_last_weights(model)
        return cls(model, config, device)

    def decode_tokens(self, image_tokens) -> torch.Tensor:
        """Ids ``[B, h, w]`` or ``[B, h*w]`` (see :func:`check_image_tokens`) -> pixels
        ``[B, 3, h * f, w * f]`` float32 in ``[0, 1]`` on the pipeline's device, ``f`` the
        downsampling factor."""
        return decode(self.stages["detokenizer"], image_tokens, self.codebook_size, self.downsample_factor, self.device)
