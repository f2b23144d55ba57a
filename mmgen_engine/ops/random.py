"""Counter-based random numbers: Philox4x32-10 in plain torch (the reference for the kernels).

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123)
maps a 128-bit counter ``(c0, c1, c2, c3)`` and a 64-bit key ``(k0, k1)`` to four 32-bit words by
ten rounds of::

    hi0, lo0 = mulhilo(0xD2511F53, c0);  hi1, lo1 = mulhilo(0xCD9E8D57, c2)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    k0, k1 = k0 + 0x9E3779B9, k1 + 0xBB67AE85            (mod 2**32)

which is what ``triton.language.philox(seed, c0, c1, c2, c3)`` computes with ``k0 = seed & 0xffffffff``
and ``k1 = seed >> 32``. Words are held in int64 tensors; products are split into 16-bit halves so
nothing overflows int64.

``uniform`` draws ``u[b, i]`` with key ``(seed_b & 0xffffffff, seed_b >> 32)``, counter
``(i, row_b, offset & 0xffffffff, offset >> 32)``, first output word ``x0`` and
``u = ((x0 >> 9) + 0.5) * 2**-23``: 23 random bits, exact in fp32 and strictly inside (0, 1)
(``((x0 >> 8) + 0.5) * 2**-24`` would need 25 significant bits and rounds up to 1.0).
"""
from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a * b) >> 32, (a * b) & 0xffffffff`` for a 32-bit constant ``a`` and 32-bit words ``b``."""
    low = a * (b & 0xFFFF)   # < 2**48
    high = a * (b >> 16)     # < 2**48; the product is low + high * 2**16
    t = low + ((high & 0xFFFF) << 16)
    return (high >> 16) + (t >> 32), t & MASK32


def philox4x32(key0, key1, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counter ``(c0, c1, c2, c3)`` under key ``(key0, key1)``: four uint32 words in
    int64 tensors. Arguments are ints or int64 tensors of values in [0, 2**32), broadcast together."""
    k0, k1, c0, c1, c2, c3 = (torch.as_tensor(w, dtype=torch.int64) for w in (key0, key1, c0, c1, c2, c3))
    for _ in range(10):
        hi0, lo0 = _mulhilo(ROUND_A, c0)
        hi1, lo1 = _mulhilo(ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform_at(seeds: torch.Tensor, offset: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``u`` fp32 in (0, 1) at the (row, column) pairs ``rows, cols`` (int64, broadcast together with
    their ``seeds`` and step counters ``offset``)."""
    x0 = philox4x32(seeds & MASK32, seeds >> 32, cols, rows, offset & MASK32, offset >> 32)[0]
    return ((x0 >> 9).float() + 0.5) * 2.0**-23


def uniform(seeds: torch.Tensor, offset: torch.Tensor, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """``u [B, cols]`` fp32 in (0, 1) for ``seeds [B]`` int64 (>= 0), the step counters ``offset``
    int64 (``[1]`` for every row, or ``[B]``) and the row indices ``rows [B]`` (counter word 1);
    column ``i`` is counter word 0."""
    col = torch.arange(cols, dtype=torch.int64, device=seeds.device)[None, :]
    return uniform_at(seeds[:, None], offset.expand(seeds.shape[0])[:, None], rows.to(torch.int64)[:, None], col)



def uniform_numpy(seeds: torch.Tensor, offset: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """:func:`uniform_at` for CPU tensors of equal shape, computed in NumPy ``uint64``: a product of
    two 32-bit words fits it exactly, so each round is a few whole-array operations instead of the
    16-bit halves the int64 version needs, and NumPy's per-call cost is a fraction of torch's. The
    same numbers (measured on the 2-core box: ~10x faster for 1 to 512 draws, what top-k / top-p
    leave of a vocabulary)."""
    m, s32 = np.uint64(MASK32), np.uint64(32)
    seeds, offset, rows, cols = (t.numpy().astype(np.uint64) for t in (seeds, offset, rows, cols))
    k0, k1, c0, c1, c2, c3 = seeds & m, seeds >> s32, cols, rows, offset & m, offset >> s32
    a, b, key_a, key_b = np.uint64(ROUND_A), np.uint64(ROUND_B), np.uint64(KEY_A), np.uint64(KEY_B)
    for _ in range(10):
        p0, p1 = a * c0, b * c2
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & m, (p0 >> s32) ^ c3 ^ k1, p0 & m
        k0, k1 = (k0 + key_a) & m, (k1 + key_b) & m
    u = ((c0 >> np.uint64(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)  # exact, as above
    return torch.from_numpy(u)


def _native_philox():
    from .registry import native_library
    lib = native_library()
    return lib if hasattr(lib, "philox_uniform") else None


_C = _native_philox()


def uniform_cpu(seeds: torch.Tensor, offset: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """:func:`uniform_at` for CPU integer tensors (broadcast together), natively (csrc/cpu/sampling.cpp: the
    same integer rounds, ~10x sooner than :func:`uniform_numpy` on the 2-core box) where the library
    has it, else :func:`uniform_numpy`. The same numbers either way."""
    if _C is None or not all(t.is_cpu for t in (seeds, offset, rows, cols)):
        return uniform_numpy(seeds, offset, rows, cols)
    seeds, offset, rows, cols = (t.to(torch.int64).contiguous()
                                 for t in torch.broadcast_tensors(seeds, offset, rows, cols))
    out = torch.empty(seeds.shape, dtype=torch.float32)
    _C.philox_uniform(seeds.data_ptr(), offset.data_ptr(), rows.data_ptr(), cols.data_ptr(), out.numel(),
                      out.data_ptr())
    return out
