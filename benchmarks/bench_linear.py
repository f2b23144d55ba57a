"""``ops.linear`` benchmark: the decode-step products of GPT-2 small at a few rows.

For each (in -> out) shape and row count it times, on cold weights (a rotating set of distinct
matrices larger than the caches, so every product streams its weight from memory):

- **peer**: ``torch.nn.functional.linear`` on the row-major ``[out, in]`` weight, what a torch
  model (transformers' ``nn.Linear``) runs;
- **engine**: ``mmgen_engine.ops.linear`` on the weight as the engine stores it on that device
  (column-major on CPU, see ``mmgen_engine/runtime/layout.py``).

It reports µs per product, weight GB/s and the fraction of the measured read ceiling (a ``sum`` over
a 512 MB buffer, all threads). Bytes moved ~ weight bytes; the activations are negligible.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import format_table, machine_info, measure, write_json  # noqa: E402

from mmgen_engine import ops  # noqa: E402
from mmgen_engine.checkpoint import TORCH_DTYPES  # noqa: E402
from mmgen_engine.runtime.layout import column_major_weights  # noqa: E402

# (in, out) of one GPT-2 small decode step: qkv, attn/cross out and cross q, fc1, fc2, LM head
SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]
QUICK_SHAPES = [(64, 192), (192, 64)]


def read_ceiling_gbps(device: torch.device, dtype: torch.dtype, nbytes: int) -> float:
    buf = torch.ones(nbytes // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    t = measure(lambda: buf.sum(), warmup=2, repeats=5, device=device)["median_ms"]
    return buf.numel() * buf.element_size() / t / 1e6


def bench_shape(k: int, n: int, rows: int, dtype, device, args) -> list[dict]:
    weight_bytes = k * n * torch.finfo(dtype).bits // 8
    copies = max(2, args.cold_bytes // weight_bytes)
    gen = torch.Generator().manual_seed(k * n)
    peer_w = [torch.randn(n, k, generator=gen).to(device, dtype) for _ in range(copies)]
    engine_w = [torch.nn.Parameter(w.clone(), requires_grad=False) for w in peer_w]
    if device.type == "cpu":
        holder = torch.nn.ParameterList(engine_w)
        column_major_weights(holder)
        engine_w = list(holder)
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    rows_out = []
    for impl, weights, fn in (("peer", peer_w, lambda w: F.linear(x, w)),
                              ("engine", engine_w, lambda w: ops.linear(x, w, None))):
        def run():
            for w in weights:
                fn(w)
        torch.testing.assert_close(ops.linear(x, engine_w[0], None), F.linear(x, peer_w[0]),
                                   atol=1e-3 * k ** 0.5, rtol=1e-3)
        t = measure(run, warmup=args.warmup, repeats=args.repeats, device=device)
        us = t["median_ms"] * 1e3 / len(weights)
        rows_out.append({"shape": f"{k}->{n}", "rows": rows, "impl": impl, "us": us,
                         "GBps": weight_bytes / us / 1e3, "p90_us": t["p90_ms"] * 1e3 / len(weights)})
    return rows_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=list(TORCH_DTYPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--cold-bytes", type=int, default=256 << 20, help="weights rotated per timed call")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for smoke tests")
    ap.add_argument("--json", default="build/bench_linear/results.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.cold_bytes, args.repeats = 1 << 20, 3
    device, dtype = torch.device(args.device), TORCH_DTYPES[args.dtype]
    ceiling = read_ceiling_gbps(device, dtype, 16 << 20 if args.quick else 512 << 20)
    results = []
    for k, n in QUICK_SHAPES if args.quick else SHAPES:
        for rows in args.rows:
            results += bench_shape(k, n, rows, dtype, device, args)
    for r in results:
        r["of_ceiling"] = r["GBps"] / ceiling
    machine = machine_info(device)
    write_json(args.json, {"benchmark": "linear", "machine": machine, "read_ceiling_GBps": ceiling,
                           "settings": vars(args), "results": results})
    print(f"wrote {args.json}\n")
    print(f"ops.linear vs F.linear on {machine.get('gpu', machine['cpu'])}, {args.dtype}, "
          f"torch threads {machine['torch_threads']}, read ceiling {ceiling:.1f} GB/s")
    print(format_table(results, ["shape", "rows", "impl", "us", "p90_us", "GBps", "of_ceiling"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
