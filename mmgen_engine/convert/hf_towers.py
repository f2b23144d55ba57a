"""What several Hugging Face converters share: reading model configs with transformers' defaults,
image processor settings, and the key maps of the common towers (CLIP / BLIP vision, BERT text
decoder) onto the engine's :class:`~mmgen_engine.models.vit.ViTEncoder` and
:class:`~mmgen_engine.models.bert.BertDecoder`.

``hub`` configs often omit fields that equal transformers' defaults, so every config is read through
:func:`settings` with the defaults of the transformers class it came from.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..config import GenerationDefaults, from_dict
from ..errors import CheckpointError, ConversionError
from . import hf
from .keymap import concat, flatten_conv, rule, squeeze_leading, transpose

# transformers' activation names -> engine activation names
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}

# transformers' defaults of the config classes these converters read
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                            num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)
GIT_VISION_DEFAULTS = {**CLIP_VISION_DEFAULTS, "patch_size": 16}
BLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_channels=3, image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)


def model_type(src: Path) -> str | None:
    """``model_type`` of the HF directory ``src`` (None: not a readable HF directory), for ``detect``."""
    if not (src.is_dir() and (src / "config.json").is_file()):
        return None
    try:
        return hf.read_json(src / "config.json").get("model_type")
    except ConversionError:
        return None


def read_config(src: Path, expected: str) -> tuple[dict, str]:
    """``(config.json of the HF directory src, its path for messages)``; its model_type must be ``expected``."""
    if not src.is_dir():
        raise ConversionError(f"{src}: expected a Hugging Face model directory")
    where = str(src / "config.json")
    top = hf.read_json(src / "config.json")
    if top.get("model_type") != expected:
        raise ConversionError(f"{where}: model_type {top.get('model_type')!r} is not {expected!r}")
    return top, where


def settings(cfg, defaults: dict, where: str) -> dict:
    """``cfg`` (a config.json object) over ``defaults``; a non-object is an error."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConversionError(f"{where}: expected an object, got {cfg!r}")
    return {**defaults, **{k: v for k, v in cfg.items() if v is not None}}


def require(cfg: dict, key: str, where: str):
    """``cfg[key]``, which must be set."""
    value = cfg.get(key)
    if value is None:
        raise ConversionError(f"{where}: missing {key!r}")
    return value


def activation(name, where: str) -> str:
    if name not in ACTIVATIONS:
        raise ConversionError(f"{where}: unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def square(value, name: str, where: str) -> int:
    """An image or patch size given as an int or a square pair."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConversionError(f"{where}: {name} must be one integer (square images), got {value!r}")
    return value


def vit_config(v: dict, where: str, clip: bool) -> dict:
    """The engine ViTConfig of a BLIP (``clip`` False) or CLIP/GIT (``clip`` True) vision config."""
    return {"hidden_size": v["hidden_size"], "num_layers": v["num_hidden_layers"],
            "num_heads": v["num_attention_heads"], "intermediate_size": v["intermediate_size"],
            "image_size": square(v["image_size"], "image_size", where),
            "patch_size": square(v["patch_size"], "patch_size", where), "num_channels": v["num_channels"],
            "layer_norm_eps": v["layer_norm_eps"], "activation": activation(v["hidden_act"], where),
            "qkv_bias": True, "patch_bias": not clip, "pre_norm": clip}


def bert_config(text: dict, where: str, encoder_hidden_size: int | None, head_transform: bool,
                tied: bool) -> dict:
    """The engine BertConfig of a BERT-style text config (BLIP's text_config, GIT's top level)."""
    return {"vocab_size": text["vocab_size"], "hidden_size": text["hidden_size"],
            "num_layers": text["num_hidden_layers"], "num_heads": text["num_attention_heads"],
            "intermediate_size": text["intermediate_size"], "max_positions": text["max_position_embeddings"],
            "layer_norm_eps": text["layer_norm_eps"], "activation": activation(text["hidden_act"], where),
            "encoder_hidden_size": encoder_hidden_size, "head_transform": head_transform, "tie_word_embeddings": tied}


def token_id(sources: list[dict], key: str, where: str, default=None) -> int:
    """The first integer ``key`` among ``sources`` (a one-element list counts); ``default`` when none
    has it (None: an error)."""
    for s in sources:
        value = s.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if value is not None:
            raise ConversionError(f"{where}: {key} must be one integer, got {value!r}")
    if default is None:
        raise ConversionError(f"{where}: no {key} in config.json or generation_config.json")
    return default


# transformers' GenerationConfig fields the engine takes, with transformers' defaults: a value equal to
# its default is not written into the engine's generation_defaults block
HF_GENERATION_FIELDS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "num_beams": 1,
                        "length_penalty": 1.0, "early_stopping": False, "num_return_sequences": 1,
                        "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "max_new_tokens": None,
                        "max_length": 20, "min_new_tokens": None, "min_length": 0}
# GenerationConfig fields that change what generate() produces but that the engine does not take; a
# converted checkpoint ignores them (and the logits processors they stand for)
HF_GENERATION_UNSUPPORTED = ("num_beam_groups", "diversity_penalty", "penalty_alpha", "typical_p", "min_p",
                             "epsilon_cutoff", "eta_cutoff", "top_h", "encoder_repetition_penalty",
                             "bad_words_ids", "force_words_ids", "constraints", "forced_bos_token_id",
                             "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
                             "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits",
                             "remove_invalid_values", "guidance_scale", "watermarking_config", "max_time",
                             "stop_strings", "dola_layers", "assistant_model", "prompt_lookup_num_tokens")


def hf_generation(src: Path, top: dict, decoder: dict | None = None) -> tuple[dict, str]:
    """The generation settings (fields of :data:`HF_GENERATION_FIELDS` that are set) that
    transformers' ``generate`` uses for the HF model in ``src`` by default, and the file they come
    from, as ``from_pretrained`` finds them: ``generation_config.json`` alone when there is one (its
    fields left out are transformers' defaults); otherwise, for older exports, ``config.json``: its
    top-level fields, then for each field the top level leaves unset or at its default the
    ``decoder`` sub-config's (``GenerationConfig.from_model_config``)."""
    path = src / "generation_config.json"
    if path.is_file():
        gen = hf.read_json(path)
        return {k: gen[k] for k in HF_GENERATION_FIELDS if gen.get(k) is not None}, str(path)
    found = {k: top[k] for k in HF_GENERATION_FIELDS if top.get(k) is not None}
    for k, default in HF_GENERATION_FIELDS.items():
        if isinstance(decoder, dict) and decoder.get(k) is not None and found.get(k, default) == default:
            found[k] = decoder[k]
    return found, str(src / "config.json")


def _hf_value(settings: dict, name: str, where: str):
    """``settings[name]`` (transformers' default when absent), which must have the JSON type
    transformers gives the field."""
    value = settings.get(name, HF_GENERATION_FIELDS[name])
    integer = isinstance(value, int) and not isinstance(value, bool)
    real = name in ("temperature", "top_p", "length_penalty", "repetition_penalty")
    if name == "do_sample":
        ok, kind = isinstance(value, bool), "true or false"
    elif name == "early_stopping":
        ok, kind = isinstance(value, bool) or value == "never", 'true, false or "never"'
    elif real:
        ok, kind = integer or isinstance(value, float), "a number"
    else:
        ok, kind = integer or (value is None and HF_GENERATION_FIELDS[name] is None), "an integer"
    if not ok:
        raise ConversionError(f"{where}: {name} must be {kind}, got {value!r}")
    return float(value) if real else value


def generation_defaults(settings: dict, where: str) -> dict | None:
    """The engine's ``generation_defaults`` block (see :class:`~mmgen_engine.config.GenerationDefaults`)
    of transformers' generation ``settings`` (:func:`hf_generation`), with transformers' semantics:

    - ``do_sample`` true: sampling with ``temperature``, ``top_k`` (transformers' default 50 is
      written, the engine's default would be 0, all tokens) and ``top_p``; false: greedy, or beam
      search with ``num_beams > 1`` (``length_penalty``, ``early_stopping``, ``num_return_sequences``);
      ``repetition_penalty`` and ``no_repeat_ngram_size`` with either;
    - ``max_new_tokens``, else ``max_length`` (which counts the decoder prompt: the start token and any
      text prompt; the engine subtracts each call's prompt length, as transformers does); likewise
      ``min_new_tokens``, else ``min_length``.

    Values equal to transformers' defaults are not written (a missing ``max_length`` is transformers'
    20 positions; without a block the engine's built-in budget is 20 new tokens), nor are settings
    the mode ignores (a temperature without ``do_sample``). Beam sampling (``do_sample`` with
    ``num_beams > 1``) is converted as beam search and several sampled sequences per input
    (``num_return_sequences > 1`` without beams) as one, each with a warning. The fields of
    :data:`HF_GENERATION_UNSUPPORTED` (diverse beams, contrastive search, typical / min-p / epsilon /
    eta sampling, bad or forced words and tokens, suppressed tokens, sequence bias, length-decay
    penalty, classifier-free guidance, watermarking, stop strings, time limits, assisted decoding)
    are ignored. Returns None when nothing differs from the defaults."""
    v = {name: _hf_value(settings, name, where) for name in HF_GENERATION_FIELDS}
    default = HF_GENERATION_FIELDS
    sampling: dict = {}
    if v["do_sample"] and v["num_beams"] > 1:
        warnings.warn(f"{where}: beam sampling (do_sample with num_beams {v['num_beams']}) is not supported; "
                      f"converted as beam search", stacklevel=3)
        v["do_sample"] = False
    if v["do_sample"]:
        sampling.update(do_sample=True, top_k=v["top_k"])
        sampling.update({k: v[k] for k in ("temperature", "top_p") if v[k] != default[k]})
        if v["num_return_sequences"] > 1:
            warnings.warn(f"{where}: num_return_sequences {v['num_return_sequences']} sampled sequences per "
                          f"input are not supported without beams; converted as one", stacklevel=3)
    if v["num_beams"] > 1:
        sampling["num_beams"] = v["num_beams"]
        sampling.update({k: v[k] for k in ("length_penalty", "early_stopping", "num_return_sequences")
                         if v[k] != default[k]})
    sampling.update({k: v[k] for k in ("repetition_penalty", "no_repeat_ngram_size") if v[k] != default[k]})
    block = {"sampling": sampling} if sampling else {}
    for new, total in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
        if v[new] is not None:
            if v[new] != (0 if new == "min_new_tokens" else None):
                block[new] = v[new]
        elif v[total] != default[total]:
            block[total] = v[total]
    if not block:
        return None
    try:
        from_dict(GenerationDefaults, block, where=f"{where}: as generation_defaults")
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return block


def generation_sources(src: Path, *configs: dict) -> list[dict]:
    """``generation_config.json`` (if any) first, then the given config objects."""
    path = src / "generation_config.json"
    return [hf.read_json(path) if path.is_file() else {}, *configs]


# image processor class -> (default size, default crop size, default resample, mean, std)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PROCESSORS = {
    "ViTImageProcessor": ({"height": 224, "width": 224}, None, 2, [0.5] * 3, [0.5] * 3),
    "BlipImageProcessor": ({"height": 384, "width": 384}, None, 3, CLIP_MEAN, CLIP_STD),
    "CLIPImageProcessor": ({"shortest_edge": 224}, {"height": 224, "width": 224}, 3, CLIP_MEAN, CLIP_STD),
    "LlavaImageProcessor": ({"shortest_edge": 224}, {"height": 224, "width": 224}, 3, CLIP_MEAN, CLIP_STD),
}
ALIASES = {"ViTFeatureExtractor": "ViTImageProcessor", "CLIPFeatureExtractor": "CLIPImageProcessor"}


def image_preprocess(path: Path, expected: str) -> dict:
    """The engine ImagePreprocessConfig of the processor in ``path`` (``preprocessor_config.json``),
    which must be ``expected`` (a key of PROCESSORS) or one of its fast/PIL variants."""
    p = hf.read_json(path)
    kind = p.get("image_processor_type", p.get("feature_extractor_type", expected))
    kind = ALIASES.get(kind, kind.removesuffix("Fast").removesuffix("Pil"))
    if kind != expected:
        raise ConversionError(f"{path}: unsupported image processor {kind!r} ({expected} expected)")
    size, crop, resample, mean, std = PROCESSORS[kind]
    size, crop = p.get("size", size), p.get("crop_size", crop)
    if isinstance(size, int):  # old configs: one int, a square (ViT, BLIP) or the shortest edge (CLIP)
        size = {"shortest_edge": size} if crop else {"height": size, "width": size}
    out = {"resample": p.get("resample", resample), "do_resize": p.get("do_resize", True),
           "do_rescale": p.get("do_rescale", True), "rescale_factor": p.get("rescale_factor", 1 / 255),
           "do_normalize": p.get("do_normalize", True), "image_mean": p.get("image_mean", mean),
           "image_std": p.get("image_std", std)}
    if isinstance(size, dict) and set(size) == {"height", "width"} and not p.get("do_center_crop", False):
        return {"height": size["height"], "width": size["width"], **out}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if (isinstance(size, dict) and set(size) == {"shortest_edge"} and p.get("do_center_crop", True)
            and isinstance(crop, dict) and {"height", "width"} <= set(crop) and out["do_resize"]):
        return {"height": crop["height"], "width": crop["width"], "shortest_edge": size["shortest_edge"], **out}
    raise ConversionError(f"{path}: unsupported resize {size!r} with center crop "
                          f"{crop if p.get('do_center_crop') else None!r} (a fixed height x width, or a "
                          f"shortest edge followed by a center crop, expected)")


def processor_files(src: Path, workdir: Path) -> dict[str, Path]:
    """The files a converted HF captioner keeps: its tokenizer (as ``tokenizer.json``) and its image
    processor settings."""
    return {
        "tokenizer.json": hf.tokenizer_json(src, workdir),
        "preprocessor_config.json": src / "preprocessor_config.json",
    }


def clip_vision_rules(prefix: str) -> list:
    """CLIP's vision tower (``CLIPVisionModel``, GIT's image encoder) under ``prefix`` (ending in
    ``vision_model.``) -> ``encoder.*``."""
    layer = prefix + "encoder.layers.{i}."
    return [
        rule("encoder.patch_embed.weight", prefix + "embeddings.patch_embedding.weight", transform=flatten_conv),
        rule("encoder.cls_token", prefix + "embeddings.class_embedding", transform=squeeze_leading),
        rule("encoder.pos_embed", prefix + "embeddings.position_embedding.weight"),
        rule("encoder.ln_pre.weight", prefix + "pre_layrnorm.weight"),
        rule("encoder.ln_pre.bias", prefix + "pre_layrnorm.bias"),
        *(rule(f"encoder.layers.{{i}}.attn.qkv.{p}", *(layer + f"self_attn.{x}_proj.{p}" for x in "qkv"),
               transform=concat, layers="enc") for p in ("weight", "bias")),
        *_vision_block_rules(layer, "self_attn.out_proj"),
        rule("encoder.ln_f.weight", prefix + "post_layernorm.weight"),
        rule("encoder.ln_f.bias", prefix + "post_layernorm.bias"),
    ]


def blip_vision_rules(prefix: str) -> list:
    """BLIP's vision model under ``prefix`` (``vision_model.``) -> ``encoder.*``."""
    layer = prefix + "encoder.layers.{i}."
    return [
        rule("encoder.patch_embed.weight", prefix + "embeddings.patch_embedding.weight", transform=flatten_conv),
        rule("encoder.patch_embed.bias", prefix + "embeddings.patch_embedding.bias"),
        rule("encoder.cls_token", prefix + "embeddings.class_embedding", transform=squeeze_leading),
        rule("encoder.pos_embed", prefix + "embeddings.position_embedding", transform=squeeze_leading),
        *(rule(f"encoder.layers.{{i}}.attn.qkv.{p}", layer + f"self_attn.qkv.{p}", layers="enc")
          for p in ("weight", "bias")),
        *_vision_block_rules(layer, "self_attn.projection"),
        rule("encoder.ln_f.weight", prefix + "post_layernorm.weight"),
        rule("encoder.ln_f.bias", prefix + "post_layernorm.bias"),
    ]


def _vision_block_rules(layer: str, out_proj: str) -> list:
    pairs = [("attn.out", out_proj), ("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"),
             ("mlp.fc2", "mlp.fc2")]
    return [rule(f"encoder.layers.{{i}}.{dst}.{p}", layer + f"{src}.{p}", layers="enc")
            for dst, src in pairs for p in ("weight", "bias")]


def bert_decoder_rules(prefix: str, cross: bool) -> list:
    """A BERT text stack under ``prefix`` (``embeddings.*``, ``encoder.layer.N.*``) -> ``decoder.*``
    (the head is the caller's: it differs between BLIP and GIT)."""
    layer = prefix + "encoder.layer.{i}."
    rules = [
        rule("decoder.wte", prefix + "embeddings.word_embeddings.weight"),
        rule("decoder.wpe", prefix + "embeddings.position_embeddings.weight"),
        rule("decoder.ln_emb.weight", prefix + "embeddings.LayerNorm.weight"),
        rule("decoder.ln_emb.bias", prefix + "embeddings.LayerNorm.bias"),
    ]
    pairs = [("attn.out", "attention.output.dense"), ("ln_attn", "attention.output.LayerNorm"),
             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"), ("ln_mlp", "output.LayerNorm")]
    if cross:
        pairs += [("cross.q", "crossattention.self.query"), ("cross.out", "crossattention.output.dense"),
                  ("ln_cross", "crossattention.output.LayerNorm")]
    for p in ("weight", "bias"):
        rules.append(rule(f"decoder.layers.{{i}}.attn.qkv.{p}", *(layer + f"attention.self.{x}.{p}"
                                                                  for x in ("query", "key", "value")),
                          transform=concat, layers="dec"))
        if cross:
            rules.append(rule(f"decoder.layers.{{i}}.cross.kv.{p}", *(layer + f"crossattention.self.{x}.{p}"
                                                                      for x in ("key", "value")),
                              transform=concat, layers="dec"))
        rules += [rule(f"decoder.layers.{{i}}.{dst}.{p}", layer + f"{src}.{p}", layers="dec") for dst, src in pairs]
    return rules


def gpt2_decoder_rules(prefix: str, cross: bool) -> list:
    """HF GPT-2 (``GPT2LMHeadModel.transformer``) under ``prefix`` (ending in ``transformer.``) ->
    ``decoder.*``: embeddings, blocks (Conv1D weights transposed; with ``cross`` the
    ``add_cross_attention`` blocks), ``ln_f``. The LM head is the caller's (tied or not)."""
    layer = prefix + "h.{i}."
    rules = [rule("decoder.wte", prefix + "wte.weight"), rule("decoder.wpe", prefix + "wpe.weight"),
             rule("decoder.ln_f.weight", prefix + "ln_f.weight"), rule("decoder.ln_f.bias", prefix + "ln_f.bias")]
    norms = [("ln1", "ln_1"), ("ln2", "ln_2")] + ([("ln_cross", "ln_cross_attn")] if cross else [])
    linears = [("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"),
               ("mlp.fc2", "mlp.c_proj")]
    if cross:
        linears += [("cross.q", "crossattention.q_attn"), ("cross.kv", "crossattention.c_attn"),
                    ("cross.out", "crossattention.c_proj")]
    for dst, src in norms:
        rules += [
            rule(f"decoder.layers.{{i}}.{dst}.{p}", layer + f"{src}.{p}", layers="dec") for p in ("weight", "bias")
        ]
    for dst, src in linears:
        rules += [
            rule(f"decoder.layers.{{i}}.{dst}.weight", layer + f"{src}.weight", transform=transpose, layers="dec"),
            rule(f"decoder.layers.{{i}}.{dst}.bias", layer + f"{src}.bias", layers="dec"),
        ]
    return rules


def tied_copy(tensors: dict, name: str, tied_to: str, where: str) -> None:
    """Drop ``tensors[name]``, a saved copy of the tied ``tensors[tied_to]``, after checking it is one."""
    if name in tensors:
        copy, original = tensors.pop(name), tensors.get(tied_to)
        if original is None or copy.shape != original.shape or not bool((copy == original).all()):
            raise ConversionError(f"{where}: {name} differs from {tied_to} although the weights are tied")
