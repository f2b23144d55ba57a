#!/usr/bin/env python3
"""Text-to-image benchmark: the engine against min-dalle's own sampling loop on the same random
weights (DALL·E Mini sizes: width 1024, 12 + 12 layers, GLU 2730, 16384 image codes, min-dalle's
VQGAN; ``--quick``: a tiny model and a tiny VQGAN).

Both sides generate with min-dalle's defaults (supercondition 16, top-k 256, temperature 1) for one
image and for a grid of ``--grid`` x ``--grid`` images of one prompt, then decode the tokens to
pixels. min-dalle's loop is the one of ``MinDalle.generate_raw_image_stream`` (one decoder call per
token over a cache it rewrites, the cross-attention K/V recomputed each step). ``--tokens N`` times
only the first N of the 256 tokens on both sides (a full CPU run of Mini takes minutes). Each side is
timed generating 1 token (encoder, prefill, first token, detokenizer) and N tokens, in turn
(``timing.measure_paired``); ``s_per_token`` is the median over those pairs of
``(t(N) - t(1)) / (N - 1)`` and ``s_per_image_256`` is ``(t(1) + 255 * s_per_token) / images``, an
extrapolation when N < 256 and a measurement at N = 256 (the default on CUDA). A markdown table is
printed last; raw times and the machine go to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import add_device_arguments, checked_device, format_table, machine_info, measure_paired, write_json  # noqa: E402

import mmgen_engine as mm  # noqa: E402

PRESETS = {
    "mini": {"width": 1024, "layers": 12, "glu": 2730, "text_vocab": 50264, "image_vocab": 16384},
    "quick": {"width": 128, "layers": 2, "glu": 256, "text_vocab": 64, "image_vocab": 16384},
}
IMAGE_TOKENS, TEXT_LEN, BOS = 256, 64, 2 ** 14 - 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPT_IDS = [0, 20, 31, 42, 2]  # "<s> w w w </s>": the ids are what matters, not the words


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tiny_vqgan(codebook: int):
    """min-dalle's detokenizer layout at toy size (taming's Decoder, GroupNorm eps 1e-5) with its
    ``forward(is_seamless, tokens [B, 256])``; the ``quick`` preset's peer detokenizer."""
    from taming.modules.diffusionmodules.model import Decoder

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(codebook, 16)
            self.post_quant_conv = torch.nn.Conv2d(16, 16, 1)
            self.decoder = Decoder(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                   in_channels=3, resolution=32, z_channels=16)
            for m in self.decoder.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.eps = 1e-5

        def forward(self, is_seamless, tokens):
            z = self.embedding(tokens.view(-1, 16, 16)).permute(0, 3, 1, 2)
            return self.decoder(self.post_quant_conv(z)).clamp(0, 1)
    return Tiny()


def build(cache: Path, preset: str, seed: int):
    """min-dalle's modules with random weights, saved as a min-dalle directory in ``cache``."""
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder, VQGanDetokenizer

    p = PRESETS[preset]
    torch.manual_seed(seed)
    heads = p["width"] // 64
    enc = DalleBartEncoder(layer_count=p["layers"], embed_count=p["width"], attention_head_count=heads,
                           text_vocab_count=p["text_vocab"], text_token_count=TEXT_LEN, glu_embed_count=p["glu"],
                           device="cpu").eval()
    dec = DalleBartDecoder(image_vocab_count=p["image_vocab"], embed_count=p["width"], attention_head_count=heads,
                           glu_embed_count=p["glu"], layer_count=p["layers"], device="cpu").eval()
    detok = (VQGanDetokenizer() if preset == "mini" else tiny_vqgan(p["image_vocab"])).eval()
    src = cache / f"min_dalle_{preset}"
    src.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, p["text_vocab"])}}
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    for name, module in [("encoder", enc), ("decoder", dec), ("detoker", detok)]:
        torch.save(module.state_dict(), src / f"{name}.pt")
    return src, enc, dec, detok


def upstream_generate(enc, dec, detok, text, images: int, tokens: int, dtype, device):
    """``MinDalle.generate_raw_image_stream`` for one prompt row, ``images`` images, ``tokens`` steps,
    then its detokenizer on the (partial) token grid (a grid of ``images`` must be square)."""
    rows = torch.ones(2, TEXT_LEN, dtype=torch.long, device=device)
    rows[0, :2] = torch.tensor([text[0], text[-1]])
    rows[1, :len(text)] = torch.tensor(text)
    settings = torch.tensor([1.0, 256, 16.0], device=device)
    with torch.inference_mode():
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        with autocast:  # as min-dalle runs its encoder and decoder; its detokenizer runs in fp32
            state = enc(rows)
            idx = [0] * images + [1] * images
            rows, state = rows[idx], state[idx]
            mask = rows.not_equal(1)[:, None, None, :]
            attention_state = torch.zeros(dec.layer_count, images * 4, IMAGE_TOKENS, dec.embed_count, device=device)
            out = torch.full((images, IMAGE_TOKENS + 1), BOS, dtype=torch.long, device=device)
            positions = torch.arange(IMAGE_TOKENS, device=device)
            for i in range(tokens):
                out[:, i + 1], attention_state = dec.sample_tokens(
                    settings=settings, attention_mask=mask, encoder_state=state, attention_state=attention_state,
                    prev_tokens=out[:, [i]], token_index=positions[[i]])
        return detok.forward(False, out[:, 1:])


def engine_generate(pipe, text, images: int, tokens: int, sampling):
    rows = torch.ones(images, TEXT_LEN, dtype=torch.long)
    rows[:, :len(text)] = torch.tensor(text)
    for got in pipe.generate_tokens_stream(rows, sampling, every=tokens if tokens < IMAGE_TOKENS else None):
        break  # the first yield: the first `tokens` tokens (all of them when tokens == 256)
    return pipe.decode_tokens(pipe._partial(got))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(ap)
    ap.add_argument("--dtype", choices=list(DTYPES), help="default float16 on CUDA, float32 on CPU")
    ap.add_argument("--grid", type=int, default=4, help="grid side for the multi-image run (default 4)")
    ap.add_argument("--tokens", type=int, help="tokens timed per run (default 256 on CUDA, 8 on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny random model, for smoke tests and CI")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=Path("build/bench_txt2img"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.preset = "quick" if args.quick else "mini"
    args.device = torch.device(checked_device(ap, args.device))
    args.dtype = args.dtype or ("float16" if args.device.type == "cuda" else "float32")
    args.tokens = args.tokens or (IMAGE_TOKENS if args.device.type == "cuda" else 8)
    if not 1 <= args.tokens <= IMAGE_TOKENS or args.grid < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error(f"need 1 <= --tokens <= {IMAGE_TOKENS}, --grid >= 1, --repeats >= 1, --warmup >= 0")
    args.json = args.json or args.cache_dir / f"results_{args.preset}.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    __import__("min_dalle")  # importing it sets torch's thread count to the core count: first, then ours
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    src, enc, dec, detok = build(args.cache_dir, args.preset, args.seed)
    out = mm.convert(src, args.cache_dir / f"engine_{args.preset}_{args.dtype}", dtype=args.dtype, overwrite=True)
    log(f"built and converted the random {args.preset} model in {time.perf_counter() - t0:.1f} s")
    dtype, device = DTYPES[args.dtype], args.device
    enc, dec, detok = (m.to(device, dtype if m is not detok else torch.float32) for m in (enc, dec, detok))
    pipe = mm.load(out, device=str(device))
    sampling = mm.SamplingParams(do_sample=True, top_k=256, guidance_scale=16.0, seed=args.seed)
    results = []
    for images in sorted({1, args.grid ** 2}):
        row = {"device": str(device), "dtype": args.dtype, "images": images, "tokens": args.tokens}
        for impl, run in [("engine", lambda n: engine_generate(pipe, PROMPT_IDS, images, n, sampling)),
                          ("min-dalle", lambda n: upstream_generate(enc, dec, detok, PROMPT_IDS, images, n, dtype,
                                                                    device))]:
            log(f"timing {impl}: {images} image(s), 1 and {args.tokens} tokens ...")
            t = measure_paired(run, args.tokens, warmup=args.warmup, repeats=args.repeats, device=device)
            first, per_token = t["first"], t["ms_per_token"] / 1e3
            results.append({**row, "impl": impl, "first": first, "full": t["full"],
                            "first_token_s": first["median_ms"] / 1e3, "s_per_token": per_token,
                            "s_per_image_256": (first["median_ms"] / 1e3 + (IMAGE_TOKENS - 1) * per_token) / images})
        eng, ref = results[-2], results[-1]
        results.append({**row, "impl": "min-dalle/engine",
                        **{k: ref[k] / eng[k] for k in ("first_token_s", "s_per_token", "s_per_image_256")}})
    payload = {"benchmark": "txt2img", "machine": machine_info(device), "preset": args.preset,
               "settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    write_json(args.json, payload)
    m = payload["machine"]
    print(f"\ntxt2img benchmark ({args.preset}, {args.tokens} of {IMAGE_TOKENS} tokens timed, {args.repeats} repeats) "
          f"on {m.get('gpu', m['cpu'])}, torch threads {m['torch_threads']}")
    print(format_table(results, ["device", "dtype", "images", "tokens", "impl", "first_token_s", "s_per_token",
                                 "s_per_image_256"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
