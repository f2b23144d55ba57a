#!/usr/bin/env python3
"""Quality of weight-only int8 (``mm.load(quantize=...)``) against float32, measured, for each setting
(``--settings``, default ``int8`` per channel and ``int8-g128``):

- the bundled demo captioner on held-out scenes (those of ``tests/test_demo.py``: 300 from seed
  ``HELD_OUT_SEED + 50_000``, greedy, 16 new tokens): the exact-caption rate, and the share of float32's
  greedy tokens (up to and with its eos) that the quantized model reproduces at the same position;
- random-weight real-size models (bench_caption's ViT-B/16 + GPT-2 small, ``--real-size``, from its
  cache): the logits of every step teacher-forced on float32's greedy ids, their error relative to
  the float32 logits' scale (max and mean absolute error over the mean absolute float32 logit, and
  over the max) and the top-1 agreement;
- the demo text-to-image model through its own check (``tests/test_demo_txt2img.py``): the 18 one-object
  prompts, sampled as the test does (its seed 1234 and the next ``--txt2img-seeds - 1``), captioned by
  the float demo captioner: images whose caption names the prompt's color and shape;
- the demo speech-to-gesture model through its own check (``tests/test_demo_gesture.py``): mean wrist
  motion on 6 held-out speech clips over that on near-silence (the test asks for 4 or more).

Prints a markdown table; writes everything with the machine to ``--json``.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import format_table, machine_info, write_json  # noqa: E402

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.demo import gesture_world  # noqa: E402
from mmgen_engine.demo.world import COLORS, HELD_OUT_SEED, SHAPES, sample  # noqa: E402

CAPTION_SEED, CAPTION_COUNT, CAPTION_TOKENS = HELD_OUT_SEED + 50_000, 300, 16
TXT2IMG_PROMPTS = [f"a {c} {s}" for c in COLORS for s in SHAPES]
TXT2IMG_SAMPLING = dict(do_sample=True, top_k=4, guidance_scale=2.0, temperature=1.0)
TXT2IMG_SEED = 1234
GESTURE_CLIPS, GESTURE_SECONDS = 6, 6.0


def log(msg: str) -> None:
    print(f"[quality_int8] {msg}", file=sys.stderr, flush=True)


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def demo_captioner(settings: list[str]) -> list[dict]:
    items = sample(CAPTION_COUNT, CAPTION_SEED)
    rows, reference = [], None
    for setting in ["float32", *settings]:
        pipe = mm.load(mm.demo_model("captioning"), quantize=None if setting == "float32" else setting)
        eos = pipe.config.generation.eos_token_id
        ids = []
        for start in range(0, CAPTION_COUNT, 50):
            pixels = pipe.preprocess([image for image, _ in items[start:start + 50]])
            ids += pipe.generate_ids(pixels, max_new_tokens=CAPTION_TOKENS).tolist()
        ids = [until_eos(r, eos) for r in ids]
        captions = [pipe.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
        exact = sum(c == want for c, (_, want) in zip(captions, items)) / CAPTION_COUNT
        reference = reference or ids
        same = sum(a == b for r, q in zip(reference, ids) for a, b in zip(r, q))
        rows.append({"model": "demo captioner", "setting": setting, "exact_caption_rate": exact,
                     "tokens_equal_float32": same / sum(map(len, reference))})
        log(f"demo captioner {setting}: exact {exact:.3f}")
    return rows


def _caches(decoder, states):
    (batch, length), (layers, heads, head_dim, positions) = states.shape[:2], decoder.cache_geometry()
    self_kv = torch.zeros(2, layers, batch, heads, positions, head_dim, dtype=states.dtype)
    cross_kv = torch.zeros(2, layers, batch, heads, length, head_dim, dtype=states.dtype)
    return (SimpleNamespace(k=self_kv[0], v=self_kv[1], span=positions),
            SimpleNamespace(k=cross_kv[0], v=cross_kv[1], lengths=torch.full((batch,), length)))


def forced_logits(pipe, pixels: torch.Tensor, start: int, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T + 1, V]`` of ``pipe``'s decoder after the start token and each of ``tokens [B, T]``."""
    dec = pipe.model.decoder
    states = pipe.model.encode(pixels)
    cache, cross = _caches(dec, states)
    batch = pixels.shape[0]
    out = [dec.prefill(torch.full((batch, 1), start), states, cache, cross)]
    for t in range(tokens.shape[1]):
        out.append(dec.decode_step(tokens[:, t], torch.full((batch,), t + 1), cache, cross))
    return torch.stack(out, dim=1).float()


def real_size(path: Path, settings: list[str], images: int, steps: int) -> list[dict]:
    base = mm.load(path)
    enc, start = base.config.encoder, base.config.generation.decoder_start_token_id
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(images, enc.num_channels, enc.image_size, enc.image_size, generator=g) * 2 - 1
    with torch.inference_mode():
        ids = base.generate_ids(pixels, max_new_tokens=steps, min_new_tokens=steps)
        ref = forced_logits(base, pixels, start, ids)
    scale_mean, scale_max = ref.abs().mean(), ref.abs().max()
    rows = []
    for setting in settings:
        pipe = mm.load(path, quantize=setting)
        with torch.inference_mode():
            q = forced_logits(pipe, pixels, start, ids)
        err = (q - ref).abs()
        rows.append({"model": "ViT-B/16 + GPT-2 small (random)", "setting": setting,
                     "max_abs_err_over_mean_abs_logit": float(err.max() / scale_mean),
                     "mean_abs_err_over_mean_abs_logit": float(err.mean() / scale_mean),
                     "max_abs_err_over_max_abs_logit": float(err.max() / scale_max),
                     "top1_agreement": float((q.argmax(-1) == ref.argmax(-1)).float().mean()),
                     "positions": int(ref.shape[0] * ref.shape[1])})
        log(f"real size {setting}: top-1 {rows[-1]['top1_agreement']:.4f}")
    return rows


def objects(caption: str) -> list[str]:
    return re.findall(r"\ba \w+ \w+", caption)


def demo_txt2img(settings: list[str], seeds: int) -> list[dict]:
    captioner = mm.load(mm.demo_model("captioning"))
    rows = []
    for setting in ["float32", *settings]:
        pipe = mm.load(mm.demo_model("text-to-image"), quantize=None if setting == "float32" else setting)
        hits = 0
        for seed in range(TXT2IMG_SEED, TXT2IMG_SEED + seeds):
            sampling = mm.SamplingParams(**TXT2IMG_SAMPLING, seed=seed)
            images = pipe.generate(TXT2IMG_PROMPTS, images_per_prompt=1, sampling=sampling)
            captions = captioner.caption(images, max_new_tokens=CAPTION_TOKENS)
            hits += sum(p in objects(c) for p, c in zip(TXT2IMG_PROMPTS, captions))
        total = seeds * len(TXT2IMG_PROMPTS)
        rows.append({"model": "demo text-to-image", "setting": setting, "round_trip": f"{hits}/{total}",
                     "round_trip_rate": hits / total})
        log(f"demo txt2img {setting}: {hits}/{total}")
    return rows


def demo_gesture(settings: list[str]) -> list[dict]:
    rows = []
    for setting in ["float32", *settings]:
        pipe = mm.load(mm.demo_model("speech-to-gesture"), quantize=None if setting == "float32" else setting)
        speech, silence = [], []
        for i in range(GESTURE_CLIPS):
            seed = gesture_world.HELD_OUT_SEED + 100 + i
            audio, _ = gesture_world.clip(seed, GESTURE_SECONDS)
            speech.append(gesture_world.wrist_speed(pipe.generate(audio, gesture_world.SAMPLE_RATE)))
            still = pipe.generate(gesture_world.near_silence(seed, GESTURE_SECONDS), gesture_world.SAMPLE_RATE)
            silence.append(gesture_world.wrist_speed(still))
        ratio = float(np.mean(speech) / np.mean(silence))
        rows.append({"model": "demo speech-to-gesture", "setting": setting, "motion_ratio": ratio,
                     "speech_motion": float(np.mean(speech)), "silence_motion": float(np.mean(silence))})
        log(f"demo gesture {setting}: ratio {ratio:.2f}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["int8", "int8-g128"], help="quantize settings to measure")
    ap.add_argument("--real-size", type=Path, default=Path("build/bench_caption/vit-gpt2/engine_float32"),
                    help="a float32 checkpoint of real size (default: bench_caption's ViT-B/16 + GPT-2 small); "
                         "skipped when missing")
    ap.add_argument("--images", type=int, default=4, help="images for the real-size logits (default 4)")
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced steps per image (default 32)")
    ap.add_argument("--txt2img-seeds", type=int, default=4, help="sampling seeds per text-to-image prompt (default 4)")
    ap.add_argument("--json", type=Path, default=Path("build/quality_int8.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = demo_captioner(args.settings)
    if (args.real_size / "config.json").is_file():
        rows += real_size(args.real_size, args.settings, args.images, args.steps)
    else:
        log(f"{args.real_size} missing (run benchmarks/bench_caption.py once): real-size logits skipped")
    rows += demo_txt2img(args.settings, args.txt2img_seeds)
    rows += demo_gesture(args.settings)
    write_json(args.json, {"benchmark": "quality_int8", "machine": machine_info("cpu"), "rows": rows,
                           "seconds": time.perf_counter() - t0})
    for columns in (["exact_caption_rate", "tokens_equal_float32"],
                    ["max_abs_err_over_mean_abs_logit", "mean_abs_err_over_mean_abs_logit",
                     "max_abs_err_over_max_abs_logit", "top1_agreement", "positions"],
                    ["round_trip", "round_trip_rate"], ["motion_ratio", "speech_motion", "silence_motion"]):
        group = [r for r in rows if columns[0] in r]
        if group:
            print(format_table(group, ["model", "setting", *columns]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
