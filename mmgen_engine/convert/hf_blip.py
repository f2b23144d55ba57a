"""Converter ``hf-blip``: HF ``BlipForConditionalGeneration`` -> ``blip`` (captioning).

The vision model (fused ``qkv`` already) maps onto the engine ViT; the text decoder
(``text_decoder.bert.*``, post-LN BERT with cross-attention to the vision states, which may be wider
than the text) onto :class:`~mmgen_engine.models.bert.BertDecoder`, with q/k/v and cross k/v fused.
The LM head keeps BERT's transform (dense + activation + LayerNorm); its projection and bias
(``cls.predictions.decoder``) are tied to the word embeddings and ``cls.predictions.bias`` and usually
not saved (a saved copy must equal them). With ``tie_word_embeddings`` false the decoder's own weight
and bias are the head, as in transformers, and ``cls.predictions.bias`` plays no part. Generation follows
``BlipForConditionalGeneration.generate``: start from ``text_config.bos_token_id`` ([DEC], 30522),
stop at ``sep_token_id`` ([SEP], 102), pad with ``pad_token_id``. Preprocessing is
BlipImageProcessor's (384x384 bicubic, CLIP mean/std); the tokenizer is BERT's WordPiece. The
generation defaults come from ``generation_config.json`` (or, in older exports, the generation fields
of ``config.json`` and its ``text_config``; see :func:`~.hf_towers.generation_defaults`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from . import hf
from .hf_towers import (
    BLIP_VISION_DEFAULTS,
    bert_config,
    bert_decoder_rules,
    blip_vision_rules,
    generation_defaults,
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

NAME = "hf-blip"

TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                     bos_token_id=30522, pad_token_id=0, sep_token_id=102, tie_word_embeddings=True)
TEXT = "text_decoder.bert."
HEAD = "text_decoder.cls.predictions."
# buffers older checkpoints saved
IGNORED = [r".*\.position_ids"]


def detect(src: Path) -> bool:
    return model_type(src) == "blip"


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, files to copy)``; never unpickles."""
    top, where = read_config(src, "blip")
    archs = top.get("architectures") or ["BlipForConditionalGeneration"]
    if "BlipForConditionalGeneration" not in archs:
        raise ConversionError(f"{where}: {archs} is not a BLIP captioning model (BlipForConditionalGeneration); "
                              f"question answering and retrieval heads are not supported")
    vision = settings(top.get("vision_config"), BLIP_VISION_DEFAULTS, where + ": vision_config")
    text = settings(top.get("text_config"), TEXT_DEFAULTS, where + ": text_config")
    tied = bool(text["tie_word_embeddings"]) and bool(top.get("tie_word_embeddings", True))
    encoder = vit_config(vision, where, clip=False)
    # BlipConfig sets the text decoder's cross-attention width to the vision width
    decoder = bert_config(text, where, vision["hidden_size"], head_transform=True, tied=tied)
    sources = [text]
    generation = {"decoder_start_token_id": token_id(sources, "bos_token_id", where),
                  "eos_token_id": token_id(sources, "sep_token_id", where),
                  "pad_token_id": token_id(sources, "pad_token_id", where)}
    config = {**header("captioning", "blip", NAME, dtype),
              "encoder": encoder, "decoder": decoder, "generation": generation,
              "preprocess": image_preprocess(src / "preprocessor_config.json", "BlipImageProcessor")}
    defaults = generation_defaults(*hf_generation(src, top, top.get("text_config")))
    if defaults:
        config["generation_defaults"] = defaults
    check_config(config, where)  # consistent before any weight is read

    tensors = hf.read_weights(src)
    if tied:
        tied_copy(tensors, HEAD + "decoder.bias", HEAD + "bias", str(src))
        tied_copy(tensors, HEAD + "decoder.weight", TEXT + "embeddings.word_embeddings.weight", str(src))
    rules = [*blip_vision_rules("vision_model."), *bert_decoder_rules(TEXT, cross=True),
             rule("decoder.head_dense.weight", HEAD + "transform.dense.weight"),
             rule("decoder.head_dense.bias", HEAD + "transform.dense.bias"),
             rule("decoder.ln_head.weight", HEAD + "transform.LayerNorm.weight"),
             rule("decoder.ln_head.bias", HEAD + "transform.LayerNorm.bias")]
    if tied:
        rules.append(rule("decoder.lm_bias", HEAD + "bias"))
    else:
        rules += [rule("decoder.lm_head", HEAD + "decoder.weight"), rule("decoder.lm_bias", HEAD + "decoder.bias")]
    ignored = IGNORED if tied else [*IGNORED, HEAD.replace(".", r"\.") + "bias"]  # unused by an untied head
    out = apply_rules(rules, tensors, {"enc": encoder["num_layers"], "dec": decoder["num_layers"]}, ignored,
                      where=str(src))
    config, out = finish(config, out, dtype, str(src))
    return config, out, processor_files(src, workdir)
