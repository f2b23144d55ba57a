#!/usr/bin/env python3
"""ONNX Runtime as a peer: each one-shot stage of the engine against the same stage exported with
``mm.export_onnx`` and run by an ``onnxruntime.InferenceSession``, on the same random weights and
inputs, per batch size.

Models (random, seeded weights; built and cached by the other benchmarks' own builders):

- captioning image encoders (``--arch``, default ``vit-gpt2 blip git``): ``bench_caption``'s models,
  ViT-B/16 at 224 px, BLIP-base's ViT-B/16 at 384 px, GIT-base's CLIP ViT-B/16 + projection
  (``--quick``: tiny ones);
- text-to-image: ``bench_txt2img``'s DALL·E Mini-size BART encoder and min-dalle's VQGAN
  detokenizer (16x16 tokens -> 256x256 pixels);
- speech-to-gesture: ``bench_gesture``'s model (the demo model's size): the audio encoder over one
  window's log-mel and the motion-VQ decoder over one window's tokens.

Then captioning end to end (``--e2e-arch``, default ``vit-gpt2``), greedy at forced lengths as
``bench_caption`` times it (first token: a 1-token call; ms/token: ``(t(N) - t(1)) / (N - 1)``):
the engine; the engine with its image encoder on ONNX Runtime (``mm.load(...,
stage_backend="onnxruntime")``); and everything on ONNX Runtime, the exported prefill and decode-step
models driven by the reference loop (``runtime="onnxruntime"``). Their ids are compared.

The engine runs each stage as its pipeline does (``pipe.stage(name)``: the engine's backends, its
CUDA graph on a GPU, ``torch.inference_mode``); ORT runs the exported part as
``stage_backend="onnxruntime"`` does (``mmgen_engine.onnx.backend.OrtStage``: I/O binding on the
torch tensors, the CPU execution provider with its default threading, or on ``--device cuda`` the
CUDA one of onnxruntime-gpu on a torch stream with ORT's CUDA graphs where it accepts them), in
``--dtype`` (default float32 on CPU, float16 on CUDA). On CUDA the end-to-end rows leave out the ORT
decode loop (``runtime="onnxruntime"`` decodes on CPU only). Each figure is the
median of ``--repeats`` timed calls after ``--warmup`` untimed ones; ``ort/engine`` < 1 means ONNX
Runtime is faster; an end-to-end row's ``ms_per_token`` is the median over pairs of a 1-token and an
N-token call timed in turn (``timing.measure_paired``). The largest difference of the outputs,
relative to their scale, is reported beside the times. A markdown table is printed last; raw times
and the machine go to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_caption  # noqa: E402
import bench_gesture  # noqa: E402
import bench_txt2img  # noqa: E402
from timing import (  # noqa: E402
    add_device_arguments,
    checked_device,
    engine_info,
    format_table,
    machine_info,
    measure,
    measure_paired,
    write_json,
)

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.onnx import PARTS, check_export  # noqa: E402
from mmgen_engine.onnx.backend import OrtStage  # noqa: E402
from mmgen_engine.onnx.export import TRACE_BATCH  # noqa: E402

# the parts that run once per request (the decoders' prefill / step parts are timed end to end)
ONE_SHOT = ("image_encoder", "text_encoder", "detokenizer", "audio_encoder", "motion_decoder")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def checkpoints(args) -> dict[str, Path]:
    """``{model name: engine checkpoint}`` of every model in this run, built or reused."""
    out = {}
    for arch in dict.fromkeys(args.arch + args.e2e_arch):
        preset = bench_caption.preset_of(arch, args)
        _, engines = bench_caption.prepare(args.cache_dir / "caption", arch, preset, args.seed, ["float32"])
        out[f"caption-{arch}"] = engines["float32"]
    if "text-to-image" in args.tasks:
        preset = "quick" if args.quick else "mini"
        engine = args.cache_dir / "txt2img" / f"engine_{preset}"
        stamp = engine.with_suffix(".seed")
        if not (engine / "config.json").is_file() or not stamp.is_file() or stamp.read_text() != str(args.seed):
            src, *_ = bench_txt2img.build(args.cache_dir / "txt2img", preset, args.seed)
            mm.convert(src, engine, overwrite=True)
            stamp.write_text(str(args.seed))
        out[f"text-to-image-{preset}"] = engine
    if "speech-to-gesture" in args.tasks:
        _, engine = bench_gesture.prepare(args.cache_dir / "gesture", "quick" if args.quick else "full", args.seed)
        out["speech-to-gesture"] = engine
    return out


def exported(name: str, ckpt: Path, args) -> Path:
    """The one-shot parts of ``ckpt`` exported (in ``--dtype``) under the cache, reused while the
    checkpoint and the export check out."""
    out = args.cache_dir / "onnx" / f"{name}-{args.dtype}"
    try:
        manifest = check_export(out, ckpt, known=True)
        if set(manifest["parts"]) >= set(parts_of(ckpt)) and manifest["dtype"] == args.dtype:
            log(f"reusing export {out}")
            return out
    except mm.MMGenError:
        pass
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    mm.export_onnx(ckpt, out, parts=parts_of(ckpt), dtype=args.dtype)
    log(f"exported {name} in {time.perf_counter() - t0:.1f} s")
    return out


def parts_of(ckpt: Path) -> list[str]:
    task = json.loads((ckpt / "config.json").read_text())["task"]
    return [p for p in PARTS[task] if p in ONE_SHOT]


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max(1, max|b|)``."""
    return float((a.float() - b.float()).abs().max() / max(1.0, float(b.float().abs().max())))


def bench_model(name: str, ckpt: Path, export: Path, args) -> tuple[list[dict], list[dict]]:
    device = args.device
    pipe = mm.load(ckpt, device=device, dtype=args.dtype, stage_backend="engine")
    task = pipe.task
    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    results, comparisons = [], []
    for part_name in parts_of(ckpt):
        part = PARTS[task][part_name]
        stage = pipe.stage(part_name)
        session = OrtStage(export, part_name, torch.device(device), stream, cuda_graph=stream is not None)
        torch.manual_seed(args.seed)
        example = part.example(pipe)  # TRACE_BATCH rows, repeated to each batch size
        for batch in args.batch:
            rows = torch.arange(batch, device=next(iter(example.values())).device) % TRACE_BATCH
            on_device = [v[rows].contiguous().to(device) for v in example.values()]

            def run_engine():
                with torch.inference_mode():
                    return stage(*on_device)

            def run_ort():
                return session(*on_device)

            want, got = run_engine().float().cpu(), run_ort().float().cpu()
            diff = relative_diff(got, want)
            row = {"model": name, "part": part_name, "device": device, "batch": batch}
            timed = {}
            for impl, fn in (("engine", run_engine), ("onnxruntime", run_ort)):
                log(f"timing {name} {part_name} {impl} batch {batch} ...")
                t = measure(fn, warmup=args.warmup, repeats=args.repeats, device=device)
                timed[impl] = {**row, "impl": impl, "ms": t["median_ms"], "p90_ms": t["p90_ms"], "timing": t}
            results += timed.values()
            comparisons.append({**row, "impl": "ort/engine", "ms": timed["onnxruntime"]["ms"] / timed["engine"]["ms"],
                                "max_rel_diff": diff})
    return results, comparisons


E2E = {"engine": {"stage_backend": "engine"}, "engine+ort-stages": {"stage_backend": "onnxruntime"},
       "ort-loop": {"stage_backend": "onnxruntime", "runtime": "onnxruntime"}}  # the last on CPU only


def bench_e2e(arch: str, ckpt: Path, args) -> tuple[list[dict], list[dict]]:
    """Captioning end to end: the engine against ONNX Runtime stages and the ORT decode loop."""
    onnx_dir = args.cache_dir / "onnx" / f"e2e-{arch}-{args.dtype}"
    impls = {impl: opts for impl, opts in E2E.items() if args.device == "cpu" or impl != "ort-loop"}
    pipes = {impl: mm.load(ckpt, device=args.device, dtype=args.dtype,
                           onnx_dir=None if impl == "engine" else onnx_dir, **opts)
             for impl, opts in impls.items()}
    enc = pipes["engine"].config.encoder
    n = args.new_tokens
    results, comparisons = [], []
    for batch in args.batch:
        g = torch.Generator().manual_seed(args.seed + batch)
        px = torch.rand(batch, enc.num_channels, enc.image_size, enc.image_size, generator=g) * 2 - 1
        row = {"model": f"caption-{arch}", "part": "end to end", "device": args.device, "batch": batch}
        timed, ids = {}, {}
        for impl, pipe in pipes.items():
            def run(k, pipe=pipe):
                return pipe.generate_ids(px, max_new_tokens=k, min_new_tokens=k)

            log(f"timing {arch} end to end {impl} batch {batch} ...")
            ids[impl] = run(n)
            t = measure_paired(run, n, warmup=args.warmup, repeats=args.repeats, device=args.device)
            timed[impl] = {**row, "impl": impl, "first_token_ms": t["first"]["median_ms"],
                           "ms_per_token": t["ms_per_token"], "ms_per_token_p90": t["ms_per_token_p90"],
                           "timing": {"first": t["first"], "full": t["full"]}}
        results += timed.values()
        base = timed["engine"]
        for impl in list(impls)[1:]:
            comparisons.append({**row, "impl": f"{impl}/engine",
                                "first_token_ms": timed[impl]["first_token_ms"] / base["first_token_ms"],
                                "ms_per_token": timed[impl]["ms_per_token"] / base["ms_per_token"],
                                "ids_match": torch.equal(ids[impl], ids["engine"])})
    return results, comparisons


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="*", choices=bench_caption.ARCHS, default=["vit-gpt2", "blip", "git"],
                    help="captioners whose image encoder is timed (default vit-gpt2 blip git; none: --arch)")
    ap.add_argument("--tasks", nargs="*", choices=["text-to-image", "speech-to-gesture"],
                    default=["text-to-image", "speech-to-gesture"],
                    help="other tasks whose one-shot stages are timed (default both)")
    ap.add_argument("--e2e-arch", nargs="*", choices=bench_caption.ARCHS, default=["vit-gpt2"],
                    help="captioners timed end to end (default vit-gpt2; none: --e2e-arch)")
    ap.add_argument("--new-tokens", type=int, help="forced length N end to end (default 32; 8 with --quick)")
    add_device_arguments(ap)
    ap.add_argument("--dtype", choices=["float32", "float16"],
                    help="weights and activations of both (default float32 on CPU, float16 on CUDA)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    ap.add_argument("--repeats", type=int, help="timed calls per figure (default 10; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before each figure (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny random models, for smoke tests and CI")
    ap.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    ap.add_argument("--cache-dir", type=Path, default=Path("build/bench_onnx"),
                    help="where the models, checkpoints and exports are kept (default build/bench_onnx)")
    ap.add_argument("--json", type=Path, help="results file (default <cache-dir>/results.json; "
                                              "results_quick.json with --quick)")
    args = ap.parse_args(argv)
    args.device = checked_device(ap, args.device)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "float16")
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2")
    args.json = args.json or args.cache_dir / ("results_quick.json" if args.quick else "results.json")
    if args.warmup < 1 or args.repeats < 1 or min(args.batch) < 1:
        ap.error("need --warmup >= 1, --repeats >= 1 and batch sizes >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime as ort
    import transformers
    transformers.logging.set_verbosity_error()

    results, comparisons = [], []
    models = checkpoints(args)
    for name, ckpt in models.items():
        if not name.startswith("caption-") or name.removeprefix("caption-") in args.arch:
            r, c = bench_model(name, ckpt, exported(name, ckpt, args), args)
            results += r
            comparisons += c
    stage_rows = len(comparisons)
    for arch in args.e2e_arch:
        r, c = bench_e2e(arch, models[f"caption-{arch}"], args)
        results += r
        comparisons += c
    payload = {"benchmark": "onnx", "machine": machine_info(args.device), "engine": engine_info(),
               "onnxruntime": ort.__version__,
               "settings": {"arch": args.arch, "tasks": args.tasks, "device": args.device, "dtype": args.dtype,
                            "batch": args.batch,
                            "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
                            "threads": torch.get_num_threads()},
               "results": results, "comparisons": comparisons}
    write_json(args.json, payload)
    log(f"wrote {args.json}")
    m = payload["machine"]
    print(f"\nonnx benchmark ({'quick' if args.quick else 'full'}; onnxruntime {ort.__version__}) on "
          f"{m.get('gpu', m['cpu'])}, torch threads {m['torch_threads']}")
    for part, columns in ((comparisons[:stage_rows], ["ms", "p90_ms", "max_rel_diff"]),
                          (comparisons[stage_rows:], ["first_token_ms", "ms_per_token", "ids_match"])):
        rows = []
        for key in dict.fromkeys((c["model"], c["part"], c["batch"]) for c in part):
            rows += [r for r in results + part if (r["model"], r["part"], r["batch"]) == key]
        if rows:
            print(format_table(rows, ["model", "part", "device", "batch", "impl", *columns]))
    worst = max((c["max_rel_diff"] for c in comparisons[:stage_rows]), default=0.0)
    status = 0
    if worst > 1e-3:
        print(f"WARNING: ONNX Runtime and the engine differ by {worst:.2e} of the output's scale", flush=True)
        status = 1
    if not all(c["ids_match"] for c in comparisons[stage_rows:]):
        print("WARNING: greedy ids differ between the engine and ONNX Runtime", flush=True)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
