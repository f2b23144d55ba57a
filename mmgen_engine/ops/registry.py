"""The one dispatch table: (op, backend) -> implementation, chosen per (device, dtype).

Every op registers a ``reference`` implementation (plain torch: the spec, the CPU path and the test
oracle); faster ``triton`` and ``cuda`` implementations register for the devices and dtypes they
support. Selection, in this order:

1. ``MMGEN_BACKEND=reference|triton|cuda`` forces one backend for every op; if that backend has no
   implementation for the op on the tensor's device and dtype, :class:`BackendError` is raised
   (never a silent fallback).
2. Otherwise the first backend in :data:`PREFERENCE` that supports (device, dtype), except that
   Triton's CPU interpreter is only ever used when forced.

Triton implementations are registered by dotted path (``"mmgen_engine.kernels.norm:layer_norm"``)
and imported on first use, so importing the engine never imports Triton. They run on CUDA; on a
machine without one they also run on CPU when ``TRITON_INTERPRET=1`` (Triton's interpreter: slow,
for tests only), see :data:`TRITON_DEVICES`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BackendError

BACKENDS = ("reference", "triton", "cuda")
PREFERENCE = ("cuda", "triton", "reference")
ENV_VAR = "MMGEN_BACKEND"


def _triton_devices() -> tuple[str, ...]:
    if importlib.util.find_spec("triton") is None:
        return ()
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


# devices the Triton kernels can run on in this process (empty without triton)
TRITON_DEVICES = _triton_devices()


@dataclass(frozen=True)
class Impl:
    fn: Callable | str  # or "module:function", imported on first use
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


def register_lazy(op: str, backend: str, target: str, devices,
                  dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> None:
    """Register ``target`` (``"package.module:function"``), imported when first selected.
    Nothing is registered when ``devices`` is empty (e.g. Triton is not installed)."""
    if devices:
        register(op, backend, devices, dtypes)(target)


def _load(target: Callable | str) -> Callable:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


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
        if backend == "triton" and device_type == "cpu" and not forced:
            continue  # the interpreter is for tests: chosen on CPU only when forced
        impl = impls.get(backend)
        if impl is not None and device_type in impl.devices and dtype in impl.dtypes:
            return _load(impl.fn)
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
