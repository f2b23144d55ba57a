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

The engine runs each stage as its pipeline does (default backend, ``torch.inference_mode``); ORT runs
the exported part on its CPU execution provider (or the CUDA one with ``--device cuda``, through
``mmgen_engine.onnx.backend`` when that is installed) with its default threading. Each figure is the
median of ``--repeats`` timed calls after ``--warmup`` untimed ones; ``ort/engine`` < 1 means ONNX
Runtime is faster. The largest difference of the outputs, relative to their scale, is reported
beside the times. A markdown table is printed last; raw times and the machine go to ``--json``.
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
from timing import add_device_arguments, checked_device, engine_info, format_table, machine_info, measure, write_json  # noqa: E402

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.onnx import PARTS, check_export, load_session  # noqa: E402
from mmgen_engine.onnx.export import TRACE_BATCH  # noqa: E402

# the parts that run once per request (the decoders' prefill / step parts are timed end to end)
ONE_SHOT = ("image_encoder", "text_encoder", "detokenizer", "audio_encoder", "motion_decoder")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def checkpoints(args) -> dict[str, Path]:
    """``{model name: engine checkpoint}`` of every model in this run, built or reused."""
    out = {}
    for arch in args.arch:
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
    """The one-shot parts of ``ckpt`` exported (float32) under the cache, reused while the checkpoint
    and the export check out."""
    out = args.cache_dir / "onnx" / name
    try:
        manifest = check_export(out, ckpt)
        if set(manifest["parts"]) >= set(parts_of(ckpt)):
            log(f"reusing export {out}")
            return out
    except mm.MMGenError:
        pass
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    mm.export_onnx(ckpt, out, parts=parts_of(ckpt))
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
    pipe = mm.load(ckpt, device=device)
    task = pipe.task
    results, comparisons = [], []
    for part_name in parts_of(ckpt):
        part = PARTS[task][part_name]
        stage = part.module(pipe).eval()
        session = load_session(export, part_name, checkpoint_dir=ckpt)
        torch.manual_seed(args.seed)
        example = part.example(pipe)  # TRACE_BATCH rows, repeated to each batch size
        for batch in args.batch:
            rows = torch.arange(batch) % TRACE_BATCH
            inputs = {k: v[rows].contiguous() for k, v in example.items()}
            on_device = [v.to(device) for v in inputs.values()]
            feed = {k: v.numpy() for k, v in inputs.items()}

            def run_engine():
                with torch.inference_mode():
                    return stage(*on_device)

            def run_ort():
                return session.run(None, feed)[0]

            want, got = run_engine().float().cpu(), torch.from_numpy(run_ort())
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="*", choices=bench_caption.ARCHS, default=["vit-gpt2", "blip", "git"],
                    help="captioners whose image encoder is timed (default vit-gpt2 blip git; none: --arch)")
    ap.add_argument("--tasks", nargs="*", choices=["text-to-image", "speech-to-gesture"],
                    default=["text-to-image", "speech-to-gesture"],
                    help="other tasks whose one-shot stages are timed (default both)")
    add_device_arguments(ap)
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
    if args.device != "cpu":
        ap.error("ONNX Runtime stages are timed on --device cpu so far")
    args.repeats = args.repeats or (3 if args.quick else 10)
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
    for name, ckpt in checkpoints(args).items():
        r, c = bench_model(name, ckpt, exported(name, ckpt, args), args)
        results += r
        comparisons += c
    payload = {"benchmark": "onnx", "machine": machine_info(args.device), "engine": engine_info(),
               "onnxruntime": ort.__version__,
               "settings": {"arch": args.arch, "tasks": args.tasks, "device": args.device, "batch": args.batch,
                            "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
                            "threads": torch.get_num_threads()},
               "results": results, "comparisons": comparisons}
    write_json(args.json, payload)
    log(f"wrote {args.json}")
    rows = []
    for c in comparisons:
        rows += [r for r in results if all(r[k] == c[k] for k in ("model", "part", "batch"))]
        rows.append(c)
    m = payload["machine"]
    print(f"\nonnx stage benchmark ({'quick' if args.quick else 'full'}; onnxruntime {ort.__version__}) on "
          f"{m.get('gpu', m['cpu'])}, torch threads {m['torch_threads']}")
    print(format_table(rows, ["model", "part", "device", "batch", "impl", "ms", "p90_ms", "max_rel_diff"]))
    worst = max((c["max_rel_diff"] for c in comparisons), default=0.0)
    if worst > 1e-3:
        print(f"WARNING: ONNX Runtime and the engine differ by {worst:.2e} of the output's scale", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
