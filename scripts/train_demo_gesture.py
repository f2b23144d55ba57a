"""Train the bundled demo speech-to-gesture model (a2g-gpt, :mod:`mmgen_engine.training.a2g_gpt`) on
the synthetic speech/gesture world (:mod:`mmgen_engine.demo.gesture_world`).

Reproduce the shipped demo model (CPU, 1 torch thread, about 30 minutes: data 0.5, tokenizer 4,
decoder 25; it overwrites the bundled checkpoint
``mmgen_engine/demo/models/speech-to-gesture``, relative to the working directory, by converting
its result with ``mm.convert``)::

    python scripts/train_demo_gesture.py

Deterministic (fixed seeds, clips drawn from fixed world seeds below ``HELD_OUT_SEED``, fixed order):

* data: ``--clips`` clips of ``--clip-seconds`` (16 kHz speech-like audio, 15 fps poses); the
  log-mel of every clip is computed once (windows are slices of it, as at inference);
* pose normalization: per-coordinate mean and standard deviation over all training frames;
* stage 1, the motion VQ-VAE on random 64-frame windows: L1 reconstruction + L1 of the frame-to-frame
  velocity + commitment (0.02), straight-through gradients, EMA codebook started at encoder outputs
  with dead-code restarts, Adam with warmup + cosine;
* stage 2, the audio encoder and the GPT decoder, teacher-forced on random 64-frame windows starting
  on a log-mel frame (multiples of 3 frames): input ``[bos, t_0 .. t_15]``, targets ``[t_0 .. t_15,
  eos]`` where ``t`` are the frozen tokenizer's codes of the window's poses, cross-entropy, AdamW
  with warmup + cosine;
* writes the model (``a2g_gpt.json`` + ``model.safetensors``) and ``generation_config.json`` (the
  sampling it is evaluated and shipped with, ``GENERATION``: the converter makes it the checkpoint's
  generation defaults) to ``--out``, converts it with the production converter to ``--engine-out``
  (default: the bundled demo model), and evaluates on held-out clips with the engine: the wrist speed
  of gestures generated for speech against those generated for near-silence (``--min-motion-ratio``),
  and the pose error of VQ reconstructions.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mmgen_engine as mm  # noqa: E402
from mmgen_engine.demo import gesture_world as world  # noqa: E402
from mmgen_engine.pipelines.audio import log_mel_400  # noqa: E402
from mmgen_engine.training import a2g_gpt as a2g  # noqa: E402

MELS_PER_FRAME = (a2g.SAMPLE_RATE // a2g.HOP) / a2g.FPS  # 100 / 15: windows start every 3 frames
# the sampling the model is evaluated and shipped with (mm.SamplingParams names): seeded, so a call is
# reproducible; temperature 0.5 and top-p 0.9 keep a silent speaker still
GENERATION = {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def build_data(cfg: a2g.A2GConfig, clips: int, seconds: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(poses [N, T, 52, 2], log-mel [N, F, 64])`` of world seeds ``0 .. clips - 1``; each clip's
    audio is padded with silence so that every window start has its full log-mel window."""
    poses, mels = [], []
    frames = round(seconds * a2g.FPS)
    pad = a2g.N_FFT + cfg.mel_frames * a2g.HOP
    for seed in range(clips):
        audio, p = world.clip(seed, seconds)
        poses.append(p[:frames])
        mels.append(log_mel_400(np.concatenate([audio, np.zeros(pad, np.float32)])))
    length = min(m.shape[0] for m in mels)
    return torch.from_numpy(np.stack(poses)), torch.stack([m[:length] for m in mels])


def windows(poses, mels, cfg, batch: int, gen: torch.Generator):
    """A random batch of aligned windows: poses ``[B, 64, 52, 2]`` (not normalized) and their log-mel
    ``[B, F, 64]``."""
    n, frames = poses.shape[:2]
    starts = torch.randint(0, (frames - cfg.window_frames) // 3 + 1, (batch,), generator=gen) * 3
    clips = torch.randint(0, n, (batch,), generator=gen)
    p = torch.stack([poses[c, s:s + cfg.window_frames] for c, s in zip(clips.tolist(), starts.tolist())])
    m = torch.stack([mels[c, round(s * MELS_PER_FRAME):round(s * MELS_PER_FRAME) + cfg.mel_frames]
                     for c, s in zip(clips.tolist(), starts.tolist())])
    return p, m


def train_vq(model: a2g.A2GGpt, poses, mels, args, gen) -> None:
    vq = model.motion
    opt = torch.optim.Adam(list(vq.encoder.parameters()) + list(vq.decoder.parameters()), lr=args.vq_lr)
    for step in range(args.vq_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vq_steps, args.vq_lr)
        p, _ = windows(poses, mels, model.cfg, args.vq_batch, gen)
        x = model.normalize(p)  # (B, 64, 104)
        z = vq.encoder(x.transpose(1, 2))
        if step == 0:
            vq.quantizer.seed_from(z.detach(), gen)
        codes = vq.quantizer.codes(z)
        q = vq.quantizer.lookup(codes)
        vq.quantizer.update(z.detach(), codes, gen)
        recon = vq.decoder(z + (q - z).detach()).transpose(1, 2)
        loss = F.l1_loss(recon, x) + F.l1_loss(recon.diff(dim=1), x.diff(dim=1)) + 0.02 * F.mse_loss(z, q.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.vq_steps - 1:
            used = codes.unique().numel()
            log(f"vq step {step}: loss {loss.item():.4f}, {used} codes in the batch")


def train_gpt(model: a2g.A2GGpt, poses, mels, args, gen) -> None:
    cfg = model.cfg
    params = list(model.audio.parameters()) + list(model.gpt.parameters())
    opt = torch.optim.AdamW(params, lr=args.gpt_lr, weight_decay=0.01)
    for step in range(args.gpt_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.gpt_steps, args.gpt_lr)
        p, m = windows(poses, mels, cfg, args.batch, gen)
        with torch.no_grad():
            codes = model.motion.tokenize(model.normalize(p))  # (B, 16)
        b = codes.shape[0]
        inputs = torch.cat([torch.full((b, 1), cfg.bos), codes], dim=1)
        targets = torch.cat([codes, torch.full((b, 1), cfg.eos)], dim=1)
        logits = model.gpt(inputs, model.audio(m))
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.gpt_steps - 1:
            log(f"gpt step {step}: loss {loss.item():.4f}")


def evaluate(engine_dir: Path, model: a2g.A2GGpt, args) -> float:
    """Held-out clips: wrist speed of generated gestures for speech over near-silence, and the
    VQ reconstruction error; returns the motion ratio."""
    pipe = mm.load(engine_dir)
    speech, silence, recon = [], [], []
    for i in range(args.eval_clips):
        seed = world.HELD_OUT_SEED + i
        audio, poses = world.clip(seed, args.clip_seconds)
        speech.append(world.wrist_speed(pipe.generate(audio, world.SAMPLE_RATE)))
        silence.append(world.wrist_speed(pipe.generate(world.near_silence(seed, args.clip_seconds), world.SAMPLE_RATE)))
        with torch.no_grad():
            x = torch.from_numpy(poses[None, :whole_token_frames(poses)])
            codes = model.motion.tokenize(model.normalize(x))
            rec = model.denormalize(model.motion.detokenize(codes))
            recon.append((rec - x).abs().mean().item())
    ratio = float(np.mean(speech) / max(np.mean(silence), 1e-9))
    log(f"held-out: wrist speed speech {np.mean(speech):.3f} vs near-silence {np.mean(silence):.3f} "
        f"(ratio {ratio:.1f}); VQ reconstruction mean abs error {np.mean(recon):.3f} units")
    return ratio


def whole_token_frames(poses: np.ndarray) -> int:
    """The longest prefix of ``poses`` the tokenizer takes whole (a multiple of 4 frames)."""
    return poses.shape[0] // a2g.DOWNSAMPLE * a2g.DOWNSAMPLE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/demo_gesture/a2g_gpt"), help="the a2g-gpt source model")
    ap.add_argument("--engine-out", type=Path, default=Path("mmgen_engine/demo/models/speech-to-gesture"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results are bitwise reproducible per value)")
    ap.add_argument("--clips", type=int, default=1200)
    ap.add_argument("--clip-seconds", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vq-batch", type=int, default=64, help="windows per tokenizer step (16 codes each)")
    ap.add_argument("--vq-steps", type=int, default=1500)
    ap.add_argument("--vq-lr", type=float, default=2e-3)
    ap.add_argument("--gpt-steps", type=int, default=6000)
    ap.add_argument("--gpt-lr", type=float, default=1e-3)
    ap.add_argument("--eval-clips", type=int, default=8)
    ap.add_argument("--min-motion-ratio", type=float, default=3.0)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = a2g.A2GConfig()
    start = time.time()
    log(f"building {args.clips} clips of {args.clip_seconds} s ...")
    poses, mels = build_data(cfg, args.clips, args.clip_seconds)
    model = a2g.A2GGpt(cfg)
    flat = poses.reshape(-1, 2 * a2g.JOINTS)
    model.pose_mean.copy_(flat.mean(0))
    model.pose_std.copy_(flat.std(0).clamp_min(1.0))  # the neck (always 0) and near-still joints: no blow-up
    log(f"data ready in {time.time() - start:.0f} s: poses {tuple(poses.shape)}, log-mel {tuple(mels.shape)}")
    model.train()
    train_vq(model, poses, mels, args, gen)
    model.motion.requires_grad_(False)
    train_gpt(model, poses, mels, args, gen)
    model.eval()
    a2g.save(model, args.out)
    (args.out / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n", encoding="utf-8")
    engine = mm.convert(args.out, args.engine_out, overwrite=True)
    log(f"trained in {time.time() - start:.0f} s; wrote {args.out} and {engine}")
    ratio = evaluate(engine, model, args)
    if ratio < args.min_motion_ratio:
        log(f"FAILED: motion ratio {ratio:.1f} < {args.min_motion_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
