"""Converter ``hf-llava``: HF ``LlavaForConditionalGeneration`` (LLaVA-1.5) -> ``llava`` (captioning).

The CLIP vision tower (``vision_tower.*``) maps onto the engine ViT without its final
LayerNorm and without the blocks after the deepest ``vision_feature_layer`` (LLaVA reads an inner
block's states: -2, the next to last, by default), the projector (``multi_modal_projector.linear_1``,
``linear_2``) onto ``linear_1`` / ``linear_2``, and the LLaMA language model onto
:class:`~mmgen_engine.models.llama.LlamaDecoder` (q/k/v fused into ``qkv``, gate/up into
``gate_up``; ``lm_head``, or the tied token embeddings). Both key layouts are read: transformers
v4's (``language_model.model.*``, ``language_model.lm_head``, what the hub's llava-hf checkpoints
hold), v5's ``save_pretrained`` output and v5's module names (``model.language_model.*``, ``lm_head``).

Supported: a ``llama`` text model with the SiLU MLP and the rope kinds ``default``, ``linear`` and
``llama3``; ``vision_feature_layer`` an index or a list; the "default" (CLS dropped) and "full"
feature strategies. The preprocessing is CLIPImageProcessor's, or LlavaImageProcessor's with its
pad-to-square (``do_pad``). Generation starts from ``bos_token_id``; the tokenizer is the model's
``tokenizer.json``, which must know the ``<image>`` token.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConversionError
from . import hf
from .hf_towers import (
    CLIP_VISION_DEFAULTS,
    activation,
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
from .keymap import apply_rules, check_config, concat, finish, header, rename_keys, rule, same

NAME = "hf-llava"

# transformers' LlavaConfig / LlamaConfig defaults (llava-1.5-7b shapes)
TOP_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
                    vision_feature_layer=-2, multimodal_projector_bias=True, tie_word_embeddings=False)
VISION_DEFAULTS = {**CLIP_VISION_DEFAULTS, "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14,
                   "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}
TEXT_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                     hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, attention_bias=False,
                     mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
ROPE_KINDS = ("default", "linear", "llama3")
# the key names of transformers v4 (the hub's llava-hf checkpoints: ``vision_tower.vision_model.*``,
# ``language_model.model.*``) and of v5's save_pretrained (``vision_tower.*``) -> v5's module names
RENAMES = [(r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
           (r"^(model\.)?vision_tower\.(vision_model\.)?", "model.vision_tower."),
           (r"^multi_modal_projector\.", "model.multi_modal_projector.")]
VISION = "model.vision_tower."
PROJECTOR = "model.multi_modal_projector."
TEXT = "model.language_model."
PROCESSORS = ("CLIPImageProcessor", "LlavaImageProcessor")


def detect(src: Path) -> bool:
    return model_type(src) == "llava"


def rope_config(text: dict, where: str) -> dict:
    """The engine RopeConfig of a LlamaConfig: v5's ``rope_parameters`` or v4's ``rope_scaling`` +
    ``rope_theta``; kinds other than default, linear and llama3 are refused."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConversionError(f"{where}: rope_parameters must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise ConversionError(f"{where}: rope type {kind!r} is not supported (supported: {', '.join(ROPE_KINDS)})")
    if params.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{where}: partial rotary embeddings (partial_rotary_factor) are not supported")
    out = {"kind": kind, "theta": float(params.get("rope_theta", text["rope_theta"]))}
    if kind != "default":
        out["factor"] = float(params.get("factor", 1.0))
    if kind == "llama3":
        out.update(low_freq_factor=float(params.get("low_freq_factor", 0)),
                   high_freq_factor=float(params.get("high_freq_factor", 0)),
                   original_max_positions=params.get("original_max_position_embeddings",
                                                     text["max_position_embeddings"]))
    return out


def llama_config(text: dict, tied: bool, where: str) -> dict:
    """The engine LlamaConfig of a transformers LlamaConfig (``text_config``)."""
    if text["model_type"] != "llama":
        raise ConversionError(f"{where}: text model {text['model_type']!r} is not supported (supported: llama)")
    if text["hidden_act"] != "silu":
        raise ConversionError(f"{where}: hidden_act {text['hidden_act']!r} is not supported (LLaMA's silu)")
    heads = text["num_attention_heads"]
    return {"vocab_size": text["vocab_size"], "hidden_size": text["hidden_size"],
            "num_layers": text["num_hidden_layers"], "num_heads": heads,
            "num_kv_heads": text["num_key_value_heads"] or heads,
            "head_dim": text["head_dim"] or text["hidden_size"] // heads,
            "intermediate_size": text["intermediate_size"], "max_positions": text["max_position_embeddings"],
            "rms_norm_eps": text["rms_norm_eps"], "rope": rope_config(text, where),
            "attention_bias": bool(text["attention_bias"]), "mlp_bias": bool(text["mlp_bias"]),
            "tie_word_embeddings": tied}


def feature_layers(value, num_layers: int, where: str) -> list[int]:
    """``vision_feature_layer`` (an index into transformers' ``hidden_states``, which has
    ``num_layers + 1`` entries, or a list of them) as counts of blocks run."""
    indices = value if isinstance(value, list) else [value]
    out = []
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool) or not -(num_layers + 1) <= i <= num_layers:
            raise ConversionError(f"{where}: vision_feature_layer {value!r} must index the vision tower's "
                                  f"{num_layers + 1} hidden states")
        out.append(i % (num_layers + 1))
    return out


def preprocess(src: Path) -> dict:
    """CLIPImageProcessor's settings, or LlavaImageProcessor's with its pad-to-square."""
    path = src / "preprocessor_config.json"
    p = hf.read_json(path)
    kind = p.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
    if kind not in PROCESSORS:
        raise ConversionError(f"{path}: unsupported image processor {kind!r} ({' or '.join(PROCESSORS)} expected)")
    out = image_preprocess(path, kind)
    if kind == "LlavaImageProcessor" and p.get("do_pad", False):
        out["pad_to_square"] = True
    return out


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, files to copy)``; never unpickles."""
    top, where = read_config(src, "llava")
    top = settings(top, TOP_DEFAULTS, where)
    vision = settings(top.get("vision_config"), VISION_DEFAULTS, where + ": vision_config")
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConversionError(f"{where}: vision tower {vision['model_type']!r} is not supported (supported: "
                              f"clip_vision_model)")
    text = settings(top.get("text_config"), TEXT_DEFAULTS, where + ": text_config")
    tied = bool(top["tie_word_embeddings"] or text["tie_word_embeddings"])
    layers = feature_layers(top["vision_feature_layer"], vision["num_hidden_layers"], where)
    strategy = top["vision_feature_select_strategy"]
    if strategy not in ("default", "full"):
        raise ConversionError(f"{where}: vision_feature_select_strategy {strategy!r} is not supported "
                              f"(default or full)")
    encoder = {**vit_config(vision, where, clip=True), "num_layers": max(max(layers), 1), "final_norm": False}
    decoder = llama_config(text, tied, where + ": text_config")
    image_token = top.get("image_token_id", top["image_token_index"])
    llava = {"image_token_id": image_token, "feature_layers": layers, "keep_cls": strategy == "full",
             "projector_bias": bool(top["multimodal_projector_bias"]),
             "projector_activation": activation(top["projector_hidden_act"], where)}
    sources = generation_sources(src, text, top)
    eos = token_id(sources, "eos_token_id", where)
    generation = {"decoder_start_token_id": token_id(sources, "bos_token_id", where), "eos_token_id": eos,
                  "pad_token_id": token_id(sources, "pad_token_id", where, default=eos)}
    config = {**header("captioning", "llava", NAME, dtype), "encoder": encoder, "decoder": decoder,
              "generation": generation, "preprocess": preprocess(src), "llava": llava}
    defaults = generation_defaults(*hf_generation(src, top, text))
    if defaults:
        config["generation_defaults"] = defaults
    check_config(config, where)  # consistent before any weight is read

    tensors = rename_keys(hf.read_weights(src), RENAMES)
    projector = [PROJECTOR + f"linear_{n}.{p}" for n in (1, 2)
                 for p in (("weight", "bias") if llava["projector_bias"] else ("weight",))]
    missing = [name for name in projector if name not in tensors]
    if missing:
        raise ConversionError(f"{src}: the multi-modal projector is missing ({', '.join(missing)})")
    rules = [r for r in clip_vision_rules(VISION) if not r.target.startswith("encoder.ln_f.")]
    rules += [rule(f"linear_{n}.{p}", PROJECTOR + f"linear_{n}.{p}") for n in (1, 2)
              for p in (("weight", "bias") if llava["projector_bias"] else ("weight",))]
    rules += llama_decoder_rules(TEXT, decoder)
    if tied:
        tied_copy(tensors, "lm_head.weight", TEXT + "embed_tokens.weight", str(src))
    else:
        rules.append(rule("decoder.lm_head", "lm_head.weight"))
    # the tower's blocks after the deepest feature layer and its final LayerNorm are never run
    unused = "|".join(str(i) for i in range(encoder["num_layers"], vision["num_hidden_layers"]))
    ignored = [re.escape(VISION) + r"post_layernorm\..*", r".*\.position_ids"]
    if unused:
        ignored.append(re.escape(VISION) + rf"encoder\.layers\.({unused})\..*")
    out = apply_rules(rules, tensors, {"enc": encoder["num_layers"], "dec": decoder["num_layers"]}, ignored,
                      where=str(src))
    config, out = finish(config, out, dtype, str(src))
    return config, out, processor_files(src, workdir)


def llama_decoder_rules(prefix: str, decoder: dict) -> list:
    """A transformers ``LlamaModel`` under ``prefix`` -> ``decoder.*`` (the head is the caller's)."""
    layer = prefix + "layers.{i}."
    rules = [rule("decoder.wte", prefix + "embed_tokens.weight"), rule("decoder.norm.weight", prefix + "norm.weight"),
             rule("decoder.layers.{i}.rms1.weight", layer + "input_layernorm.weight", layers="dec"),
             rule("decoder.layers.{i}.rms2.weight", layer + "post_attention_layernorm.weight", layers="dec")]
    fused = [("attn.qkv", [f"self_attn.{x}_proj" for x in "qkv"], decoder["attention_bias"]),
             ("attn.out", ["self_attn.o_proj"], decoder["attention_bias"]),
             ("mlp.gate_up", ["mlp.gate_proj", "mlp.up_proj"], decoder["mlp_bias"]),
             ("mlp.down", ["mlp.down_proj"], decoder["mlp_bias"])]
    for dst, srcs, bias in fused:
        for p in ("weight", "bias") if bias else ("weight",):
            names = [layer + f"{s}.{p}" for s in srcs]
            rules.append(rule(f"decoder.layers.{{i}}.{dst}.{p}", *names, transform=concat if len(names) > 1 else same,
                              layers="dec"))
    return rules
