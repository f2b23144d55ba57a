"""``ops.linear`` benchmark: the decode-step products of GPT-2 small at a few rows.

For each (in -> out) shape and row count it times, on cold weights (a rotating set of distinct
matrices larger than the caches, so every product streams its weight from memory):

- **peer**: ``torch.nn.functional.linear`` on the row-major ``[out, in]`` weight, what a torch
  model (transformers' ``nn.Linear``) runs;
- **engine**: ``mmgen_engine.ops.linear`` on the weight as the engine stores it on that device
  (column-major on CPU, see ``mmgen_engine/runtime/layout.py``);
- **int8**, **int8-g128** (``--int8``): ``ops.linear`` on a weight-only int8 weight
  (:class:`mmgen_engine.ops.Int8Weight`), per output channel and in groups of 128 inputs, on the
  path the dispatch picks; on CPU also each CPU path by name (**int8 chunked**, **int8 pack**,
  **int8 native**, see ``mmgen_engine/ops/linear.py``), the numbers that pick the default;
- **bf16w** (``--bf16-weights``, float32 only): ``ops.linear`` on a bfloat16 weight with float32
  activations (float32 math), on the dispatch's path, and on CPU each path by name (**bf16w
  native**: csrc/cpu/gemv.cpp; **bf16w upcast**: the spec, the weight widened then ``F.linear``).

It reports µs per product, weight GB/s (int8 rows: int8 bytes + float32 scales; bf16w rows: bf16
bytes), the fraction of the measured read ceiling (the faster of a ``sum`` over a 512 MB buffer and, on CPU, the
native kernel's one-row product over a 512 MB bfloat16 weight; all threads) and,
for int8 and bf16w rows, the time against the engine's float product of the same shape
(``vs_engine``). Bytes moved ~ weight bytes;
the activations are negligible.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import format_table, machine_info, measure, write_json  # noqa: E402

from mmgen_engine import ops  # noqa: E402
from mmgen_engine.checkpoint import TORCH_DTYPES  # noqa: E402
from mmgen_engine.ops.quant import Int8Weight, dequantize_int8  # noqa: E402
from mmgen_engine.runtime.layout import column_major_weights  # noqa: E402

# (in, out) of one GPT-2 small decode step: qkv, attn/cross out and cross q, fc1, fc2, LM head
SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]
QUICK_SHAPES = [(64, 192), (192, 64)]
INT8_GROUP = 128
linear_ops = importlib.import_module("mmgen_engine.ops.linear")  # the module (ops.linear is the function)


def read_ceiling_gbps(device: torch.device, dtype: torch.dtype, nbytes: int) -> float:
    """The fastest read of ``nbytes`` measured: torch's ``sum`` and, on CPU where the native kernels
    are built, a one-row product with a bfloat16 weight of that size (csrc/cpu/gemv.cpp: prefetched
    streams, ~2 bytes per multiply-add; torch's sum read 29-31 GB/s on the 2-core AMD box where these
    streams read over 40)."""
    buf = torch.ones(nbytes // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    t = measure(lambda: buf.sum(), warmup=2, repeats=5, device=device)["median_ms"]
    best = buf.numel() * buf.element_size() / t / 1e6
    buf = None  # freed before the second buffer
    if device.type == "cpu" and linear_ops._GEMV is not None:
        k = 4096
        w = torch.ones(nbytes // 2 // k, k, dtype=torch.bfloat16)
        x = torch.ones(1, k)
        t = measure(lambda: linear_ops.linear_bf16_weight_native(x, w, None), warmup=2, repeats=5,
                    device=device)["median_ms"]
        best = max(best, w.numel() * 2 / t / 1e6)
    return best


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
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ops.linear(x, engine_w[0], None), F.linear(x, peer_w[0]),
                                   atol=tol * k ** 0.5, rtol=tol)
        t = measure(run, warmup=args.warmup, repeats=args.repeats, device=device)
        us = t["median_ms"] * 1e3 / len(weights)
        rows_out.append({"shape": f"{k}->{n}", "rows": rows, "impl": impl, "us": us,
                         "GBps": weight_bytes / us / 1e3, "p90_us": t["p90_ms"] * 1e3 / len(weights)})
    return rows_out


def random_int8(n: int, k: int, group_size, gen, device) -> Int8Weight:
    """Random int8 values and scales of a plausible size: the timing does not depend on them."""
    groups = () if group_size is None else (-(-k // group_size),)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return Int8Weight(q.to(device), (torch.rand((n, *groups), generator=gen) * 0.01 + 0.01).to(device),
                      group_size)


def bench_int8(k: int, n: int, rows: int, dtype, device, args, engine_us: float) -> list[dict]:
    gen = torch.Generator().manual_seed(k * n + 1)
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    cases = [("int8", None, ops.linear), ("int8-g128", INT8_GROUP, ops.linear)]
    if device.type == "cpu":
        cases += [("int8 chunked", None, linear_ops.linear_int8_chunked),
                  ("int8-g128 chunked", INT8_GROUP, linear_ops.linear_int8_chunked)]
        if linear_ops.int8_pack_supported(x, random_int8(1, k, None, gen, device)):
            cases.append(("int8 pack", None, linear_ops.linear_int8_pack))
        probe = random_int8(1, k, None, gen, device)
        if linear_ops.gemv_supported(x, probe.qweight, probe.scale):
            cases += [("int8 native", None, linear_ops.linear_int8_native),
                      ("int8-g128 native", INT8_GROUP, linear_ops.linear_int8_native)]
    out = []
    weights = {}
    for impl, group, fn in cases:
        if group not in weights:
            nbytes = random_int8(1, k, group, gen, device).nbytes() * n
            weights[group] = [random_int8(n, k, group, gen, device)
                              for _ in range(max(2, args.cold_bytes // nbytes))]
        ws = weights[group]
        spec = F.linear(x, dequantize_int8(ws[0], dtype))
        torch.testing.assert_close(fn(x, ws[0], None), spec, atol=2e-2 * k ** 0.5, rtol=2e-2)

        def run():
            for w in ws:
                fn(x, w, None)
        t = measure(run, warmup=args.warmup, repeats=args.repeats, device=device)
        us = t["median_ms"] * 1e3 / len(ws)
        out.append({"shape": f"{k}->{n}", "rows": rows, "impl": impl, "us": us,
                    "GBps": ws[0].nbytes() / us / 1e3, "p90_us": t["p90_ms"] * 1e3 / len(ws),
                    "vs_engine": us / engine_us})
    return out


def bench_bf16_weights(k: int, n: int, rows: int, device, args, engine_us: float) -> list[dict]:
    """float32 activations x bfloat16 weights: the dispatch's path and, on CPU, each path by name."""
    gen = torch.Generator().manual_seed(k * n + 2)
    x = torch.randn(rows, k, generator=gen).to(device)
    ws = [torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
          for _ in range(max(2, args.cold_bytes // (2 * n * k)))]
    cases = [("bf16w", ops.linear)]
    if device.type == "cpu":
        cases.append(("bf16w upcast", linear_ops.linear_bf16_weight_spec))
        if linear_ops.gemv_supported(x, ws[0]):
            cases.append(("bf16w native", linear_ops.linear_bf16_weight_native))
    out = []
    for impl, fn in cases:
        torch.testing.assert_close(fn(x, ws[0], None), F.linear(x, ws[0].float()), atol=1e-4 * k ** 0.5, rtol=1e-4)

        def run():
            for w in ws:
                fn(x, w, None)
        t = measure(run, warmup=args.warmup, repeats=args.repeats, device=device)
        us = t["median_ms"] * 1e3 / len(ws)
        out.append({"shape": f"{k}->{n}", "rows": rows, "impl": impl, "us": us, "GBps": 2 * n * k / us / 1e3,
                    "p90_us": t["p90_ms"] * 1e3 / len(ws), "vs_engine": us / engine_us})
    return out


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
    ap.add_argument("--int8", action="store_true", help="also time weight-only int8 weights")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="also time bfloat16 weights under float32 activations (--dtype float32)")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="IN->OUT",
                    help="only these of the GPT-2 shapes, e.g. 768->2304")
    ap.add_argument("--json", default="build/bench_linear/results.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.cold_bytes, args.repeats = 1 << 20, 3
    device, dtype = torch.device(args.device), TORCH_DTYPES[args.dtype]
    if args.bf16_weights and dtype != torch.float32:
        ap.error("--bf16-weights times float32 activations: use --dtype float32")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if f"{s[0]}->{s[1]}" in args.shapes]
    ceiling = read_ceiling_gbps(device, dtype, 16 << 20 if args.quick else 512 << 20)
    results = []
    for k, n in shapes:
        for rows in args.rows:
            base = bench_shape(k, n, rows, dtype, device, args)
            results += base
            engine_us = base[-1]["us"]
            if args.int8:
                results += bench_int8(k, n, rows, dtype, device, args, engine_us)
            if args.bf16_weights:
                results += bench_bf16_weights(k, n, rows, device, args, engine_us)
    for r in results:
        r["of_ceiling"] = r["GBps"] / ceiling
    machine = machine_info(device)
    write_json(args.json, {"benchmark": "linear", "machine": machine, "read_ceiling_GBps": ceiling,
                           "settings": vars(args), "results": results})
    print(f"wrote {args.json}\n")
    print(f"ops.linear vs F.linear on {machine.get('gpu', machine['cpu'])}, {args.dtype}, "
          f"torch threads {machine['torch_threads']}, read ceiling {ceiling:.1f} GB/s")
    columns = ["shape", "rows", "impl", "us", "p90_us", "GBps", "of_ceiling"] + (
        ["vs_engine"] if args.int8 or args.bf16_weights else [])
    print(format_table(results, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
