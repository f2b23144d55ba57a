"""Converter ``taming-vqgan``: a taming-transformers ``VQModel`` -> an ``image-detokenizer`` (VQGAN).

The source is one state dict file (a Lightning ``.ckpt`` with a ``state_dict`` entry, a plain
``torch.save`` state dict, or safetensors), or a directory holding one. Its decoder half is kept:
``quantize.embedding.weight`` (the codebook), ``post_quant_conv.*`` and ``decoder.*``; the encoder,
``quant_conv`` and the training loss are dropped. Every architecture field is read off the tensors:
levels from ``decoder.up.N``, blocks per level, attention per level, widths from the convs. Engine
names are taming's, except the codebook (``embedding``) and the attention's q/k/v, fused into
``qkv``. :func:`vqgan_from_tensors` serves min-dalle's detokenizer too (same decoder layout).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..errors import ConversionError
from . import detokenizer, keymap, weights_file
from .keymap import Rule, apply_rules, concat, rule

NAME = "taming-vqgan"
CODEBOOK = "quantize.embedding.weight"
# the names that identify a taming VQModel (in a Lightning checkpoint they sit under "state_dict")
SIGNATURE = {CODEBOOK, "post_quant_conv.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"}
# tensors of the VQModel that play no part in decoding
IGNORED = [r"encoder\..*", r"quant_conv\..*", r"loss\..*"]


def detect(src: Path) -> bool:
    return SIGNATURE <= weights_file.names(src)


def _infer_config(tensors: dict[str, torch.Tensor], codebook_key: str, norm_eps: float, output: str,
                 where: str) -> dict:
    """The :class:`VQGANConfig` fields (as a dict) of the taming-layout decoder in ``tensors``."""
    codebook_size, embed_dim = keymap.shape(tensors, codebook_key, 2, where)
    z_channels = keymap.shape(tensors, "decoder.conv_in.weight", 4, where)[1]
    out_channels = keymap.shape(tensors, "decoder.conv_out.weight", 4, where)[0]
    levels = keymap.count(tensors, "decoder.up.{}.block.0.conv1.weight")
    if levels == 0:
        raise ConversionError(f"{where}: no decoder levels (decoder.up.0.block.0.conv1.weight is missing)")
    blocks = [keymap.count(tensors, f"decoder.up.{i}.block.{{}}.conv1.weight") for i in range(levels)]
    if len(set(blocks)) != 1:
        raise ConversionError(f"{where}: decoder levels have different numbers of ResNet blocks {blocks}")
    widths = [keymap.shape(tensors, f"decoder.up.{i}.block.0.conv1.weight", 4, where)[0] for i in range(levels)]
    ch = math.gcd(*widths)
    return {"codebook_size": codebook_size, "embed_dim": embed_dim, "z_channels": z_channels, "ch": ch,
            "ch_mult": [w // ch for w in widths], "num_res_blocks": blocks[0] - 1,
            "attn_levels": [i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in tensors],
            "out_channels": out_channels, "norm_eps": norm_eps, "output": output}


def _rules(engine_names, codebook_key: str) -> list[Rule]:
    """Every engine tensor has its taming name, except the codebook and the fused attention q/k/v."""
    rules = []
    for name in engine_names:
        fused = re.fullmatch(r"(.*)\.qkv\.(weight|bias)", name)
        if name == "embedding":
            rules.append(rule(name, codebook_key))
        elif fused:
            prefix, param = fused.groups()
            rules.append(rule(name, *(f"{prefix}.{p}.{param}" for p in "qkv"), transform=concat))
        else:
            rules.append(rule(name, name))
    return rules


def vqgan_from_tensors(tensors: dict[str, torch.Tensor], *, codebook_key: str, norm_eps: float, output: str,
                       where: str, ignore=()) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(VQGANConfig dict, tensors named as VQGANDecoder's state dict)`` from a taming-layout decoder:
    ``codebook_key [K, E]``, ``post_quant_conv.*``, ``decoder.*``. ``norm_eps`` and ``output`` are
    the source's GroupNorm eps and pixel mapping (taming 1e-6 / "minus1_1", min-dalle 1e-5 / "0_1").
    Source tensors not used and not matched by a regex of ``ignore`` are an error; tensors keep
    their dtype (shapes are checked by the caller's ``check_tensors`` against the built model)."""
    config = _infer_config(tensors, codebook_key, norm_eps, output, where)
    names = detokenizer.state_names("vqgan", config, where)
    return config, apply_rules(_rules(names, codebook_key), tensors, {}, ignore, where=where)


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, no files)``; pickled objects only with ``trust_pickle``."""
    path, tensors = weights_file.read(src, trust_pickle)
    vqgan, out = vqgan_from_tensors(tensors, codebook_key=CODEBOOK, norm_eps=1e-6, output="minus1_1",
                                    where=str(path), ignore=IGNORED)
    config, out = detokenizer.checkpoint(NAME, "vqgan", vqgan, out, dtype, str(path))
    return config, out, {}
