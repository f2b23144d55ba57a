"""a2g-gpt ("audio to gesture GPT"): speech -> motion tokens -> 2D upper-body poses, in plain PyTorch.

This is the model's definition as it is trained, and its source format: :func:`save` writes a
directory with ``a2g_gpt.json`` (:class:`A2GConfig`) and ``model.safetensors`` (this module's state
dict), which the ``a2g-gpt`` converter turns into an engine checkpoint. :func:`generate` is the
plain, uncached reference the engine is tested against.

Parts (built from proven pieces):

- **Audio front end**: PATS ``log_mel_400`` (16 kHz, 64 mel bins, 100 frames/s;
  :func:`mmgen_engine.pipelines.audio.log_mel_400`).
- **Audio encoder**: two Conv1d (kernel 3, stride 2, padding 1, GELU) -> learned positions ->
  ``audio_layers`` pre-LN transformer blocks -> LayerNorm; ``[B, F, 64] -> [B, L, width]``, 4x fewer
  frames (25/s).
- **Motion tokenizer**: a Conv1d VQ-VAE in the style of T2M-GPT (Zhang et al. 2023): encoder
  ``conv_in, ReLU, 2 x [Conv1d(k4, s2), ResStack], conv_out`` (4x temporal downsampling) to
  ``code_dim``; nearest of ``codebook_size`` codes (EMA-updated in training); decoder
  ``conv_in, ReLU, 2 x [ResStack(reversed dilations), nearest 2x upsample, Conv1d(k3)], conv_mid,
  ReLU, conv_out``. A ResStack block is ``x + conv1x1(ReLU(conv3_dilated(ReLU(x))))`` with dilations
  ``growth**i``. Poses are normalized per coordinate (``pose_mean``, ``pose_std``).
- **Decoder**: GPT-2 blocks with cross-attention to the audio states (``ln_1 > attn, ln_cross >
  cross-attn, ln_2 > mlp``, tanh GELU, tied LM head) over the vocabulary ``codes + [bos, eos]``.
- **Windows**: :mod:`mmgen_engine.pipelines.gesture_windows` (64 frames, each window seeded with the
  previous one's last ``seed_tokens`` tokens).

Poses are the PATS upper-body skeleton: 52 joints x (x, y), neck-relative, y up, 15 fps; the
feature vector of a frame is ``poses.reshape(104)`` (joint-major).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..gesture_format import (  # noqa: F401
    CONFIG_FILE,
    DOWNSAMPLE,
    FPS,
    HOP,
    JOINTS,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    WEIGHTS_FILE,
    A2GConfig,
)
from ..pipelines.audio import log_mel_400
from ..pipelines.gesture_windows import Stitcher, WindowPlan

# ---- shared blocks --------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention with fused q/k/v (self) or q + fused k/v (cross), biases on."""

    def __init__(self, width: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads, self.cross = heads, cross
        if cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(width, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, memory=None, causal=False):
        b, t, d = x.shape
        if self.cross:
            q, (k, v) = self.q(x), self.kv(memory).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (y.view(b, y.shape[1], self.heads, -1).transpose(1, 2) for y in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, approximate: str):
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(width, hidden), nn.Linear(hidden, width), approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln2, self.mlp = nn.LayerNorm(width), MLP(width, hidden, "none")

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: A2GConfig):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv1d(N_MELS, w, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(w, w, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.zeros(cfg.audio_positions, w))
        self.blocks = nn.ModuleList(EncoderBlock(w, cfg.audio_heads, cfg.audio_ff) for _ in range(cfg.audio_layers))
        self.ln_f = nn.LayerNorm(w)

    def forward(self, mel):
        """``mel [B, F, 64]`` (F = cfg.mel_frames) -> ``[B, L, width]``."""
        x = F.gelu(self.conv1(mel.transpose(1, 2)))
        x = F.gelu(self.conv2(x)).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


# ---- motion VQ-VAE ----------------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv1d(width, width, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def res_stack(cfg: A2GConfig, reverse: bool) -> nn.Sequential:
    dilations = [cfg.vq_growth ** i for i in range(cfg.vq_depth)]
    return nn.Sequential(*(ResBlock(cfg.vq_width, d) for d in (dilations[::-1] if reverse else dilations)))


class MotionEncoder(nn.Module):
    def __init__(self, cfg: A2GConfig):
        super().__init__()
        w = cfg.vq_width
        self.conv_in = nn.Conv1d(2 * JOINTS, w, 3, padding=1)
        self.down = nn.ModuleList(nn.Sequential(nn.Conv1d(w, w, 4, stride=2, padding=1), res_stack(cfg, False))
                                  for _ in range(2))
        self.conv_out = nn.Conv1d(w, cfg.code_dim, 3, padding=1)

    def forward(self, x):  # (B, 104, T) -> (B, code_dim, T / 4)
        x = F.relu(self.conv_in(x))
        for level in self.down:
            x = level(x)
        return self.conv_out(x)


class MotionDecoder(nn.Module):
    def __init__(self, cfg: A2GConfig):
        super().__init__()
        w = cfg.vq_width
        self.conv_in = nn.Conv1d(cfg.code_dim, w, 3, padding=1)
        self.res = nn.ModuleList(res_stack(cfg, True) for _ in range(2))
        self.up_conv = nn.ModuleList(nn.Conv1d(w, w, 3, padding=1) for _ in range(2))
        self.conv_mid = nn.Conv1d(w, w, 3, padding=1)
        self.conv_out = nn.Conv1d(w, 2 * JOINTS, 3, padding=1)

    def forward(self, z):  # (B, code_dim, T / 4) -> (B, 104, T)
        x = F.relu(self.conv_in(z))
        for res, conv in zip(self.res, self.up_conv):
            x = conv(F.interpolate(res(x), scale_factor=2, mode="nearest"))
        return self.conv_out(F.relu(self.conv_mid(x)))


class Quantizer(nn.Module):
    """Nearest-code quantization; in training the codebook follows an EMA of its assigned vectors
    and unused codes are re-seeded from the batch."""

    def __init__(self, cfg: A2GConfig, decay: float = 0.99, restart_below: float = 0.5):
        super().__init__()
        self.decay, self.restart_below = decay, restart_below  # EMA usage (vectors per step) of a dead code
        self.register_buffer("codebook", torch.randn(cfg.codebook_size, cfg.code_dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(cfg.codebook_size), persistent=False)
        self.register_buffer("ema_sum", self.codebook.clone(), persistent=False)

    def codes(self, z):  # (B, C, n) -> (B, n) nearest code ids
        flat = z.transpose(1, 2).reshape(-1, z.shape[1])
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1))
        return d.argmin(1).view(z.shape[0], z.shape[2])

    def lookup(self, codes):  # (B, n) -> (B, C, n)
        return self.codebook[codes].transpose(1, 2)

    @torch.no_grad()
    def seed_from(self, z, generator: torch.Generator | None = None):
        """Start the codebook at randomly chosen encoder outputs ``z [B, C, n]`` (repeated if fewer)."""
        flat = z.transpose(1, 2).reshape(-1, z.shape[1])
        pick = torch.randint(0, flat.shape[0], (self.codebook.shape[0],), generator=generator)
        self.codebook.copy_(flat[pick])
        self.ema_sum.copy_(flat[pick])
        self.ema_count.fill_(1.0)

    @torch.no_grad()
    def update(self, z, codes, generator: torch.Generator | None = None):
        flat = z.transpose(1, 2).reshape(-1, z.shape[1])
        onehot = F.one_hot(codes.reshape(-1), self.codebook.shape[0]).type(flat.dtype)
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        dead = self.ema_count < self.restart_below
        if dead.any():  # restart unused codes at random encoder outputs
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),), generator=generator)
            self.ema_sum[dead] = flat[pick]
            self.ema_count[dead] = 1.0
        self.codebook.copy_(self.ema_sum / self.ema_count[:, None])


class MotionVQ(nn.Module):
    def __init__(self, cfg: A2GConfig):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = MotionEncoder(cfg), Quantizer(cfg), MotionDecoder(cfg)

    def tokenize(self, feats):  # normalized (B, T, 104) -> (B, T / 4) code ids
        return self.quantizer.codes(self.encoder(feats.transpose(1, 2)))

    def detokenize(self, codes):  # (B, n) -> normalized (B, 4 n, 104)
        return self.decoder(self.quantizer.lookup(codes)).transpose(1, 2)


# ---- decoder -----------------------------------------------------------------------------------------

class GPTBlock(nn.Module):
    def __init__(self, cfg: A2GConfig):
        super().__init__()
        w = cfg.width
        self.ln_1, self.attn = nn.LayerNorm(w), Attention(w, cfg.heads)
        self.ln_cross, self.cross = nn.LayerNorm(w), Attention(w, cfg.heads, cross=True)
        self.ln_2, self.mlp = nn.LayerNorm(w), MLP(w, cfg.ff, "tanh")

    def forward(self, x, memory):
        x = x + self.attn(self.ln_1(x), causal=True)
        x = x + self.cross(self.ln_cross(x), memory)
        return x + self.mlp(self.ln_2(x))


class MotionGPT(nn.Module):
    def __init__(self, cfg: A2GConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.width)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)

    def forward(self, tokens, memory):
        """``tokens [B, T]``, audio states ``memory [B, L, width]`` -> logits ``[B, T, vocab]``."""
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, memory)
        return self.ln_f(x) @ self.wte.weight.t()


def _init_transformer(module: nn.Module) -> None:
    """GPT-2's initialization: linear and embedding weights N(0, 0.02), biases 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)


class A2GGpt(nn.Module):
    def __init__(self, cfg: A2GConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.audio = AudioEncoder(cfg)
        self.motion = MotionVQ(cfg)
        self.gpt = MotionGPT(cfg)
        self.register_buffer("pose_mean", torch.zeros(2 * JOINTS))
        self.register_buffer("pose_std", torch.ones(2 * JOINTS))
        self.gpt.apply(_init_transformer)
        self.audio.blocks.apply(_init_transformer)
        nn.init.normal_(self.audio.pos, 0.0, 0.02)

    def normalize(self, poses):  # (B, T, 52, 2) -> (B, T, 104)
        return (poses.reshape(*poses.shape[:-2], 2 * JOINTS) - self.pose_mean) / self.pose_std

    def denormalize(self, feats):  # (B, T, 104) -> (B, T, 52, 2), the neck exactly at the origin
        poses = (feats * self.pose_std + self.pose_mean).reshape(*feats.shape[:-1], JOINTS, 2)
        poses[..., 0, :] = 0
        return poses


def save(model: A2GGpt, out: Path) -> Path:
    """Write ``out/a2g_gpt.json`` and ``out/model.safetensors`` (the source format)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    return out


def load(src: Path) -> A2GGpt:
    """The model :func:`save` wrote (strict: every tensor present, none extra)."""
    src = Path(src)
    model = A2GGpt(A2GConfig(**json.loads((src / CONFIG_FILE).read_text())))
    model.load_state_dict(load_file(str(src / WEIGHTS_FILE)))
    return model.eval()


# ---- reference generation (no caches) -----------------------------------------------------------------

def plan(cfg: A2GConfig):
    return WindowPlan(SAMPLE_RATE, FPS, HOP, N_FFT, cfg.window_frames, cfg.seed_tokens * DOWNSAMPLE)


@torch.no_grad()
def generate(model: A2GGpt, audio: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Greedy gestures for 16 kHz mono ``audio``: ``(tokens of every window, poses [T, 52, 2])``, by
    full recomputation of the decoder at every step (the spec the engine is tested against). Runs
    where ``model`` is (CPU or CUDA); the audio and the poses stay NumPy arrays on the host."""

    cfg = model.cfg
    device = model.pose_mean.device
    p = plan(cfg)
    stitch, chunks, all_tokens, seed = Stitcher(p, p.frames(audio.shape[0])), [], [], []
    for w in range(p.windows(audio.shape[0])):
        mel = log_mel_400(p.window_audio(audio, w))[None].to(device)
        memory = model.audio(mel)
        tokens = [cfg.bos] + seed
        while len(tokens) <= cfg.window_tokens:
            logits = model.gpt(torch.tensor([tokens], device=device), memory)[0, -1, :cfg.codebook_size]
            tokens.append(int(logits.argmax()))
        window = tokens[1:]
        all_tokens.append(window)
        seed = window[-cfg.seed_tokens:]
        window_poses = model.denormalize(model.motion.detokenize(torch.tensor([window], device=device)))[0]
        chunks.append(stitch.add(window_poses.cpu().numpy()))
    chunks.append(stitch.finish())
    return all_tokens, np.concatenate(chunks)
