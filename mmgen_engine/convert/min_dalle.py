"""Converter ``min-dalle``: a min-dalle model directory -> a ``dalle-bart`` text-to-image checkpoint.

The directory is what min-dalle downloads into ``models_root/dalle_bart_{mega,mini}``:
``encoder.pt``, ``decoder.pt`` (or the ``_mini`` names of the Hugging Face repo), ``vocab.json``,
``merges.txt``, and the VQGAN ``detoker.pt`` beside them or in min-dalle's ``../vqgan/``. The ``.pt``
files are state dicts read with ``torch.load(weights_only=True)``.

Sizes come from the tensors: widths, layer counts, GLU width, text vocabulary and context (64),
image vocabulary and token count (256 = a 16x16 grid); the head count is width / 64 as in min-dalle
(Mega 2048/32, Mini 1024/16). min-dalle samples among the first ``2**14`` rows of its head
(``logits[:, :2**14]``) starting from token ``2**14 - 1``; a model with fewer image codes samples
among all of them and starts from the extra last row of its embedding. q/k/v (and the cross
attention's k/v) and the GLU's fc0/fc1 are fused. The detokenizer keeps min-dalle's VQGAN
conventions: GroupNorm eps 1e-5 and pixels ``clamp(x, 0, 1)``.

Generation defaults: min-dalle's ``generate_image`` defaults (top-k 256, supercondition factor 16,
temperature 1, sampling), unless the directory holds a ``generation_config.json`` (not part of
min-dalle's downloads; mmgen's demo training script writes one) whose keys are ``generate_image``'s
keyword arguments ``temperature``, ``top_k``, ``supercondition_factor`` and ``seed`` (-1, min-dalle's
default: a new seed every call); those it leaves out keep min-dalle's defaults, other keys are
refused.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from . import hf, taming_vqgan, weights_file
from .keymap import apply_rules, check_config, concat, count, finish, header, rule, shape

NAME = "min-dalle"
HEAD_DIM = 64           # min-dalle: attention_head_count = embed_count / 64
SAMPLED_CODES = 2 ** 14  # min-dalle samples from logits[:, :2**14] ...
START_TOKEN = 2 ** 14 - 1  # ... starting from this token
TEXT_PAD = 1
# min-dalle's generate_image(seed=-1, ..., temperature=1, top_k=256, supercondition_factor=16)
GENERATE_IMAGE_DEFAULTS = {"temperature": 1.0, "top_k": 256, "supercondition_factor": 16.0, "seed": -1}
GENERATION_FILE = "generation_config.json"

L = "layers.{i}."


def _block_rules(prefix: str, cross: bool):
    rules = [
        rule(prefix + L + "attn.qkv.weight", *(L + f"self_attn.{p}_proj.weight" for p in "qkv"), transform=concat,
             layers="n"),
        rule(prefix + L + "attn.out.weight", L + "self_attn.out_proj.weight", layers="n"),
        rule(prefix + L + "glu.fc01.weight", L + "glu.fc0.weight", L + "glu.fc1.weight", transform=concat, layers="n"),
        rule(prefix + L + "glu.fc2.weight", L + "glu.fc2.weight", layers="n"),
    ]
    norms = [("ln_pre_attn", "pre_self_attn_layer_norm"), ("ln_post_attn", "self_attn_layer_norm"),
             ("glu.ln0", "glu.ln0"), ("glu.ln1", "glu.ln1")]
    if cross:
        norms += [("ln_pre_cross", "pre_encoder_attn_layer_norm"), ("ln_post_cross", "encoder_attn_layer_norm")]
        rules += [
            rule(prefix + L + "cross.q.weight", L + "encoder_attn.q_proj.weight", layers="n"),
            rule(prefix + L + "cross.kv.weight", L + "encoder_attn.k_proj.weight", L + "encoder_attn.v_proj.weight",
                 transform=concat, layers="n"),
            rule(prefix + L + "cross.out.weight", L + "encoder_attn.out_proj.weight", layers="n"),
        ]
    for dst, src in norms:
        rules += [rule(prefix + L + f"{dst}.{p}", L + f"{src}.{p}", layers="n") for p in ("weight", "bias")]
    rules += [rule(prefix + "wte", "embed_tokens.weight"), rule(prefix + "wpe", "embed_positions.weight")]
    for dst, src in [("ln_emb", "layernorm_embedding"), ("ln_f", "final_ln")]:
        rules += [rule(prefix + f"{dst}.{p}", f"{src}.{p}") for p in ("weight", "bias")]
    if cross:
        rules.append(rule(prefix + "lm_head", "lm_head.weight"))
    return rules


def _one_of(src: Path, names: tuple[str, ...], what: str) -> Path:
    found = [src / n for n in names if (src / n).is_file()]
    if not found:
        raise ConversionError(f"{src}: no {what} ({' or '.join(names)})")
    if len(found) > 1:
        raise ConversionError(f"{src}: both {found[0].name} and {found[1].name}; keep one {what}")
    return found[0]


def _files(src: Path) -> dict[str, Path]:
    detoker = [p for p in (src / "detoker.pt", src.parent / "vqgan" / "detoker.pt") if p.is_file()]
    if not detoker:
        raise ConversionError(f"{src}: no detoker.pt (the VQGAN detokenizer), looked in {src} and "
                              f"{src.parent / 'vqgan'}")
    return {"encoder": _one_of(src, ("encoder.pt", "encoder_mini.pt"), "encoder"),
            "decoder": _one_of(src, ("decoder.pt", "decoder_mini.pt"), "decoder"),
            "vocab": _one_of(src, ("vocab.json", "vocab_mini.json"), "vocabulary"),
            "merges": _one_of(src, ("merges.txt", "merges_mini.txt"), "BPE merges"),
            "detoker": detoker[0]}


def detect(src: Path) -> bool:
    """A directory whose encoder state dict has min-dalle's GLU encoder layers (read from its pickle
    without loading it)."""
    if not src.is_dir():
        return False
    try:
        encoder = _files(src)["encoder"]
    except ConversionError:
        return False
    return "layers.0.glu.fc0.weight" in weights_file.names(encoder)


def _bart(tensors, where) -> dict:
    vocab, width = shape(tensors, "embed_tokens.weight", 2, where)
    if width % HEAD_DIM:
        raise ConversionError(f"{where}: width {width} is not a multiple of min-dalle's head size {HEAD_DIM}")
    return {"vocab_size": vocab, "hidden_size": width, "num_layers": count(tensors, "layers.{}.glu.fc0.weight"),
            "num_heads": width // HEAD_DIM, "glu_size": shape(tensors, "layers.0.glu.fc0.weight", 2, where)[0],
            "max_positions": shape(tensors, "embed_positions.weight", 2, where)[0]}


def _check_vocab(path: Path) -> None:
    vocab = hf.read_json(path)
    missing = [t for t in ("<s>", "</s>", "<unk>") if not isinstance(vocab.get(t), int)]
    if missing:
        raise ConversionError(f"{path}: no id for {', '.join(missing)}")
    if vocab.get("<pad>", TEXT_PAD) != TEXT_PAD:
        raise ConversionError(f"{path}: <pad> must be id {TEXT_PAD} as min-dalle pads with it")


def generation_defaults(src: Path) -> dict:
    """The checkpoint's ``generation_defaults`` block: min-dalle's ``generate_image`` defaults, or the
    settings of ``src/generation_config.json`` (see the module docstring)."""
    settings = dict(GENERATE_IMAGE_DEFAULTS)
    path = src / GENERATION_FILE
    if path.is_file():
        given = hf.read_json(path)
        unknown = sorted(given.keys() - settings.keys())
        if unknown:
            raise ConversionError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; min-dalle's "
                                  f"generate_image takes {', '.join(GENERATE_IMAGE_DEFAULTS)}")
        for key, value in given.items():
            number = key in ("temperature", "supercondition_factor")
            if isinstance(value, bool) or not isinstance(value, (int, float) if number else int):
                raise ConversionError(f"{path}: {key} must be {'a number' if number else 'an integer'}, "
                                      f"got {value!r}")
        settings.update(given)
    sampling = {"do_sample": True, "temperature": float(settings["temperature"]), "top_k": settings["top_k"],
                "guidance_scale": float(settings["supercondition_factor"])}
    if settings["seed"] >= 0:
        sampling["seed"] = settings["seed"]
    return {"sampling": sampling}


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, files to copy)`` (never unpickles: every file is a state dict)."""
    if not src.is_dir():
        raise ConversionError(f"{src}: expected a min-dalle model directory")
    files = _files(src)
    enc_src, dec_src = (hf.load_torch(files[k]) for k in ("encoder", "decoder"))
    encoder, decoder = _bart(enc_src, str(files["encoder"])), _bart(dec_src, str(files["decoder"]))
    grid = int(round(decoder["max_positions"] ** 0.5))
    if grid * grid != decoder["max_positions"]:
        raise ConversionError(f"{files['decoder']}: {decoder['max_positions']} image positions are not a square grid")
    codes = min(decoder["vocab_size"] - 1, SAMPLED_CODES)
    bos = START_TOKEN if codes == SAMPLED_CODES else decoder["vocab_size"] - 1
    _check_vocab(files["vocab"])
    detok_cfg, detok = taming_vqgan.vqgan_from_tensors(hf.load_torch(files["detoker"]), codebook_key="embedding.weight",
                                                        norm_eps=1e-5, output="0_1", where=str(files["detoker"]))
    config = {**header("text-to-image", "dalle-bart", NAME, dtype),
              "encoder": encoder, "decoder": decoder,
              "generation": {"bos_token_id": bos, "image_vocab_size": codes, "grid_size": grid,
                             "text_pad_token_id": TEXT_PAD},
              "detokenizer": {"architecture": "vqgan", "vqgan": detok_cfg},
              "generation_defaults": generation_defaults(src)}
    check_config(config, str(src))  # the sizes are consistent before any tensor is built
    out = apply_rules(_block_rules("encoder.", cross=False), enc_src, {"n": encoder["num_layers"]},
                      where=str(files["encoder"]))
    out |= apply_rules(_block_rules("decoder.", cross=True), dec_src, {"n": decoder["num_layers"]},
                       where=str(files["decoder"]))
    out |= {f"detokenizer.{k}": v for k, v in detok.items()}
    config, out = finish(config, out, dtype, str(src))
    return config, out, {"vocab.json": files["vocab"], "merges.txt": files["merges"]}
