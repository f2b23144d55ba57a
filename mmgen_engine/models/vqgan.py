"""VQGAN decoder (Esser et al., taming-transformers), also min-dalle's detokenizer.

``tokens [B, h, w]`` -> codebook rows ``[B, E, h, w]`` -> ``post_quant_conv`` (1x1) -> ``conv_in``
(3x3) -> mid (ResNet, attention, ResNet) -> levels ``L-1 .. 0`` of ``num_res_blocks + 1`` ResNet
blocks (each followed by attention on ``attn_levels``), a nearest 2x upsample + 3x3 conv after
every level but 0 -> GroupNorm + SiLU -> ``conv_out`` -> pixels in ``[0, 1]``:
``[B, 3, h * 2**(L-1), w * 2**(L-1)]``.

Every conv is one fused :func:`mmgen_engine.ops.conv2d` call: a ResNet block is
``x + conv2(silu(gn2(conv1(silu(gn1(x))))))`` as two calls (norm + SiLU on the input side, the
shortcut added on the output side), the upsample is folded into the next conv's input. The
attention block is ``x + proj_out(attn(qkv(gn(x))))``: one conv for GroupNorm + fused q/k/v, single
head attention over the ``h * w`` positions, one conv adding the residual. Activations stay
channels-last (``[B, H, W, C]`` in memory), so a 1x1 conv's output reads as ``[B, H*W, C]`` rows.

State-dict names are taming's (``decoder.up.{i}.block.{j}.conv1.weight``, ...), except the codebook
``embedding [codebook_size, embed_dim]`` and the attention's fused ``qkv [3C, C, 1, 1]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import VQGANConfig


def _conv(cin: int, cout: int, k: int, device) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, device=device)


class GroupNorm(nn.GroupNorm):
    def args(self) -> tuple:
        """The ``norm`` argument of :func:`ops.conv2d`: GroupNorm fused into a conv's input."""
        return self.weight, self.bias, self.num_groups, self.eps


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``; the shortcut is a 1x1 conv when
    the width changes."""

    def __init__(self, cin: int, cout: int, cfg: VQGANConfig, device=None):
        super().__init__()
        self.norm1 = GroupNorm(cfg.norm_groups, cin, cfg.norm_eps, device=device)
        self.conv1 = _conv(cin, cout, 3, device)
        self.norm2 = GroupNorm(cfg.norm_groups, cout, cfg.norm_eps, device=device)
        self.conv2 = _conv(cout, cout, 3, device)
        self.nin_shortcut = _conv(cin, cout, 1, device) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.conv2d(x, self.conv1.weight, self.conv1.bias, 1, norm=self.norm1.args(), act="silu")
        shortcut = x
        if self.nin_shortcut is not None:
            shortcut = ops.conv2d(x, self.nin_shortcut.weight, self.nin_shortcut.bias, 0)
        return ops.conv2d(h, self.conv2.weight, self.conv2.bias, 1, norm=self.norm2.args(), act="silu",
                          residual=shortcut)


class AttnBlock(nn.Module):
    """``x + proj_out(softmax(q k^T / sqrt(C)) v)`` over the ``H*W`` positions, one head of width C,
    ``q, k, v = qkv(norm(x))``."""

    def __init__(self, c: int, cfg: VQGANConfig, device=None):
        super().__init__()
        self.norm = GroupNorm(cfg.norm_groups, c, cfg.norm_eps, device=device)
        self.qkv = _conv(c, 3 * c, 1, device)
        self.proj_out = _conv(c, c, 1, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = ops.conv2d(x, self.qkv.weight, self.qkv.bias, 0, norm=self.norm.args())
        qkv = qkv.permute(0, 2, 3, 1).reshape(b, 1, hgt * wid, 3 * c)  # (B, 1, HW, 3C), a view if NHWC
        q, k, v = qkv.split(c, dim=-1)
        o = ops.attention(q, k, v, c ** -0.5, causal=False)  # (B, 1, HW, C)
        o = o.reshape(b, hgt, wid, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last
        return ops.conv2d(o, self.proj_out.weight, self.proj_out.bias, 0, residual=x)


class Mid(nn.Module):
    def __init__(self, c: int, cfg: VQGANConfig, device=None):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, cfg, device)
        self.attn_1 = AttnBlock(c, cfg, device)
        self.block_2 = ResnetBlock(c, c, cfg, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResNet blocks (+ attention), then the 2x upsample conv unless level 0."""

    def __init__(self, cin: int, cout: int, attention: bool, upsample: bool, cfg: VQGANConfig, device=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, cfg, device)
                                   for j in range(cfg.num_res_blocks + 1))
        self.attn = nn.ModuleList(AttnBlock(cout, cfg, device) for _ in self.block) if attention else None
        self.upsample = None
        if upsample:
            self.upsample = nn.Module()
            self.upsample.conv = _conv(cout, cout, 3, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if self.attn is not None:
                x = self.attn[j](x)
        if self.upsample is not None:
            conv = self.upsample.conv
            x = ops.conv2d(x, conv.weight, conv.bias, 1, upsample=True)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig, device=None):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = _conv(cfg.z_channels, widths[-1], 3, device)
        self.mid = Mid(widths[-1], cfg, device)
        # up[i] is level i; it takes the width of level i + 1 (the one run before it)
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, len(widths) - 1)], widths[i], i in cfg.attn_levels, i != 0, cfg, device)
            for i in range(len(widths)))
        self.norm_out = GroupNorm(cfg.norm_groups, widths[0], cfg.norm_eps, device=device)
        self.conv_out = _conv(widths[0], cfg.out_channels, 3, device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(ops.conv2d(z, self.conv_in.weight, self.conv_in.bias, 1))
        for level in reversed(self.up):
            h = level(h)
        return ops.conv2d(h, self.conv_out.weight, self.conv_out.bias, 1, norm=self.norm_out.args(), act="silu")


class VQGANDecoder(nn.Module):
    """Image token ids -> RGB pixels in ``[0, 1]`` (see the module docstring)."""

    def __init__(self, cfg: VQGANConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.codebook_size = cfg.codebook_size
        self.embedding = nn.Parameter(torch.empty(cfg.codebook_size, cfg.embed_dim, device=device))
        self.post_quant_conv = _conv(cfg.embed_dim, cfg.z_channels, 1, device)
        self.decoder = Decoder(cfg, device)
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, h, w]`` int64 in ``[0, codebook_size)`` -> ``[B, 3, H, W]`` in ``[0, 1]``,
        ``H = h * downsample_factor``, in the module's dtype (channels-last memory)."""
        z = ops.token_gather(tokens, self.embedding).permute(0, 3, 1, 2)  # (B, E, h, w), channels-last
        z = ops.conv2d(z, self.post_quant_conv.weight, self.post_quant_conv.bias, 0)
        x = self.decoder(z)
        if self.cfg.output == "minus1_1":
            x = x.add(1).mul_(0.5)
        return x.clamp_(0, 1)
