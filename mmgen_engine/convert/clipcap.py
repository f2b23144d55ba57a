"""Converter ``clipcap``: a ClipCap model (Mokady et al. 2021, github.com/rmokady/CLIP_prefix_caption,
MLP mapping network) -> ``clipcap`` (captioning).

The source is a directory holding

- the ClipCap state dict as saved by its training script (``coco_weights.pt``, ...; one safetensors
  or ``torch.save`` file, read with ``weights_only=True``): ``clip_project.model.{0,2,..}`` (the MLP's
  linear layers, tanh between) and ``gpt.*`` (a ``GPT2LMHeadModel``);
- ``clip/``: the CLIP model the prefixes were made with, in transformers' format
  (``CLIPVisionModelWithProjection`` or ``CLIPModel``; the text tower is dropped) with its
  ``preprocessor_config.json``;
- GPT-2's tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``).

GPT-2's sizes are read off the tensors (64-wide heads, as in every GPT-2 size); the prefix length is
the MLP's output width over GPT-2's. Captions are generated as ClipCap's ``generate2`` does: greedy
after the prefix, no start token, up to and including the first "." token, at most its
``entry_length`` of 67 tokens (the checkpoint's generation defaults: greedy, ``max_new_tokens`` 67).
ClipCap's transformer mapping network is not supported.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ..errors import ConversionError
from . import hf, keymap, weights_file
from .hf_towers import (
    CLIP_VISION_DEFAULTS,
    clip_vision_rules,
    gpt2_decoder_rules,
    image_preprocess,
    settings,
    tied_copy,
    vit_config,
)
from .keymap import apply_rules, check_config, finish, header, rule

NAME = "clipcap"
SIGNATURE = {"clip_project.model.0.weight", "gpt.transformer.wte.weight"}
HEAD_DIM = 64  # GPT-2's head width at every size
STOP_TOKEN = "."
MAX_NEW_TOKENS = 67  # generate2's entry_length
IGNORED = [r".*\.position_ids", r"gpt\.transformer\.h\.\d+\.attn\.(masked_)?bias",
           r"text_model\..*", r"text_projection\.weight", r"logit_scale"]


def detect(src: Path) -> bool:
    return src.is_dir() and (src / "clip" / "config.json").is_file() and SIGNATURE <= weights_file.names(src)


def _clip_vision(clip: Path) -> dict:
    """The vision settings of the CLIP directory (a CLIPModel's vision_config or a vision model's own)."""
    where = str(clip / "config.json")
    top = hf.read_json(clip / "config.json")
    kind = top.get("model_type")
    if kind == "clip":
        return settings(top.get("vision_config"), CLIP_VISION_DEFAULTS, where + ": vision_config")
    if kind == "clip_vision_model":
        return settings(top, CLIP_VISION_DEFAULTS, where)
    raise ConversionError(f"{where}: model_type {kind!r} is not a CLIP model ('clip' or 'clip_vision_model')")


def _gpt2_config(tensors: dict, where: str) -> dict:
    vocab, width = keymap.shape(tensors, "gpt.transformer.wte.weight", 2, where)
    layers = keymap.count(tensors, "gpt.transformer.h.{}.ln_1.weight")
    if not layers or width % HEAD_DIM:
        raise ConversionError(f"{where}: expected GPT-2 blocks gpt.transformer.h.N with a width divisible by "
                              f"{HEAD_DIM}, found {layers} blocks of width {width}")
    return {"vocab_size": vocab, "hidden_size": width, "num_layers": layers, "num_heads": width // HEAD_DIM,
            "intermediate_size": keymap.shape(tensors, "gpt.transformer.h.0.mlp.c_fc.weight", 2, where)[1],
            "max_positions": keymap.shape(tensors, "gpt.transformer.wpe.weight", 2, where)[0],
            "layer_norm_eps": 1e-5, "activation": "gelu_tanh", "tie_word_embeddings": True,
            "cross_attention": False}


def _stop_token(tokenizer_file: Path, where: str) -> int:
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(STOP_TOKEN, add_special_tokens=False).ids
    if not ids:
        raise ConversionError(f"{where}: the tokenizer has no token for ClipCap's stop token {STOP_TOKEN!r}")
    return ids[0]


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, files to copy)``; never unpickles."""
    if not src.is_dir() or not (src / "clip").is_dir():
        raise ConversionError(f"{src}: expected a directory with the ClipCap weights, a clip/ model directory "
                              f"and GPT-2's tokenizer")
    where = str(src)
    _, tensors = weights_file.read(src, trust_pickle=False)
    if any(k.startswith(("clip_project.transformer.", "clip_project.linear.")) for k in tensors):
        raise ConversionError(f"{where}: ClipCap's transformer mapping network is not supported (MLP mapper only)")
    layers = []  # the MLP's linear layers sit at even indices, a tanh between each two
    while f"clip_project.model.{2 * len(layers)}.weight" in tensors:
        layers.append(2 * len(layers))
    if not layers:
        raise ConversionError(f"{where}: expected the MLP mapper's linear layers clip_project.model.0, .2, ...")
    sizes = [keymap.shape(tensors, "clip_project.model.0.weight", 2, where)[1]]
    sizes += [keymap.shape(tensors, f"clip_project.model.{i}.weight", 2, where)[0] for i in layers]
    decoder = _gpt2_config(tensors, where)
    tied_copy(tensors, "gpt.lm_head.weight", "gpt.transformer.wte.weight", where)

    clip = src / "clip"
    vision = _clip_vision(clip)
    clip_tensors = hf.read_weights(clip)
    if "visual_projection.weight" not in clip_tensors:
        raise ConversionError(f"{clip}: no visual_projection.weight: ClipCap needs CLIP's image embedding "
                              f"(CLIPVisionModelWithProjection or CLIPModel)")
    projection_dim = clip_tensors["visual_projection.weight"].shape[0]
    tokenizer = hf.tokenizer_json(src, workdir)
    stop = _stop_token(tokenizer, where)
    width = decoder["hidden_size"]
    config = {**header("captioning", "clipcap", NAME, dtype),
              "encoder": vit_config(vision, str(clip / "config.json"), clip=True), "decoder": decoder,
              "generation": {"decoder_start_token_id": None, "eos_token_id": stop, "pad_token_id": stop,
                             "include_eos": True},
              "preprocess": image_preprocess(clip / "preprocessor_config.json", "CLIPImageProcessor"),
              "projection_dim": projection_dim, "mapper_sizes": sizes,
              "prefix_length": sizes[-1] // width if sizes[-1] % width == 0 else 0,
              "generation_defaults": {"max_new_tokens": MAX_NEW_TOKENS}}
    check_config(config, where)

    overlap = set(tensors) & set(clip_tensors)
    if overlap:
        raise ConversionError(f"{where}: tensor names in both the ClipCap file and clip/: {sorted(overlap)[:3]}")
    rules = [*clip_vision_rules("vision_model."), rule("projection.weight", "visual_projection.weight"),
             *(rule(f"mapper.{n}.{p}", f"clip_project.model.{i}.{p}") for n, i in enumerate(layers)
               for p in ("weight", "bias")),
             *gpt2_decoder_rules("gpt.transformer.", cross=False)]
    out = apply_rules(rules, {**tensors, **clip_tensors},
                      {"enc": config["encoder"]["num_layers"], "dec": decoder["num_layers"]}, IGNORED, where=where)
    config, out = finish(config, out, dtype, where)
    return config, out, {"tokenizer.json": tokenizer, "preprocessor_config.json": clip / "preprocessor_config.json"}
