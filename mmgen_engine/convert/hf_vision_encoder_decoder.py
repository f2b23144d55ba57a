"""Converter ``hf-vision-encoder-decoder``: HF ``VisionEncoderDecoderModel`` (ViT + GPT-2) -> ``vit-gpt2``.

Accepts both key-name generations of transformers: v4 (``encoder.encoder.layer.N.attention.attention
.query``, ...) and v5 (``encoder.layers.N.attention.q_proj``, ...); v4 names are first renamed to v5,
then one declarative map builds the engine tensors. GPT-2 ``Conv1D`` weights are ``[in, out]`` and
get transposed; q/k/v are fused; the LM head tied to ``wte`` (and usually not saved) is dropped;
``enc_to_dec_proj`` exists exactly when the encoder and decoder widths differ. The generation
defaults come from ``generation_config.json`` (or, in older exports, the generation fields of
``config.json`` and its decoder config; see :func:`~.hf_towers.generation_defaults`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from . import hf
from .hf_towers import (
    activation,
    generation_defaults,
    generation_sources,
    gpt2_decoder_rules,
    hf_generation,
    image_preprocess,
    model_type,
    processor_files,
    require,
    token_id,
)
from .keymap import apply_rules, check_config, concat, finish, flatten_conv, header, rename_keys, rule, squeeze_leading

NAME = "hf-vision-encoder-decoder"

# transformers v4 ViT names -> v5 names (order matters: attention.output before output)
V4_TO_V5 = [
    (r"^encoder\.encoder\.layer\.(\d+)\.", r"encoder.layers.\1."),
    (r"^(encoder\.layers\.\d+)\.attention\.attention\.query\.", r"\1.attention.q_proj."),
    (r"^(encoder\.layers\.\d+)\.attention\.attention\.key\.", r"\1.attention.k_proj."),
    (r"^(encoder\.layers\.\d+)\.attention\.attention\.value\.", r"\1.attention.v_proj."),
    (r"^(encoder\.layers\.\d+)\.attention\.output\.dense\.", r"\1.attention.o_proj."),
    (r"^(encoder\.layers\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"^(encoder\.layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]

ENC = "encoder.layers.{i}."


def _rules(qkv_bias: bool, proj: bool, tied: bool):
    rules = [
        rule("encoder.patch_embed.weight", "encoder.embeddings.patch_embeddings.projection.weight",
             transform=flatten_conv),
        rule("encoder.patch_embed.bias", "encoder.embeddings.patch_embeddings.projection.bias"),
        rule("encoder.cls_token", "encoder.embeddings.cls_token", transform=squeeze_leading),
        rule("encoder.pos_embed", "encoder.embeddings.position_embeddings", transform=squeeze_leading),
        rule("encoder.layers.{i}.ln1.weight", ENC + "layernorm_before.weight", layers="enc"),
        rule("encoder.layers.{i}.ln1.bias", ENC + "layernorm_before.bias", layers="enc"),
        rule("encoder.layers.{i}.attn.qkv.weight", *(ENC + f"attention.{p}_proj.weight" for p in "qkv"),
             transform=concat, layers="enc"),
        rule("encoder.layers.{i}.attn.out.weight", ENC + "attention.o_proj.weight", layers="enc"),
        rule("encoder.layers.{i}.attn.out.bias", ENC + "attention.o_proj.bias", layers="enc"),
        rule("encoder.layers.{i}.ln2.weight", ENC + "layernorm_after.weight", layers="enc"),
        rule("encoder.layers.{i}.ln2.bias", ENC + "layernorm_after.bias", layers="enc"),
        rule("encoder.layers.{i}.mlp.fc1.weight", ENC + "mlp.fc1.weight", layers="enc"),
        rule("encoder.layers.{i}.mlp.fc1.bias", ENC + "mlp.fc1.bias", layers="enc"),
        rule("encoder.layers.{i}.mlp.fc2.weight", ENC + "mlp.fc2.weight", layers="enc"),
        rule("encoder.layers.{i}.mlp.fc2.bias", ENC + "mlp.fc2.bias", layers="enc"),
        rule("encoder.ln_f.weight", "encoder.layernorm.weight"),
        rule("encoder.ln_f.bias", "encoder.layernorm.bias"),
        *gpt2_decoder_rules("decoder.transformer.", cross=True),
    ]
    if qkv_bias:
        rules.append(rule("encoder.layers.{i}.attn.qkv.bias", *(ENC + f"attention.{p}_proj.bias" for p in "qkv"),
                          transform=concat, layers="enc"))
    if proj:
        rules += [rule("enc_to_dec.weight", "enc_to_dec_proj.weight"), rule("enc_to_dec.bias", "enc_to_dec_proj.bias")]
    if not tied:
        rules.append(rule("decoder.lm_head", "decoder.lm_head.weight"))
    return rules


# tensors that exist in the source but play no part in captioning
IGNORED = [r"encoder\.pooler\..*", r"decoder\.transformer\.h\.\d+\.(attn|crossattention)\.(masked_)?bias"]


def detect(src: Path) -> bool:
    return model_type(src) == "vision-encoder-decoder"


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, files to copy)`` for the checkpoint writer (never unpickles:
    ``trust_pickle`` is not needed by this format)."""
    if not src.is_dir():
        raise ConversionError(f"{src}: expected a Hugging Face model directory")
    top = hf.read_json(src / "config.json")
    where = str(src / "config.json")
    enc, dec = top.get("encoder"), top.get("decoder")
    if not isinstance(enc, dict) or not isinstance(dec, dict):
        raise ConversionError(f"{where}: expected \"encoder\" and \"decoder\" objects")
    if enc.get("model_type") != "vit" or dec.get("model_type") != "gpt2":
        raise ConversionError(f"{where}: unsupported VisionEncoderDecoder of {enc.get('model_type')!r} + "
                              f"{dec.get('model_type')!r}; supported: vit + gpt2")
    if not dec.get("add_cross_attention", False):
        raise ConversionError(f"{where}: decoder has no cross-attention (add_cross_attention is false)")
    d_enc, d_dec = require(enc, "hidden_size", where), require(dec, "n_embd", where)
    cross_width = dec.get("cross_attention_hidden_size")
    if cross_width not in (None, d_dec):
        raise ConversionError(f"{where}: cross_attention_hidden_size {cross_width} is not supported for GPT-2")
    proj = d_enc != d_dec and cross_width is None
    sources = generation_sources(src, top, dec)
    eos = token_id(sources, "eos_token_id", where)
    start = token_id(sources, "decoder_start_token_id", where, default=-1)
    generation = {"decoder_start_token_id": start if start >= 0 else token_id(sources, "bos_token_id", where),
                  "eos_token_id": eos, "pad_token_id": token_id(sources, "pad_token_id", where, default=eos)}
    encoder = {"hidden_size": d_enc, "num_layers": require(enc, "num_hidden_layers", where),
               "num_heads": require(enc, "num_attention_heads", where),
               "intermediate_size": require(enc, "intermediate_size", where),
               "image_size": require(enc, "image_size", where), "patch_size": require(enc, "patch_size", where),
               "num_channels": enc.get("num_channels", 3),
               "layer_norm_eps": enc.get("layer_norm_eps", 1e-12),
               "activation": activation(enc.get("hidden_act", "gelu"), where),
               "qkv_bias": enc.get("qkv_bias", True)}
    tied = dec.get("tie_word_embeddings", True)
    decoder = {"vocab_size": require(dec, "vocab_size", where), "hidden_size": d_dec,
               "num_layers": require(dec, "n_layer", where), "num_heads": require(dec, "n_head", where),
               "intermediate_size": dec.get("n_inner") or 4 * d_dec,
               "max_positions": require(dec, "n_positions", where),
               "layer_norm_eps": dec.get("layer_norm_epsilon", 1e-5),
               "activation": activation(dec.get("activation_function", "gelu_new"), where),
               "scale_attn_weights": dec.get("scale_attn_weights", True),
               "scale_attn_by_inverse_layer_idx": dec.get("scale_attn_by_inverse_layer_idx", False),
               "tie_word_embeddings": tied}

    config = {**header("captioning", "vit-gpt2", NAME, dtype),
              "encoder": encoder, "decoder": decoder, "generation": generation,
              "preprocess": image_preprocess(src / "preprocessor_config.json", "ViTImageProcessor"),
              "enc_to_dec_proj": proj}
    defaults = generation_defaults(*hf_generation(src, top, dec))
    if defaults:
        config["generation_defaults"] = defaults
    check_config(config, where)  # consistent before any weight is read

    tensors = rename_keys(hf.read_weights(src), V4_TO_V5)
    if tied and "decoder.lm_head.weight" in tensors:
        lm_head = tensors.pop("decoder.lm_head.weight")
        wte = tensors.get("decoder.transformer.wte.weight")
        if wte is None or lm_head.shape != wte.shape or not bool((lm_head == wte).all()):
            raise ConversionError(f"{src}: decoder.lm_head.weight differs from wte although "
                                  f"tie_word_embeddings is true")
    out = apply_rules(_rules(encoder["qkv_bias"], proj, tied), tensors,
                      {"enc": encoder["num_layers"], "dec": decoder["num_layers"]}, IGNORED, where=str(src))
    config, out = finish(config, out, dtype, str(src))
    return config, out, processor_files(src, workdir)
