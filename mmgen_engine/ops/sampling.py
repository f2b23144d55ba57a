"""Batched per-row token sampling with a counter-based random stream.

``sample(logits, temperature, top_k, top_p, do_sample, seeds, offset, guidance=None, vocab_limit=None,
greedy=False, rows=None) -> tokens [B] int64``

- ``logits [R, V]`` fp32/fp16/bf16. Per-row ``temperature [B]`` f32, ``top_k [B]`` int64 (0 = off),
  ``top_p [B]`` f32 in (0, 1], ``do_sample [B]`` bool, ``seeds [B]`` int64; ``offset`` int64 on
  the logits' device is the step counter, ``[1]`` (every row) or ``[B]`` (per row: rows of a
  continuous batch are at different steps), read on the device so the op can be captured in a CUDA
  graph and replayed with a new offset without a host sync.
- ``rows``: None or ``[B]`` int64 on the logits' device, each row's index in the random stream
  (None: ``0..B-1``). A row of a continuous batch draws what it would draw as row ``rows[b]`` of
  its own request's batch, wherever it sits in the shared one.
- ``guidance``: None (then R == B) or ``[B]`` f32 (then R == 2B, rows ``[uncond_0..uncond_{B-1};
  cond_0..cond_{B-1}]``, combined ``z_b = uncond_b * (1 - g_b) + cond_b * g_b`` in fp32: min-dalle's
  supercondition formula).
- ``vocab_limit``: None or n: only columns ``0..n-1`` take part (e.g. the image-code slice of a
  text+image vocabulary); tokens are < n.
- ``greedy``: the caller's host-side promise that ``do_sample`` is False in every row (a request
  without sampling), so only the argmax is computed.

Per row b, in fp32: the combined logits ``z`` over the sliced vocabulary. ``do_sample[b]`` false:
``argmax z`` (first index on ties). Otherwise ``l = z * inv_t`` with ``inv_t = 1 / temperature[b]``
(one fp32 reciprocal computed with torch, so every backend multiplies by the same number); top-k
keeps every token with ``l >=`` the k-th largest ``l`` (ties at the boundary kept); then top-p over
the softmax of the tokens kept so far keeps token i iff the probability mass of kept tokens with
strictly greater ``l`` is ``< top_p`` (ties are kept or removed together; for distinct values this is
Hugging Face's TopPLogitsWarper; the most likely token is always kept). The token is the argmax over
kept i of ``l_i + gumbel_i``, ``gumbel_i = -log(-log(u_i))``: Gumbel-max, an exact draw from the
categorical distribution.

Randomness: ``u[b, i]`` is :func:`mmgen_engine.ops.random.uniform` - Philox4x32-10 with key
``(seed_b & 0xffffffff, seed_b >> 32)`` and counter ``(i, r_b, o_b & 0xffffffff, o_b >> 32)``
(what ``triton.language.philox`` computes), first word ``x0``, ``u = ((x0 >> 9) + 0.5) * 2**-23``.
``i`` is the vocabulary index, ``r_b = rows[b]`` (``b``, the output row after the guidance
combine, when ``rows`` is None) and ``o_b`` the row's offset (``offset[0]`` when it has one element).
"""
from __future__ import annotations

import torch

from .random import uniform, uniform_cpu
from .registry import (
    CUDA_DEVICES,
    TRITON_DEVICES,
    dispatch,
    native_library,
    native_step_allowed,
    register,
    register_lazy,
)


def combine(logits, guidance, vocab_limit):
    """The fp32 logits ``z [B, n]`` of the spec: the vocabulary slice, guidance-combined."""
    n = logits.shape[-1] if vocab_limit is None else vocab_limit
    logits = logits[:, :n].float()
    if guidance is None:
        return logits
    uncond, cond = logits.chunk(2)
    g = guidance.float()[:, None]
    return uncond * (1 - g) + cond * g


def filter_logits(logits, temperature, top_k, top_p):
    """``l = logits * (1 / temperature)`` with the tokens that top-k and top-p remove set to ``-inf``."""
    logits = logits.float() * temperature.float().reciprocal()[:, None]
    vocab = logits.shape[1]
    ninf = torch.full((), float("-inf"), device=logits.device)  # no host copy: capturable in a CUDA graph
    # On CPU a filter no row uses is skipped (the checks wait for their values: CUDA graphs forbid them)
    cpu = logits.device.type == "cpu"
    # top-k: everything >= the k-th largest value
    k = top_k.clamp(min=0, max=vocab)
    if not cpu or bool((k > 0).any()):
        # on CPU only the largest max(k) values are sorted out; a graph needs a fixed-size sort
        if cpu:
            top = torch.topk(logits, int(k.max()), dim=-1).values
        else:
            top = torch.sort(logits, dim=-1, descending=True).values
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])
        logits = torch.where((logits < kth) & (k[:, None] > 0), ninf, logits)
    if cpu and not bool((top_p < 1).any()):
        return logits
    # top-p: keep i iff the mass strictly above l_i is < top_p (ties share their group's mass above).
    # In descending order the mass before position j is cum[j - 1] (0 at j = 0), which never
    # decreases, so the kept positions are a prefix 0..m, m = #{j < V - 1: cum[j] < top_p}, and with
    # ties (adjacent in that order) the kept tokens are exactly those with l >= the m-th largest l:
    # one threshold per row instead of a scatter of the sorted decisions back
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    probs = e / e.sum(dim=-1, keepdim=True)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = probs.gather(1, order).cumsum(dim=-1)
    last = (cum[:, :-1] < top_p.float()[:, None]).sum(dim=-1, keepdim=True)  # (B, 1)
    return torch.where(logits >= sorted_logits.gather(1, last), logits, ninf)


@register("sample", "reference")
def sample_reference(logits, temperature, top_k, top_p, do_sample, seeds, offset, guidance=None, vocab_limit=None,
                     greedy=False, rows=None):
    z = combine(logits, guidance, vocab_limit)
    if greedy:
        return z.argmax(dim=-1)
    l = filter_logits(z, temperature, top_k, top_p)
    offsets = offset.expand(z.shape[0])
    if rows is None:
        rows = torch.arange(z.shape[0], device=z.device)
    if z.device.type == "cpu":
        # the same scores, with the random words drawn only where a token is kept (removed tokens
        # stay -inf either way); nonzero() waits for its result, so CPU only: CUDA graphs forbid it
        b, i = torch.isfinite(l).nonzero(as_tuple=True)
        u = uniform_cpu(seeds[b], offsets[b], rows[b], i)  # uniform_at's numbers, sooner
        scores = torch.full_like(l, float("-inf"))
        scores[b, i] = l[b, i] - torch.log(-torch.log(u))
    else:
        scores = l - torch.log(-torch.log(uniform(seeds, offsets, rows, z.shape[1])))
    return torch.where(do_sample, scores.argmax(dim=-1), z.argmax(dim=-1))


register_lazy("sample", "triton", "mmgen_engine.kernels.sampling:sample", TRITON_DEVICES)
register_lazy("sample", "cuda", "mmgen_engine.ops.cuda_ops:sample", CUDA_DEVICES)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           do_sample: torch.Tensor, seeds: torch.Tensor, offset: torch.Tensor, guidance: torch.Tensor | None = None,
           vocab_limit: int | None = None, greedy: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits [R, V]`` (R == B, or 2B with ``guidance [B]``), see the
    module docstring. Shapes are checked here; values are not (that would sync with the device).
    ``greedy=True`` is the caller's promise that no row samples (``do_sample`` all False, known on
    the host): only the argmax is computed."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    batch = seeds.shape[0] if seeds.dim() == 1 else -1
    for name, t in [("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("do_sample", do_sample),
                    ("guidance", guidance)]:
        if t is not None and tuple(t.shape) != (batch,):
            raise ValueError(f"{name} must have shape [B] = seeds' shape {tuple(seeds.shape)}, got {tuple(t.shape)}")
    want_rows = batch if guidance is None else 2 * batch
    if batch < 1 or logits.shape[0] != want_rows:
        raise ValueError(f"logits must have {'2B' if guidance is not None else 'B'} rows for B = {batch} "
                         f"{'with' if guidance is not None else 'without'} guidance, got {logits.shape[0]}")
    vocab = logits.shape[1]
    if vocab < 1:
        raise ValueError("logits has an empty vocabulary")
    if vocab_limit is not None and (type(vocab_limit) is not int or not 1 <= vocab_limit <= vocab):
        raise ValueError(f"vocab_limit must be an integer in [1, {vocab}], got {vocab_limit!r}")
    for name, t, shapes in [("offset", offset, {(1,), (batch,)}), ("rows", rows, {(batch,)})]:
        if t is not None and (tuple(t.shape) not in shapes or t.dtype != torch.int64 or t.device != logits.device):
            want = " or ".join(f"[{s[0]}]" for s in sorted(shapes))
            raise ValueError(f"{name} must be a {want} int64 tensor on {logits.device}, got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}")
    return dispatch("sample", logits)(logits, temperature, top_k, top_p, do_sample, seeds, offset, guidance,
                                      vocab_limit, greedy, rows)


# ---------------------------------------------------------------------------------------------
# CPU: the pick from Gumbel noise drawn ahead (runtime.sampler.Sampler.draw_ahead), what a recorded
# decode step replays; natively (csrc/cpu/sampling.cpp) where it can run.
# ---------------------------------------------------------------------------------------------

_C = native_library() if hasattr(native_library(), "sample_drawn") else None


def sample_drawn_reference(logits, temperature, top_k, top_p, do_sample, offset, guidance, vocab_limit, drawn):
    """:func:`sample_reference` with its Gumbel noise looked up in ``drawn [B, offsets, n]``: the
    reference scores a kept token ``l - log(-log(u))`` and a removed one ``-inf``, and so does ``l -
    drawn`` (``-inf`` minus a finite number); torch's CPU ``log`` rounds each element alike whether it
    is taken over the kept tokens or the whole table (checked in tests/test_step_overhead.py), so the
    tokens are the reference's bitwise."""
    z = combine(logits, guidance, vocab_limit)
    l = filter_logits(z, temperature, top_k, top_p)
    at = offset.expand(z.shape[0])[:, None, None].expand(-1, 1, z.shape[1])
    scores = l - drawn.gather(1, at)[:, 0]
    return torch.where(do_sample, scores.argmax(dim=-1), z.argmax(dim=-1))


def _native_fits(logits, temperature, top_k, top_p, do_sample, offset, n: int, drawn) -> bool:
    """Whether csrc/cpu/sampling.cpp can take these: CPU tensors of the dtypes and sizes it reads."""
    rows = logits.shape[0] if logits.dim() == 2 else 0
    per_row = ((temperature, torch.float32), (top_k, torch.int64), (top_p, torch.float32), (do_sample, torch.bool))
    return (rows > 0 and logits.dtype == torch.float32 and logits.is_cpu and logits.stride(1) == 1
            and 1 <= n <= logits.shape[1] and drawn.dim() == 3 and drawn.shape[0] == rows and drawn.shape[2] == n
            and drawn.dtype == torch.float32 and drawn.is_cpu and drawn.stride(2) == 1
            and all(t.shape == (rows,) and t.dtype == dtype and t.is_cpu for t, dtype in per_row)
            and offset.dtype == torch.int64 and offset.is_cpu and offset.shape in ((1,), (rows,)))


def _native_drawn(logits, temperature, top_k, top_p, do_sample, offset, n: int, drawn) -> torch.Tensor:
    """csrc/cpu/sampling.cpp on tensors :func:`_native_fits` passed (the offsets' values it checks)."""
    rows = logits.shape[0]
    out = torch.empty(rows, dtype=torch.int64)
    temperature, top_k, top_p, do_sample, offset = (t.contiguous() for t in (temperature, top_k, top_p, do_sample,
                                                                             offset))
    _C.sample_drawn(logits.data_ptr(), logits.stride(0), rows, n, temperature.data_ptr(), top_k.data_ptr(),
                    top_p.data_ptr(), do_sample.data_ptr(), drawn.data_ptr(), drawn.stride(0), drawn.stride(1),
                    drawn.shape[1], offset.data_ptr(), offset.numel(), out.data_ptr())
    return out


if _C is not None:
    _LIB = torch.library.Library("mmgen", "FRAGMENT")
    _LIB.define("sample_drawn(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor do_sample, "
                "Tensor offset, int n, Tensor drawn) -> Tensor")
    _LIB.impl("sample_drawn", _native_drawn, "CPU")


def sample_drawn(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 do_sample: torch.Tensor, offset: torch.Tensor, guidance: torch.Tensor | None,
                 vocab_limit: int | None, drawn: torch.Tensor) -> torch.Tensor:
    """Next tokens ``[B]`` as :func:`sample` picks them (without ``seeds`` and ``rows``: their noise is
    in ``drawn [B, offsets, n]``, ``n`` the vocabulary slice, as
    :meth:`~mmgen_engine.runtime.sampler.Sampler.draw_ahead` stores it). No host call, so a recording
    (:mod:`mmgen_engine.runtime.recorded`) can replay it. Natively in one call for float32 logits
    without guidance where the native library has it (and ``MMGEN_CPU_NATIVE_STEP`` /
    ``MMGEN_BACKEND`` leave it on): the same math, whose exponential may differ from torch's in the
    last bit (a token exactly on the top-p boundary could move); else
    :func:`sample_drawn_reference`."""
    n = logits.shape[1] if vocab_limit is None else vocab_limit
    if _C is not None and guidance is None and native_step_allowed("sample") and _native_fits(
            logits, temperature, top_k, top_p, do_sample, offset, n, drawn):
        if torch.jit.is_tracing():
            return torch.ops.mmgen.sample_drawn(logits, temperature, top_k, top_p, do_sample, offset, n, drawn)
        return _native_drawn(logits, temperature, top_k, top_p, do_sample, offset, n, drawn)
    return sample_drawn_reference(logits, temperature, top_k, top_p, do_sample, offset, guidance, vocab_limit, drawn)
