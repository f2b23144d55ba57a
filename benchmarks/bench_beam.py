#!/usr/bin/env python3
"""Beam-search benchmark: the engine's beam search against transformers' ``generate(num_beams=K)``
on the same random captioner (``bench_caption.py``'s models; default ViT-B/16 + GPT-2 small), and
against the engine's own greedy decoding of a batch of K rows (K copies of the image).

For each arch, dtype and beam width K (``--beams``, default 3 5), one image, lengths forced on every
side (``min_new_tokens = max_new_tokens``: eos is suppressed, so every step runs), after warm-up:

- engine beam K: ``pipe.generate_ids(px, N, N, SamplingParams(num_beams=K, num_return_sequences=K))``;
- engine greedy xK: ``pipe.generate_ids(px repeated K times, N, N, SamplingParams())``;
- HF beam K / HF greedy xK: ``model.generate`` with the same settings (``use_cache=True``);
- on CUDA, the engine again with its CUDA graphs off (``engine-eager``).

Each is timed at 1 and N new tokens, the calls of all of them taken in turn (one call of each, then
the next round), so that a shared machine's changing load falls on all alike: **first_token_ms** is
the 1-token call (encoder + prefill + the first pick), **ms_per_step** ``(t(N) - t(1)) / (N - 1)``
over each round's pair of calls: the median (and p90) over the rounds. A step of K beams and a
step of K greedy rows both feed K tokens. Ratio rows: ``engine/HF`` per decoding (below 1: the
engine is faster) and ``beam/greedy`` per implementation, the issue's target metric: the engine's
per-step cost of K beams against a batch of K greedy rows, at most 1.5x (a benchmark, not a test:
reported, never asserted). The engine's K hypotheses are compared with transformers'
(``ids_match``, a WARNING when they differ), and its greedy ids with transformers' greedy ids.

The models are those of ``bench_caption.py`` and share its cache (``--cache-dir``, default
``build/bench_caption``). A markdown table is printed last; the machine, settings and every raw time
go to ``--json`` (default ``build/bench_beam/results.json``; ``results_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_caption as caption  # noqa: E402
from timing import (  # noqa: E402
    add_device_arguments,
    checked_device,
    engine_info,
    format_table,
    machine_info,
    measure,
    per_token,
    summarize,
    write_json,
)

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.pipelines.captioning import RECORD_AFTER  # noqa: E402

TARGET = 1.5  # the bound on the engine's beam/greedy per-step cost
EARLY_STOPPING = {"false": False, "true": True, "never": "never"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_interleaved(runs: dict, args) -> tuple[dict, dict]:
    """Times every ``runs[key](n)`` (generate exactly n tokens) at n = 1 and n = N, one call after
    another in turn (the order rotated each round), so that a change in the machine's load during
    the run falls on every implementation alike rather than on the one timed then. Returns per key
    the record and the ids of one N-token call."""
    n = args.new_tokens
    calls = [(key, length) for key in runs for length in (1, n)]
    # on CPU the engine records a call shape's steps after RECORD_AFTER eager runs of it: warm up past
    # that, so that no timed call pays for a recording
    warmup = max(args.warmup, RECORD_AFTER + 1) if args.device == "cpu" else args.warmup
    for key, length in calls:
        for _ in range(warmup):
            runs[key](length)
    times = {call: [] for call in calls}
    for i in range(args.repeats):
        for key, length in calls[i % len(calls):] + calls[:i % len(calls)]:
            s = measure(lambda: runs[key](length), warmup=0, repeats=1, device=args.device, flush_l2=args.flush_l2)
            times[key, length] += s["times_ms"]
    records, ids = {}, {}
    for key in runs:
        first, full = summarize(times[key, 1]), summarize(times[key, n])
        records[key] = {"new_tokens": n, "first_token": first, "n_tokens": full,
                        "first_token_ms": first["median_ms"], "first_token_p90_ms": first["p90_ms"],
                        **dict(zip(("ms_per_step", "ms_per_step_p90"), per_token(times[key, 1], times[key, n], n)))}
        ids[key] = runs[key](n).cpu()
    return records, ids


def ratio(impl: str, decoding: str, num: dict, den: dict, **extra) -> dict:
    return {"impl": impl, "decoding": decoding,
            **{k: num[k] / den[k] for k in ("first_token_ms", "ms_per_step", "ms_per_step_p90")}, **extra}


def ids_compare(ours: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    if ours.shape != ref.shape:
        return False, 0.0
    return bool(torch.equal(ours, ref)), float((ours == ref).float().mean())


def bench_dtype(arch: str, dtype: str, engine_dir: Path, hf_dir: Path, args) -> tuple[list[dict], list[dict]]:
    import transformers

    device = args.device
    pipe = mm.load(engine_dir, device=device)
    hf = getattr(transformers, caption.HF_CLASSES[arch]).from_pretrained(
        hf_dir, dtype=caption.DTYPES[dtype]).to(device).eval()
    start = caption.token_ids(caption.model_spec(arch, args.preset, args.seed))[0]
    enc = pipe.config.encoder
    g = torch.Generator().manual_seed(args.seed + 1)
    # one preprocessed image, as bench_caption draws them
    px = torch.rand(1, enc.num_channels, enc.image_size, enc.image_size, generator=g) * 2 - 1
    early = EARLY_STOPPING[args.early_stopping]
    greedy = mm.SamplingParams()
    results, comparisons = [], []
    for k in args.beams:
        px_engine = {1: px.to(device), k: px.expand(k, -1, -1, -1).contiguous().to(device)}
        px_hf = {b: x.to(device, caption.DTYPES[dtype]) for b, x in px_engine.items()}
        beam = mm.SamplingParams(num_beams=k, num_return_sequences=k, length_penalty=args.length_penalty,
                                 early_stopping=early)

        def run_engine(n, beams):
            if beams:
                return pipe.generate_ids(px_engine[1], max_new_tokens=n, min_new_tokens=n, sampling=beam)
            return pipe.generate_ids(px_engine[k], max_new_tokens=n, min_new_tokens=n, sampling=greedy)

        def run_hf(n, beams):
            batch = 1 if beams else k
            # GIT's generate takes the start token as input_ids; ViT-GPT2 and BLIP add their own
            prompt = {"input_ids": torch.full((batch, 1), start, device=device)} if arch == "git" else {}
            search = ({"num_beams": k, "num_return_sequences": k, "length_penalty": args.length_penalty,
                       "early_stopping": early} if beams else {"num_beams": 1})
            with torch.inference_mode():
                out = hf.generate(pixel_values=px_hf[batch], **prompt, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, **search)
            return out[:, 1:]  # drop the start token

        row = {"arch": arch, "device": device, "dtype": dtype, "K": k}
        names = {True: f"beam {k}", False: f"greedy x{k}"}
        def eager(run, n, beams):  # the engine with its CUDA graphs off
            pipe.use_cuda_graphs = False
            try:
                return run(n, beams)
            finally:
                pipe.use_cuda_graphs = True

        impls = [("engine", run_engine)]
        if pipe.use_cuda_graphs:  # the same engine without graphs, to show what the graphs buy
            impls.append(("engine-eager", run_engine))
        impls.append(("HF", run_hf))
        runs = {}
        for impl, run in impls:
            for beams in (True, False):
                if impl == "HF" and not beams and args.no_hf_greedy:
                    continue
                if impl == "engine-eager":
                    runs[impl, beams] = lambda n, b=beams: eager(run_engine, n, b)
                else:
                    runs[impl, beams] = lambda n, b=beams, r=run: r(n, b)
        log(f"timing {', '.join(f'{impl} {names[b]}' for impl, b in runs)} ({arch} {dtype}), interleaved ...")
        recs, ids = time_interleaved(runs, args)
        recs = {(impl, b): {"impl": impl, "decoding": names[b], **rec} for (impl, b), rec in recs.items()}
        results += [{**row, **rec} for rec in recs.values()]

        # the engine's K hypotheses against transformers', best first; greedy rows likewise
        beam_match, beam_agree = ids_compare(ids["engine", True], ids["HF", True])
        if not beam_match:
            print(f"WARNING: engine and HF beam ids differ ({arch} {device} {dtype} K={k}): "
                  f"{beam_agree:.1%} of tokens agree", flush=True)
        greedy_rows_equal = bool((ids["engine", False] == ids["engine", False][:1]).all())
        if not greedy_rows_equal:
            print(f"WARNING: the engine's greedy rows of one image differ ({arch} {device} {dtype} x{k})", flush=True)
        ratios = [ratio("engine/HF", names[True], recs["engine", True], recs["HF", True],
                        ids_match=beam_match, ids_agree_fraction=beam_agree)]
        if ("HF", False) in recs:
            greedy_match, greedy_agree = ids_compare(ids["engine", False], ids["HF", False])
            if not greedy_match:
                print(f"WARNING: engine and HF greedy ids differ ({arch} {device} {dtype} x{k}): "
                      f"{greedy_agree:.1%} of tokens agree", flush=True)
            ratios.append(ratio("engine/HF", names[False], recs["engine", False], recs["HF", False],
                                ids_match=greedy_match, ids_agree_fraction=greedy_agree))
        for impl in ("engine", "engine-eager", "HF"):
            if (impl, True) in recs and (impl, False) in recs:
                r = ratio(impl, "beam/greedy", recs[impl, True], recs[impl, False])
                if impl.startswith("engine"):
                    r["target"] = f"<={TARGET}: " + ("yes" if r["ms_per_step"] <= TARGET else "NO")
                    r["meets_target"] = r["ms_per_step"] <= TARGET
                ratios.append(r)
        if pipe.use_cuda_graphs:
            eager_equal = (torch.equal(ids["engine-eager", True], ids["engine", True])
                           and torch.equal(ids["engine-eager", False], ids["engine", False]))
            if not eager_equal:
                print(f"WARNING: graph and eager ids differ ({arch} {device} {dtype} K={k})", flush=True)
            ratios[0]["eager_ids_equal_graph"] = eager_equal
        ratios[0]["greedy_rows_equal"] = greedy_rows_equal
        comparisons += [{**row, **r} for r in ratios]
    return results, comparisons


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", choices=caption.ARCHS, default=["vit-gpt2"],
                    help="captioners of bench_caption.py to time, each in turn (default vit-gpt2)")
    add_device_arguments(ap)
    ap.add_argument("--dtype", nargs="+", choices=list(caption.DTYPES),
                    help="dtypes to time (default float32 on CPU, float16 on CUDA)")
    ap.add_argument("--beams", nargs="+", type=int, default=[3, 5], help="beam widths K (default 3 5)")
    ap.add_argument("--new-tokens", type=int, help="forced length N (default 32; 16 with --quick)")
    ap.add_argument("--length-penalty", type=float, default=1.0, help="both sides (default 1.0)")
    ap.add_argument("--early-stopping", choices=list(EARLY_STOPPING), default="false",
                    help="both sides (default false; at a forced length no hypothesis ends early either way)")
    ap.add_argument("--no-hf-greedy", action="store_true",
                    help="skip transformers' greedy batch of K (only there for its own beam/greedy ratio)")
    ap.add_argument("--repeats", type=int, help="timed calls per figure (default 5; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before each figure (default 3, min 2)")
    ap.add_argument("--flush-l2", action="store_true", help="CUDA: write 256 MB before each timed call")
    ap.add_argument("--quick", action="store_true", help="tiny random models and short lengths, for smoke tests")
    ap.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    ap.add_argument("--cache-dir", type=Path, default=Path("build/bench_caption"),
                    help="where the HF models and engine checkpoints are kept, shared with bench_caption.py "
                         "(default build/bench_caption)")
    ap.add_argument("--json", type=Path, help="results file (default build/bench_beam/results.json; "
                                              "results_quick.json with --quick)")
    args = ap.parse_args(argv)
    args.arch = list(dict.fromkeys(args.arch))
    args.beams = list(dict.fromkeys(args.beams))
    args.preset = "quick" if args.quick else "full"
    args.device = checked_device(ap, args.device)
    args.dtype = args.dtype or (["float16"] if args.device.startswith("cuda") else ["float32"])
    args.new_tokens = args.new_tokens or max(caption.PRESETS[a][args.preset]["new_tokens"] for a in args.arch)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.json = args.json or Path("build/bench_beam") / ("results_quick.json" if args.quick else "results.json")
    max_new = min(caption.max_positions(a, args.preset) for a in args.arch) - 1  # the start token's position
    if not 2 <= args.new_tokens <= max_new:
        ap.error(f"--new-tokens must be in [2, {max_new}]")
    if not all(2 <= k <= 64 for k in args.beams):
        ap.error("--beams must lie in [2, 64]")
    if args.warmup < 2 or args.repeats < 1:
        ap.error("need --warmup >= 2 and --repeats >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    results, comparisons = [], []
    for arch in args.arch:
        hf_dir, engines = caption.prepare(args.cache_dir, arch, args.preset, args.seed, args.dtype)
        for dtype in args.dtype:
            r, c = bench_dtype(arch, dtype, engines[dtype], hf_dir, args)
            results += r
            comparisons += c
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    matches = [c["ids_match"] for c in comparisons if "ids_match" in c]
    targets = [c for c in comparisons if c["impl"] == "engine" and c["decoding"] == "beam/greedy"]
    payload = {"benchmark": "beam", "machine": machine_info(args.device), "engine": engine_info(),
               "transformers": transformers.__version__,
               "models": {arch: {"name": caption.PRESETS[arch][args.preset]["name"],
                                 **caption.model_spec(arch, args.preset, args.seed)} for arch in args.arch},
               "settings": {"archs": args.arch, "device": args.device, "dtypes": args.dtype, "beams": args.beams,
                            "new_tokens": args.new_tokens, "length_penalty": args.length_penalty,
                            "early_stopping": EARLY_STOPPING[args.early_stopping], "hf_greedy": not args.no_hf_greedy,
                            "warmup": args.warmup, "repeats": args.repeats, "flush_l2": args.flush_l2,
                            "threads": torch.get_num_threads(), "quick": args.quick},
               "target_beam_over_greedy": TARGET,
               "results": results, "comparisons": comparisons, "ids_match": all(matches),
               "meets_target": all(c["meets_target"] for c in targets)}
    write_json(args.json, payload)
    log(f"wrote {args.json}")

    keys = ("arch", "device", "dtype", "K")
    rows = []
    for group in dict.fromkeys(tuple(c[k] for k in keys) for c in comparisons):
        rows += [r for r in results if tuple(r[k] for k in keys) == group]
        rows += [c for c in comparisons if tuple(c[k] for k in keys) == group]
    columns = ["arch", "device", "dtype", "K", "impl", "decoding", "first_token_ms", "first_token_p90_ms",
               "ms_per_step", "ms_per_step_p90", "ids_match", "target"]
    m = payload["machine"]
    models = ", ".join(f"{a}: {caption.PRESETS[a][args.preset]['name']}" for a in args.arch)
    print(f"\nbeam benchmark ({args.preset}; {models}; N={args.new_tokens}, {args.repeats} repeats) on "
          f"{m.get('gpu', m['cpu'])}, torch threads {m['torch_threads']}, load {m['load_avg_1m']}")
    print(format_table(rows, columns))
    bad = [k for r in results for k in ("first_token_ms", "ms_per_step") if not math.isfinite(r[k])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
