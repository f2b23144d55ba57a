#!/usr/bin/env python3
"""Image detokenizer benchmark: the engine's ImageDetokenizer against the upstream decoders on the
same random, seeded weights, tokens -> pixels in [0, 1]:

- ``dvae``: OpenAI's ``dall_e.Decoder`` (defaults: n_init 128, n_hid 256, 2 blocks per group, 8192
  codes), 32x32 tokens -> 256x256 pixels. Upstream input is ``one_hot(tokens).float()``, output
  ``unmap_pixels(sigmoid(x[:, :3]))``; on CUDA its convs run in fp16 (its ``use_float16``).
- ``vqgan``: min-dalle's ``VQGanDetokenizer`` (its fixed architecture, 16384 codes), 16x16 tokens ->
  256x256 pixels, run as min-dalle runs it for a batch of images (embedding, post_quant_conv,
  decoder, ``clip(0, 1)``; the grid tiling left out), always in fp32 as min-dalle does.

The engine checkpoint is converted from the upstream state dict (``mm.convert`` for the dVAE,
``vqgan_from_tensors`` + the checkpoint writer for min-dalle's detokenizer) and loaded with
``mm.load``. Each figure is the median of ``--repeats`` timed calls after ``--warmup`` untimed
ones (on CPU one of each, which keeps the default run near 2 minutes on an idle 2-core machine);
the largest pixel difference to upstream, from the first untimed call, is reported beside it.
``--quick``: tiny token grids and a small dVAE, for smoke tests. A markdown table is printed last;
raw times go to ``--json``.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from dall_e import Decoder
from dall_e.utils import unmap_pixels
from min_dalle.models import VQGanDetokenizer  # sets torch's thread count on import: before --threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import add_device_arguments, checked_device, engine_info, format_table, machine_info, measure, write_json  # noqa: E402

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.checkpoint import save_checkpoint  # noqa: E402
from mmgen_engine.convert import detokenizer as detok_checkpoint  # noqa: E402
from mmgen_engine.convert.taming_vqgan import vqgan_from_tensors  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# per model and preset: upstream constructor arguments (dVAE) and the token grid side
PRESETS = {
    "full": {"dvae": {"args": {"n_init": 128, "n_hid": 256, "n_blk_per_group": 2, "vocab_size": 8192}, "grid": 32},
             "vqgan": {"grid": 16}},
    "quick": {"dvae": {"args": {"n_init": 32, "n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512}, "grid": 8},
              "vqgan": {"grid": 4}},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_dvae(spec: dict, device: str, workdir: Path, dtype: str):
    """``(upstream decode fn, its dtype name, engine pipeline, codebook size)`` for dall_e's Decoder."""
    upstream = Decoder(**spec["args"], device=torch.device(device)).eval()
    torch.save(upstream.state_dict(), workdir / "dvae.pt")
    pipe = mm.load(mm.convert(workdir / "dvae.pt", workdir / "dvae_engine", dtype=dtype), device=device)
    vocab = spec["args"]["vocab_size"]

    def run(tokens):
        one_hot = F.one_hot(tokens, vocab).permute(0, 3, 1, 2).float()
        return unmap_pixels(torch.sigmoid(upstream(one_hot)[:, :3].float()))

    return run, "float16" if device.startswith("cuda") else "float32", pipe, vocab


def build_vqgan(spec: dict, device: str, workdir: Path, dtype: str):
    """``(upstream decode fn, its dtype name, engine pipeline, codebook size)`` for min-dalle's VQGAN."""
    upstream = VQGanDetokenizer().eval()
    where = str(workdir / "detoker.pt")
    vqgan, tensors = vqgan_from_tensors(upstream.state_dict(), codebook_key="embedding.weight", norm_eps=1e-5,
                                        output="0_1", where=where)
    config, tensors = detok_checkpoint.checkpoint("min-dalle", "vqgan", vqgan, tensors, dtype, where)
    pipe = mm.load(save_checkpoint(workdir / "vqgan_engine", config, tensors), device=device)
    upstream = upstream.to(device)

    def run(tokens):  # VQGanDetokenizer.forward(is_seamless=False) for B images, without the grid tiling
        b, h, w = tokens.shape
        z = upstream.embedding(tokens.view(b, h * w)).view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        z = upstream.decoder(upstream.post_quant_conv(z))
        return z.clip(0.0, 1.0)

    return run, "float32", pipe, upstream.vocab_count


BUILDERS = {"dvae": build_dvae, "vqgan": build_vqgan}


def bench_model(name: str, args, workdir: Path) -> tuple[list[dict], list[dict]]:
    spec = PRESETS[args.preset][name]
    torch.manual_seed(args.seed)
    log(f"building {name} ...")
    upstream, upstream_dtype, pipe, vocab = BUILDERS[name](spec, args.device, workdir, args.dtype)
    results, comparisons = [], []
    for batch in args.batches:
        g = torch.Generator().manual_seed(args.seed + batch)
        tokens = torch.randint(0, vocab, (batch, spec["grid"], spec["grid"]), generator=g).to(args.device)
        row = {"model": name, "device": args.device, "batch": batch, "tokens": f"{spec['grid']}x{spec['grid']}"}
        impls = {"engine": (lambda: pipe.decode_tokens(tokens), args.dtype),
                 "upstream": (lambda: upstream(tokens), upstream_dtype)}
        timed = {}
        with torch.inference_mode():
            # the first call of each is a warm-up call, and its pixels are the ones compared
            first = {impl: fn().float() for impl, (fn, _) in impls.items()}
            diff = (first["engine"] - first["upstream"]).abs().max().item()
            for impl, (fn, dtype) in impls.items():
                log(f"timing {name} {impl} batch {batch} ...")
                t = measure(fn, warmup=args.warmup - 1, repeats=args.repeats, device=args.device)
                timed[impl] = {**row, "impl": impl, "dtype": dtype, "ms": t["median_ms"], "p90_ms": t["p90_ms"],
                               "ms_per_image": t["median_ms"] / batch, "timing": t}
        results += timed.values()
        comparisons.append({**row, "impl": "engine/upstream", "ms": timed["engine"]["ms"] / timed["upstream"]["ms"],
                            "max_abs_diff": diff})
    return results, comparisons


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(ap)
    ap.add_argument("--dtype", choices=list(DTYPES), help="engine dtype (default float32 on CPU, float16 on CUDA)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    ap.add_argument("--models", nargs="+", choices=list(BUILDERS), default=list(BUILDERS), help="default: both")
    ap.add_argument("--repeats", type=int, help="timed calls per figure (default 10 on CUDA, 1 on CPU)")
    ap.add_argument("--warmup", type=int, help="untimed calls before each figure, the first of them compared "
                                               "with upstream (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny token grids and dVAE, for smoke tests")
    ap.add_argument("--seed", type=int, default=0, help="weights and tokens seed (default 0)")
    ap.add_argument("--json", type=Path, default=Path("build/bench_detok/results.json"),
                    help="results file (default build/bench_detok/results.json)")
    args = ap.parse_args(argv)
    args.preset = "quick" if args.quick else "full"
    args.device = checked_device(ap, args.device)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    # a CPU batch of 8 takes seconds per call: one warm-up and one timed call keep the default run short
    args.repeats = args.repeats or (10 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.warmup < 1 or args.repeats < 1 or min(args.batches) < 1:
        ap.error("need --warmup >= 1, --repeats >= 1 and batch sizes >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results, comparisons = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            r, c = bench_model(name, args, Path(workdir))
            results += r
            comparisons += c
    payload = {"benchmark": "detok", "machine": machine_info(args.device),
               "engine": engine_info(),
               "settings": {"preset": args.preset, "device": args.device, "dtype": args.dtype,
                            "batches": args.batches, "models": args.models, "warmup": args.warmup,
                            "repeats": args.repeats, "threads": torch.get_num_threads(), "seed": args.seed},
               "results": results, "comparisons": comparisons}
    write_json(args.json, payload)
    log(f"wrote {args.json}")

    rows = []
    for c in comparisons:
        rows += [r for r in results if (r["model"], r["batch"]) == (c["model"], c["batch"])]
        rows.append(c)
    m = payload["machine"]
    print(f"\ndetokenizer benchmark ({args.preset}, {args.repeats} repeats) on {m.get('gpu', m['cpu'])}, "
          f"torch threads {m['torch_threads']}")
    print(format_table(rows, ["model", "device", "dtype", "batch", "tokens", "impl", "ms", "p90_ms", "ms_per_image",
                              "max_abs_diff"]))
    return 0 if all(math.isfinite(r["ms"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
