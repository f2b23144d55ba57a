"""Train the bundled demo text-to-image model: a tiny min-dalle (DALL-E mini style BART encoder /
decoder over VQGAN image tokens) on the synthetic shapes world (``mmgen_engine.demo.world``),
written in min-dalle's checkpoint format.

Reproduce the shipped demo model (CPU, 1 torch thread, about 30 minutes: stage 1 ~11, stage 2 ~15)::

    python scripts/train_demo_txt2img.py
    mmgen convert build/demo_txt2img_min_dalle mmgen_engine/demo/models/text-to-image --from min-dalle

What it does, deterministically (fixed seeds, data drawn from fixed scene seeds, all below
``world.HELD_OUT_SEED``, in a fixed order; bitwise reproducible for a given ``--threads``):

* builds a tiny BART-style BPE vocabulary for min-dalle's ``TextTokenizer``: ``<s> <pad> </s> <unk>``
  (ids 0-3), the word marker ``chr(ord(" ") + 256)`` and the printable ASCII characters, plus
  left-to-right merges that make every word of the grammar (marker included) one token;
* stage 1, the image tokenizer: a VQ autoencoder, 64x64 images <-> a 16x16 grid of codes. Encoder
  (not shipped): a patch-local MLP over 4x4 pixel patches, so a code depends on its patch only and
  equal patches always get equal codes; quantizer: EMA codebook (256 x 32) seeded k-means++ style,
  dead codes restarted on the worst-represented encoder outputs, commitment loss; decoder:
  taming-transformers' ``Decoder`` (ch 32, ch_mult (1, 1, 1), num_res_blocks 1 = two ResnetBlocks per
  level, attention in the middle only, GroupNorm with 32 groups and min-dalle's eps 1e-5, swish) with
  min-dalle's output convention (pixels = clamp(x, 0, 1)); L1 + L2 on fresh scenes every step
  (1200 steps x 16 images, Adam, warmup + cosine);
* stage 2, the prior: min-dalle's ``DalleBartEncoder`` / ``DalleBartDecoder`` (same parameter names
  and math: GLU feed-forward, LayerNorms before and after each sublayer; width 128 = 2 heads of 64,
  2 encoder and 3 decoder layers, GLU 256), teacher-forced on the codes of fresh scenes (2000 steps x
  16; ``--two-object-frac`` of them two-object scenes, the rest one-object), AdamW, warmup + cosine.
  Decoder input = [start, code_0 .. code_254] with the start token the extra embedding row
  ``image_vocab_count`` (min-dalle's ``2**14 - 1`` for its 16384-code VQGAN), positions 0..255 (their
  embedding starts from a 2D sine-cosine table of the 16x16 grid), targets code_0 .. code_255,
  cross-entropy over the ``image_vocab_count`` codes. With probability ``--uncond-prob`` a caption is
  replaced by the unconditional text ``<s> </s>`` (min-dalle's supercondition = classifier-free
  guidance needs it). Text rows are trained 16 long: padding is masked, so that equals 64;
* writes ``encoder.pt``, ``decoder.pt`` (min-dalle's state dict layouts), ``detoker.pt``
  (``VQGanDetokenizer`` naming: ``embedding``, ``post_quant_conv``, ``decoder.*``), ``vocab.json``,
  ``merges.txt`` and ``generation_config.json`` (the sampling below, in min-dalle's ``generate_image``
  argument names, which the ``min-dalle`` converter makes the checkpoint's generation defaults) to
  ``--out``; stage 1 (with the encoder and codebook) to ``--work``/stage1.pt,
  which ``--reuse-stage1`` loads instead of retraining;
* evaluates on held-out material with the bundled captioning demo model: the exact-match rate of the
  captions of VQ reconstructions of scene seeds ``[world.HELD_OUT_SEED, + --recon-eval-n)``, and,
  for images generated min-dalle style (supercondition ``--guidance``, top-k ``--top-k``,
  ``--temperature``, generator seeds 1..``--eval-seeds``) for the 18 one-object prompts, the fraction
  captioned with the prompt's color and shape (grid in ``--work``/generated.png). Exits non-zero
  below ``--min-recon-accuracy`` or ``--min-accuracy``.

Sampling (``GENERATION``, the checkpoint's generation defaults): a low supercondition factor suits
this small model (upstream's 16 over-sharpens an undertrained unconditional row and breaks the
shapes), with a small top-k; greedy decoding (top-k 1) degenerates. ``scripts/measure_demo_txt2img.py``
measures the converted model with them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmgen_engine.demo import world  # noqa: E402

# ---------------------------------------------------------------------------------------------
# text tokenizer (min-dalle's TextTokenizer: BART ids, byte-pair merges over characters)

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0, 1, 2, 3 as in BART
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
WORD_MARK = chr(ord(" ") + 256)  # "Ġ": min-dalle prefixes every word with it before merging
CHARS = string.ascii_lowercase + string.digits + string.punctuation  # the tokenizer lower-cases, keeps ASCII
# the sampling the model is evaluated and shipped with (min-dalle's generate_image argument names)
GENERATION = {"temperature": 0.7, "top_k": 4, "supercondition_factor": 2.0}
TEXT_TOKEN_COUNT = 64  # min-dalle's text context
TRAIN_TEXT_LEN = 16  # rows are trained padded to 16: padding is masked out, so this equals 64
IMAGE_TOKEN_COUNT = 256  # a 16x16 grid
GRID = 16


def grammar_words() -> list[str]:
    words = ["a", *world.COLORS, *world.SHAPES]
    for rel in world.RELATIONS:
        words += rel.split(" ")
    return list(dict.fromkeys(words))


def build_text_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (subword -> id) and merges (ranked pairs). Each grammar word is merged left to
    right from its marker: (Ġ, r) -> Ġr, (Ġr, e) -> Ġre, (Ġre, d) -> Ġred. Every merge has a marker
    on its left, so no other pair of a word ever merges and each grammar word ends as one token."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in WORD_MARK + CHARS:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in grammar_words():
        cur = WORD_MARK
        for ch in word:
            pair = (cur, ch)
            cur = cur + ch
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(cur, len(vocab))
    return vocab, merges


def save_text_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], out: Path) -> None:
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf8")
    # min-dalle reads f.read().split("\n")[1:-1]: a header line first, a final newline last
    lines = ["#version: 0.2 - shapes-world demo"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf8")


class TextTokenizer:
    """min-dalle's ``TextTokenizer.tokenize`` (without its emoji step, a no-op for ASCII text)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab = vocab
        self.rank = {pair: i for i, pair in enumerate(merges)}

    def bpe(self, word: str) -> list[str]:
        sub = [WORD_MARK] + list(word)
        while len(sub) > 1:
            pairs = list(zip(sub[:-1], sub[1:]))
            best = min(pairs, key=lambda p: self.rank.get(p, math.inf))
            if best not in self.rank:
                break
            i = pairs.index(best)
            sub = sub[:i] + [sub[i] + sub[i + 1]] + sub[i + 2:]
        return sub

    def tokenize(self, text: str) -> list[int]:
        text = text.lower().encode("ascii", errors="ignore").decode()
        ids = [self.vocab.get(s, UNK_ID) for w in text.split(" ") if w for s in self.bpe(w)]
        return [BOS_ID] + ids + [EOS_ID]


def text_rows(tok: TextTokenizer, texts: list[str], length: int = TEXT_TOKEN_COUNT) -> torch.Tensor:
    """(B, length) prompt rows ``<s> ... </s>`` padded with 1, as min-dalle builds them."""
    rows = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = tok.tokenize(t)[:length]
        rows[i, : len(ids)] = torch.tensor(ids)
    return rows


def uncond_rows(rows: torch.Tensor) -> torch.Tensor:
    """min-dalle's unconditional rows: each row's first and last real token, then padding."""
    out = torch.full_like(rows, PAD_ID)
    lengths = (rows != PAD_ID).sum(1)
    out[:, 0] = rows[:, 0]
    out[:, 1] = rows[torch.arange(len(rows)), lengths - 1]
    return out


# ---------------------------------------------------------------------------------------------
# stage 1 modules: VQ autoencoder; the decoder uses taming-transformers' / min-dalle's names


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-5)  # min-dalle's VQGanDetokenizer


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(y).reshape(b, c, h * w).transpose(1, 2)
        v = self.v(y).reshape(b, c, h * w).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, single head
        return x + self.proj_out(o.transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TamingDecoder(nn.Module):
    """taming.modules.diffusionmodules.model.Decoder(ch, ch_mult, num_res_blocks=blocks - 1,
    attn_resolutions=[], z_channels, out_ch=3): ``up[0]`` is the highest resolution, every level
    but 0 ends with a 2x upsample; the middle always has block_1, attn_1, block_2."""

    def __init__(self, z_channels: int, ch: int, ch_mult: tuple[int, ...], blocks: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        up = []
        for level in reversed(range(len(ch_mult))):
            mod = nn.Module()
            block_out = ch * ch_mult[level]
            mod.block = nn.ModuleList()
            for _ in range(blocks):
                mod.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            mod.attn = nn.ModuleList()
            if level != 0:
                mod.upsample = Upsample(block_in)
            up.insert(0, mod)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            for blk in self.up[level].block:
                h = blk(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Detokenizer(nn.Module):
    """min-dalle's ``VQGanDetokenizer`` layout: codes -> embedding -> post_quant_conv -> decoder;
    the image is ``clamp(decoder output, 0, 1)``."""

    def __init__(self, codebook: int, embed_dim: int, ch: int, ch_mult: tuple[int, ...], blocks: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.decoder = TamingDecoder(embed_dim, ch, ch_mult, blocks)

    def decode_latent(self, zq):  # (B, E, 16, 16) -> (B, 3, 64, 64), unclamped
        return self.decoder(self.post_quant_conv(zq))

    def decode_codes(self, codes):  # (B, 256) or (B, 16, 16) -> (B, 3, 64, 64) in [0, 1]
        z = self.embedding(codes.reshape(len(codes), GRID, GRID)).permute(0, 3, 1, 2)
        return self.decode_latent(z).clamp(0, 1)


class PatchEncoder(nn.Module):
    """Not shipped. A 4x4-patch-local MLP: each code is a function of its own 16 pixels, so equal
    patches always get equal codes (the prior then models a deterministic, low-entropy grid)."""

    def __init__(self, embed_dim: int, hidden: int = 128):
        super().__init__()
        self.patch = nn.Conv2d(3, hidden, 4, stride=4)
        self.fc1 = nn.Conv2d(hidden, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, embed_dim, 1)

    def forward(self, x):  # x in [0, 1]
        h = F.silu(self.patch(x * 2 - 1))
        return self.fc2(F.silu(self.fc1(h)))


class EMAQuantizer(nn.Module):
    """Nearest-code vector quantizer. The codebook is an exponential moving average of the encoder
    outputs assigned to each code (no gradient), seeded k-means++ style from the first batch; codes
    that fall out of use are restarted on encoder outputs drawn with probability proportional to
    their squared distance to the codebook (the patches it represents worst, typically edges)."""

    def __init__(self, codebook: int, dim: int, decay: float = 0.99, dead: float = 0.03):
        super().__init__()
        self.decay, self.dead = decay, dead
        self.register_buffer("embed", torch.zeros(codebook, dim))
        self.register_buffer("count", torch.zeros(codebook))
        self.register_buffer("embed_sum", torch.zeros(codebook, dim))

    def distances(self, flat):
        return ((flat * flat).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
                + (self.embed * self.embed).sum(1)).clamp_min(0)

    @torch.no_grad()
    def reseed(self, codes: torch.Tensor, flat: torch.Tensor, gen: torch.Generator, count: float) -> None:
        """Put ``codes`` one by one on batch vectors drawn with probability ~ squared distance to the
        nearest live code (k-means++ seeding)."""
        live = torch.ones(len(self.embed), dtype=torch.bool)
        live[codes] = False
        d = self.distances(flat)[:, live].min(1).values if live.any() else torch.full((len(flat),), 1.0)
        for c in codes.tolist():
            w = d if d.sum() > 0 else torch.ones_like(d)
            i = int(torch.multinomial(w, 1, generator=gen))
            self.embed[c] = flat[i]
            self.embed_sum[c] = flat[i] * count
            self.count[c] = count
            d = torch.minimum(d, (flat - flat[i]).pow(2).sum(1))

    def forward(self, z, gen: torch.Generator | None = None, restart: bool = False):
        b, e, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, e)
        if self.training and not bool(self.count.any()):
            self.reseed(torch.arange(len(self.embed)), flat.detach(), gen, 1.0)
        idx = self.distances(flat.detach()).argmin(1)
        zq = self.embed[idx]
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(idx, len(self.embed)).to(flat.dtype)
                self.count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_sum.mul_(self.decay).add_(onehot.t() @ flat.detach(), alpha=1 - self.decay)
                used = self.count > 1e-6
                self.embed[used] = self.embed_sum[used] / self.count[used, None]
                dead = (self.count < self.dead).nonzero()[:, 0]
                if restart and len(dead):
                    self.reseed(dead, flat.detach(), gen, 0.1)
        commit = F.mse_loss(flat, zq.detach())
        zq = flat + (zq - flat).detach()  # straight-through
        return zq.reshape(b, h, w, e).permute(0, 3, 1, 2), idx.reshape(b, h * w), commit


# ---------------------------------------------------------------------------------------------
# stage 2 modules: min-dalle's DalleBartEncoder / DalleBartDecoder (same parameter names and math)


class GLU(nn.Module):
    def __init__(self, d: int, mid: int):
        super().__init__()
        self.ln0, self.ln1 = nn.LayerNorm(d), nn.LayerNorm(mid)
        self.fc0 = nn.Linear(d, mid, bias=False)
        self.fc1 = nn.Linear(d, mid, bias=False)
        self.fc2 = nn.Linear(mid, d, bias=False)

    def forward(self, z):
        z = self.ln0(z)
        return self.fc2(self.ln1(F.gelu(self.fc0(z)) * self.fc1(z)))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def split(self, x):  # (B, T, D) -> (B, H, T, D / H)
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def attend(self, q, k, v, mask=None, causal=False):
        """q (B, Tq, D) already projected, k / v (B, H, Tk, Dh); mask (B, 1, 1|Tq, Tk) bool, True = keep."""
        o = F.scaled_dot_product_attention(self.split(q), k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(o.transpose(1, 2).reshape(q.shape))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, glu: int):
        super().__init__()
        self.pre_self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = Attention(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.glu = GLU(d, glu)

    def forward(self, x, mask):
        h = self.pre_self_attn_layer_norm(x)
        a = self.self_attn
        h = a.attend(a.q_proj(h), a.split(a.k_proj(h)), a.split(a.v_proj(h)), mask)
        x = x + self.self_attn_layer_norm(h)
        return x + self.glu(x)


class TextEncoder(nn.Module):
    """min-dalle's DalleBartEncoder."""

    def __init__(self, vocab: int, d: int, layers: int, glu: int):
        super().__init__()
        heads = d // 64
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_positions = nn.Embedding(TEXT_TOKEN_COUNT, d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, glu) for _ in range(layers))
        self.layernorm_embedding = nn.LayerNorm(d)
        self.final_ln = nn.LayerNorm(d)

    def forward(self, tokens):  # (B, T) -> (B, T, D)
        mask = (tokens != PAD_ID)[:, None, None, :]
        pos = torch.arange(tokens.shape[1])
        x = self.layernorm_embedding(self.embed_tokens(tokens) + self.embed_positions(pos))
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_ln(x)


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, glu: int):
        super().__init__()
        self.pre_self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = Attention(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.pre_encoder_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.glu = GLU(d, glu)

    def forward(self, x, enc_kv, enc_mask, cache=None):
        """x (B, T, D). Training (cache None): causal over x. Decoding: ``cache`` is a list
        [k, v] of the earlier positions (B, H, t, Dh) or None entries, updated in place."""
        h = self.pre_self_attn_layer_norm(x)
        a = self.self_attn
        k, v = a.split(a.k_proj(h)), a.split(a.v_proj(h))
        if cache is None:
            h = a.attend(a.q_proj(h), k, v, causal=True)
        else:
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[0], cache[1] = k, v
            h = a.attend(a.q_proj(h), k, v)  # one new position: it sees every cached one
        x = x + self.self_attn_layer_norm(h)
        h = self.pre_encoder_attn_layer_norm(x)
        h = self.encoder_attn.attend(self.encoder_attn.q_proj(h), enc_kv[0], enc_kv[1], enc_mask)
        x = x + self.encoder_attn_layer_norm(h)
        return x + self.glu(x)

    def encoder_kv(self, enc):
        a = self.encoder_attn
        return a.split(a.k_proj(enc)), a.split(a.v_proj(enc))


class ImageDecoder(nn.Module):
    """min-dalle's DalleBartDecoder; the start token is the extra row ``image_vocab_count``."""

    def __init__(self, image_vocab: int, d: int, layers: int, glu: int):
        super().__init__()
        heads = d // 64
        self.image_vocab = image_vocab
        self.embed_tokens = nn.Embedding(image_vocab + 1, d)
        self.embed_positions = nn.Embedding(IMAGE_TOKEN_COUNT, d)
        self.layers = nn.ModuleList(DecoderLayer(d, heads, glu) for _ in range(layers))
        self.layernorm_embedding = nn.LayerNorm(d)
        self.final_ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, image_vocab + 1, bias=False)

    def forward(self, prev, enc, enc_mask, start=0, caches=None):
        """prev (B, T) tokens at positions start .. start + T - 1 -> logits (B, T, image_vocab + 1)."""
        pos = torch.arange(start, start + prev.shape[1])
        x = self.layernorm_embedding(self.embed_tokens(prev) + self.embed_positions(pos))
        for i, layer in enumerate(self.layers):
            kv = enc[i] if isinstance(enc, list) else layer.encoder_kv(enc)
            x = layer(x, kv, enc_mask, None if caches is None else caches[i])
        return self.lm_head(self.final_ln(x))


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2D sine-cosine position table (as in MAE), row-major: the first half
    of the channels encode the row, the second half the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ang = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None, :]
    one_axis = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, dim / 2)
    rows = one_axis[:, None, :].expand(grid, grid, -1)
    cols = one_axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


@torch.no_grad()
def generate_codes(enc_model: TextEncoder, dec_model: ImageDecoder, rows: torch.Tensor, seed: int,
                   guidance: float, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """min-dalle's ``generate_raw_image_stream`` for a batch of prompt rows (B, 64): encode
    [unconditional rows; prompt rows], then 256 steps of: logits of both halves, mixed as
    ``uncond * (1 - g) + cond * g``, restricted to the image codes, top-k, temperature, sampled
    with one torch generator seeded with ``seed``. Returns (B, 256) codes."""
    b = len(rows)
    tokens = torch.cat([uncond_rows(rows), rows])
    enc = enc_model(tokens)
    mask = (tokens != PAD_ID)[:, None, None, :]
    enc_kv = [layer.encoder_kv(enc) for layer in dec_model.layers]
    caches = [[None, None] for _ in dec_model.layers]
    gen = torch.Generator().manual_seed(seed)
    v = dec_model.image_vocab
    prev = torch.full((2 * b, 1), v, dtype=torch.long)
    out = torch.empty(b, IMAGE_TOKEN_COUNT, dtype=torch.long)
    for i in range(IMAGE_TOKEN_COUNT):
        logits = dec_model(prev, enc_kv, mask, start=i, caches=caches)[:, -1, :v]
        logits = logits[:b] * (1 - guidance) + logits[b:] * guidance
        if top_k > 0:
            kth = logits.topk(min(top_k, v), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits / temperature, -1)
        out[:, i] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        prev = out[:, i : i + 1].repeat(2, 1)
    return out


# ---------------------------------------------------------------------------------------------
# data, evaluation helpers


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, 64, 64) float32 in [0, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) * np.float32(1 / 255)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] -> HxWx3 uint8 arrays (round to nearest)."""
    return list((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.02) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def load_captioner():
    import mmgen_engine as mm

    return mm.load(mm.demo_model("captioning"))


def caption_all(captioner, images: list[np.ndarray], batch: int = 100) -> list[str]:
    out = []
    for b in range(0, len(images), batch):
        out += captioner.caption(images[b : b + batch], max_new_tokens=16)
    return out


def stage2_scenes(n: int, two_object_frac: float) -> list[tuple[int, world.Scene]]:
    """The first ``n`` scenes in scene-seed order, keeping every one-object scene and a two-object
    scene only while they are below ``two_object_frac`` of those kept."""
    kept, n_two = [], 0
    for s in itertools.count():
        if len(kept) == n:
            return kept
        if s >= world.HELD_OUT_SEED:
            raise SystemExit("training scene seeds would reach the held-out range")
        scene = world.scene_for_seed(s)
        if len(scene.shapes) == 2:
            if n_two >= two_object_frac * (len(kept) + 1):
                continue
            n_two += 1
        kept.append((s, scene))
    raise AssertionError


def state_dict_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# stages


def train_stage1(args) -> tuple[PatchEncoder, EMAQuantizer, Detokenizer]:
    torch.manual_seed(args.seed)
    encoder = PatchEncoder(args.embed_dim)
    quant = EMAQuantizer(args.codebook, args.embed_dim)
    detok = Detokenizer(args.codebook, args.embed_dim, args.vq_ch, tuple(args.vq_ch_mult), args.vq_blocks)
    params = list(encoder.parameters()) + list(detok.post_quant_conv.parameters()) + list(detok.decoder.parameters())
    n_params = sum(p.numel() for p in detok.parameters())
    print(f"stage 1: VQ autoencoder, codebook {args.codebook} x {args.embed_dim}, detokenizer params "
          f"{n_params / 1e6:.2f} M, steps {args.vq_steps}, batch {args.vq_batch}", flush=True)
    opt = torch.optim.Adam(params, lr=args.vq_lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed + 1)
    encoder.train(), quant.train(), detok.train()
    t0 = time.time()
    run_rec = run_com = 0.0
    for step in range(args.vq_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vq_steps, args.vq_lr, 100)
        x = to_tensor([im for im, _ in world.sample(args.vq_batch, step * args.vq_batch)])
        z = encoder(x)
        zq, idx, commit = quant(z, gen, restart=(step % 10 == 9 and step < args.vq_steps * 3 // 4))
        y = detok.decode_latent(zq)
        rec = F.l1_loss(y, x) + F.mse_loss(y, x)
        loss = rec + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_rec += rec.item()
        run_com += commit.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.vq_steps:
            k = (step % args.log_every) + 1
            used = int((quant.count >= quant.dead).sum())
            print(f"  vq step {step + 1:5d}  rec {run_rec / k:.4f}  commit {run_com / k:.4f}  codes in use {used}  "
                  f"elapsed {time.time() - t0:6.1f}s", flush=True)
            run_rec = run_com = 0.0
    with torch.no_grad():
        detok.embedding.weight.copy_(quant.embed)
    encoder.eval(), quant.eval(), detok.eval()
    return encoder, quant, detok


@torch.no_grad()
def encode_codes(encoder: PatchEncoder, quant: EMAQuantizer, images, batch: int = 500) -> torch.Tensor:
    out = []
    for b in range(0, len(images), batch):
        z = encoder(to_tensor(images[b : b + batch]))
        out.append(quant(z)[1])
    return torch.cat(out)


@torch.no_grad()
def eval_reconstruction(encoder, quant, detok, captioner, n: int) -> float:
    pairs = world.sample(n, world.HELD_OUT_SEED)
    codes = encode_codes(encoder, quant, [im for im, _ in pairs])
    images = []
    for b in range(0, n, 100):
        images += to_uint8(detok.decode_codes(codes[b : b + 100]))
    caps = caption_all(captioner, images)
    correct, shown = 0, 0
    for c, (_, ref) in zip(caps, pairs):
        correct += c == ref
        if c != ref and shown < 5:
            print(f"  recon miss: {c!r} != {ref!r}")
            shown += 1
    used = len(torch.unique(codes))
    print(f"  held-out reconstructions: {used} distinct codes used", flush=True)
    return correct / n


def train_stage2(args, codes: torch.Tensor, rows: torch.Tensor, vocab_size: int, eval_fn=None):
    torch.manual_seed(args.seed + 2)
    enc = TextEncoder(vocab_size, args.width, args.enc_layers, args.glu)
    dec = ImageDecoder(args.codebook, args.width, args.dec_layers, args.glu)
    init_weights(enc), init_weights(dec)
    with torch.no_grad():  # start the (learned) image positions from the 16x16 grid's 2D layout
        dec.embed_positions.weight.copy_(sincos_2d(GRID, args.width) * 0.02 * math.sqrt(2))
    n_params = sum(p.numel() for m in (enc, dec) for p in m.parameters())
    print(f"stage 2: BART encoder {args.enc_layers} / decoder {args.dec_layers} layers, width {args.width} "
          f"({args.width // 64} heads), GLU {args.glu}, params {n_params / 1e6:.2f} M, steps {args.steps}, "
          f"batch {args.batch_size}", flush=True)
    params = list(enc.parameters()) + list(dec.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed + 3)
    v = args.codebook
    enc.train(), dec.train()
    t0 = time.time()
    running = acc = 0.0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
        tgt = codes[sl].long()
        text = rows[sl].clone()
        drop = torch.rand(len(text), generator=gen) < args.uncond_prob
        text[drop] = uncond_rows(text[drop]) if drop.any() else text[drop]
        prev = torch.cat([torch.full((len(tgt), 1), v, dtype=torch.long), tgt[:, :-1]], 1)
        mask = (text != PAD_ID)[:, None, None, :]
        logits = dec(prev, enc(text), mask)[..., :v]
        loss = F.cross_entropy(logits.reshape(-1, v), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running += loss.item()
        acc += (logits.argmax(-1) == tgt).float().mean().item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = (step % args.log_every) + 1
            print(f"  step {step + 1:5d}  loss {running / k:.4f}  teacher-forced token acc {acc / k:.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  elapsed {time.time() - t0:6.1f}s", flush=True)
            running = acc = 0.0
        if eval_fn is not None and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            enc.eval(), dec.eval()
            t1 = time.time()
            print(f"  step {step + 1:5d}  generation: {eval_fn(enc, dec)}  ({time.time() - t1:.0f}s)", flush=True)
            t0 += time.time() - t1
            enc.train(), dec.train()
    enc.eval(), dec.eval()
    return enc, dec


@torch.no_grad()
def eval_generation(enc, dec, detok, tok, captioner, seeds: list[int], guidance: float, top_k: int,
                    temperature: float, out_png: Path | None = None) -> tuple[float, float]:
    """Generate one image per (one-object prompt, seed); return the fractions captioned with the
    prompt's color and shape, and captioned exactly as the prompt."""
    prompts = list(itertools.islice(world.all_captions(), len(world.COLORS) * len(world.SHAPES)))
    rows = text_rows(tok, prompts)
    images, wanted = [], []
    for seed in seeds:
        codes = generate_codes(enc, dec, rows, seed, guidance, top_k, temperature)
        images += to_uint8(detok.decode_codes(codes))
        wanted += prompts
    caps = caption_all(captioner, images)
    ok = sum(p in re.findall(r"\ba \w+ \w+", c) for c, p in zip(caps, wanted))
    exact = sum(c == p for c, p in zip(caps, wanted))
    if out_png is not None:  # rows = seeds, columns = prompts
        from PIL import Image

        grid = np.concatenate([np.concatenate(images[i * len(prompts):(i + 1) * len(prompts)], 1)
                               for i in range(len(seeds))], 0)
        Image.fromarray(grid).save(out_png)
    return ok / len(caps), exact / len(caps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/demo_txt2img_min_dalle", help="the min-dalle model directory")
    ap.add_argument("--work", default="build/demo_txt2img_work", help="stage-1 checkpoint and evaluation images")
    ap.add_argument("--reuse-stage1", action="store_true", help="load --work/stage1.pt instead of training stage 1")
    ap.add_argument("--stage1-only", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (weights init, dropout of captions)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; results are bitwise reproducible for a given value")
    ap.add_argument("--log-every", type=int, default=100)
    # stage 1
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--embed-dim", type=int, default=32)
    ap.add_argument("--vq-ch", type=int, default=32)
    ap.add_argument("--vq-ch-mult", type=int, nargs="+", default=[1, 1, 1])
    ap.add_argument(
        "--vq-blocks", type=int, default=2, help="ResnetBlocks per decoder level (taming num_res_blocks + 1)"
    )
    ap.add_argument("--vq-steps", type=int, default=1200)
    ap.add_argument("--vq-batch", type=int, default=16)
    ap.add_argument("--vq-lr", type=float, default=2e-3)
    ap.add_argument("--recon-eval-n", type=int, default=500)
    ap.add_argument("--min-recon-accuracy", type=float, default=0.95)
    # stage 2
    ap.add_argument("--width", type=int, default=128, help="multiple of 64; heads = width / 64")
    ap.add_argument("--enc-layers", type=int, default=2)
    ap.add_argument("--dec-layers", type=int, default=3)
    ap.add_argument("--glu", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--uncond-prob", type=float, default=0.15)
    ap.add_argument("--two-object-frac", type=float, default=0.2)
    ap.add_argument("--eval-every", type=int, default=500,
                    help="quick generation check (18 prompts, 1 seed) every N steps (0: off)")
    # evaluation (min-dalle sampling), also written as the model's generation defaults
    ap.add_argument("--eval-seeds", type=int, default=8, help="images per one-object prompt")
    ap.add_argument("--guidance", type=float, default=GENERATION["supercondition_factor"],
                    help="min-dalle's supercondition factor")
    ap.add_argument("--top-k", type=int, default=GENERATION["top_k"])
    ap.add_argument("--temperature", type=float, default=GENERATION["temperature"])
    ap.add_argument("--min-accuracy", type=float, default=0.9)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.width % 64:
        raise SystemExit("--width must be a multiple of 64 (min-dalle: heads = width / 64)")
    if args.vq_steps * args.vq_batch > world.HELD_OUT_SEED:
        raise SystemExit("stage-1 scene seeds would reach the held-out range")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    vocab, merges = build_text_vocab()
    tok = TextTokenizer(vocab, merges)
    save_text_vocab(vocab, merges, out)
    print(f"text vocab {len(vocab)} ({len(merges)} merges)")
    captioner = load_captioner()

    # stage 1
    stage1 = work / "stage1.pt"
    if args.reuse_stage1:
        sd = torch.load(stage1, weights_only=True)
        encoder, quant = PatchEncoder(args.embed_dim), EMAQuantizer(args.codebook, args.embed_dim)
        detok = Detokenizer(args.codebook, args.embed_dim, args.vq_ch, tuple(args.vq_ch_mult), args.vq_blocks)
        (
            encoder.load_state_dict(sd["encoder"]),
            quant.load_state_dict(sd["quantizer"]),
            detok.load_state_dict(sd["detoker"]),
        )
        encoder.eval(), quant.eval(), detok.eval()
        print(f"stage 1: loaded {stage1}")
    else:
        t0 = time.time()
        encoder, quant, detok = train_stage1(args)
        torch.save({"encoder": state_dict_cpu(encoder), "quantizer": state_dict_cpu(quant),
                    "detoker": state_dict_cpu(detok)}, stage1)
        print(f"stage 1 trained in {time.time() - t0:.0f}s", flush=True)
    torch.save(state_dict_cpu(detok), out / "detoker.pt")
    t0 = time.time()
    rec_acc = eval_reconstruction(encoder, quant, detok, captioner, args.recon_eval_n)
    print(f"held-out reconstruction caption exact match (scene seeds {world.HELD_OUT_SEED}.."
          f"{world.HELD_OUT_SEED + args.recon_eval_n - 1}): {rec_acc:.2%} ({time.time() - t0:.0f}s)", flush=True)
    if rec_acc < args.min_recon_accuracy:
        print(f"WARNING: reconstruction accuracy below --min-recon-accuracy {args.min_recon_accuracy:.0%}")
    if args.stage1_only:
        return 0 if rec_acc >= args.min_recon_accuracy else 1

    # stage 2: tokenize fresh training scenes, then train the prior
    t0 = time.time()
    n = args.steps * args.batch_size
    scenes = stage2_scenes(n, args.two_object_frac)
    codes = torch.cat([encode_codes(encoder, quant, [world.render(sc) for _, sc in scenes[b : b + 2000]])
                       for b in range(0, n, 2000)]).to(torch.int16)
    rows = text_rows(tok, [world.caption(sc) for _, sc in scenes], TRAIN_TEXT_LEN)
    n_two = sum(len(sc.shapes) == 2 for _, sc in scenes)
    print(f"stage 2 data: {n} scenes (seeds 0..{scenes[-1][0]}, {n_two} two-object), tokenized in "
          f"{time.time() - t0:.0f}s", flush=True)
    t0 = time.time()
    def eval_fn(e, d):
        ok, exact = eval_generation(e, d, detok, tok, captioner, [1], args.guidance, args.top_k, args.temperature)
        return f"color+shape {ok:.2%}, exact {exact:.2%}"

    enc, dec = train_stage2(args, codes, rows, len(vocab), eval_fn)
    print(f"stage 2 trained in {time.time() - t0:.0f}s", flush=True)
    torch.save(state_dict_cpu(enc), out / "encoder.pt")
    torch.save(state_dict_cpu(dec), out / "decoder.pt")
    generation = {"temperature": args.temperature, "top_k": args.top_k, "supercondition_factor": args.guidance}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf8")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved {out} ({size / 1e6:.2f} MB)", flush=True)

    t0 = time.time()
    seeds = list(range(1, args.eval_seeds + 1))
    ok, exact = eval_generation(enc, dec, detok, tok, captioner, seeds, args.guidance, args.top_k,
                                args.temperature, work / "generated.png")
    print(f"generation (18 one-object prompts x {len(seeds)} seeds; supercondition {args.guidance}, top-k "
          f"{args.top_k}, temperature {args.temperature}): color+shape {ok:.2%}, exact caption {exact:.2%} "
          f"({time.time() - t0:.0f}s)")
    print(f"total {time.time() - t_start:.0f}s")
    return 0 if ok >= args.min_accuracy and rec_acc >= args.min_recon_accuracy else 1


if __name__ == "__main__":
    raise SystemExit(main())
