#!/usr/bin/env python3
"""Captioning benchmark: the engine against Hugging Face ``VisionEncoderDecoderModel.generate`` on
the same random weights (ViT-B/16 + GPT-2 small with cross-attention; ``--quick``: a tiny model).

For each dtype and batch size it times, for both implementations, after warm-up:

- first-token latency: a call generating exactly 1 token (encoder + prefill + one greedy pick);
- ms/token: ``(t(N forced tokens) - t(1 token)) / (N - 1)`` from the medians; the p90 figure uses
  the N-token call's p90 over the 1-token median;
- weight GB/s: decoder weight bytes / ms per token, the bandwidth a decode step needs at least.

Lengths are forced (``min_new_tokens = max_new_tokens``, eos suppressed) on both sides, and the
greedy ids of the two are compared on the timed batch. The HF model and the engine checkpoint are
cached under ``--cache-dir`` and rebuilt only when the model spec changes. A markdown table is
printed last; all raw times and the machine go to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import format_table, machine_info, measure, write_json  # noqa: E402

import mmgen_engine as mm  # noqa: E402

# Token ids of GPT-2: bos = eos = 50256; the tiny model uses the last id of its vocab the same way.
PRESETS = {
    "full": {"encoder": {"image_size": 224, "patch_size": 16, "num_hidden_layers": 12, "hidden_size": 768,
                         "num_attention_heads": 12, "intermediate_size": 3072},
             "decoder": {"vocab_size": 50257, "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
             "new_tokens": 32},
    "quick": {"encoder": {"image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "hidden_size": 64,
                          "num_attention_heads": 4, "intermediate_size": 128},
              "decoder": {"vocab_size": 1000, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64},
              "new_tokens": 16},
}
SPEC_FILE = "bench_spec.json"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_spec(preset: str, seed: int) -> dict:
    """Everything the cached model depends on; a cache whose spec differs is rebuilt."""
    p = PRESETS[preset]
    return {"preset": preset, "seed": seed, "encoder": p["encoder"], "decoder": p["decoder"]}


def _spec_matches(path: Path, spec: dict) -> bool:
    try:
        return json.loads(path.read_text()) == spec
    except (OSError, ValueError):
        return False


def build_hf_model(hf_dir: Path, spec: dict) -> None:
    """Save a random-weight ViT + GPT-2 VisionEncoderDecoder (default initializer, seeded), its
    ViTImageProcessor config and a WordLevel tokenizer of the right vocab size into ``hf_dir``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    enc, dec = spec["encoder"], spec["decoder"]
    special = dec["vocab_size"] - 1
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**enc), GPT2Config(**dec, bos_token_id=special, eos_token_id=special,
                                     add_cross_attention=True, is_decoder=True))
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = special
    torch.manual_seed(spec["seed"])
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id = special
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = special
    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir)
    size = enc["image_size"]
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(hf_dir)
    # The ids are what is compared; the tokenizer only has to exist and cover the vocab.
    vocab = {f"t{i}": i for i in range(dec["vocab_size"])}
    Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(hf_dir / "tokenizer.json"))
    (hf_dir / SPEC_FILE).write_text(json.dumps(spec))


def prepare(cache: Path, preset: str, seed: int, dtypes: list[str]) -> tuple[Path, dict[str, Path]]:
    """The HF model directory and one engine checkpoint per dtype, built or reused from ``cache``."""
    spec = model_spec(preset, seed)
    suffix = "" if preset == "full" else f"_{preset}"
    hf_dir = cache / f"hf{suffix}"
    if _spec_matches(hf_dir / SPEC_FILE, spec):
        log(f"reusing HF model {hf_dir}")
    else:
        t0 = time.perf_counter()
        build_hf_model(hf_dir, spec)
        log(f"built HF model {hf_dir} in {time.perf_counter() - t0:.1f} s")
    engines = {}
    for dtype in dtypes:
        out = cache / f"engine{suffix}_{dtype}"
        stamp = cache / f"engine{suffix}_{dtype}.{SPEC_FILE}"
        if _spec_matches(stamp, spec) and (out / "config.json").is_file():
            log(f"reusing engine checkpoint {out}")
        else:
            t0 = time.perf_counter()
            mm.convert(hf_dir, out, dtype=dtype, overwrite=True)
            stamp.write_text(json.dumps(spec))
            log(f"converted {out} in {time.perf_counter() - t0:.1f} s")
        engines[dtype] = out
    return hf_dir, engines


def decode_rate(first: dict, full: dict, new_tokens: int) -> dict:
    """ms per generated token after the first, from a 1-token and an N-token timing."""
    return {"ms_per_token": (full["median_ms"] - first["median_ms"]) / (new_tokens - 1),
            "ms_per_token_p90": (full["p90_ms"] - first["median_ms"]) / (new_tokens - 1)}


def time_impl(impl: str, run, device: str, args) -> tuple[dict, torch.Tensor]:
    """Times ``run(n)`` (generate exactly n tokens) at n = 1 and n = N; returns the record and the
    ids of one N-token call."""
    n = args.new_tokens
    first = measure(lambda: run(1), warmup=args.warmup, repeats=args.repeats, device=device,
                    flush_l2=args.flush_l2)
    full = measure(lambda: run(n), warmup=args.warmup, repeats=args.repeats, device=device,
                   flush_l2=args.flush_l2)
    record = {"impl": impl, "new_tokens": n, "first_token": first, "n_tokens": full,
              "first_token_ms": first["median_ms"], "first_token_p90_ms": first["p90_ms"],
              **decode_rate(first, full, n)}
    return record, run(n).cpu()


def bench_dtype(dtype: str, engine_dir: Path, hf_dir: Path, args) -> tuple[list[dict], list[dict]]:
    from transformers import VisionEncoderDecoderModel

    device = args.device
    pipe = mm.load(engine_dir, device=device)
    hf = VisionEncoderDecoderModel.from_pretrained(hf_dir, dtype=DTYPES[dtype]).to(device).eval()
    enc = pipe.config.encoder
    # every decode step reads all decoder weights once (tied lm_head counted once): a lower bound
    # on the bytes a step moves, for a GB/s figure comparable with the memory ceiling
    step_bytes = sum(p.numel() * p.element_size() for p in hf.decoder.parameters())
    results, comparisons = [], []
    for batch in args.batch:
        g = torch.Generator().manual_seed(args.seed + batch)
        # a ViTImageProcessor output lies in [-1, 1]
        px = torch.rand(batch, enc.num_channels, enc.image_size, enc.image_size, generator=g) * 2 - 1
        px_engine = px.to(device)
        px_hf = px.to(device, DTYPES[dtype])

        def run_engine(n):
            return pipe.generate_ids(px_engine, max_new_tokens=n, min_new_tokens=n)

        def run_hf(n):
            with torch.inference_mode():
                out = hf.generate(pixel_values=px_hf, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  num_beams=1, use_cache=True)
            return out[:, 1:]  # drop the decoder start token

        row = {"device": device, "dtype": dtype, "batch": batch}
        log(f"timing engine {dtype} batch {batch} ...")
        eng, eng_ids = time_impl("engine", run_engine, device, args)
        timed = [eng]
        if pipe.use_cuda_graphs:  # the same engine without graphs, to show what the graphs buy
            pipe.use_cuda_graphs = False
            log(f"timing engine (eager) {dtype} batch {batch} ...")
            eager, eager_ids = time_impl("engine-eager", run_engine, device, args)
            pipe.use_cuda_graphs = True
            if not torch.equal(eager_ids, eng_ids):
                print(f"WARNING: graph and eager ids differ ({device} {dtype} batch {batch})", flush=True)
            eager["ids_equal_graph"] = torch.equal(eager_ids, eng_ids)
            timed.append(eager)
        log(f"timing HF {dtype} batch {batch} ...")
        ref, ref_ids = time_impl("HF", run_hf, device, args)
        timed.append(ref)
        for rec in timed:
            rec["decoder_weight_bytes"] = step_bytes
            rec["weight_GBps"] = step_bytes / rec["ms_per_token"] / 1e6
        results += [{**row, **rec} for rec in timed]

        same = eng_ids.shape == ref_ids.shape and bool((eng_ids == ref_ids).all())
        agree = float((eng_ids == ref_ids).float().mean()) if eng_ids.shape == ref_ids.shape else 0.0
        if not same:
            print(f"WARNING: engine and HF greedy ids differ ({device} {dtype} batch {batch}): "
                  f"{agree:.1%} of tokens agree", flush=True)
        comparisons.append({**row, "impl": "engine/HF",
                            "first_token_ms": eng["first_token_ms"] / ref["first_token_ms"],
                            "ms_per_token": eng["ms_per_token"] / ref["ms_per_token"],
                            "ids_match": same, "ids_agree_fraction": agree,
                            "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None)})
    del pipe, hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results, comparisons


def parse_args(argv=None):
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device, help=f"cpu | cuda | cuda:N (default {default_device})")
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                    help="dtypes to time (default float32 on CPU, float16 on CUDA)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    ap.add_argument("--new-tokens", type=int, help="forced length N (default 32; 16 with --quick)")
    ap.add_argument("--repeats", type=int, help="timed calls per figure (default 5; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before each figure (default 3, min 2)")
    ap.add_argument("--flush-l2", action="store_true", help="CUDA: write 256 MB before each timed call")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's choice)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, for smoke tests and CI")
    ap.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    ap.add_argument("--cache-dir", type=Path, default=Path("build/bench_caption"),
                    help="where the HF model and engine checkpoints are kept (default build/bench_caption)")
    ap.add_argument("--json", type=Path, help="results file (default <cache-dir>/results.json; "
                                              "results_quick.json with --quick)")
    args = ap.parse_args(argv)
    args.preset = "quick" if args.quick else "full"
    try:
        args.device = str(torch.device(args.device))
    except RuntimeError:
        ap.error(f"invalid --device {args.device!r}; use cpu, cuda or cuda:N")
    args.dtype = args.dtype or (["float16"] if args.device.startswith("cuda") else ["float32"])
    args.new_tokens = args.new_tokens or PRESETS[args.preset]["new_tokens"]
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.json = args.json or args.cache_dir / ("results_quick.json" if args.quick else "results.json")
    max_new = PRESETS[args.preset]["decoder"]["n_positions"] - 1
    if not 2 <= args.new_tokens <= max_new:
        ap.error(f"--new-tokens must be in [2, {max_new}]")
    if args.warmup < 2 or args.repeats < 1 or min(args.batch) < 1:
        ap.error("need --warmup >= 2, --repeats >= 1 and batch sizes >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    hf_dir, engines = prepare(args.cache_dir, args.preset, args.seed, args.dtype)
    results, comparisons = [], []
    for dtype in args.dtype:
        r, c = bench_dtype(dtype, engines[dtype], hf_dir, args)
        results += r
        comparisons += c

    ids_match = all(c["ids_match"] for c in comparisons)
    info = mm.build_info()
    payload = {"benchmark": "caption", "machine": machine_info(args.device),
               "engine": {"version": info["version"], "cuda": info["cuda"], "triton": info["triton"]},
               "transformers": transformers.__version__,
               "model": model_spec(args.preset, args.seed),
               "settings": {"device": args.device, "dtypes": args.dtype, "batch": args.batch,
                            "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
                            "flush_l2": args.flush_l2, "threads": torch.get_num_threads()},
               "results": results, "comparisons": comparisons, "ids_match": ids_match}
    write_json(args.json, payload)
    log(f"wrote {args.json}")

    rows = []
    for c in comparisons:
        rows += [r for r in results if (r["device"], r["dtype"], r["batch"]) == (c["device"], c["dtype"], c["batch"])]
        rows.append(c)
    columns = ["device", "dtype", "batch", "impl", "first_token_ms", "first_token_p90_ms", "ms_per_token",
               "ms_per_token_p90", "weight_GBps"]
    m = payload["machine"]
    print(f"\ncaption benchmark ({args.preset}, N={args.new_tokens}, {args.repeats} repeats) on "
          f"{m.get('gpu', m['cpu'])}, torch threads {m['torch_threads']}")
    print(format_table(rows, columns))
    bad = [k for r in results for k in ("first_token_ms", "ms_per_token") if not math.isfinite(r[k])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
