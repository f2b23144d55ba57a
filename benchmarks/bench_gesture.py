#!/usr/bin/env python3
"""Speech-to-gesture benchmark: the engine's SpeechToGesturePipeline against the plain PyTorch a2g-gpt
reference (``mmgen_engine.training.a2g_gpt.generate``: greedy, no caches, the decoder recomputed over
the whole window at every step) on the same random, seeded weights and the same speech-like audio.

The model is ``A2GConfig()`` (the demo model's size; ``--quick``: a tiny one and 6 s of audio),
built with ``torch.manual_seed(--seed)``, saved with ``a2g_gpt.save``, converted with ``mm.convert``
and loaded with ``mm.load(--device, --dtype)``; the reference runs the saved weights in float32 on
the same device. Both are cached under ``--cache-dir`` and rebuilt only when the spec changes. The
audio is deterministic: harmonics of a gliding pitch, amplitude-modulated at a syllable rate, with
pauses and a little noise, 16 kHz, ``--seconds`` long.

For the engine (greedy ``mm.SamplingParams()``, the reference's work; and the pipeline's default,
seeded top-p sampling) and for the reference it times, after ``--warmup`` untimed calls, the
median of ``--repeats`` calls of the following. On CPU the engine first runs until its decode steps
are recorded (``recording_calls_s``: those calls' seconds, the first one the cold call;
``--eager-steps``: no recordings, every step eager).

- a whole ``generate``: **rtf** (real-time factor) = seconds of motion produced / seconds of compute
  (``rtf_p90`` from the p90 time), and **ms_per_window** = compute / windows;
- the first pose chunk: **first_chunk_ms**, for the engine the time from calling ``generate_stream``
  until ``next()`` returns its first chunk, for the reference a ``generate`` over exactly one window
  of audio (``plan.window_samples`` samples).

The engine's greedy poses and window tokens are compared with the reference's on the timed audio:
on CPU in float32 they must agree to 1e-4 relative (max abs diff / max abs; a mismatch is a WARNING
and exit status 1); on CUDA or in half precision the difference is only reported. Targets (printed,
not asserted; demo-size model, batch 1): 5x real time on a 2-core CPU, 100x on an H100/H200. A
markdown table is printed last; raw times, the machine and the settings go to ``--json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import add_device_arguments, checked_device, engine_info, format_table, machine_info, measure, write_json  # noqa: E402

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.pipelines.speech_to_gesture import DEFAULT_SAMPLING  # noqa: E402
from mmgen_engine.training import a2g_gpt as a2g  # noqa: E402

DEFAULT_LABEL = f"T {DEFAULT_SAMPLING.temperature:g}, top-p {DEFAULT_SAMPLING.top_p:g}"  # the pipeline's sampling

PRESETS = {
    "full": {"name": "a2g-gpt demo size", "config": {}, "seconds": 30.0},
    "quick": {"name": "tiny a2g-gpt", "seconds": 6.0,
              "config": {"width": 32, "audio_layers": 1, "audio_heads": 2, "audio_ff": 48, "layers": 2, "heads": 2,
                         "ff": 64, "codebook_size": 40, "code_dim": 8, "vq_width": 16, "vq_depth": 2}},
}
# At A2GGpt's own (GPT-2 style) initialisation the random decoder repeats one token whatever the
# audio, which would leave the pose comparison with a single code: the audio encoder's and decoder's
# matrices are redrawn wider, the token embeddings narrower and the positions wider, the codebook
# and the pose statistics spread. The motion decoder keeps its
# default init (redrawn, its poses reach 1e6 and overflow fp16). At seed 0 the demo-size model's
# greedy tokens then vary with the audio and along the window, and poses stay within about +-10.
INIT = {"matrices": 0.2, "audio_pos": 1.0, "wte": 0.1, "wpe": 2.0, "codebook": 1.0, "pose_mean": 3.0,
        "pose_std": [0.5, 2.0]}
TARGET_RTF = {"cpu": 5.0, "cuda": 100.0}  # demo-size model, batch 1
TOLERANCE = 1e-4  # max abs pose diff / max abs pose, CPU float32
GREEDY = mm.SamplingParams()
SPEC_FILE = "bench_spec.json"
DTYPES = ("float32", "float16", "bfloat16")
SAMPLE_RATE = 16000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_config(preset: str) -> a2g.A2GConfig:
    return a2g.A2GConfig(**PRESETS[preset]["config"])


def model_spec(preset: str, seed: int) -> dict:
    """Everything the cached model depends on; a cache whose spec differs is rebuilt."""
    return {"preset": preset, "seed": seed, "config": dataclasses.asdict(model_config(preset)), "init": INIT}


def build_reference(cfg: a2g.A2GConfig, seed: int) -> a2g.A2GGpt:
    """``A2GGpt(cfg)`` drawn with ``torch.manual_seed(seed)``, then rescaled as :data:`INIT` says."""
    torch.manual_seed(seed)
    model = a2g.A2GGpt(cfg).eval()
    with torch.no_grad():
        for part in (model.audio, model.gpt):
            for p in part.parameters():
                if p.dim() > 1:
                    p.normal_(0, INIT["matrices"])
        model.audio.pos.normal_(0, INIT["audio_pos"])
        model.gpt.wte.weight.normal_(0, INIT["wte"])
        model.gpt.wpe.weight.normal_(0, INIT["wpe"])
        model.motion.quantizer.codebook.normal_(0, INIT["codebook"])
        model.pose_mean.normal_(0, INIT["pose_mean"])
        model.pose_std.uniform_(*INIT["pose_std"])
    return model


def _spec_matches(path: Path, spec: dict) -> bool:
    try:
        return json.loads(path.read_text()) == spec
    except (OSError, ValueError):
        return False


def prepare(cache: Path, preset: str, seed: int) -> tuple[Path, Path]:
    """The reference's source directory (``a2g_gpt.save``) and its engine checkpoint, built or reused."""
    spec = model_spec(preset, seed)
    suffix = "" if preset == "full" else f"_{preset}"
    src, engine = cache / f"a2g{suffix}", cache / f"engine{suffix}"
    if _spec_matches(src / SPEC_FILE, spec):
        log(f"reusing reference model {src}")
    else:
        t0 = time.perf_counter()
        a2g.save(build_reference(model_config(preset), seed), src)
        (src / SPEC_FILE).write_text(json.dumps(spec))
        log(f"built reference model {src} in {time.perf_counter() - t0:.1f} s")
    stamp = cache / f"engine{suffix}.{SPEC_FILE}"
    if _spec_matches(stamp, spec) and (engine / "config.json").is_file():
        log(f"reusing engine checkpoint {engine}")
    else:
        t0 = time.perf_counter()
        mm.convert(src, engine, overwrite=True)
        stamp.write_text(json.dumps(spec))
        log(f"converted {engine} in {time.perf_counter() - t0:.1f} s")
    return src, engine


def speech_like(seconds: float, seed: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Deterministic speech-like audio: 8 harmonics of a pitch gliding around 120 Hz, amplitude-modulated
    at a syllable rate (about 4 Hz) with random syllable loudness, pauses of 0.3-0.8 s every 1-3 s, and
    a little noise; float32 in about [-0.6, 0.6]."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.3 * t) + 10 * np.sin(2 * np.pi * 1.7 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 9))
    syllable = 0.25  # s
    loud = np.repeat(rng.uniform(0.2, 1.0, n // int(syllable * rate) + 1), int(syllable * rate))[:n]
    envelope = loud * np.sin(np.pi * (t % syllable) / syllable) ** 2
    speaking = np.ones(n)
    start = rng.uniform(1, 3)
    while start < seconds:  # pauses
        stop = start + rng.uniform(0.3, 0.8)
        speaking[int(start * rate):int(stop * rate)] = 0
        start = stop + rng.uniform(1, 3)
    audio = 0.25 * voice * envelope * speaking + 0.003 * rng.standard_normal(n)
    return audio.astype(np.float32)


def rel_diff(poses: np.ndarray, ref: np.ndarray) -> float:
    """max |poses - ref| / max |ref| (inf when the shapes differ)."""
    if poses.shape != ref.shape:
        return math.inf
    return float(np.abs(poses.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def engine_greedy(pipe, audio: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Every window's tokens of a greedy engine run, and its poses."""
    return pipe.generate_tokens(audio, SAMPLE_RATE, GREEDY), pipe.generate(audio, SAMPLE_RATE, sampling=GREEDY)


def warm_up_recordings(pipe, audio: np.ndarray, sampling, max_calls: int = 20) -> list[float]:
    """On CPU the pipeline records a decode step shape after it ran eagerly a few dozen times
    (:mod:`mmgen_engine.runtime.recorded`): call ``generate`` until a call records nothing new after
    enough calls for the steps every window shares to be recorded (a shape that only the first window
    has stays eager), so the timed calls are its steady state. Returns those calls' seconds (the
    cost of getting there)."""
    if pipe.device.type != "cpu" or not pipe.record_cpu_steps:
        return []
    windows = pipe.plan.windows(audio.shape[0])
    min_calls = min(8, 2 + pipe.recorded_steps.record_after // max(1, windows - 1))
    times = []
    for _ in range(max_calls):
        before = len(pipe.recorded_steps)
        t0 = time.perf_counter()
        pipe.generate(audio, SAMPLE_RATE, sampling=sampling)
        times.append(time.perf_counter() - t0)
        if len(pipe.recorded_steps) == before and len(times) >= min_calls:
            break
    return times


def rates(full: dict, first: dict, motion_s: float, windows: int) -> dict:
    """The figures of one implementation from its whole-call and first-chunk timings."""
    return {"compute_s": full["median_ms"] / 1e3, "rtf": motion_s / (full["median_ms"] / 1e3),
            "rtf_p90": motion_s / (full["p90_ms"] / 1e3), "ms_per_window": full["median_ms"] / windows,
            "first_chunk_ms": first["median_ms"], "first_chunk_p90_ms": first["p90_ms"]}


def bench(src: Path, engine_dir: Path, args) -> tuple[list[dict], dict]:
    device, dtype = args.device, args.dtype
    pipe = mm.load(engine_dir, device=device, dtype=dtype)
    ref = a2g.load(src).to(device)  # float32, as saved
    plan = pipe.plan
    audio = speech_like(args.seconds, args.seed)
    windows = plan.windows(audio.shape[0])
    one_window = audio[:plan.window_samples]
    if plan.windows(one_window.shape[0]) != 1:
        raise RuntimeError("one window of audio makes more than one window")
    fps = pipe.fps
    timing = {"warmup": args.warmup, "repeats": args.repeats, "device": device}
    row = {"device": device, "windows": windows}
    results = []

    def engine_first(sampling):
        stream = pipe.generate_stream(audio, SAMPLE_RATE, sampling=sampling)
        chunk = next(stream)
        stream.close()
        return chunk

    pipe.record_cpu_steps = not args.eager_steps
    for impl, sampling, label in (("engine", GREEDY, "greedy"), ("engine", DEFAULT_SAMPLING, DEFAULT_LABEL)):
        log(f"timing engine {label} ...")
        warm = warm_up_recordings(pipe, audio, sampling)
        full = measure(lambda: pipe.generate(audio, SAMPLE_RATE, sampling=sampling), **timing)
        first = measure(lambda: engine_first(sampling), **timing)
        poses = pipe.generate(audio, SAMPLE_RATE, sampling=sampling)
        motion_s = poses.shape[0] / fps
        results.append({**row, "impl": impl, "dtype": dtype, "sampling": label, "motion_s": motion_s,
                        **rates(full, first, motion_s, windows), "generate": full, "first_chunk": first,
                        "recording_calls_s": warm, "recorded_steps": len(pipe.recorded_steps),
                        "eager_steps": args.eager_steps})

    log("timing reference ...")
    with torch.inference_mode():
        full = measure(lambda: a2g.generate(ref, audio), **timing)
        first = measure(lambda: a2g.generate(ref, one_window), **timing)
        ref_tokens, ref_poses = a2g.generate(ref, audio)
    motion_s = ref_poses.shape[0] / fps
    results.append({**row, "impl": "reference", "dtype": "float32", "sampling": "greedy", "motion_s": motion_s,
                    **rates(full, first, motion_s, windows), "generate": full, "first_chunk": first})

    for r in results:  # the engine's speed as a multiple of the reference's (greedy) on the same audio
        r["x_reference"] = results[-1]["compute_s"] / r["compute_s"]
        r["cold_s"] = r.get("recording_calls_s", [None])[0] if r.get("recording_calls_s") else None
    for r in results:
        if r["impl"] == "engine" and args.target is not None:
            r["target_rtf"] = args.target
            r["meets_target"] = r["rtf"] >= args.target

    # the engine's greedy tokens and poses against the reference's, on the timed audio
    tokens, poses = engine_greedy(pipe, audio)
    diff = rel_diff(poses, ref_poses)
    flat_ref = [t for w in ref_tokens for t in w]
    flat = [t for w in tokens for t in w]
    agree = (sum(a == b for a, b in zip(flat, flat_ref)) / len(flat_ref)) if len(flat) == len(flat_ref) else 0.0
    checked = device == "cpu" and dtype == "float32"
    matched = diff <= TOLERANCE and tokens == ref_tokens
    eng, ref_row = results[0], results[-1]
    comparison = {**row, "impl": "engine/reference", "dtype": dtype, "sampling": "greedy",
                  "compute_s": eng["compute_s"] / ref_row["compute_s"],
                  "ms_per_window": eng["ms_per_window"] / ref_row["ms_per_window"],
                  "first_chunk_ms": eng["first_chunk_ms"] / ref_row["first_chunk_ms"],
                  "rtf_speedup": eng["rtf"] / ref_row["rtf"],
                  "max_rel_diff": diff, "tokens_match": tokens == ref_tokens, "tokens_agree_fraction": agree,
                  "distinct_tokens": len(set(flat_ref)), "checked": checked, "tolerance": TOLERANCE,
                  "poses_match": matched if checked else None}
    if checked and not matched:
        print(f"WARNING: engine and reference greedy poses differ ({device} {dtype}): max rel diff {diff:.3g}, "
              f"{agree:.1%} of tokens agree", flush=True)
    return results, comparison


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(ap)
    ap.add_argument("--dtype", choices=DTYPES, help="engine dtype (default float32 on CPU, float16 on CUDA; "
                                                    "the reference always runs float32)")
    ap.add_argument("--seconds", type=float, help="audio length (default 30; 6 with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per figure (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before each figure (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="weights and audio seed (default 0)")
    ap.add_argument("--eager-steps", action="store_true",
                    help="CPU: run every engine decode step eagerly (no recorded steps), the path before them")
    ap.add_argument("--quick", action="store_true", help="a tiny model and 6 s of audio, for smoke tests and CI")
    ap.add_argument("--cache-dir", type=Path, default=Path("build/bench_gesture"),
                    help="where the reference model and the engine checkpoint are kept (default build/bench_gesture)")
    ap.add_argument("--json", type=Path, help="results file (default <cache-dir>/results.json; "
                                              "results_quick.json with --quick)")
    args = ap.parse_args(argv)
    args.preset = "quick" if args.quick else "full"
    args.device = checked_device(ap, args.device)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.seconds = args.seconds if args.seconds is not None else PRESETS[args.preset]["seconds"]
    args.json = args.json or args.cache_dir / ("results_quick.json" if args.quick else "results.json")
    # the targets are for the demo-size model: none for the tiny one
    args.target = None if args.quick else TARGET_RTF["cuda" if cuda else "cpu"]
    if args.seconds <= 0 or args.repeats < 1 or args.warmup < 0:
        ap.error("need --seconds > 0, --repeats >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    src, engine_dir = prepare(args.cache_dir, args.preset, args.seed)
    results, comparison = bench(src, engine_dir, args)

    cfg = model_config(args.preset)
    params = sum(p.numel() for p in a2g.A2GGpt(cfg).parameters())
    payload = {"benchmark": "gesture", "machine": machine_info(args.device),
               "engine": engine_info(),
               "model": {"name": PRESETS[args.preset]["name"], "parameters": params,
                         **model_spec(args.preset, args.seed)},
               "settings": {"preset": args.preset, "device": args.device, "dtype": args.dtype,
                            "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
                            "threads": torch.get_num_threads(), "seed": args.seed, "target_rtf": args.target},
               "results": results, "comparisons": [comparison], "poses_match": comparison["poses_match"]}
    write_json(args.json, payload)
    log(f"wrote {args.json}")

    m = payload["machine"]
    target = f"target {args.target:g}x real time (engine)" if args.target else "no target (tiny model)"
    print(f"\ngesture benchmark ({args.preset}: {PRESETS[args.preset]['name']}, {params / 1e6:.2f}M params; "
          f"{args.seconds:g} s of audio, {comparison['windows']} windows, batch 1, {args.repeats} repeats; {target}) "
          f"on {m.get('gpu', m['cpu'])}, torch threads {m['torch_threads']}")
    columns = ["device", "dtype", "impl", "sampling", "windows", "motion_s", "compute_s", "x_reference", "cold_s",
               "rtf", "rtf_p90",
               "target_rtf", "meets_target", "first_chunk_ms", "ms_per_window", "rtf_speedup", "max_rel_diff",
               "tokens_match"]
    print(format_table(results + [comparison], columns))
    bad = [r for r in results for k in ("rtf", "first_chunk_ms") if not math.isfinite(r[k]) or r[k] <= 0]
    return 1 if bad or comparison["poses_match"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
