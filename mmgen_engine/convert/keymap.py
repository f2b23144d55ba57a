"""Declarative key maps: how source tensors become engine tensors.

A converter lists :class:`Rule` s - one engine tensor each, built from named source tensors by a
small named transform - plus regexes of source tensors it knowingly drops. :func:`apply_rules`
builds every target and fails if a source tensor is missing or if any source tensor is left unused,
so a checkpoint with an unexpected layout can never convert silently wrong.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..checkpoint import check_tensors, tensor_dtype, torch_dtype
from ..config import CONFIG_CLASSES, FORMAT_NAME, FORMAT_VERSION, from_dict
from ..errors import CheckpointError, ConversionError


def same(t):
    return t


def transpose(t):
    """GPT-2 ``Conv1D`` stores ``[in, out]``; engine linears are ``[out, in]``."""
    return t.t()


def flatten_conv(t):
    """A stride-p conv with kernel p over patches == linear ``[out, C*p*p]``."""
    return t.reshape(t.shape[0], -1)


def squeeze_leading(t):
    """``[1, 1, D]`` / ``[1, N, D]`` learned tokens -> ``[D]`` / ``[N, D]``."""
    while t.dim() > 1 and t.shape[0] == 1:
        t = t[0]
    return t


def concat(*ts):
    """Fuse q/k/v (or k/v) projections: rows of the outputs stacked in order."""
    return torch.cat(ts, dim=0)


@dataclass(frozen=True)
class Rule:
    """``target = transform(*sources)``; ``{i}`` in names expands over ``layers`` (a count key)."""

    target: str
    sources: tuple[str, ...]
    transform: Callable = same
    layers: str | None = None


def rule(target: str, source: str, *more: str, transform: Callable = same, layers: str | None = None) -> Rule:
    return Rule(target, (source, *more), transform, layers)


def rename_keys(tensors: dict, renames: Iterable[tuple[str, str]]) -> dict:
    """Apply regex renames in order to every key (to normalize naming generations)."""
    out = {}
    for key, t in tensors.items():
        new = key
        for pattern, repl in renames:
            new = re.sub(pattern, repl, new)
        if new in out:
            raise ConversionError(f"source tensors {key!r} and another both map to {new!r} "
                                  f"(mixed key-name generations?)")
        out[new] = t
    return out


def apply_rules(rules: Iterable[Rule], source: dict[str, torch.Tensor], counts: dict[str, int],
                ignore: Iterable[str] = (), where: str = "source") -> dict[str, torch.Tensor]:
    """Build all targets; error on missing source tensors or unused ones not matched by ``ignore``."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for r in rules:
        indices = range(counts[r.layers]) if r.layers else [None]
        for i in indices:
            names = [s.format(i=i) for s in r.sources]
            absent = [n for n in names if n not in source]
            if absent:
                missing.extend(absent)
                continue
            used.update(names)
            try:
                out[r.target.format(i=i)] = r.transform(*(source[n] for n in names))
            except RuntimeError as e:
                shapes = [tuple(source[n].shape) for n in names]
                raise ConversionError(f"{where}: cannot build {r.target.format(i=i)} from {names} "
                                      f"with shapes {shapes}: {e}") from None
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConversionError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")
    patterns = [re.compile(p) for p in ignore]
    unused = sorted(k for k in source if k not in used and not any(p.fullmatch(k) for p in patterns))
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ConversionError(f"{where}: unused tensor(s) {', '.join(unused[:5])}{more}; "
                              f"the checkpoint does not match its config or this converter")
    return out


def shape(tensors: dict[str, torch.Tensor], name: str, dims: int, where: str) -> torch.Size:
    """The shape of ``tensors[name]``, which must exist with ``dims`` dimensions."""
    t = tensors.get(name)
    if t is None or t.dim() != dims:
        raise ConversionError(f"{where}: missing or malformed tensor {name!r} (expected {dims} dimensions)")
    return t.shape


def count(tensors: dict[str, torch.Tensor], pattern: str, start: int = 0) -> int:
    """How many consecutive indices ``start, start + 1, ...`` put in ``pattern``'s ``{}`` name a tensor."""
    n = 0
    while pattern.format(start + n) in tensors:
        n += 1
    return n


def header(task: str, architecture: str, source_format: str, dtype: str | None) -> dict:
    """The fields every engine config starts with (``dtype`` float32 until :func:`finish` stores the
    tensors' own)."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "task": task, "architecture": architecture,
            "source_format": source_format, "dtype": dtype or "float32"}


def check_config(config: dict, where: str) -> None:
    """Validate ``config`` as its task's config before any weight is read, as a ConversionError."""
    try:
        from_dict(CONFIG_CLASSES[config["task"]], config, where)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


def finish(config: dict, tensors: dict[str, torch.Tensor], dtype: str | None, where: str):
    """The last step of every converter: validate ``config`` as its task's config, store floating
    tensors as ``dtype`` (None: the dtype most of them have) and check that they are exactly the state
    of the model the config describes. Returns ``(config, tensors)``; any problem is a ConversionError."""
    from ..models import build_model
    from .hf import tensor_dtype_name

    config["dtype"] = dtype or tensor_dtype_name(tensors)
    stored = torch_dtype(config["dtype"])
    try:
        model = build_model(from_dict(CONFIG_CLASSES[config["task"]], config, where), device="meta")
        out = {k: (v.to(tensor_dtype(model, k, stored)) if v.is_floating_point() else v) for k, v in tensors.items()}
        check_tensors(model, out, where, stored)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return config, out
