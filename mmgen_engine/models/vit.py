"""ViT image encoder (Dosovitskiy et al.), as in Hugging Face ``ViTModel`` without the pooler, and
its relatives: BLIP's vision model (the same math) and the CLIP vision tower (GIT, ClipCap: no patch
bias, a LayerNorm on the embeddings before the first block, quick GELU).

``pixel_values [B, C, H, W]`` -> patches ``[B, N, C*p*p]`` -> linear patch embedding, a learned CLS
token in front, learned positions, (``ln_pre``,) ``num_layers`` pre-LN blocks, final LayerNorm ->
``[B, 1 + N, D]``, or with ``pooled`` only the CLS state ``[B, D]`` (CLIP's pooled output);
:meth:`ViTEncoder.layer_states` gives the states after chosen blocks instead (LLaVA). The
patch embedding is the conv weight flattened to ``[D, C*p*p]`` (a stride-p conv with kernel p is
exactly that matmul over non-overlapping patches).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ViTConfig
from ..layers import EncoderBlock, LayerNorm, Linear


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig, device=None):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = Linear(cfg.num_channels * p * p, d, bias=cfg.patch_bias, device=device)
        self.cls_token = nn.Parameter(torch.empty(d, device=device))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches + 1, d, device=device))
        self.ln_pre = LayerNorm(d, cfg.layer_norm_eps, device) if cfg.pre_norm else None
        self.layers = nn.ModuleList(EncoderBlock(d, cfg.num_heads, cfg.intermediate_size, cfg.layer_norm_eps,
                                                 cfg.activation, cfg.qkv_bias, device) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(d, cfg.layer_norm_eps, device) if cfg.final_norm else None
        self.requires_grad_(False)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = pixel_values.shape
        p = self.cfg.patch_size
        x = pixel_values.view(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, nh, nw, C, p, p)
        return x.reshape(b, (hgt // p) * (wid // p), c * p * p)  # (B, N, C*p*p)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patchify(pixel_values.to(self.patch_embed.weight.dtype)))
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        h = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        return h if self.ln_pre is None else self.ln_pre(h)

    def forward(self, pixel_values: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """``pixel_values [B, C, H, W]`` (H = W = image_size) -> hidden states ``[B, 1 + N, D]``, or
        the CLS state ``[B, D]`` when ``pooled``; the final LayerNorm applied (if the model has one)."""
        h = self._embed(pixel_values)
        for layer in self.layers:
            h = layer(h)
        h = h[:, 0] if pooled else h
        return h if self.ln_f is None else self.ln_f(h)

    def layer_states(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """The states ``[B, 1 + N, D]`` after each of ``layers`` blocks (0: the embeddings, after
        ``ln_pre``), without the final LayerNorm, as transformers' ``hidden_states[k]``; only the
        blocks up to the deepest asked for run."""
        h = self._embed(pixel_values)
        states = {0: h}
        for k, layer in enumerate(self.layers[:max(layers)], start=1):
            h = layer(h)
            if k in layers:
                states[k] = h
        return [states[k] for k in layers]
