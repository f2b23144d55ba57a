"""The Triton sampling kernel (kernels/triton/sampling.py) against the reference, token for token.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes are
small and awkward: one-column and odd vocabularies, guidance, vocab_limit, every top-k / top-p kind
per row, -inf rows, ties, fp16; one GPT-2-sized row; rows split over several programs, and over many
small ones (CHUNK and BLOCK patched). Philox is checked against Random123's known answers and
``tl.philox``. Per-row step counters and stream rows (continuous batching) are checked here for both
kernels - Triton's and the ``cuda`` backend's, on CPU through the SIMT emulator (tests/native) - a
row drawing what it draws as its stream row of its own request's batch. The ``gpu`` tests run real
sizes and CUDA-graph replays.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from mmgen_engine import SamplingParams
from mmgen_engine.ops import cuda_ops
from mmgen_engine.ops.random import philox4x32
from mmgen_engine.ops.sampling import sample_reference
from mmgen_engine.runtime import Sampler

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402  (needs triton)

from mmgen_engine.kernels import sampling as sampling_kernel  # noqa: E402  (needs triton)


def make_logits(rows, vocab, kind, dtype, g):
    if kind == "ties":  # a handful of distinct values: ties everywhere, also at the thresholds
        logits = torch.randint(-2, 3, (rows, vocab), generator=g).float()
    else:
        logits = torch.randn(rows, vocab, generator=g) * 3
    if kind == "-inf":  # suppressed tokens, the same in both halves of a guided batch
        logits[:, torch.rand(vocab, generator=g) < 0.4] = float("-inf")
    return logits.to(dtype)


def grid_params(batch, vocab, g):
    """Per-row parameters cycling through every (top_k, top_p) kind; temperatures and do_sample mixed
    (rows 1 and 6 greedy)."""
    combos = list(itertools.product([0, 1, 5, vocab], [1.0, 0.9, 0.3]))
    top_k, top_p = (torch.tensor([combos[i % len(combos)][j] for i in range(batch)]) for j in (0, 1))
    temperature = torch.tensor([1.0, 0.7, 30.0, 1.3][:batch] * batch)[:batch]
    do_sample = torch.tensor([i not in (1, 6) for i in range(batch)])
    seeds = torch.randint(0, 2**63 - 1, (batch,), generator=g)
    return temperature, top_k, top_p.float(), do_sample, seeds


def both(*args):
    ref = sample_reference(*args)
    out = sampling_kernel.sample(*args)
    assert out.dtype == torch.int64 and out.shape == ref.shape
    return out, ref


CASES = [  # batch, vocab, guided, vocab_limit, logits kind, dtype
    (1, 1, False, None, "randn", torch.float32),
    (3, 7, False, None, "randn", torch.float32),
    (12, 97, False, None, "randn", torch.float32),
    (12, 97, False, None, "ties", torch.float32),
    (12, 97, True, None, "-inf", torch.float32),
    (3, 97, True, 50, "ties", torch.float16),
    (12, 1000, False, 900, "randn", torch.float16),
    (3, 1000, True, None, "randn", torch.float32),
]


@pytest.mark.parametrize("batch,vocab,guided,vocab_limit,kind,dtype", CASES)
def test_matches_reference(batch, vocab, guided, vocab_limit, kind, dtype):
    g = torch.Generator().manual_seed(batch * vocab)
    logits = make_logits(2 * batch if guided else batch, vocab, kind, dtype, g)
    # keep g_b in [0, 1) for -inf rows: -inf * (1 - g) + -inf * g stays -inf
    guidance = (torch.rand(batch, generator=g) * (1 if kind == "-inf" else 4)) if guided else None
    params = grid_params(batch, vocab_limit or vocab, g)
    for offset in [0, 2**32 + 5]:
        out, ref = both(logits, *params, torch.tensor([offset]), guidance, vocab_limit)
        assert torch.equal(out, ref), (offset, out.tolist(), ref.tolist())


@pytest.mark.parametrize("guided,vocab_limit", [(False, None), (True, 3000)])
def test_greedy_requests_take_the_argmax_only(guided, vocab_limit):
    """``greedy=True`` (no row samples, known on the host): only pass 1 and the combine run; the
    tokens are the first argmax of the combined logits, as with ``do_sample`` all False."""
    batch, vocab = 3, 2 * sampling_kernel.CHUNK + 999
    g = torch.Generator().manual_seed(vocab)
    logits = make_logits(2 * batch if guided else batch, vocab, "ties", torch.float32, g)
    temperature, top_k, top_p, _, seeds = grid_params(batch, vocab, g)
    args = (logits, temperature, top_k, top_p, torch.zeros(batch, dtype=torch.bool), seeds, torch.tensor([3]),
            torch.rand(batch, generator=g) * 2 if guided else None, vocab_limit)
    out, ref = sampling_kernel.sample(*args, greedy=True), sample_reference(*args, greedy=True)
    assert torch.equal(out, ref) and torch.equal(out, sample_reference(*args))


def test_gpt2_vocabulary_row():
    """One 50257-column row through every pass (top-k and top-p both active)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50257, generator=g) * 3
    args = (torch.tensor([0.8, 1.0]), torch.tensor([50, 0]), torch.tensor([0.9, 1.0]), torch.tensor([True, False]),
            torch.tensor([123, 4]), torch.tensor([7]))
    out, ref = both(logits, *args)
    assert torch.equal(out, ref)


def test_several_parts_mixed_rows_guidance_and_vocab_limit():
    """A vocabulary of 3 * CHUNK + 5 columns cut to 3 * CHUNK + 1 (4 programs per row, the last with one
    column), guided: rows with a top-k whose boundary (a tie group) spans parts, then top-p; greedy
    with both filters set (which it ignores); top-p alone."""
    vocab = 3 * sampling_kernel.CHUNK + 5
    g = torch.Generator().manual_seed(vocab)
    logits = make_logits(6, vocab, "ties", torch.float32, g)
    args = (torch.tensor([0.9, 1.0, 1.5]), torch.tensor([2 * sampling_kernel.CHUNK + 3, 50, 0]),
            torch.tensor([0.95, 0.9, 0.5]), torch.tensor([True, False, True]),
            torch.randint(0, 2**63 - 1, (3,), generator=g), torch.tensor([11]), torch.rand(3, generator=g) * 3)
    out, ref = both(logits, *args, vocab - 4)
    assert torch.equal(out, ref), (out.tolist(), ref.tolist())


def test_many_small_parts_match_the_reference_and_each_other(monkeypatch):
    """With 32-column blocks and slices of 1, 2 or all blocks, the cross-part combines (max and first
    index, radix digits, exp and mass sums) run over many parts at a small vocabulary; the fp32 sums
    are over blocks, so the tokens cannot depend on the number of parts."""
    monkeypatch.setattr(sampling_kernel, "BLOCK", 32)
    g = torch.Generator().manual_seed(6)
    batch, vocab = 4, 150
    logits = make_logits(2 * batch, vocab, "ties", torch.float16, g)
    args = (torch.tensor([1.0, 0.7, 1.3, 2.0]), torch.tensor([40, 5, 0, 150]), torch.tensor([0.8, 1.0, 0.6, 0.3]),
            torch.tensor([True, True, True, False]), torch.randint(0, 2**63 - 1, (batch,), generator=g),
            torch.tensor([3]), torch.rand(batch, generator=g) * 2, 148)
    tokens = []
    for chunk in [32, 64, 4096]:  # 5, 3 and 1 parts
        monkeypatch.setattr(sampling_kernel, "CHUNK", chunk)
        out, ref = both(logits, *args)
        assert torch.equal(out, ref), (chunk, out.tolist(), ref.tolist())
        tokens.append(out)
    assert all(torch.equal(t, tokens[0]) for t in tokens)


def test_high_temperature_draws_cover_exactly_the_kept_set():
    """At temperature 1e4 the draw is near uniform over the kept set, so over many offsets any
    difference in the top-k/top-p thresholds would show up as a differing token."""
    logits = torch.tensor([[4.0, 1.0, 3.0, 3.0, 2.5, 0.0, 3.0, -1.0]]).expand(2, -1).contiguous()
    args = (torch.full((2,), 1e4), torch.tensor([3, 0]), torch.tensor([1.0, 0.6]), torch.tensor([True, True]),
            torch.tensor([1, 2]))
    seen = set()
    for offset in range(40):
        out, ref = both(logits, *args, torch.tensor([offset]))
        assert torch.equal(out, ref)
        seen |= {tuple(out.tolist())}
    assert {t[0] for t in seen} == {0, 2, 3, 6}  # top-3, with the three-way tie at 3.0 kept
    assert {t[1] for t in seen} == {0, 2, 3, 4, 6}  # probabilities ~1/8: 4 tokens above 2.5 hold < 0.6


def test_non_contiguous_logits():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 120, generator=g)
    args = (torch.ones(3), torch.tensor([5, 0, 0]), torch.tensor([1.0, 0.9, 1.0]), torch.tensor([True, True, False]),
            torch.tensor([1, 2, 3]), torch.tensor([0]))
    for logits in [wide[:, :97], wide.t().contiguous().t()]:  # row stride 120; column-major
        out, ref = both(logits, *args)
        assert torch.equal(out, ref)


def test_same_seed_same_tokens_and_offsets_differ():
    logits = torch.zeros(3, 500)  # uniform: every token is a fair draw
    args = (torch.ones(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), torch.ones(3, dtype=torch.bool),
            torch.tensor([9, 9, 9]))
    a = sampling_kernel.sample(logits, *args, torch.tensor([1]))
    assert torch.equal(a, sampling_kernel.sample(logits, *args, torch.tensor([1])))
    assert len(set(a.tolist())) == 3  # rows differ through the counter, not the seed
    assert not torch.equal(a, sampling_kernel.sample(logits, *args, torch.tensor([2])))


def test_vocab_limit_never_returns_an_index_at_or_above_it():
    logits = torch.zeros(4, 300)
    logits[:, 200:] = 50.0
    args = (torch.ones(4), torch.tensor([0, 1, 5, 0]), torch.tensor([1.0, 1.0, 0.3, 0.9]),
            torch.tensor([True, True, True, False]), torch.tensor([1, 2, 3, 4]), torch.tensor([0]))
    assert int(sampling_kernel.sample(logits, *args, None, 200).max()) < 200


def test_registered_as_the_triton_backend(monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    sampler = Sampler(SamplingParams(do_sample=True, top_k=5, seed=11), 2, torch.device("cpu"))
    logits = torch.randn(2, 97, generator=torch.Generator().manual_seed(4))
    first = sampler(logits, torch.tensor([3]))
    monkeypatch.setenv("MMGEN_BACKEND", "reference")
    assert torch.equal(first, sampler(logits, torch.tensor([3])))


# ---- per-row step counters and stream rows (continuous batching) ----

@pytest.fixture(params=["triton", "cuda-emulated", pytest.param("triton-gpu", marks=pytest.mark.gpu),
                        pytest.param("cuda-gpu", marks=pytest.mark.gpu)])
def kernel(request, monkeypatch):
    """(sample function, device): the Triton kernel or the ``cuda`` backend's wrapper, on CPU (Triton's
    interpreter; the CUDA kernel compiled against the SIMT emulator) or, marked ``gpu``, on a GPU."""
    if request.param == "cuda-emulated":
        import emulated  # tests/emulated.py: builds the CPU-emulated kernels, or skips without g++

        monkeypatch.setattr(cuda_ops, "_C", emulated.load())
    elif request.param == "cuda-gpu" and not cuda_ops._C.cuda:
        pytest.fail("mmgen_engine._C was built without CUDA on a machine with a GPU")
    fn = sampling_kernel.sample if request.param.startswith("triton") else cuda_ops.sample
    return fn, "cuda" if request.param.endswith("gpu") else "cpu"


def to(device, *args):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("batch,vocab,guided,vocab_limit,kind,dtype", CASES)
def test_per_row_offsets_and_rows_match_the_reference(batch, vocab, guided, vocab_limit, kind, dtype, kernel):
    """``offset [B]`` (per-row step counters, across the 2**32 boundary of the counter's words) and
    ``rows [B]`` (stream rows: repeated, out of order, up to 2**32 - 1), each alone and together."""
    fn, device = kernel
    g = torch.Generator().manual_seed(batch * vocab + 1)
    logits = make_logits(2 * batch if guided else batch, vocab, kind, dtype, g)
    guidance = (torch.rand(batch, generator=g) * (1 if kind == "-inf" else 4)) if guided else None
    params = grid_params(batch, vocab_limit or vocab, g)
    offsets = torch.tensor([0, 2**32 - 1, 2**32, 7, 2**40 + 3, 1][:batch] * batch)[:batch]
    offsets[-1] += 2**33  # each row its own counter (also for B = 1)
    rows = torch.tensor([3, 0, 2**32 - 1, 3, 11, 1][:batch] * batch)[:batch]
    for offset, stream_rows in [(offsets, None), (offsets[:1], rows), (offsets, rows)]:
        args = to(device, logits, *params, offset, guidance, vocab_limit, False, stream_rows)
        out, ref = fn(*args), sample_reference(*args)
        assert out.dtype == torch.int64 and torch.equal(out, ref), (offset.tolist(), out.tolist(), ref.tolist())


def continuous_batch(vocab, guided, dtype, g):
    """Four requests, each a batch of its own (rows ``0..n-1``, its own seed, parameters and step
    counter), and one shared batch holding all their rows interleaved. Returns the requests' argument
    lists (offset ``[1]``), the shared batch's (offset and rows ``[B]``) and, per shared row, its
    (request, row)."""
    steps = [5, 2**32 + 7, 0, 2**33 + 2**31]
    requests = []
    for i, (n, step) in enumerate(zip([3, 2, 1, 4], steps)):
        logits = torch.randn(2 * n if guided else n, vocab, generator=g) * 0.5  # flat: many likely tokens
        temperature, top_k, top_p, do_sample, _ = grid_params(n, vocab, g)
        temperature = temperature.clamp(max=2.0)
        seeds = torch.full((n,), int(torch.randint(0, 2**63 - 1, (), generator=g)))  # one seed per request
        guidance = torch.rand(n, generator=g) * 3 if guided else None
        requests.append([logits.to(dtype), temperature, top_k, top_p, do_sample, seeds, torch.tensor([step]),
                         guidance])
    slots = [(req, row) for req, r in enumerate(requests) for row in range(r[5].shape[0])]
    slots = [slots[i] for i in torch.randperm(len(slots), generator=g).tolist()]

    def gather(k):
        return torch.stack([requests[req][k][row] for req, row in slots])

    logits = [requests[req][0][row] for req, row in slots]
    if guided:  # unconditioned rows first, then the conditioned ones, in the shared order
        logits += [requests[req][0][row + requests[req][5].shape[0]] for req, row in slots]
    shared = [torch.stack(logits), *(gather(k) for k in range(1, 6)),
              torch.tensor([steps[req] for req, _ in slots]), gather(7) if guided else None]
    return requests, shared, torch.tensor([row for _, row in slots]), slots


@pytest.mark.parametrize("guided,vocab_limit,dtype", [(False, None, torch.float32), (True, None, torch.float32),
                                                      (False, 70, torch.float16), (True, 50, torch.bfloat16)])
def test_continuous_batch_rows_draw_what_their_own_batch_draws(guided, vocab_limit, dtype, kernel):
    """Row b of a shared batch with ``rows[b] = r`` and ``offset[b] = o`` draws exactly the token of
    row r of its own request's batch at the ``[1]`` offset o - wherever it sits in the shared batch."""
    fn, device = kernel
    g = torch.Generator().manual_seed(97 + guided)
    requests, shared, rows, slots = continuous_batch(97, guided, dtype, g)
    own = [fn(*to(device, *args, vocab_limit)) for args in requests]
    out = fn(*to(device, *shared, vocab_limit, False, rows))
    assert torch.equal(out, torch.stack([own[req][row] for req, row in slots])), (out.tolist(), slots)
    assert torch.equal(out, sample_reference(*to(device, *shared, vocab_limit, False, rows)))
    # not by chance: as rows 0..B-1 at one offset the shared batch draws other tokens
    plain = fn(*to(device, *shared[:6], shared[6][:1], shared[7], vocab_limit))
    assert not torch.equal(out, plain)


def test_per_row_offset_of_equal_values_and_rows_arange_change_nothing(kernel):
    """``offset [B]`` holding one value (also an expanded ``[1]``: stride 0) is the ``[1]`` offset;
    ``rows = 0..B-1`` is ``rows=None``; strided views of ``offset`` and ``rows`` are read as their
    values."""
    fn, device = kernel
    g = torch.Generator().manual_seed(12)
    logits = make_logits(5, 300, "randn", torch.float32, g)
    params = grid_params(5, 300, g)
    one = torch.tensor([2**32 + 9], device=device)
    expect = fn(*to(device, logits, *params, one))
    for offset, rows in [(torch.full((5,), 2**32 + 9), None), (one, torch.arange(5)), (one.expand(5), None),
                         (torch.full((5,), 2**32 + 9), torch.arange(5))]:
        assert torch.equal(fn(*to(device, logits, *params, offset, None, None, False, rows)), expect)
    offsets, rows = torch.tensor([4, 0, 2**32, 0, 6, 0, 1, 0, 9]), torch.tensor([2, 0, 1, 0, 0, 0, 7, 0, 3])
    args = to(device, logits, *params, offsets[::2], None, None, False, rows[::2])
    assert torch.equal(fn(*args), sample_reference(*to(device, logits, *params, offsets[::2].contiguous(), None,
                                                         None, False, rows[::2].contiguous())))
    # a greedy call reads neither
    args = to(device, logits, *params[:3], torch.zeros(5, dtype=torch.bool), params[4], torch.full((5,), 3))
    assert torch.equal(fn(*args, None, None, True, torch.arange(5, device=device)), logits.argmax(-1).to(device))


def test_cuda_wrapper_rejects_bad_offset_and_rows_before_any_launch(monkeypatch):
    """The ``cuda`` backend indexes ``offset`` and ``rows`` by row: a wrong shape, dtype or device
    would read out of bounds, so its wrapper checks them even when called without ``ops.sample``."""
    import emulated

    monkeypatch.setattr(cuda_ops, "_C", emulated.load())
    logits = torch.randn(3, 20)
    params = (torch.ones(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), torch.ones(3, dtype=torch.bool),
              torch.arange(3))
    one = torch.tensor([0])
    with pytest.raises(ValueError, match=r"offset must have shape \(1,\) or \(3,\), got \(2,\)"):
        cuda_ops.sample(logits, *params, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"offset must have shape \(1,\) or \(3,\), got \(\)"):
        cuda_ops.sample(logits, *params, torch.tensor(0))
    with pytest.raises(TypeError, match="offset must be int64"):
        cuda_ops.sample(logits, *params, one.int())
    with pytest.raises(ValueError, match=r"rows must have shape \(3,\), got \(1,\)"):
        cuda_ops.sample(logits, *params, one, rows=torch.tensor([0]))
    with pytest.raises(TypeError, match="rows must be int64"):
        cuda_ops.sample(logits, *params, one, rows=torch.arange(3, dtype=torch.int32))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="rows is on cuda"):
            cuda_ops.sample(logits, *params, one, rows=torch.arange(3, device="cuda"))


@triton.jit
def _philox_kernel(out_ptr, seed, c_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    words = [tl.load(c_ptr + j * n + i, mask=mask).to(tl.uint32) for j in range(4)]
    x = tl.philox(seed, words[0], words[1], words[2], words[3])
    for j in tl.static_range(4):
        tl.store(out_ptr + j * n + i, x[j].to(tl.int64), mask=mask)


def tl_philox(key0, key1, counters):
    """``tl.philox`` under key ``(key0, key1)`` of counters ``[4, n]``: ``[4, n]`` words."""
    out = torch.empty_like(counters)
    seed = key0 | key1 << 32
    _philox_kernel[(1,)](out, seed - 2**64 if seed >= 2**63 else seed, counters, counters.shape[1], BLOCK=64)
    return out


def test_philox_known_answers_and_torch_match_triton():
    kat = [  # Random123's kat_vectors for philox4x32_R(10)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expect in kat:
        assert tl_philox(*key, torch.tensor(ctr)[:, None]).flatten().tolist() == list(expect)
    counters = torch.randint(0, 2**32, (4, 50), generator=torch.Generator().manual_seed(5))
    for key in [(0, 0), (7, 0), (0xDEADBEEF, 0x7FFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF)]:
        assert torch.equal(tl_philox(*key, counters), torch.stack(philox4x32(*key, *counters)))


# ---- on a GPU: real sizes, and replay in a CUDA graph ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_gpt2_sizes_match_reference_on_cuda(dtype, guided):
    batch, vocab = 16, 50257
    g = torch.Generator().manual_seed(1)
    logits = make_logits(2 * batch if guided else batch, vocab, "randn", dtype, g).cuda()
    guidance = (torch.rand(batch, generator=g) * 4).cuda() if guided else None
    params = [t.cuda() for t in grid_params(batch, vocab, g)]
    per_row = torch.randint(0, 2**40, (batch,), generator=g).cuda()
    stream_rows = torch.randint(0, 2**32, (batch,), generator=g).cuda()
    for offset, rows in [(0, None), (1, None), (2**32 + 5, None), (per_row, None), (per_row, stream_rows)]:
        offset = offset if isinstance(offset, torch.Tensor) else torch.tensor([offset], device="cuda")
        for vocab_limit in [None, 16384]:
            out, ref = both(logits, *params, offset, guidance, vocab_limit, False, rows)
            assert torch.equal(out, ref), (offset.tolist(), rows is not None, vocab_limit,
                                           (out != ref).nonzero().flatten().tolist())


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_calls(monkeypatch):
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    device, batch, steps = torch.device("cuda"), 16, 8
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    logits = (torch.randn(batch, 50257, generator=torch.Generator().manual_seed(2)) * 3).half().to(device)

    eager = Sampler(params, batch, device)
    expect = torch.stack([eager(logits, torch.tensor([i], device=device)) for i in range(steps)])

    graphed = Sampler(params, batch, device)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed(logits, offset)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = graphed(logits, offset)
        offset += 1  # the caller's step counter, advanced on the device
    got = []
    for _ in range(steps):
        graph.replay()
        got.append(tokens.clone())
    assert torch.equal(torch.stack(got), expect)
    assert offset.item() == steps
    assert len({tuple(step) for step in expect.tolist()}) > 1  # the offset moved on every replay


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_with_per_row_offsets_and_rows(backend):
    """A captured call with ``offset [B]`` and ``rows [B]`` replays with the counters the caller
    advanced on the device (and rows it rewrote), as the eager reference draws."""
    if backend == "cuda" and not cuda_ops._C.cuda:
        pytest.fail("mmgen_engine._C was built without CUDA on a machine with a GPU")
    fn = sampling_kernel.sample if backend == "triton" else cuda_ops.sample
    device, batch = torch.device("cuda"), 8
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(batch, 50257, generator=g) * 3).half().to(device)
    params = [t.to(device) for t in grid_params(batch, 50257, g)]
    start = torch.tensor([0, 5, 2**32 - 2, 3, 9, 1, 2**35, 7], device=device)
    offset, rows = start.clone(), torch.tensor([0, 1, 0, 2, 1, 0, 3, 0], device=device)
    args = lambda o, r: (logits, *params, o, None, None, False, r)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*args(offset, rows))  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = fn(*args(offset, rows))
        offset += 1
    for step in range(4):
        if step == 2:
            rows.copy_(rows.flip(0))
        graph.replay()
        assert torch.equal(tokens, sample_reference(*args(start + step, rows))), step
    assert torch.equal(offset, start + 4)
