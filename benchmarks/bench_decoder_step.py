#!/usr/bin/env python3
"""The native CPU decode step (:mod:`mmgen_engine.ops.decoder_step`) against the decoder's per-op
step, by decoder size: where the one-thread native step stops paying (``MAX_BYTES``).

For GPT-2-style decoders with cross-attention (random weights, column-major as the pipelines store
them on CPU, float32, batch ``--rows``, 32 encoder states, 16 cache slots in use), it times one
``decode_step``: the per-op step eager (``MMGEN_CPU_NATIVE_STEP=0``), the per-op step replayed from
a recording (:class:`~mmgen_engine.runtime.recorded.RecordedSteps`, what the pipelines run on CPU)
and the native step (its Python wrapper included), median of ``--repeats`` timed blocks of
``--steps`` calls. Logits of native and per-op steps are compared (max abs error / max abs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import format_table, machine_info, write_json  # noqa: E402

from mmgen_engine.config import GPT2Config  # noqa: E402
from mmgen_engine.models.gpt2 import GPT2Decoder  # noqa: E402
from mmgen_engine.ops import decoder_step  # noqa: E402
from mmgen_engine.runtime import CrossKVCache, KVCache, RecordedSteps  # noqa: E402
from mmgen_engine.runtime.layout import column_major_weights  # noqa: E402

SIZES = {  # name: (width, layers, heads, vocab)
    "gesture demo (128 x 3)": (128, 3, 4, 514),
    "256 x 4": (256, 4, 4, 1024),
    "384 x 6": (384, 6, 6, 2048),
    "512 x 6": (512, 6, 8, 4096),
    "768 x 6": (768, 6, 12, 8192),
}
QUICK = ("gesture demo (128 x 3)", "256 x 4")


def build(width: int, layers: int, heads: int, vocab: int) -> GPT2Decoder:
    cfg = GPT2Config(vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
                     intermediate_size=4 * width, max_positions=64, layer_norm_eps=1e-5, activation="gelu_tanh",
                     scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=True,
                     cross_attention=True)
    dec = GPT2Decoder(cfg)
    gen = torch.Generator().manual_seed(0)
    for p in dec.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.05
    column_major_weights(dec)
    return dec


def time_block(fn, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean us per call of ``steps`` calls (after one untimed block)."""
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if r:
            times.append((time.perf_counter() - start) / steps * 1e6)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def bench(name: str, rows: int, steps: int, repeats: int) -> dict:
    width, layers, heads, vocab = SIZES[name]
    dec = build(width, layers, heads, vocab)
    nlayers, h, dh, slots = dec.cache_geometry()
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(nlayers, rows, h, slots, dh, generator=gen) for _ in range(2))
    cross = CrossKVCache(*(torch.randn(nlayers, rows, h, 32, dh, generator=gen) for _ in range(2)),
                         torch.full((rows,), 32))
    tokens, positions = torch.randint(0, vocab, (rows,), generator=gen), torch.full((rows,), 15)
    cache = KVCache(k, v, 16)
    step = lambda: dec.decode_step(tokens, positions, cache, cross)  # noqa: E731
    weights_mb = sum(p.numel() for p in dec.parameters()) * 4 / 2**20
    native = decoder_step.native_step(dec, dec._step_spec, tokens, k)
    if native is None:  # above MAX_BYTES: time it anyway, that is the question here
        spec = dec._step_spec()
        native = decoder_step.NativeDecoderStep(spec)
    out = {"decoder": name, "rows": rows, "weights_mb": round(weights_mb, 1),
           "native_default": weights_mb * 2**20 <= decoder_step.MAX_BYTES}
    out["native_us"] = time_block(lambda: native(tokens, positions, k, v, 16, cross.k, cross.v, cross.lengths),
                                  steps, repeats)
    os.environ[decoder_step.ENV_VAR] = "0"
    try:
        reference = step()
        out["per_op_eager_us"] = time_block(step, steps, repeats)
        recorded = RecordedSteps(dec, record_after=0)
        replay = lambda: recorded(tokens, positions, cache, cross)  # noqa: E731
        replay()
        out["per_op_recorded_us"] = time_block(replay, steps, repeats)
    finally:
        del os.environ[decoder_step.ENV_VAR]
    logits = native(tokens, positions, k, v, 16, cross.k, cross.v, cross.lengths)
    out["native_vs_recorded"] = out["native_us"] / out["per_op_recorded_us"]
    out["max_rel_err"] = float((logits - reference).abs().max() / reference.abs().max())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=50, help="calls per timed block")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="the two smallest sizes, few calls (a smoke test)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if decoder_step._C is None:
        ap.error("the native library was built without the decoder step")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [s for s in args.sizes if s in QUICK] if args.quick else args.sizes
    steps, repeats = (5, 2) if args.quick else (args.steps, args.repeats)
    rows = [bench(name, r, steps, repeats) for name in sizes for r in args.rows]
    machine = machine_info("cpu")
    print(f"native decode step vs per-op step on {machine.get('cpu', '?')}, torch threads "
          f"{torch.get_num_threads()}, MAX_BYTES {decoder_step.MAX_BYTES >> 20} MiB")
    print(format_table(rows, ["decoder", "rows", "weights_mb", "native_default", "per_op_eager_us",
                              "per_op_recorded_us", "native_us", "native_vs_recorded", "max_rel_err"]))
    if args.json:
        write_json(args.json, {"machine": machine, "threads": torch.get_num_threads(),
                               "max_bytes": decoder_step.MAX_BYTES, "results": rows})
    bad = [r for r in rows if r["max_rel_err"] > 1e-4]
    for r in bad:
        print(f"WARNING: {r['decoder']} rows {r['rows']}: native logits differ by {r['max_rel_err']:.2g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
