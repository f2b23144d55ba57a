"""Converter ``a2g-gpt``: a model saved by :func:`mmgen_engine.training.a2g_gpt.save` (a directory
with ``a2g_gpt.json`` and ``model.safetensors``, see :mod:`mmgen_engine.gesture_format`) -> a
``speech-to-gesture`` checkpoint.

Conv1d weights ``[Cout, Cin, k]`` become the engine's tap-major ``[Cout, k Cin]``; the decoder is a
GPT-2 with cross-attention (tied head); the motion VQ-VAE's encoder is training-only and dropped.

Generation defaults: the engine's sampling for gestures (temperature 0.5, top-p 0.9, seed 0; see
:data:`~mmgen_engine.config.BUILTIN_GENERATION_DEFAULTS`), unless the directory holds a
``generation_config.json``: the sampling to use instead, in ``mm.SamplingParams`` field names
(``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``repetition_penalty``,
``no_repeat_ngram_size``; those left out are SamplingParams' defaults). The demo's training script
writes the settings it evaluated the model with.
"""
from __future__ import annotations

from pathlib import Path

from .. import gesture_format as a2g
from ..config import BUILTIN_GENERATION_DEFAULTS
from ..errors import ConversionError
from ..layers.conv1d import tap_major
from . import hf
from .keymap import apply_rules, check_config, finish, header, rule

NAME = "a2g-gpt"
IGNORED = [r"motion\.encoder\..*"]
GENERATION_FILE = "generation_config.json"
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty",
                   "no_repeat_ngram_size")


def generation_defaults(src: Path) -> dict:
    """The checkpoint's ``generation_defaults`` block (see the module docstring); its values are
    checked with the rest of the config."""
    path = src / GENERATION_FILE
    if not path.is_file():
        return {"sampling": dict(BUILTIN_GENERATION_DEFAULTS["speech-to-gesture"]["sampling"])}
    sampling = hf.read_json(path)
    unknown = sorted(sampling.keys() - set(SAMPLING_FIELDS))
    if unknown:
        raise ConversionError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; the sampling of "
                              f"gestures takes {', '.join(SAMPLING_FIELDS)}")
    return {"sampling": sampling}


def detect(src: Path) -> bool:
    return src.is_dir() and (src / a2g.CONFIG_FILE).is_file()


def _source_config(src: Path) -> a2g.A2GConfig:
    raw = hf.read_json(src / a2g.CONFIG_FILE)
    known = {f for f in a2g.A2GConfig.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConversionError(f"{src / a2g.CONFIG_FILE}: unknown field(s) {', '.join(unknown)}")
    try:
        cfg = a2g.A2GConfig(**raw)
        cfg.check()
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{src / a2g.CONFIG_FILE}: {e}") from None
    return cfg


def _rules(cfg: a2g.A2GConfig) -> list:
    rules = [rule("encoder.conv1.weight", "audio.conv1.weight", transform=tap_major),
             rule("encoder.conv1.bias", "audio.conv1.bias"),
             rule("encoder.conv2.weight", "audio.conv2.weight", transform=tap_major),
             rule("encoder.conv2.bias", "audio.conv2.bias"),
             rule("encoder.pos_embed", "audio.pos"),
             rule("decoder.wte", "gpt.wte.weight"), rule("decoder.wpe", "gpt.wpe.weight"),
             rule("motion.codebook", "motion.quantizer.codebook"),
             rule("pose_mean", "pose_mean"), rule("pose_std", "pose_std")]
    for p in ("weight", "bias"):
        rules += [rule(f"encoder.ln_f.{p}", f"audio.ln_f.{p}"), rule(f"decoder.ln_f.{p}", f"gpt.ln_f.{p}")]
        rules += [rule(f"encoder.layers.{{i}}.{name}.{p}", f"audio.blocks.{{i}}.{name}.{p}", layers="audio")
                  for name in ("ln1", "ln2", "attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2")]
        rules += [rule(f"decoder.layers.{{i}}.{dst}.{p}", f"gpt.blocks.{{i}}.{src}.{p}", layers="dec")
                  for dst, src in [("ln1", "ln_1"), ("ln_cross", "ln_cross"), ("ln2", "ln_2"), ("attn.qkv", "attn.qkv"),
                                   ("attn.out", "attn.out"), ("cross.q", "cross.q"), ("cross.kv", "cross.kv"),
                                   ("cross.out", "cross.out"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]]
    convs = ["conv_in", "conv_mid", "conv_out"] + [f"up_conv.{level}" for level in range(2)]
    convs += [f"res.{level}.{b}.conv{k}" for level in range(2) for b in range(cfg.vq_depth) for k in (1, 2)]
    for name in convs:
        rules += [rule(f"motion.{name}.weight", f"motion.decoder.{name}.weight", transform=tap_major),
                  rule(f"motion.{name}.bias", f"motion.decoder.{name}.bias")]
    return rules


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, files to copy)``; never unpickles."""
    if not detect(src):
        raise ConversionError(f"{src}: expected an a2g-gpt directory ({a2g.CONFIG_FILE} + {a2g.WEIGHTS_FILE})")
    cfg = _source_config(src)
    config = {**header("speech-to-gesture", "a2g-gpt", NAME, dtype),
        "audio_encoder": {"n_mels": a2g.N_MELS, "hidden_size": cfg.width, "num_layers": cfg.audio_layers,
                          "num_heads": cfg.audio_heads, "intermediate_size": cfg.audio_ff,
                          "max_positions": cfg.audio_positions},
        "decoder": {"vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "num_layers": cfg.layers,
                    "num_heads": cfg.heads, "intermediate_size": cfg.ff, "max_positions": cfg.max_positions,
                    "layer_norm_eps": 1e-5, "activation": "gelu_tanh", "tie_word_embeddings": True,
                    "cross_attention": True},
        "motion": {"codebook_size": cfg.codebook_size, "code_dim": cfg.code_dim, "width": cfg.vq_width,
                   "depth": cfg.vq_depth, "growth": cfg.vq_growth, "joints": a2g.JOINTS, "levels": 2},
        "gesture": {"bos_token_id": cfg.bos, "eos_token_id": cfg.eos, "skeleton": list(a2g.PARENTS),
                    "front_end": "log_mel_400", "sample_rate": a2g.SAMPLE_RATE, "fps": a2g.FPS,
                    "window_frames": cfg.window_frames, "seed_tokens": cfg.seed_tokens},
        "generation_defaults": generation_defaults(src),
    }
    check_config(config, str(src / a2g.CONFIG_FILE))
    tensors = hf.load_safetensors(src / a2g.WEIGHTS_FILE)
    out = apply_rules(_rules(cfg), tensors, {"audio": cfg.audio_layers, "dec": cfg.layers}, IGNORED, where=str(src))
    config, out = finish(config, out, dtype, str(src))
    return config, out, {}

