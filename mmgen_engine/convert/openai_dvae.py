"""Converter ``openai-dvae``: OpenAI's DALL-E dVAE decoder (``dall_e.Decoder``) -> an
``image-detokenizer`` (dVAE).

The source is the decoder's state dict (``blocks.input.w``, ``blocks.group_G.block_B.id_path.w``,
``...res_path.conv_K.w``, ``blocks.output.conv.w`` and their ``.b``) as a ``torch.save`` or
safetensors file, or OpenAI's ``decoder.pkl``, a pickled whole module: that one needs full
unpickling (and the ``dall_e`` package) and is read only with ``trust_pickle``. The architecture
(vocabulary, widths, groups, blocks per group) is read off the tensors. The input 1x1 conv over
one-hot codes ``[n_init, vocab, 1, 1]`` becomes the embedding ``[vocab, n_init]``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConversionError
from . import detokenizer, keymap, weights_file
from .keymap import Rule, apply_rules, rule

NAME = "openai-dvae"
SIGNATURE = {"blocks.input.w", "blocks.output.conv.w"}
PICKLED_CLASS = "dall_e.decoder.Decoder"


def detect(src: Path) -> bool:
    names = weights_file.names(src)
    return SIGNATURE <= names or PICKLED_CLASS in names


def one_hot_conv_to_embedding(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv ``[n_init, vocab, 1, 1]`` over one-hot codes picks column ``code``: the embedding
    ``[vocab, n_init]`` is its transpose."""
    if w.dim() != 4 or w.shape[2:] != (1, 1):
        raise RuntimeError(f"expected a 1x1 conv weight, got shape {tuple(w.shape)}")
    return w[:, :, 0, 0].t()


def _infer_config(tensors: dict[str, torch.Tensor], where: str) -> dict:
    """The :class:`DVAEConfig` fields (as a dict) of the ``dall_e.Decoder`` state dict ``tensors``."""
    n_init, vocab_size = keymap.shape(tensors, "blocks.input.w", 4, where)[:2]
    out2, n_hid = keymap.shape(tensors, "blocks.output.conv.w", 4, where)[:2]
    groups = keymap.count(tensors, "blocks.group_{}.block_1.res_path.conv_1.w", start=1)
    blocks = [keymap.count(tensors, f"blocks.group_{g}.block_{{}}.res_path.conv_1.w", start=1)
              for g in range(1, groups + 1)]
    if not groups or len(set(blocks)) != 1:
        raise ConversionError(f"{where}: expected groups blocks.group_1.. with the same number of blocks, "
                              f"found {blocks or 'none'}")
    if out2 % 2:
        raise ConversionError(f"{where}: blocks.output.conv.w has {out2} output channels, expected "
                              f"2 per image channel")
    return {"vocab_size": vocab_size, "n_init": n_init, "n_hid": n_hid, "n_blk_per_group": blocks[0],
            "group_count": groups, "output_channels": out2 // 2}


def _source_name(name: str) -> str:
    """dall_e's name of engine tensor ``name``: ``groups.G.B.conv_K.weight`` ->
    ``blocks.group_{G+1}.block_{B+1}.res_path.conv_K.w``, ``output.bias`` -> ``blocks.output.conv.b``."""
    path, param = name.rsplit(".", 1)
    param = {"weight": "w", "bias": "b"}[param]
    if path == "output":
        return f"blocks.output.conv.{param}"
    _, g, b, layer = path.split(".")
    layer = layer if layer == "id_path" else f"res_path.{layer}"
    return f"blocks.group_{int(g) + 1}.block_{int(b) + 1}.{layer}.{param}"


def _rules(engine_names) -> list[Rule]:
    rules = [rule("embedding", "blocks.input.w", transform=one_hot_conv_to_embedding),
             rule("embedding_bias", "blocks.input.b")]
    return rules + [rule(n, _source_name(n)) for n in engine_names if not n.startswith("embedding")]


def convert(src: Path, dtype: str | None, workdir: Path, trust_pickle: bool = False):
    """Returns ``(config dict, tensors, no files)``; a pickled module only with ``trust_pickle``."""
    path, tensors = weights_file.read(src, trust_pickle)
    where = str(path)
    config = _infer_config(tensors, where)
    out = apply_rules(_rules(detokenizer.state_names("dvae", config, where)), tensors, {}, where=where)
    config, out = detokenizer.checkpoint(NAME, "dvae", config, out, dtype, where)
    return config, out, {}
