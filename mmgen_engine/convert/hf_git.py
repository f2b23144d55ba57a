"""Converter ``hf-git``: HF ``GitForCausalLM`` (image captioning) -> ``git`` (captioning).

The CLIP image encoder (``git.image_encoder.vision_model.*``) maps onto the engine ViT (no patch
bias, the ``pre_layrnorm``, quick GELU, the final LayerNorm over every state as GIT applies it), the
visual projection (linear + LayerNorm) onto ``projection`` / ``ln_projection``, and the BERT text
stack (``git.embeddings``, ``git.encoder.layer.N``) onto a prefix
:class:`~mmgen_engine.models.bert.BertDecoder`; ``output`` is the LM head (tied to the word
embeddings only with ``tie_word_embeddings``). Video GIT (``num_image_with_embedding``) is not
supported. Generation starts from ``bos_token_id`` ([CLS], 101) and stops at ``eos_token_id``
([SEP], 102). Preprocessing is CLIPImageProcessor's (shortest edge, center crop, CLIP mean/std). The generation
defaults come from ``generation_config.json`` (or, in older exports, the generation fields of
``config.json``; see :func:`~.hf_towers.generation_defaults`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from . import hf
from .hf_towers import (
    GIT_VISION_DEFAULTS,
    bert_config,
    bert_decoder_rules,
    clip_vision_rules,
    generation_defaults,
    generation_sources,
    hf_generation,
    image_preprocess,
    model_type,
    processor_files,
    read_config,
    settings,
    tied_copy,
    token_id,
    vit_config,
)
from .keymap import apply_rules, check_config, finish, header, rule

NAME = "hf-git"

TEXT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", max_position_embeddings=1024, layer_norm_eps=1e-12,
                     pad_token_id=0, tie_word_embeddings=False, bos_token_id=101, eos_token_id=102)
IGNORED = [r".*\.position_ids"]


def detect(src: Path) -> bool:
    return model_type(src) == "git"


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, files to copy)``; never unpickles."""
    top, where = read_config(src, "git")
    if top.get("num_image_with_embedding") is not None:
        raise ConversionError(f"{where}: video GIT (num_image_with_embedding) is not supported")
    vision = settings(top.get("vision_config"), GIT_VISION_DEFAULTS, where + ": vision_config")
    text = settings(top, TEXT_DEFAULTS, where)
    tied = bool(text["tie_word_embeddings"])
    encoder = vit_config(vision, where, clip=True)
    decoder = bert_config(text, where, None, head_transform=False, tied=tied)
    sources = generation_sources(src, text)
    eos = token_id(sources, "eos_token_id", where)
    generation = {"decoder_start_token_id": token_id(sources, "bos_token_id", where), "eos_token_id": eos,
                  "pad_token_id": token_id(sources, "pad_token_id", where, default=eos)}
    config = {**header("captioning", "git", NAME, dtype),
              "encoder": encoder, "decoder": decoder, "generation": generation,
              "preprocess": image_preprocess(src / "preprocessor_config.json", "CLIPImageProcessor")}
    defaults = generation_defaults(*hf_generation(src, top))
    if defaults:
        config["generation_defaults"] = defaults
    check_config(config, where)  # consistent before any weight is read

    tensors = hf.read_weights(src)
    projection = "git.visual_projection.visual_projection."
    rules = [*clip_vision_rules("git.image_encoder.vision_model."), *bert_decoder_rules("git.", cross=False),
             rule("projection.weight", projection + "0.weight"), rule("projection.bias", projection + "0.bias"),
             rule("ln_projection.weight", projection + "1.weight"), rule("ln_projection.bias", projection + "1.bias"),
             rule("decoder.lm_bias", "output.bias")]
    if tied:
        tied_copy(tensors, "output.weight", "git.embeddings.word_embeddings.weight", str(src))
    else:
        rules.append(rule("decoder.lm_head", "output.weight"))
    out = apply_rules(rules, tensors, {"enc": encoder["num_layers"], "dec": decoder["num_layers"]}, IGNORED,
                      where=str(src))
    config, out = finish(config, out, dtype, str(src))
    return config, out, processor_files(src, workdir)
