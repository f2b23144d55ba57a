"""The one dispatch table: (op, backend) -> implementation, chosen per (device, dtype).

Every op registers a ``reference`` implementation (plain torch: the spec, the CPU path and the test
oracle); faster ``triton`` and ``cuda`` implementations register for the devices and dtypes they
support. Selection, in this order:

1. ``MMGEN_BACKEND=reference|triton|cuda`` forces one backend for every op; if that backend has no
   implementation for the op on the tensor's device and dtype, :class:`BackendError` is raised
   (never a silent fallback).
2. Otherwise the first backend in :data:`PREFERENCE` that supports (device, dtype).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BackendError

BACKENDS = ("reference", "triton", "cuda")
PREFERENCE = ("cuda", "triton", "reference")
ENV_VAR = "MMGEN_BACKEND"


@dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]


_TABLE: dict[str, dict[str, Impl]] = {}


def register(op: str, backend: str, devices=("cpu", "cuda"),
             dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        impls = _TABLE.setdefault(op, {})
        if backend in impls:
            raise ValueError(f"op {op!r} already has a {backend} implementation")
        impls[backend] = Impl(fn, frozenset(devices), frozenset(dtypes))
        resolve.cache_clear()
        return fn

    return deco


def forced_backend() -> str | None:
    """The backend forced by ``MMGEN_BACKEND`` (None when unset or empty)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value and value not in BACKENDS:
        raise BackendError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value or None


@functools.lru_cache(maxsize=None)
def resolve(op: str, device_type: str, dtype: torch.dtype, forced: str | None) -> Callable:
    impls = _TABLE.get(op)
    if impls is None:
        raise BackendError(f"unknown op {op!r}")
    candidates = (forced,) if forced else PREFERENCE
    for backend in candidates:
        impl = impls.get(backend)
        if impl is not None and device_type in impl.devices and dtype in impl.dtypes:
            return impl.fn
    have = ", ".join(f"{b} ({'/'.join(sorted(i.devices))})" for b, i in impls.items())
    want = f"backend {forced!r}" if forced else "any backend"
    raise BackendError(f"op {op!r} has no implementation for {want} on {device_type}/"
                       f"{str(dtype).removeprefix('torch.')}; available: {have}")


def dispatch(op: str, like: torch.Tensor) -> Callable:
    """The implementation of ``op`` for tensors like ``like`` (its device type and dtype)."""
    return resolve(op, like.device.type, like.dtype, forced_backend())


def available_backends() -> dict[str, list[str]]:
    """``{op: [backends with an implementation]}`` in :data:`BACKENDS` order."""
    return {op: [b for b in BACKENDS if b in impls] for op, impls in sorted(_TABLE.items())}
