#!/usr/bin/env python3
"""Captioning benchmark: the engine against Hugging Face ``generate`` on the same random weights, for
the captioner architectures picked with ``--arch`` (one or several; default ``vit-gpt2``):

- ``vit-gpt2``: ViT-B/16 + GPT-2 small with cross-attention, as ``VisionEncoderDecoderModel``;
- ``blip``: BLIP-base (ViT-B/16 at 384 px + 12-layer BERT decoder with cross-attention), as
  ``BlipForConditionalGeneration``;
- ``git``: GIT-base (CLIP ViT-B/16 at 224 px + 6-layer BERT over the image prefix), as
  ``GitForCausalLM``;
- ``llava``: LLaVA-1.5-7B (CLIP ViT-L/14 at 336 px, MLP projector, LLaMA-7B) on CUDA; on CPU the same
  vision tower with a ~1.1B LLaMA (TinyLlama's shape: 22 layers of 2048, 4 K/V heads), as
  ``LlavaForConditionalGeneration``, prompted with a short conversation around one ``<image>``;
- ``blip2``: BLIP-2 OPT-2.7B (ViT-g/14, Q-Former, OPT-2.7B) on CUDA; on CPU a ViT-B/16 tower, the
  full Q-Former and OPT-125m's shape, as ``Blip2ForConditionalGeneration``.

``--quick`` uses a tiny model of each. (Sizes per device: ``full`` on CUDA, ``cpu`` where an arch
has it, on CPU.) For each arch, dtype and batch size it times, for both
implementations, after warm-up:

- first-token latency: a call generating exactly 1 token (encoder + prefill + one greedy pick);
- ms/token: ``(t(N forced tokens) - t(1 token)) / (N - 1)``, the 1-token and N-token calls timed
  alternately in pairs: the median (and p90) over the pairs;
- weight GB/s: decoder weight bytes / ms per token, the bandwidth a decode step needs at least.

Lengths are forced (``min_new_tokens = max_new_tokens``, eos suppressed) on both sides, and the
greedy ids of the two are compared on the timed batch.

``--quantize int8`` (or ``int8-gN``) adds, in the same run, the engine with weight-only int8 decoder
weights (``mm.load(quantize=...)`` from the float checkpoint) and, on CPU, transformers with torch's
dynamic int8 quantization (``torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
dtype=torch.qint8)``: int8 weights, activations quantized per call) as the quantized peer. GPT-2's
blocks are transformers' ``Conv1D``, not ``nn.Linear``, which ``quantize_dynamic`` would leave in
float: they are replaced by the equivalent ``nn.Linear`` first, so that the peer's whole decoder is
int8 as the engine's is. Each int8 row's ids are compared with its own float ids.

``--dtype bfloat16`` on CPU times the engine as ``mm.load`` gives it (bfloat16 decoder weights; float32
or bfloat16 compute by :func:`mmgen_engine.pipelines.cpu_bf16_compute`) and, in the same run, with the
other compute (``engine-bfloat16-compute`` or ``engine-float32-compute``, forced through
``$MMGEN_CPU_BF16_COMPUTE``); the engine rows name what they compute in and what their decoder's
weights are. With ``float32`` among the dtypes (given first), each engine row's greedy ids are
compared with the float32 engine's (``ids_agree_float32``).

The HF model and the engine checkpoints are cached under ``--cache-dir``/<arch> and rebuilt only when
the model spec changes. A markdown table is printed last; all raw times and the machine go to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (  # noqa: E402
    add_device_arguments,
    checked_device,
    engine_info,
    format_table,
    machine_info,
    measure_paired,
    write_json,
)

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.pipelines import BF16_COMPUTE_ENV, cpu_bf16_compute, weight_format  # noqa: E402
from mmgen_engine.pipelines.captioning import RECORD_AFTER  # noqa: E402

_TINY_VIT = {"image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "hidden_size": 64,
             "num_attention_heads": 4, "intermediate_size": 128}
_TINY_BERT = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128, "max_position_embeddings": 64}
_VIT_B16 = {"patch_size": 16, "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
            "intermediate_size": 3072}

# arch -> preset -> the model: "encoder" and "decoder" are the kwargs of the HF vision and text configs
# (for GIT the text settings are GitConfig's own). Token ids: GPT-2's bos = eos = 50256 (the tiny
# model uses the last id of its vocab the same way); BLIP starts from [DEC] (bos_token_id, the
# second-last id) and stops at [SEP] 102; GIT starts from [CLS] 101 and stops at [SEP] 102; pad 0.
#
# "initializer_range" (BLIP, GIT; all sub-configs) is chosen so that the random models' greedy ids
# vary along the sequence and with the image (checked at seed 0), which the id comparison needs:
# with the default 0.02 the tiny models emit the same ids whatever the image (the image path is
# then untested), with 0.035 and more the full-size ones repeat one token; BLIP's own vision
# default (1e-10) would leave its position embeddings at zero.
PRESETS = {
    "vit-gpt2": {
        "full": {"name": "ViT-B/16 + GPT-2 small",
                 "encoder": {"image_size": 224, "patch_size": 16, "num_hidden_layers": 12, "hidden_size": 768,
                             "num_attention_heads": 12, "intermediate_size": 3072},
                 "decoder": {"vocab_size": 50257, "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
                 "new_tokens": 32},
        "quick": {"name": "tiny ViT + GPT-2",
                  "encoder": {"image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "hidden_size": 64,
                              "num_attention_heads": 4, "intermediate_size": 128},
                  "decoder": {"vocab_size": 1000, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64},
                  "new_tokens": 16},
    },
    "blip": {
        "full": {"name": "BLIP-base",
                 "encoder": {"image_size": 384, **_VIT_B16, "layer_norm_eps": 1e-5, "hidden_act": "gelu"},
                 "decoder": {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12,
                             "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                             "bos_token_id": 30522, "sep_token_id": 102, "pad_token_id": 0},
                 "initializer_range": 0.02, "new_tokens": 32},
        "quick": {"name": "tiny BLIP",
                  "encoder": {**_TINY_VIT, "layer_norm_eps": 1e-5, "hidden_act": "gelu"},
                  "decoder": {**_TINY_BERT, "bos_token_id": 998, "sep_token_id": 102, "pad_token_id": 0},
                  "initializer_range": 0.1, "new_tokens": 16},
    },
    "git": {
        "full": {"name": "GIT-base",
                 "encoder": {"image_size": 224, **_VIT_B16, "hidden_act": "quick_gelu"},
                 "decoder": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 6,
                             "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 1024,
                             "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0},
                 "initializer_range": 0.015, "new_tokens": 32},
        "quick": {"name": "tiny GIT",
                  "encoder": {**_TINY_VIT, "hidden_act": "quick_gelu"},
                  "decoder": {**_TINY_BERT, "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0},
                  "initializer_range": 0.1, "new_tokens": 16},
    },
}
_CLIP_L336 = {"image_size": 336, "patch_size": 14, "num_hidden_layers": 24, "hidden_size": 1024,
              "num_attention_heads": 16, "intermediate_size": 4096, "projection_dim": 768}
_LLAMA = {"vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
_TINY_LLAMA = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
_QFORMER = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "cross_attention_frequency": 2}
_OPT = {"vocab_size": 50272, "max_position_embeddings": 2048, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
# LLaVA and BLIP-2: "image_token" is the placeholder's id (LLaVA-1.5: 32000, its <pad> 32001; BLIP-2
# OPT: 50265), "init" the initializer range of every sub-config (see above)
PRESETS["llava"] = {
    "full": {"name": "LLaVA-1.5-7B", "encoder": _CLIP_L336,
             "decoder": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 32},
             "image_token": 32000, "pad": 32001, "init": 0.02, "new_tokens": 32},
    "cpu": {"name": "CLIP ViT-L/14-336 + 1.1B LLaMA", "encoder": _CLIP_L336,
            "decoder": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                        "num_attention_heads": 32, "num_key_value_heads": 4},
            "image_token": 32000, "pad": 32001, "init": 0.02, "new_tokens": 16},
    "quick": {"name": "tiny LLaVA", "encoder": {**_TINY_VIT, "projection_dim": 32}, "decoder": _TINY_LLAMA,
              "image_token": 254, "pad": 255, "init": 0.2, "new_tokens": 16},
}
PRESETS["blip2"] = {
    "full": {"name": "BLIP-2 OPT-2.7B",
             "encoder": {"image_size": 224, "patch_size": 14, "num_hidden_layers": 39, "hidden_size": 1408,
                         "num_attention_heads": 16, "intermediate_size": 6144},
             "qformer": _QFORMER,
             "decoder": {**_OPT, "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "word_embed_proj_dim": 2560},
             "image_token": 50265, "init": 0.02, "new_tokens": 32},
    "cpu": {"name": "BLIP-2 (ViT-B/16, Q-Former, OPT-125m shapes)",
            "encoder": {"image_size": 224, **_VIT_B16}, "qformer": _QFORMER,
            "decoder": {**_OPT, "hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "word_embed_proj_dim": 768},
            "image_token": 50265, "init": 0.02, "new_tokens": 32},
    "quick": {"name": "tiny BLIP-2", "encoder": _TINY_VIT,
              "qformer": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "intermediate_size": 64, "cross_attention_frequency": 2},
              "decoder": {"vocab_size": 256, "hidden_size": 48, "ffn_dim": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "max_position_embeddings": 96, "word_embed_proj_dim": 48,
                          "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
              "image_token": 255, "init": 0.2, "new_tokens": 16},
}
BLIP2_QUERIES = 32
ARCHS = list(PRESETS)
HF_CLASSES = {"vit-gpt2": "VisionEncoderDecoderModel", "blip": "BlipForConditionalGeneration",
              "git": "GitForCausalLM", "llava": "LlavaForConditionalGeneration",
              "blip2": "Blip2ForConditionalGeneration"}
# LLaVA's prompt: BOS, a few words, the one <image>, a few more (made-up ids: only the ids are compared)
LLAVA_TEXT = ([10, 11, 12], [13, 14, 15, 16])
SPEC_FILE = "bench_spec.json"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_spec(arch: str, preset: str, seed: int) -> dict:
    """Everything the cached model depends on; a cache whose spec differs is rebuilt."""
    p = PRESETS[arch][preset]
    return {"arch": arch, "preset": preset, "seed": seed,
            **{k: v for k, v in p.items() if k not in ("name", "new_tokens")}}


def preset_of(arch: str, args) -> str:
    """The model size of ``arch`` in this run: ``quick``, else ``full`` on CUDA and the arch's ``cpu``
    size (where it has one) on CPU."""
    if args.quick:
        return "quick"
    return "cpu" if not args.device.startswith("cuda") and "cpu" in PRESETS[arch] else "full"


def max_positions(arch: str, preset: str) -> int:
    dec = PRESETS[arch][preset]["decoder"]
    return dec["n_positions"] if arch == "vit-gpt2" else dec["max_position_embeddings"]


def token_ids(spec: dict) -> tuple[int, int, int]:
    """``(start, eos, pad)`` ids of the model."""
    dec = spec["decoder"]
    if spec["arch"] == "vit-gpt2":
        special = dec["vocab_size"] - 1
        return special, special, special
    if spec["arch"] == "llava":
        return 1, 2, spec["pad"]
    if spec["arch"] == "blip2":
        return dec["bos_token_id"], dec["eos_token_id"], dec["pad_token_id"]
    eos = dec["sep_token_id"] if spec["arch"] == "blip" else dec["eos_token_id"]
    return dec["bos_token_id"], eos, dec["pad_token_id"]


def _spec_matches(path: Path, spec: dict) -> bool:
    try:
        return json.loads(path.read_text()) == spec
    except (OSError, ValueError):
        return False


def _bert_tokenizer(vocab_size: int, specials: dict[int, str]):
    """A BERT-style WordPiece tokenizer over ``vocab_size`` made-up tokens (``specials``: id -> name)."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    names = [f"t{i}" for i in range(vocab_size)]
    for i, name in specials.items():
        names[i] = name
    tok = Tokenizer(WordPiece({name: i for i, name in enumerate(names)}, unk_token="[UNK]"))
    tok.normalizer = BertNormalizer(lowercase=True)
    tok.pre_tokenizer = BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(sorted(specials.values()))
    return tok


def build_hf_model(hf_dir: Path, spec: dict) -> None:
    """Save a random-weight (seeded) HF model of ``spec["arch"]``, its image processor config and a
    tokenizer of the right vocab size into ``hf_dir``."""
    import transformers

    arch, enc, dec = spec["arch"], spec["encoder"], spec["decoder"]
    start, eos, pad = token_ids(spec)
    size = enc["image_size"]
    torch.manual_seed(spec["seed"])
    if arch == "vit-gpt2":
        from transformers import GPT2Config, VisionEncoderDecoderConfig, ViTConfig

        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            ViTConfig(**enc), GPT2Config(**dec, bos_token_id=start, eos_token_id=eos,
                                         add_cross_attention=True, is_decoder=True))
        config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = start, eos, pad
        model = transformers.VisionEncoderDecoderModel(config=config)
        model.generation_config.decoder_start_token_id = start
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = pad, eos
        processor = transformers.ViTImageProcessor(size={"height": size, "width": size})
    elif arch == "blip":
        init = spec["initializer_range"]
        config = transformers.BlipConfig(vision_config={**enc, "initializer_range": init},
                                         text_config={**dec, "initializer_range": init}, initializer_range=init)
        model = transformers.BlipForConditionalGeneration(config)
        processor = transformers.BlipImageProcessor(size={"height": size, "width": size})
    elif arch == "git":
        init = spec["initializer_range"]
        config = transformers.GitConfig(vision_config={**enc, "initializer_range": init}, **dec,
                                        initializer_range=init)
        model = transformers.GitForCausalLM(config)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size})
    elif arch == "llava":
        init = spec["init"]
        config = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**enc, initializer_range=init),
            text_config=transformers.LlamaConfig(**dec, bos_token_id=start, eos_token_id=eos, pad_token_id=pad,
                                                 initializer_range=init),
            image_token_index=spec["image_token"], image_seq_length=(size // enc["patch_size"]) ** 2)
        model = transformers.LlavaForConditionalGeneration(config)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size})
    elif arch == "blip2":
        init = spec["init"]
        config = transformers.Blip2Config(
            vision_config={**enc, "initializer_range": init},
            qformer_config={**spec["qformer"], "encoder_hidden_size": enc["hidden_size"], "initializer_range": init},
            text_config={**dec, "model_type": "opt", "init_std": init}, num_query_tokens=BLIP2_QUERIES,
            image_token_index=spec["image_token"], initializer_range=init)
        model = transformers.Blip2ForConditionalGeneration(config)
        processor = transformers.BlipImageProcessor(size={"height": size, "width": size})
    else:
        raise ValueError(f"unknown arch {arch!r}")
    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir)
    processor.save_pretrained(hf_dir)
    # The ids are what is compared; the tokenizer only has to exist and cover the vocab.
    if arch in ("vit-gpt2", "llava", "blip2"):
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        names = {i: f"t{i}" for i in range(dec["vocab_size"])}
        if arch != "vit-gpt2":
            names.update({start: "<s>", eos: "</s>", pad: "<pad>", spec["image_token"]: "<image>"})
        tok = Tokenizer(WordLevel({name: i for i, name in names.items()}, unk_token=names[0]))
        if arch != "vit-gpt2":
            tok.add_special_tokens(sorted({names[start], names[eos], names[pad], "<image>"}))
        tok.save(str(hf_dir / "tokenizer.json"))
    else:
        specials = {pad: "[PAD]", 1: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
        if arch == "blip":
            specials[start] = "[DEC]"
        _bert_tokenizer(dec["vocab_size"], specials).save(str(hf_dir / "tokenizer.json"))
    (hf_dir / SPEC_FILE).write_text(json.dumps(spec))


def prepare(cache: Path, arch: str, preset: str, seed: int, dtypes: list[str]) -> tuple[Path, dict[str, Path]]:
    """The HF model directory and one engine checkpoint per dtype, built or reused from ``cache/arch``."""
    spec = model_spec(arch, preset, seed)
    cache = cache / arch
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


def decoder_weight_bytes(hf, arch: str) -> int:
    """Bytes of the weights a decode step reads: the text decoder's parameters (shared ones once),
    less an input embedding table that is not also the LM head (a step gathers only its rows)."""
    if arch == "git":  # the text side of GitForCausalLM: BERT embeddings and layers, LM head
        owner, modules = hf, [hf.git.embeddings, hf.git.encoder, hf.output]
    elif arch in ("llava", "blip2"):  # the language model and its head
        owner = hf
        modules = [hf.model.language_model if arch == "llava" else hf.language_model, hf.get_output_embeddings()]
    else:
        owner = hf.decoder if arch == "vit-gpt2" else hf.text_decoder
        modules = [owner]
    params = {id(p): p for m in modules for p in m.parameters()}
    inp, out = owner.get_input_embeddings(), owner.get_output_embeddings()
    if out is None or inp.weight is not out.weight:
        params.pop(id(inp.weight), None)
    return sum(p.numel() * p.element_size() for p in params.values())


def time_impl(impl: str, run, device: str, args) -> tuple[dict, torch.Tensor]:
    """Times ``run(n)`` (generate exactly n tokens) at n = 1 and n = N, alternately (a burst of load
    from elsewhere then lands on both sides of a pair, not on all of one side: the per-token time of
    a small model is a small difference of two larger times); returns the record and the ids of one
    N-token call."""
    n = args.new_tokens
    # on CPU the engine records a call shape's steps after RECORD_AFTER eager runs of it: warm up past
    # that, so that no timed call pays for a recording
    warmup = max(args.warmup, RECORD_AFTER + 1) if device == "cpu" else args.warmup
    t = measure_paired(run, n, warmup=warmup, repeats=args.repeats, device=device, flush_l2=args.flush_l2)
    first = t["first"]
    record = {"impl": impl, "new_tokens": n, "first_token": first, "n_tokens": t["full"],
              "first_token_ms": first["median_ms"], "first_token_p90_ms": first["p90_ms"],
              "ms_per_token": t["ms_per_token"], "ms_per_token_p90": t["ms_per_token_p90"]}
    return record, run(n).cpu()


def conv1d_as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every transformers ``Conv1D`` (``y = x W + b``, ``W [in, out]``) replaced by the
    equivalent ``nn.Linear`` (``W^T``), in place."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.nf)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def engine_step_bytes(pipe) -> int:
    """Bytes of the weights an engine decode step reads: the decoder's state less the token (and
    position) tables a step only gathers rows of, unless the table is also the head."""
    dec = pipe.model.decoder
    gathered = {"wpe"} | ({"wte"} if hasattr(dec, "lm_head") else set())
    return sum(t.numel() * t.element_size() for name, t in dec.state_dict().items() if name not in gathered)


def bench_dtype(arch: str, dtype: str, engine_dir: Path, hf_dir: Path, args) -> tuple[list[dict], list[dict]]:
    import transformers

    device = args.device
    pipe = mm.load(engine_dir, device=device)
    hf = getattr(transformers, HF_CLASSES[arch]).from_pretrained(hf_dir, dtype=DTYPES[dtype]).to(device).eval()
    pipe_q = hf_q = pipe_alt = None
    if device == "cpu" and dtype == "bfloat16":  # the engine's other bfloat16 compute, in the same run
        other = "bfloat16" if cpu_bf16_compute() == torch.float32 else "float32"
        with mock.patch.dict(os.environ, {BF16_COMPUTE_ENV: other}):
            pipe_alt = mm.load(engine_dir, device=device)
    if args.quantize:
        pipe_q = mm.load(engine_dir, device=device, quantize=args.quantize)
        if device == "cpu" and dtype == "float32":  # torch's dynamic int8: CPU, float32 activations
            fresh = getattr(transformers, HF_CLASSES[arch]).from_pretrained(hf_dir, dtype=DTYPES[dtype]).eval()
            hf_q = torch.ao.quantization.quantize_dynamic(conv1d_as_linear(fresh), {torch.nn.Linear},
                                                          dtype=torch.qint8)
    start = token_ids(model_spec(arch, preset_of(arch, args), args.seed))[0]
    enc = pipe.config.encoder
    # every decode step reads all decoder weights once (tied lm_head counted once): a lower bound
    # on the bytes a step moves, for a GB/s figure comparable with the memory ceiling
    step_bytes = decoder_weight_bytes(hf, arch)
    results, comparisons = [], []
    for batch in args.batch:
        g = torch.Generator().manual_seed(args.seed + batch)
        # preprocessed pixels lie in [-1, 1] (ViT's mean/std) or about [-1.8, 2.1] (CLIP's)
        px = torch.rand(batch, enc.num_channels, enc.image_size, enc.image_size, generator=g) * 2 - 1
        px_engine = px.to(device)
        px_hf = px.to(device, DTYPES[dtype])
        # GIT's generate takes the start token as input_ids; ViT-GPT2 and BLIP add their own; LLaVA and
        # BLIP-2 take the processor's ids (the image's placeholders expanded)
        engine_prompt, hf_ids = hf_inputs(arch, hf, start)
        hf_prompt = {} if hf_ids is None else {"input_ids": hf_ids.expand(batch, -1).to(device)}
        if hf_ids is not None:
            hf_prompt["attention_mask"] = torch.ones_like(hf_prompt["input_ids"])

        def run_engine(n, pipe=pipe):
            return pipe.generate_ids(px_engine, max_new_tokens=n, min_new_tokens=n, prompt_ids=engine_prompt)

        def run_hf(n, hf=hf):
            with torch.inference_mode():
                out = hf.generate(pixel_values=px_hf, **hf_prompt, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, num_beams=1, use_cache=True)
            return out[:, 1 if hf_ids is None else hf_ids.shape[1]:]  # the generated ids only

        row = {"arch": arch, "device": device, "dtype": dtype, "batch": batch}
        log(f"timing engine {arch} {dtype} batch {batch} ...")
        eng, eng_ids = time_impl("engine", run_engine, device, args)
        timed = [eng]
        if pipe.use_cuda_graphs:  # the same engine without graphs, to show what the graphs buy
            pipe.use_cuda_graphs = False
            log(f"timing engine (eager) {arch} {dtype} batch {batch} ...")
            eager, eager_ids = time_impl("engine-eager", run_engine, device, args)
            pipe.use_cuda_graphs = True
            if not torch.equal(eager_ids, eng_ids):
                print(f"WARNING: graph and eager ids differ ({arch} {device} {dtype} batch {batch})", flush=True)
            eager["ids_equal_graph"] = torch.equal(eager_ids, eng_ids)
            timed.append(eager)
        engine_ids = {id(eng): (eng_ids, pipe)}  # record -> its greedy ids and its pipeline
        if pipe_alt is not None:
            impl = f"engine-{weight_format(pipe_alt)['dtype']}-compute"
            log(f"timing {impl} {arch} {dtype} batch {batch} ...")
            eng_alt, eng_alt_ids = time_impl(impl, partial(run_engine, pipe=pipe_alt), device, args)
            timed.append(eng_alt)
            engine_ids[id(eng_alt)] = (eng_alt_ids, pipe_alt)
        log(f"timing HF {arch} {dtype} batch {batch} ...")
        ref, ref_ids = time_impl("HF", run_hf, device, args)
        timed.append(ref)
        for rec in timed:
            rec["decoder_weight_bytes"] = step_bytes
            rec["weight_GBps"] = step_bytes / rec["ms_per_token"] / 1e6
        if dtype == "float32":
            FLOAT32_IDS[arch, batch] = eng_ids
        quantized = []
        if pipe_q is not None:
            log(f"timing engine {args.quantize} {arch} {dtype} batch {batch} ...")
            eng_q, eng_q_ids = time_impl(f"engine-{args.quantize}", partial(run_engine, pipe=pipe_q), device, args)
            eng_q["decoder_weight_bytes"] = engine_step_bytes(pipe_q)
            eng_q["weight_GBps"] = eng_q["decoder_weight_bytes"] / eng_q["ms_per_token"] / 1e6
            eng_q["ids_agree_own_float"] = agreement(eng_q_ids, eng_ids)
            quantized.append(eng_q)
            engine_ids[id(eng_q)] = (eng_q_ids, pipe_q)
        for rec in timed + quantized:
            if id(rec) in engine_ids:
                ids, p = engine_ids[id(rec)]
                form = weight_format(p)  # what the engine computes in and streams (bfloat16: float32 compute or not)
                rec.update(dtype_compute=form["dtype"], decoder_weights=form["decoder_weights"])
                if (arch, batch) in FLOAT32_IDS:  # the share of greedy ids equal to the float32 engine's
                    rec["ids_agree_float32"] = agreement(ids, FLOAT32_IDS[arch, batch])
        if hf_q is not None:
            log(f"timing HF dynamic int8 {arch} {dtype} batch {batch} ...")
            ref_q, ref_q_ids = time_impl("HF-dynamic-int8", partial(run_hf, hf=hf_q), device, args)
            ref_q["ids_agree_own_float"] = agreement(ref_q_ids, ref_ids)
            quantized.append(ref_q)
        results += [{**row, **rec} for rec in timed + quantized]

        same = eng_ids.shape == ref_ids.shape and bool((eng_ids == ref_ids).all())
        agree = float((eng_ids == ref_ids).float().mean()) if eng_ids.shape == ref_ids.shape else 0.0
        if not same:
            print(f"WARNING: engine and HF greedy ids differ ({arch} {device} {dtype} batch {batch}): "
                  f"{agree:.1%} of tokens agree", flush=True)
        comparisons.append({**row, "impl": "engine/HF",
                            "first_token_ms": eng["first_token_ms"] / ref["first_token_ms"],
                            "ms_per_token": eng["ms_per_token"] / ref["ms_per_token"],
                            "ids_match": same, "ids_agree_fraction": agree,
                            "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None)})
        if quantized:
            for peer in [ref] + quantized[1:]:
                comparisons.append({**row, "impl": f"{quantized[0]['impl']}/{peer['impl']}",
                                    "first_token_ms": quantized[0]["first_token_ms"] / peer["first_token_ms"],
                                    "ms_per_token": quantized[0]["ms_per_token"] / peer["ms_per_token"]})
    return results, comparisons


FLOAT32_IDS: dict[tuple[str, int], torch.Tensor] = {}  # (arch, batch) -> the float32 engine's greedy ids


def agreement(ids: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of greedy tokens of ``ids`` equal to ``reference``'s (0 when the shapes differ)."""
    return float((ids == reference).float().mean()) if ids.shape == reference.shape else 0.0


def hf_inputs(arch: str, hf, start: int) -> tuple[list[int] | None, torch.Tensor | None]:
    """``(engine prompt_ids, HF input_ids [1, T])`` of one row: None, None where ``generate`` needs
    none; GIT: the start token; LLaVA: :data:`LLAVA_TEXT` around the ``<image>`` (expanded to the
    image's tokens for HF, BOS first); BLIP-2: the query placeholders then BOS."""
    if arch == "git":
        return None, torch.tensor([[start]])
    if arch == "llava":
        image, (before, after) = hf.config.image_token_index, LLAVA_TEXT
        return [*before, image, *after], torch.tensor([[start, *before, *[image] * hf.config.image_seq_length,
                                                        *after]])
    if arch == "blip2":
        return None, torch.tensor([[hf.config.image_token_index] * hf.config.num_query_tokens + [start]])
    return None, None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", choices=ARCHS, default=["vit-gpt2"],
                    help="captioners to time, each in turn (default vit-gpt2)")
    add_device_arguments(ap)
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                    help="dtypes to time (default float32 on CPU, float16 on CUDA)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    ap.add_argument("--new-tokens", type=int, help="forced length N (default 32; 16 with --quick)")
    ap.add_argument("--repeats", type=int, help="timed calls per figure (default 5; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before each figure (default 3, min 2)")
    ap.add_argument("--flush-l2", action="store_true", help="CUDA: write 256 MB before each timed call")
    ap.add_argument("--quick", action="store_true", help="tiny random models, for smoke tests and CI")
    ap.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    ap.add_argument("--cache-dir", type=Path, default=Path("build/bench_caption"),
                    help="where the HF models and engine checkpoints are kept, one folder per arch "
                         "(default build/bench_caption)")
    ap.add_argument("--json", type=Path, help="results file (default <cache-dir>/results.json; "
                                              "results_quick.json with --quick)")
    ap.add_argument("--quantize", default=None, metavar="int8[-gN]",
                    help="also time the engine with int8 decoder weights and, on CPU, transformers with torch's "
                         "dynamic int8 (see above)")
    args = ap.parse_args(argv)
    args.arch = list(dict.fromkeys(args.arch))  # in the order given, once each
    args.device = checked_device(ap, args.device)
    args.dtype = args.dtype or (["float16"] if args.device.startswith("cuda") else ["float32"])
    args.new_tokens = args.new_tokens or max(PRESETS[a][preset_of(a, args)]["new_tokens"] for a in args.arch)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.json = args.json or args.cache_dir / ("results_quick.json" if args.quick else "results.json")
    max_new = min(max_positions(a, preset_of(a, args)) for a in args.arch) - 1  # the start token takes a position
    if not 2 <= args.new_tokens <= max_new:
        ap.error(f"--new-tokens must be in [2, {max_new}]")
    if args.warmup < 2 or args.repeats < 1 or min(args.batch) < 1:
        ap.error("need --warmup >= 2, --repeats >= 1 and batch sizes >= 1")
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
        hf_dir, engines = prepare(args.cache_dir, arch, preset_of(arch, args), args.seed, args.dtype)
        for dtype in args.dtype:
            r, c = bench_dtype(arch, dtype, engines[dtype], hf_dir, args)
            results += r
            comparisons += c
            if args.device.startswith("cuda"):  # the two models went with bench_dtype's frame
                torch.cuda.empty_cache()

    ids_match = all(c["ids_match"] for c in comparisons if c["impl"] == "engine/HF")
    payload = {"benchmark": "caption", "machine": machine_info(args.device),
               "engine": engine_info(),
               "transformers": transformers.__version__,
               "models": {arch: {"name": PRESETS[arch][preset_of(arch, args)]["name"],
                                 **model_spec(arch, preset_of(arch, args), args.seed)} for arch in args.arch},
               "settings": {"archs": args.arch, "device": args.device, "dtypes": args.dtype, "batch": args.batch,
                            "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
                            "flush_l2": args.flush_l2, "threads": torch.get_num_threads()},
               "results": results, "comparisons": comparisons, "ids_match": ids_match}
    write_json(args.json, payload)
    log(f"wrote {args.json}")

    keys = ("arch", "device", "dtype", "batch")
    rows = []
    for key in dict.fromkeys(tuple(c[k] for k in keys) for c in comparisons):
        rows += [r for r in results + comparisons if tuple(r[k] for k in keys) == key]  # timings, then ratios
    columns = ["arch", "device", "dtype", "batch", "impl", "first_token_ms", "first_token_p90_ms", "ms_per_token",
               "ms_per_token_p90", "weight_GBps"] + (["ids_agree_own_float"] if args.quantize else []) + (
        ["dtype_compute", "decoder_weights"] if args.device == "cpu" else []) + (
        ["ids_agree_float32"] if "float32" in args.dtype and len(args.dtype) > 1 else [])
    m = payload["machine"]
    models = ", ".join(f"{a}: {PRESETS[a][preset_of(a, args)]['name']}" for a in args.arch)
    size = "quick" if args.quick else "full"
    print(f"\ncaption benchmark ({size}; {models}; N={args.new_tokens}, {args.repeats} repeats) on "
          f"{m.get('gpu', m['cpu'])}, torch threads {m['torch_threads']}")
    print(format_table(rows, columns))
    bad = [k for r in results for k in ("first_token_ms", "ms_per_token") if not math.isfinite(r[k])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
