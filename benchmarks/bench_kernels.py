#!/usr/bin/env python3
"""Per-kernel benchmark on CUDA: every backend of each op - the CUDA kernels of csrc/ (``cuda``), the
Triton kernels and the reference (plain torch) - on the same inputs, at the shapes of ViT-B/16 +
GPT-2 small captioning (and of DALL·E Mini's gated GELU, the image decoders' code gathers, and the
LLaMA-7B-like decoder of LLaVA-1.5: RMSNorm, rotary, grouped-query decode attention, and its linear
layers with fp16/bf16 and weight-only int8 weights at 1 and 16 rows).

Each case reports µs per call (median of CUDA-graph replays, ``triton.testing.do_bench_cudagraph``,
so launch gaps are not counted, as in the engine's captured decode step), the bytes the op must move at
least (each input read once, each output written once), GB/s, and the fraction of the copy bandwidth
measured in the same run (a device-to-device copy of 1 GiB, bytes read + written). The image decoders'
convolutions (VQGAN and dVAE shapes, every input channels-last; the reference is cuDNN in the same
dtype) and GroupNorm are timed too, convolutions with TFLOP/s. A markdown table is printed last, then,
per op, which backend was fastest in how many of its cases (what the defaults on GPU in ops/registry.py
should follow, benchmarks/RESULTS.md "Backend defaults"); all figures go to ``--json``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import format_table, machine_info, write_json  # noqa: E402

from mmgen_engine.ops import registry  # noqa: E402
from mmgen_engine.ops.quant import quantize_int8  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# the triton backend of linear routes small few-row products to cuBLAS (ops/linear.py): time the
# Triton kernel itself too, so the table shows the comparison behind that rule
KERNEL_ONLY = {"linear": {"triton kernel": "mmgen_engine.kernels.linear:linear"}}
# which argument an op dispatches on (ops/*.py: the table, not the token ids), when not the first
LIKE_ARG = {"embedding": 2, "token_gather": 1}


def bench_us(fn) -> float:
    """Median µs of ``fn`` replayed from a CUDA graph."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1000


def copy_gbps(device) -> float:
    src = torch.randn(1 << 28, device=device)  # 1 GiB of fp32 (byte-wise copies run slower)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / us / 1e3


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(dtype, device, quick: bool):
    """(name, shape label, op, args builder, bytes) per case; args are built once per case."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    d, h, dh, ff, vocab = 768, 12, 64, 3072, 50257
    for rows in (1, 16):
        x, r = rnd(rows, d), rnd(rows, d)
        w, b = rnd(d, dt=dtype), rnd(d, dt=dtype)
        yield "layer_norm", f"{rows}x{d}", (x, w, b, 1e-5), nbytes(x) * 2
        yield "add_layer_norm", f"{rows}x{d}", (x, r, w, b, 1e-5), nbytes(x, r) * 2
        hid, bias = rnd(rows, ff), rnd(ff)
        yield "bias_gelu", f"{rows}x{ff} tanh", (hid, bias, "tanh"), nbytes(hid) * 2
        yield "bias_gelu", f"{rows}x{ff} sigmoid (CLIP quick GELU)", (hid, bias, "sigmoid"), nbytes(hid) * 2
        glu = rnd(2 * rows, 2 * 2730)  # DALL-E Mini's GLU, [uncond; cond] rows: fc0 | fc1 outputs
        yield "gelu_mul", f"{2 * rows}x2x2730", (glu,), nbytes(glu) * 3 // 2
        tok = torch.randint(0, vocab, (rows,), device=device)
        wte, wpe = rnd(vocab, d), rnd(1024, d)
        yield "embedding", f"{rows}x{d}", (tok, tok % 1024, wte, wpe), 3 * rows * d * wte.element_size()
        yield "embedding", f"{rows}x{d} + LayerNorm", (tok, tok % 1024, wte, wpe, w, b), \
            3 * rows * d * wte.element_size()
    for b, s in ((1, 1024), (16, 197), (16, 4096)) if not quick else ((1, 256),):
        q, k, v = rnd(b, h, dh), rnd(b, h, s, dh), rnd(b, h, s, dh)
        lengths = torch.full((b,), s, device=device)
        # q, k, v read once, the output written once
        yield "decode_attention", f"B{b} H{h} L{s} D{dh}", (q, k, v, lengths, dh ** -0.5), nbytes(q, k, v, q)
        # the engine's self-attention step: the new key/value stored into the cache by the same call
        new_k, new_v = rnd(b, h, dh), rnd(b, h, dh)
        yield "decode_attention", f"B{b} H{h} L{s} D{dh} + cache write", \
            (q, k, v, lengths, dh ** -0.5, new_k, new_v), nbytes(q, k, v, q, new_k, new_v)
    yield from llama_cases(rnd, quick)
    for b in (1, 16):
        logits = rnd(b, vocab, dt=torch.float32)
        ones = torch.ones(b, device=device)
        seeds, offset = (
            torch.zeros(b, dtype=torch.int64, device=device),
            torch.zeros(1, dtype=torch.int64, device=device),
        )
        # a request without sampling: the engine tells the sampler (greedy=True, two launches)
        greedy = (logits, ones, torch.zeros(b, dtype=torch.int64, device=device), ones,
                  torch.zeros(b, dtype=torch.bool, device=device), seeds, offset, None, None, True)
        yield "sample", f"B{b} V{vocab} greedy", greedy, nbytes(logits)
        topk = (logits, ones, torch.full((b,), 50, dtype=torch.int64, device=device), 0.9 * ones,
                torch.ones(b, dtype=torch.bool, device=device), seeds, offset)
        yield "sample", f"B{b} V{vocab} top-k 50 top-p 0.9", topk, nbytes(logits)
    for rows in (1, 16):
        for n, kdim in ((2304, d), (d, d), (ff, d), (d, ff), (vocab, d)):
            x, w, bias = rnd(rows, kdim), rnd(n, kdim), rnd(n)
            yield "linear", f"{rows}x{kdim}->{n}", (x, w, bias), nbytes(x, w, bias) + rows * n * x.element_size()
    q, k, v = (rnd(4, h, 197, dh) for _ in range(3))
    yield "attention", "B4 H12 T197 D64 (ViT)", (q, k, v, dh ** -0.5, False, None), nbytes(q, k, v, q)
    text = rnd(4, h, 16, dh)  # GIT's prefill: 16 text queries, causal after 197 image keys
    yield "attention", "B4 H12 Tq16 Tk213 D64 causal (GIT text)", \
        (text, torch.cat([k, k[:, :, :16]], 2), torch.cat([v, v[:, :, :16]], 2), dh ** -0.5, True, None), \
        nbytes(text, k, v, text)
    for b in (1, 8):  # the image decoders' first step: DALL-E dVAE (8192 x 128 + bias), VQGAN (16384 x 256)
        for vocab_size, dim, side, bias in ((8192, 128, 32, True), (16384, 256, 16, False)):
            tokens = torch.randint(0, vocab_size, (b, side, side), device=device)
            table = rnd(vocab_size, dim)
            extra = (rnd(dim),) if bias else ()
            yield "token_gather", f"B{b} {side}x{side} codes of {vocab_size}x{dim}{' + bias' if bias else ''}", \
                (tokens, table, *extra), 2 * b * side * side * dim * table.element_size() + nbytes(tokens)
    yield from conv_cases(rnd, quick)


def llama_cases(rnd, quick: bool):
    """LLaMA-7B-like shapes (width 4096, 32 query heads of 128; 8 K/V heads as in grouped-query models, 32
    as in LLaMA-7B itself): RMSNorm, the rotary embedding of a prefill, and the decode step with the
    rotary cache write."""
    d, hq, dh = 4096, 32, 128
    for rows in (1, 16):
        x, w = rnd(rows, d), rnd(d)
        yield "rms_norm", f"{rows}x{d}", (x, w, 1e-6), nbytes(x) * 2 + nbytes(w)
    t = 64 if quick else 600  # a LLaVA-1.5 prompt: 576 image tokens and some text
    x, angles = rnd(1, hq, t, dh), rnd(1, t, dh // 2, dt=torch.float32)
    yield "rotary", f"B1 H{hq} T{t} D{dh}", (x, angles.cos(), angles.sin()), nbytes(x) * 2 + 2 * nbytes(angles)
    # the decoder's products with weight-only int8 (one scale per output channel, or per 128 inputs)
    # against the same products with fp16/bf16 weights: issue 21's target is 70% of the copy bandwidth
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 32000)) if not quick else ((256, 512),):
        w = rnd(n, k)
        quantized = {"int8": quantize_int8(w, None), "int8-g128": quantize_int8(w, 128)}
        for rows in (1, 16):
            x = rnd(rows, k)
            out = rows * n * x.element_size()
            yield "linear", f"{rows}x{k}->{n}", (x, w, None), nbytes(x, w) + out
            for label, q in quantized.items():
                yield "linear_int8", f"{rows}x{k}->{n} {label}", (x, q, None), nbytes(x, q.qweight, q.scale) + out
        del w
    for b, s in ((1, 4096), (16, 1024)) if not quick else ((1, 256),):
        for hkv in (8, 32):
            q, k, v = rnd(b, hq, dh), rnd(b, hkv, s, dh), rnd(b, hkv, s, dh)
            new_k, new_v = rnd(b, hkv, dh), rnd(b, hkv, dh)
            angles = rnd(b, dh // 2, dt=torch.float32)
            lengths = torch.full((b,), s, device=q.device)
            yield "decode_attention", f"B{b} Hq{hq} Hkv{hkv} L{s} D{dh} + rotary cache write", \
                (q, k, v, lengths, dh ** -0.5, new_k, new_v, 1, angles.cos(), angles.sin()), \
                nbytes(q, k, v, q, new_k, new_v) + 2 * nbytes(angles)


def conv_cases(rnd, quick: bool):
    """conv2d and group_norm at the shapes of the VQGAN decoder (f16, ch 128, widths 128..512) and the
    OpenAI dVAE decoder (n_hid 256: 2048 channels at 32x32, bottleneck blocks of width 512); conv
    cases carry their FLOPs as a fifth item."""
    cl = torch.channels_last
    # (Cin, Cout, input H = W, k, upsample, GroupNorm in, activation in, residual out, label)
    shapes = [(512, 512, 16, 3, False, True, "silu", True, "VQGAN mid"),
              (512, 1536, 16, 1, False, True, None, False, "VQGAN attn qkv"),
              (256, 256, 32, 3, True, False, None, False, "VQGAN upsample"),
              (128, 128, 256, 3, False, True, "silu", False, "VQGAN top"),
              (2048, 512, 32, 3, False, False, "relu", False, "dVAE block in"),
              (512, 512, 32, 3, False, False, "relu", False, "dVAE block"),
              (512, 2048, 32, 1, False, False, "relu", True, "dVAE block out")]
    for b in (1,) if quick else (1, 8):
        for cin, cout, hw, k, upsample, norm, act, residual, label in shapes[:2] if quick else shapes:
            ho = 2 * hw if upsample else hw
            x = rnd(b, cin, hw, hw).contiguous(memory_format=cl)
            w = (rnd(cout, cin, k, k) * (cin * k * k) ** -0.5).contiguous(memory_format=cl)
            bias = rnd(cout)
            gn = (rnd(cin), rnd(cin), 32, 1e-6) if norm else None
            res = rnd(b, cout, ho, ho).contiguous(memory_format=cl) if residual else None
            out_bytes = b * cout * ho * ho * x.element_size()
            stages = "".join([" up" if upsample else "", " GN" if norm else "", f" {act}" if act else "",
                              " +res" if residual else ""])
            yield ("conv2d", f"B{b} {cin}->{cout} {ho}x{ho} {k}x{k}{stages} ({label})",
                   (x, w, bias, k // 2, upsample, gn, act, res, 0.5 if residual else 1.0),
                   nbytes(x, w, bias, *([res] if residual else [])) + out_bytes, 2 * b * ho * ho * cout * cin * k * k)
        for c, hw in ((512, 16), (128, 256)):
            x = rnd(b, c, hw, hw).contiguous(memory_format=cl)
            yield "group_norm", f"B{b} {c}x{hw}x{hw} G32 SiLU", (x, rnd(c), rnd(c), 32, 1e-6, "silu"), 2 * nbytes(x)


def implementations(op: str, op_args) -> dict:
    """``{backend: target}`` of ``op`` for CUDA tensors of the dtype of the argument it dispatches on,
    plus the op's KERNEL_ONLY rows."""
    dtype = op_args[LIKE_ARG.get(op, 0)].dtype
    impls = {b: impl.fn for b, impl in registry._TABLE[op].items() if "cuda" in impl.devices and dtype in impl.dtypes}
    impls.update(KERNEL_ONLY.get(op, {}))
    return impls


def fastest(rows) -> list[dict]:
    """Per op: the backends timed and how many of its (dtype, shape) cases each won."""
    cases_by_op: dict[str, dict] = {}
    for r in rows:
        if not math.isnan(r["us"]):
            cases_by_op.setdefault(r["op"], {}).setdefault((r["dtype"], r["shape"]), []).append(r)
    out = []
    for op, cases in cases_by_op.items():
        wins: dict[str, int] = {}
        for timed in cases.values():
            best = min(timed, key=lambda r: r["us"])["backend"]
            wins[best] = wins.get(best, 0) + 1
        backends = sorted({r["backend"] for timed in cases.values() for r in timed})
        out.append({"op": op, "backends": " ".join(backends),
                    "wins": ", ".join(f"{b} {n}/{len(cases)}" for b, n in sorted(wins.items(), key=lambda x: -x[1]))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float16"])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    ap.add_argument("--ops", nargs="+", help="only these ops (default: all)")
    ap.add_argument("--json", type=Path, default=Path("build/bench_kernels.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench_kernels needs a CUDA GPU")
    device = torch.device("cuda")
    ceiling = copy_gbps(device)
    rows = []
    for dtype_name in args.dtype:
        for op, shape, op_args, moved, *flops in cases(DTYPES[dtype_name], device, args.quick):
            if args.ops and op not in args.ops:
                continue
            for backend, target in implementations(op, op_args).items():
                fn = registry._load(target)
                try:
                    us = bench_us(lambda: fn(*op_args))
                except Exception as e:  # report, keep going: one failing case must not hide the rest
                    print(f"FAILED {op} {backend} {shape}: {type(e).__name__}: {e}", flush=True)
                    us = math.nan
                gbps = moved / us / 1e3
                rows.append({"op": op, "backend": backend, "dtype": dtype_name, "shape": shape, "us": us,
                             "MB": moved / 1e6, "GBps": gbps, "of_copy_bw": gbps / ceiling,
                             **({"TFLOPs": flops[0] / us / 1e6} if flops else {})})
    write_json(args.json, {"benchmark": "kernels", "machine": machine_info(device), "copy_GBps": ceiling,
                           "results": rows})
    print(f"\nkernel benchmark on {torch.cuda.get_device_name(device)}; copy bandwidth {ceiling:.0f} GB/s "
          f"(read + write); µs = median of CUDA-graph replays")
    print(format_table(rows, ["op", "backend", "dtype", "shape", "us", "MB", "GBps", "of_copy_bw", "TFLOPs"]))
    print("\nfastest backend per op (cases won)")
    print(format_table(fastest(rows), ["op", "backends", "wins"]))
    return 1 if any(math.isnan(r["us"]) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
