"""Converters from upstream checkpoint formats to the engine format, registered by name.

Each converter module has ``NAME``, ``detect(src) -> bool`` (from the source's own contents, never
from file names) and ``convert(src, dtype, workdir, trust_pickle) -> (config, tensors, files)``.
``src`` is a directory or, for formats that are one file (a state dict), a file.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import remove_stale_writes, save_checkpoint
from ..config import CONFIG_CLASSES, DTYPES, QuantizationConfig, from_dict
from ..errors import CheckpointError, ConversionError, InputError, one_line
from ..models import build_model, quantize_tensors
from . import (
    a2g_gpt,
    clipcap,
    hf_blip,
    hf_blip2,
    hf_git,
    hf_llava,
    hf_vision_encoder_decoder,
    min_dalle,
    openai_dvae,
    taming_vqgan,
)

CONVERTERS = {m.NAME: m for m in (hf_vision_encoder_decoder, hf_blip, hf_blip2, hf_git, hf_llava, clipcap, min_dalle,
                                  taming_vqgan, openai_dvae, a2g_gpt)}


def detect_format(src: Path) -> str:
    """The name of the converter that recognizes ``src``."""
    found = [name for name, m in CONVERTERS.items() if m.detect(src)]
    if not found:
        raise ConversionError(f"{src}: unrecognized or unsupported source model; supported formats: "
                              f"{', '.join(CONVERTERS)} (pass source_format / --from to choose one)")
    return found[0]


def convert(src, out, source_format: str | None = None, dtype: str | None = None,
            trust_pickle: bool = False, overwrite: bool = False,
            progress: Callable[[int, int | None], None] | None = None, quantize: str | None = None) -> Path:
    """Convert the upstream checkpoint at ``src`` into an engine checkpoint directory ``out``.

    ``source_format`` None detects it; ``dtype`` "float32" | "float16" | "bfloat16" casts floating
    weights (None keeps the source's). ``trust_pickle`` allows the few sources that can only be read
    by full unpickling (OpenAI's ``decoder.pkl``); without it ``torch.load`` is always called with
    ``weights_only=True``. ``out`` is written atomically;
    an existing non-empty ``out`` is replaced only with ``overwrite``. ``progress(done, total)``, if
    given, is called with the bytes of weights written so far and in all (``total`` is an int here;
    the contract allows None for an unknown total), first with ``done`` 0, then after each tensor.
    ``quantize`` None | "int8" | "int8-gN" (e.g. "int8-g128") writes the decoder's linear layers
    and head as int8 with float32 scales, per output channel or per group of N input columns, and
    records it in ``config.json`` ``"quantization"`` (see
    :class:`~mmgen_engine.config.QuantizationConfig`); the quantized checkpoint loads without
    quantizing again. Arguments of the wrong type raise InputError; temporary directories that
    killed conversions left beside ``out`` are removed first.
    """
    src, out = _path("src", src), _path("out", out)
    for name, value in (("source_format", source_format), ("dtype", dtype)):
        if value is not None and not isinstance(value, str):
            raise InputError(f"{name} must be a string or None, got {type(value).__name__}")
    for name, value in (("trust_pickle", trust_pickle), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {type(value).__name__}")
    quantization = QuantizationConfig.parse(quantize, InputError)
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a callable progress(done, total) or None, got {type(progress).__name__}")
    try:
        if not src.exists():
            raise ConversionError(f"{src}: source model not found")
        replaces_source = out.resolve() == src.resolve() or out.resolve() in src.resolve().parents
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, a symlink loop
        raise ConversionError(f"{src} -> {out}: unusable path ({one_line(e)})") from None
    if source_format is None:
        source_format = detect_format(src)
    elif source_format not in CONVERTERS:
        raise ConversionError(f"unknown source format {source_format!r}; supported: {', '.join(CONVERTERS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if replaces_source:
        raise ConversionError(f"{out}: the output would replace the source model {src}")
    remove_stale_writes(out)
    with tempfile.TemporaryDirectory() as workdir:
        config, tensors, files = CONVERTERS[source_format].convert(src, dtype, Path(workdir), trust_pickle)
        if quantization is not None:
            config, tensors = _quantized(config, tensors, quantization)
        try:
            return save_checkpoint(out, config, tensors, files, overwrite=overwrite, progress=progress)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None


def _quantized(config: dict, tensors: dict, quantization: QuantizationConfig) -> tuple[dict, dict]:
    """The converted ``config`` and ``tensors`` with the decoder quantized."""
    if config["task"] not in CONFIG_CLASSES or config["task"] == "image-detokenizer":
        raise ConversionError(f"a {config['task']} checkpoint has no decoder to quantize")
    config = {**config, "quantization": dataclasses.asdict(quantization)}
    model = build_model(from_dict(CONFIG_CLASSES[config["task"]], {**config, "quantization": None}), device="meta")
    return config, quantize_tensors(model, tensors, quantization)


def _path(name: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    try:
        return Path(value)
    except TypeError:  # an os.PathLike giving bytes
        raise InputError(f"{name} must be a path whose os.fspath is a str") from None


__all__ = ["CONVERTERS", "convert", "detect_format"]
