"""The one dispatch table: (op, backend) -> implementation, chosen per (device, dtype).

Every op registers a ``reference`` implementation (plain torch: the spec, the CPU path and the test
oracle); faster ``triton`` and ``cuda`` implementations register for the devices and dtypes they
support. Selection, in this order:

1. ``MMGEN_BACKEND`` forces a backend: ``reference|triton|cuda`` for every op, or per op as a
   comma-separated list ``op=backend`` (``MMGEN_BACKEND=decode_attention=cuda,sample=cuda``; ops not
   named are chosen as in 2). If the forced backend has no implementation for the op on the
   tensor's device and dtype, :class:`BackendError` is raised (never a silent fallback).
2. Otherwise the first backend in the op's order that supports (device, dtype): :data:`PREFERENCE`,
   or the op's entry in :data:`OP_PREFERENCE` where the benchmarks chose otherwise (the table
   "Backend defaults" in benchmarks/RESULTS.md says which and why). Triton's CPU interpreter is
   only ever used when forced.

Triton implementations are registered by dotted path (``"mmgen_engine.kernels.norm:layer_norm"``)
and imported on first use, so importing the engine never imports Triton. They run on CUDA; on a
machine without one they also run on CPU when ``TRITON_INTERPRET=1`` (Triton's interpreter: slow,
for tests only), see :data:`TRITON_DEVICES`. The ``cuda`` implementations
(:mod:`mmgen_engine.ops.cuda_ops`, the kernels of ``csrc/``) register for CUDA tensors when the
native library was built with CUDA, see :data:`CUDA_DEVICES`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import BackendError

BACKENDS = ("reference", "triton", "cuda")
PREFERENCE = ("cuda", "triton", "reference")
# Ops whose default order on GPU differs from PREFERENCE (benchmarks/RESULTS.md, "Backend defaults").
# The CUDA kernels of these ops have not yet been timed on a GPU (no GPU was lent since they
# landed), so the Triton kernels, measured there, stay first until benchmarks/gpu_check.sh says
# otherwise; the CUDA kernels are selected with MMGEN_BACKEND=op=cuda.
OP_PREFERENCE = {op: ("triton", "cuda", "reference")
                 for op in ("add_layer_norm", "decode_attention", "layer_norm", "sample", "token_gather")}
ENV_VAR = "MMGEN_BACKEND"
HALF_DTYPES = (torch.float16, torch.bfloat16)  # what most CUDA kernels are built for


def _triton_devices() -> tuple[str, ...]:
    if importlib.util.find_spec("triton") is None:
        return ()
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


# devices the Triton kernels can run on in this process (empty without triton)
TRITON_DEVICES = _triton_devices()


def _cuda_devices() -> tuple[str, ...]:
    try:
        from .. import _native
    except ImportError:
        return ()
    return ("cuda",) if _native._C.cuda else ()


# devices the native CUDA kernels can run on (empty when the library was built without CUDA)
CUDA_DEVICES = _cuda_devices()


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
        _forced.cache_clear()  # an op=backend list naming this op was refused before
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


def forced_backend(op: str | None = None) -> str | None:
    """The backend ``MMGEN_BACKEND`` forces for ``op`` (or, with no op, for every op); None when
    nothing is forced."""
    return _forced(os.environ.get(ENV_VAR, ""), op)


# Parsed once per (value, op): dispatch runs ~20 times per decode step, and parsing the variable
# each time cost a few microseconds of each (the variable is still read per call, so a test or a
# caller that changes it is obeyed at once).
@functools.lru_cache(maxsize=1024)
def _forced(raw: str, op: str | None) -> str | None:
    value = raw.strip().lower()
    if "=" not in value:
        if value and value not in BACKENDS:
            raise BackendError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)} "
                               "or a list of op=backend")
        return value or None
    forced = None
    for item in value.split(","):
        name, _, backend = (part.strip() for part in item.partition("="))
        if backend not in BACKENDS or name not in _TABLE:
            raise BackendError(f"{ENV_VAR}: {item.strip()!r} is not op=backend with an op of "
                               f"{', '.join(sorted(_TABLE))} and a backend of {', '.join(BACKENDS)}")
        if name == op:
            forced = backend
    return forced


@functools.cache
def resolve(op: str, device_type: str, dtype: torch.dtype, forced: str | None) -> Callable:
    impls = _TABLE.get(op)
    if impls is None:
        raise BackendError(f"unknown op {op!r}")
    candidates = (forced,) if forced else PREFERENCE
    if not forced and device_type == "cuda":
        candidates = OP_PREFERENCE.get(op, PREFERENCE)
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
    return resolve(op, like.device.type, like.dtype, _forced(os.environ.get(ENV_VAR, ""), op))


# "0" turns off the native CPU paths of a decode step (ops.decoder_step, ops.sampling.sample_drawn):
# every step then runs its per-op path
NATIVE_STEP_ENV = "MMGEN_CPU_NATIVE_STEP"


def native_step_allowed(op: str | None = None) -> bool:
    """Whether a native CPU step path may run: not turned off by ``MMGEN_CPU_NATIVE_STEP=0`` and no
    backend forced by ``MMGEN_BACKEND`` (for ``op``, or for every op with none named)."""
    return os.environ.get(NATIVE_STEP_ENV) != "0" and forced_backend(op) is None


def native_library():
    """``mmgen_engine._C``, or None where the native library is not built."""
    try:
        from .. import _native
    except ImportError:
        return None
    return _native._C


def available_backends() -> dict[str, list[str]]:
    """``{op: [backends with an implementation]}`` in :data:`BACKENDS` order."""
    return {op: [b for b in BACKENDS if b in impls] for op, impls in sorted(_TABLE.items())}
