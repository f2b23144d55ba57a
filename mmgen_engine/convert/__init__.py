"""Converters from upstream checkpoint formats to the engine format, registered by name.

Each converter module has ``NAME``, ``detect(src) -> bool`` (from the source's own contents, never
from file names) and ``convert(src, dtype, workdir, trust_pickle) -> (config, tensors, files)``.
``src`` is a directory or, for formats that are one file (a state dict), a file.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..checkpoint import save_checkpoint
from ..config import DTYPES
from ..errors import CheckpointError, ConversionError
from . import a2g_gpt, clipcap, hf_blip, hf_git, hf_vision_encoder_decoder, min_dalle, openai_dvae, taming_vqgan

CONVERTERS = {m.NAME: m for m in (hf_vision_encoder_decoder, hf_blip, hf_git, clipcap, min_dalle, taming_vqgan,
                                  openai_dvae, a2g_gpt)}


def detect_format(src: Path) -> str:
    """The name of the converter that recognizes ``src``."""
    found = [name for name, m in CONVERTERS.items() if m.detect(src)]
    if not found:
        raise ConversionError(f"{src}: unrecognized or unsupported source model; supported formats: "
                              f"{', '.join(CONVERTERS)} (pass source_format / --from to choose one)")
    return found[0]


def convert(src, out, source_format: str | None = None, dtype: str | None = None,
            trust_pickle: bool = False, overwrite: bool = False) -> Path:
    """Convert the upstream checkpoint at ``src`` into an engine checkpoint directory ``out``.

    ``source_format`` None detects it; ``dtype`` "float32" | "float16" | "bfloat16" casts floating
    weights (None keeps the source's). ``trust_pickle`` allows the few sources that can only be read
    by full unpickling (OpenAI's ``decoder.pkl``); without it ``torch.load`` is always called with
    ``weights_only=True``. ``out`` is written atomically;
    an existing non-empty ``out`` is replaced only with ``overwrite``.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise ConversionError(f"{src}: source model not found")
    if source_format is None:
        source_format = detect_format(src)
    elif source_format not in CONVERTERS:
        raise ConversionError(f"unknown source format {source_format!r}; supported: {', '.join(CONVERTERS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ConversionError(f"{out}: the output would replace the source model {src}")
    with tempfile.TemporaryDirectory() as workdir:
        config, tensors, files = CONVERTERS[source_format].convert(src, dtype, Path(workdir), trust_pickle)
        try:
            return save_checkpoint(out, config, tensors, files, overwrite=overwrite)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None


__all__ = ["CONVERTERS", "convert", "detect_format"]
