"""OpenAI DALL-E dVAE decoder (Ramesh et al. 2021, the ``dall_e`` package's ``Decoder``).

``codes [B, h, w]`` -> ``embedding[codes] + embedding_bias`` ``[B, n_init, h, w]`` (exactly the
upstream 1x1 conv over one-hot codes, without materializing the one-hot) -> groups ``1..G`` of
``n_blk_per_group`` blocks, group ``g`` ``n_hid * 2**(G-g)`` wide, a nearest 2x upsample after every
group but the last -> ``output(relu(x))`` (1x1, ``2 * output_channels``) -> pixels
``clamp((sigmoid(x[:, :3]) - eps) / (1 - 2 eps), 0, 1)``, ``eps = 0.1`` (``unmap_pixels``):
``[B, 3, h * 2**(G-1), w * 2**(G-1)]`` in ``[0, 1]``.

A block is ``id_path(x) + post_gain * conv_4(relu(conv_3(relu(conv_2(relu(conv_1(relu(x))))))))``,
``conv_1`` 1x1 to a quarter of the output width, ``conv_2..4`` 3x3, ``id_path`` a 1x1 conv where
the width changes, ``post_gain = 1 / (G * n_blk_per_group)**2``. Each conv is one fused
:func:`mmgen_engine.ops.conv2d` call (ReLU on its input; the shortcut and post_gain on
``conv_4``'s output). A nearest upsample commutes with ReLU and 1x1 convs, so the first block of an
upsampled group runs ``conv_1`` and ``id_path`` at the low resolution (4x fewer MACs) and the
upsample is folded into ``conv_2``'s input; only the shortcut is upsampled on its own.
Activations stay channels-last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import DVAEConfig

LOGIT_LAPLACE_EPS = 0.1


def _conv(cin: int, cout: int, k: int, device) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, device=device)


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, post_gain: float, device=None):
        super().__init__()
        hid = cout // 4
        self.id_path = _conv(cin, cout, 1, device) if cin != cout else None
        self.conv_1 = _conv(cin, hid, 1, device)
        self.conv_2 = _conv(hid, hid, 3, device)
        self.conv_3 = _conv(hid, hid, 3, device)
        self.conv_4 = _conv(hid, cout, 3, device)
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        """``x [B, cin, H, W]`` -> ``[B, cout, H, W]``; with ``upsample`` the block runs on the 2x
        nearest upsample of ``x`` and returns ``[B, cout, 2H, 2W]``."""
        h = ops.conv2d(x, self.conv_1.weight, self.conv_1.bias, 0, act="relu")
        h = ops.conv2d(h, self.conv_2.weight, self.conv_2.bias, 1, upsample=upsample, act="relu")
        h = ops.conv2d(h, self.conv_3.weight, self.conv_3.bias, 1, act="relu")
        shortcut = x if self.id_path is None else ops.conv2d(x, self.id_path.weight, self.id_path.bias, 0)
        if upsample:
            shortcut = F.interpolate(shortcut, scale_factor=2.0, mode="nearest")
        return ops.conv2d(h, self.conv_4.weight, self.conv_4.bias, 1, act="relu", residual=shortcut,
                          scale=self.post_gain)


class DVAEDecoder(nn.Module):
    """Image token ids -> RGB pixels in ``[0, 1]`` (see the module docstring)."""

    def __init__(self, cfg: DVAEConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.codebook_size = cfg.vocab_size
        self.embedding = nn.Parameter(torch.empty(cfg.vocab_size, cfg.n_init, device=device))
        self.embedding_bias = nn.Parameter(torch.empty(cfg.n_init, device=device))
        groups, cin = [], cfg.n_init
        for g in range(cfg.group_count):
            cout = cfg.n_hid * 2 ** (cfg.group_count - 1 - g)
            groups.append(nn.ModuleList(DecoderBlock(cin if b == 0 else cout, cout, cfg.post_gain, device)
                                        for b in range(cfg.n_blk_per_group)))
            cin = cout
        self.groups = nn.ModuleList(groups)
        self.output = _conv(cfg.n_hid, 2 * cfg.output_channels, 1, device)
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, h, w]`` int64 in ``[0, vocab_size)`` -> ``[B, 3, H, W]`` in ``[0, 1]``,
        ``H = h * downsample_factor``, in the module's dtype (channels-last memory)."""
        x = ops.token_gather(tokens, self.embedding, self.embedding_bias).permute(0, 3, 1, 2)  # (B, n_init, h, w), NHWC
        for g, group in enumerate(self.groups):
            for b, block in enumerate(group):
                x = block(x, upsample=g > 0 and b == 0)
        # only the logit-Laplace location (the first 3 channels) is the image
        c = self.cfg.output_channels
        x = ops.conv2d(x, self.output.weight[:c], self.output.bias[:c], 0, act="relu")
        return ((torch.sigmoid(x) - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp_(0, 1)
