"""a2g-gpt (see :mod:`mmgen_engine.training.a2g_gpt` for the model's definition): the audio encoder,
a GPT-2 decoder with cross-attention to its states over motion tokens, and the motion VQ decoder
with the pose normalization, on the engine's shared blocks."""
from __future__ import annotations

import torch
from torch import nn

from ..config import SpeechToGestureConfig
from .audio import AudioEncoder
from .gpt2 import GPT2Decoder
from .motion_vq import MotionVQDecoder


class A2GGpt(nn.Module):
    # the pose statistics (104 values each, up to ~270 units) stay fp32 at any weight dtype: rounded
    # to half precision they would move every joint by up to ~1 unit
    fp32_tensors = ("pose_mean", "pose_std")

    def __init__(self, cfg: SpeechToGestureConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = AudioEncoder(cfg.audio_encoder, device)
        self.decoder = GPT2Decoder(cfg.decoder, device)
        self.motion = MotionVQDecoder(cfg.motion, device)
        features = 2 * cfg.motion.joints
        self.pose_mean = nn.Parameter(torch.empty(features, device=device), requires_grad=False)
        self.pose_std = nn.Parameter(torch.empty(features, device=device), requires_grad=False)
        self.requires_grad_(False)

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel frames of a window ``[B, F, n_mels]`` -> audio states ``[B, L, D]``."""
        return self.encoder(mel)

    def poses(self, codes: torch.Tensor) -> torch.Tensor:
        """Motion token ids ``[B, n]`` -> poses ``[B, 4 n, joints, 2]`` (fp32, the root at the origin)."""
        feats = self.motion(codes).float() * self.pose_std + self.pose_mean  # fp32_tensors
        poses = feats.view(*feats.shape[:-1], self.cfg.motion.joints, 2)
        poses[..., 0, :] = 0
        return poses
