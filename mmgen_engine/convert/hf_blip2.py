"""Converter ``hf-blip2``: HF ``Blip2ForConditionalGeneration`` with an OPT language model ->
``blip2`` (captioning).

The vision model (``vision_model.*``, BLIP's layout: fused ``qkv``, ``projection``) maps onto the
engine ViT; the Q-Former (``query_tokens``, ``qformer.layernorm``, ``qformer.encoder.layer.N``)
onto :class:`~mmgen_engine.models.blip2.QFormerLayer` s with q/k/v and cross k/v fused, the query
path's MLP (``intermediate_query`` / ``output_query``) as the layer's MLP; the text path's MLP
(``intermediate`` / ``output``, present with ``use_qformer_text_input``) plays no part in
captioning and is dropped. ``language_projection`` becomes ``projection``; the OPT language model
(``language_model.model.decoder.*``) maps onto :class:`~mmgen_engine.models.opt.OPTDecoder` with
q/k/v fused and OPT's two offset rows cut from the position table; ``language_model.lm_head`` is
tied to the token embeddings unless ``text_config.tie_word_embeddings`` is false.

Supported OPT variants: pre-LayerNorm (``do_layer_norm_before``: every published OPT but 350m, all
of BLIP-2's) with biases, affine LayerNorms and the final LayerNorm; a BLIP-2 whose language model is
not OPT (Flan-T5) is refused with one line. Generation follows ``Blip2ForConditionalGeneration.
generate``: the queries, then ``text_config.bos_token_id`` (OPT's ``</s>``) and the prompt; stop at
``text_config.eos_token_id``, pad with its ``pad_token_id``. That ``generate`` runs the language
model's own ``generate``, whose settings come from ``text_config`` alone: the checkpoint's
``generation_config.json`` plays no part there, so none is converted (the engine's built-in
defaults, greedy and 20 new tokens, are what transformers' call without arguments does).
Preprocessing is BlipImageProcessor's; the tokenizer OPT's byte-level BPE (``tokenizer.json``, or
``vocab.json`` + ``merges.txt``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from . import hf
from .hf_towers import (
    BLIP_VISION_DEFAULTS,
    activation,
    blip_vision_rules,
    image_preprocess,
    model_type,
    processor_files,
    read_config,
    settings,
    tied_copy,
    token_id,
    vit_config,
)
from .keymap import apply_rules, check_config, concat, finish, header, rule, squeeze_leading

NAME = "hf-blip2"

VISION_DEFAULTS = {**BLIP_VISION_DEFAULTS, "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                   "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6,
                   "qkv_bias": True}
QFORMER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        hidden_act="gelu", layer_norm_eps=1e-12, cross_attention_frequency=2,
                        encoder_hidden_size=1408)
OPT_DEFAULTS = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                    max_position_embeddings=2048, do_layer_norm_before=True, _remove_final_layer_norm=False,
                    word_embed_proj_dim=None, num_attention_heads=12, activation_function="relu", pad_token_id=1,
                    bos_token_id=2, eos_token_id=2, enable_bias=True, layer_norm_elementwise_affine=True,
                    tie_word_embeddings=True)
OPT_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding reads row position + 2
LM = "language_model."
OPT = LM + "model.decoder."
QF = "qformer."
# buffers older checkpoints saved; the Q-Former's text path (use_qformer_text_input), unused in captioning
IGNORED = [r".*\.position_ids", r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*", r"qformer\.embeddings\..*"]


def detect(src: Path) -> bool:
    return model_type(src) == "blip-2"


def opt_config(text: dict, where: str) -> dict:
    """The engine OPTConfig of an HF OPT config (read over :data:`OPT_DEFAULTS`); post-LN OPT (350m) and
    bias-free or non-affine variants are refused."""
    unsupported = [("do_layer_norm_before", False, "post-LayerNorm OPT (opt-350m)"),
                   ("_remove_final_layer_norm", True, "OPT without its final LayerNorm"),
                   ("enable_bias", False, "OPT without biases (enable_bias false)"),
                   ("layer_norm_elementwise_affine", False, "OPT with non-affine LayerNorms")]
    for key, bad, what in unsupported:
        if bool(text[key]) == bad:
            raise ConversionError(f"{where}: {what} is not supported (supported: pre-LayerNorm OPT with biases, "
                                  f"every published size but 350m)")
    act = text["activation_function"]
    embed = text["word_embed_proj_dim"]
    return {"vocab_size": text["vocab_size"], "hidden_size": text["hidden_size"],
            "num_layers": text["num_hidden_layers"], "num_heads": text["num_attention_heads"],
            "intermediate_size": text["ffn_dim"], "max_positions": text["max_position_embeddings"],
            "layer_norm_eps": 1e-5, "activation": "relu" if act == "relu" else activation(act, where),
            "word_embed_proj_dim": None if embed in (None, text["hidden_size"]) else embed,
            "tie_word_embeddings": bool(text["tie_word_embeddings"])}


def opt_decoder_rules(prefix: str, decoder: dict) -> list:
    """HF ``OPTDecoder`` under ``prefix`` (ending in ``decoder.``) -> ``decoder.*`` (the LM head is
    the caller's)."""
    layer = prefix + "layers.{i}."
    rules = [rule("decoder.wte", prefix + "embed_tokens.weight"),
             rule("decoder.wpe", prefix + "embed_positions.weight", transform=lambda t: t[OPT_POSITION_OFFSET:]),
             rule("decoder.ln_f.weight", prefix + "final_layer_norm.weight"),
             rule("decoder.ln_f.bias", prefix + "final_layer_norm.bias")]
    if decoder["word_embed_proj_dim"] is not None:
        rules += [rule("decoder.project_in.weight", prefix + "project_in.weight"),
                  rule("decoder.project_out.weight", prefix + "project_out.weight")]
    pairs = [("attn.out", "self_attn.out_proj"), ("ln1", "self_attn_layer_norm"), ("ln2", "final_layer_norm"),
             ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")]
    for p in ("weight", "bias"):
        rules.append(rule(f"decoder.layers.{{i}}.attn.qkv.{p}", *(layer + f"self_attn.{x}_proj.{p}" for x in "qkv"),
                          transform=concat, layers="dec"))
        rules += [rule(f"decoder.layers.{{i}}.{dst}.{p}", layer + f"{src}.{p}", layers="dec") for dst, src in pairs]
    return rules


def qformer_rules(num_layers: int, frequency: int) -> list:
    """The Q-Former's query path -> ``query_tokens``, ``ln_query``, ``qformer.N.*``."""
    rules = [rule("query_tokens", "query_tokens", transform=squeeze_leading),
             rule("ln_query.weight", QF + "layernorm.weight"), rule("ln_query.bias", QF + "layernorm.bias")]
    for i in range(num_layers):
        src, dst = f"{QF}encoder.layer.{i}.", f"qformer.{i}."
        blocks = [("attn", "attention", False)] + ([("cross", "crossattention", True)] if i % frequency == 0 else [])
        for p in ("weight", "bias"):
            for name, upstream, cross in blocks:
                heads = src + upstream + ".attention."
                if cross:
                    rules += [rule(f"{dst}cross.q.{p}", heads + f"query.{p}"),
                              rule(f"{dst}cross.kv.{p}", heads + f"key.{p}", heads + f"value.{p}", transform=concat)]
                else:
                    rules.append(rule(f"{dst}attn.qkv.{p}", *(heads + f"{x}.{p}" for x in ("query", "key", "value")),
                                      transform=concat))
                rules += [rule(f"{dst}{name}.out.{p}", src + upstream + f".output.dense.{p}"),
                          rule(f"{dst}ln_{name}.{p}", src + upstream + f".output.LayerNorm.{p}")]
            rules += [rule(f"{dst}mlp.fc1.{p}", src + f"intermediate_query.dense.{p}"),
                      rule(f"{dst}mlp.fc2.{p}", src + f"output_query.dense.{p}"),
                      rule(f"{dst}ln_mlp.{p}", src + f"output_query.LayerNorm.{p}")]
    return rules


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, files to copy)``; never unpickles."""
    top, where = read_config(src, "blip-2")
    archs = top.get("architectures") or ["Blip2ForConditionalGeneration"]
    if "Blip2ForConditionalGeneration" not in archs:
        raise ConversionError(f"{where}: {archs} is not a BLIP-2 captioning model (Blip2ForConditionalGeneration); "
                              f"retrieval and feature-extraction heads are not supported")
    raw_text = top.get("text_config") or {}
    kind = raw_text.get("model_type", "opt") if isinstance(raw_text, dict) else "opt"  # a non-object: settings()
    if kind != "opt":
        raise ConversionError(f"{where}: BLIP-2 with a {kind!r} language model is not supported; supported: BLIP-2 "
                              f"with an OPT language model (text_config.model_type 'opt', e.g. blip2-opt-2.7b)")
    text = settings(raw_text, OPT_DEFAULTS, where + ": text_config")
    vision = settings(top.get("vision_config"), VISION_DEFAULTS, where + ": vision_config")
    qf = settings(top.get("qformer_config"), QFORMER_DEFAULTS, where + ": qformer_config")
    encoder = {**vit_config(vision, where, clip=False), "qkv_bias": bool(vision["qkv_bias"])}
    decoder = opt_config(text, where + ": text_config")
    qformer = {"hidden_size": qf["hidden_size"], "num_layers": qf["num_hidden_layers"],
               "num_heads": qf["num_attention_heads"], "intermediate_size": qf["intermediate_size"],
               "num_query_tokens": top.get("num_query_tokens", 32), "encoder_hidden_size": qf["encoder_hidden_size"],
               "cross_attention_frequency": qf["cross_attention_frequency"], "layer_norm_eps": qf["layer_norm_eps"],
               "activation": activation(qf["hidden_act"], where + ": qformer_config")}
    # Blip2ForConditionalGeneration.generate runs the language model's generate, whose generation
    # config comes from text_config: generation_config.json (the top level's) plays no part
    generation = {name: token_id([text], key, where + ": text_config") for name, key in
                  (("decoder_start_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                   ("pad_token_id", "pad_token_id"))}
    config = {**header("captioning", "blip2", NAME, dtype),
              "encoder": encoder, "decoder": decoder, "generation": generation, "qformer": qformer,
              "preprocess": image_preprocess(src / "preprocessor_config.json", "BlipImageProcessor")}
    check_config(config, where)  # consistent before any weight is read

    tensors = hf.read_weights(src)
    vision_rules = blip_vision_rules("vision_model.")
    if not encoder["qkv_bias"]:
        vision_rules = [r for r in vision_rules if not r.target.endswith("attn.qkv.bias")]
    rules = [*vision_rules, *qformer_rules(qformer["num_layers"], qformer["cross_attention_frequency"]),
             rule("projection.weight", "language_projection.weight"),
             rule("projection.bias", "language_projection.bias"), *opt_decoder_rules(OPT, decoder)]
    if decoder["tie_word_embeddings"]:
        tied_copy(tensors, LM + "lm_head.weight", OPT + "embed_tokens.weight", str(src))
    else:
        rules.append(rule("decoder.lm_head", LM + "lm_head.weight"))
    out = apply_rules(rules, tensors, {"enc": encoder["num_layers"], "dec": decoder["num_layers"]}, IGNORED,
                      where=str(src))
    config, out = finish(config, out, dtype, str(src))
    return config, out, processor_files(src, workdir)
