"""The Triton sampling kernel (kernels/triton/sampling.py) against the reference, token for token.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes are
small and awkward: one-column and odd vocabularies, guidance, vocab_limit, every top-k / top-p kind
per row, -inf rows, ties, fp16; one GPT-2-sized row; rows split over several programs, and over many
small ones (CHUNK and BLOCK patched). Philox is checked against Random123's known answers and
``tl.philox``. The ``gpu`` tests run real sizes and a CUDA-graph replay.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from mmgen_engine import SamplingParams
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
    for offset in [0, 1, 2**32 + 5]:
        for vocab_limit in [None, 16384]:
            out, ref = both(logits, *params, torch.tensor([offset], device="cuda"), guidance, vocab_limit)
            assert torch.equal(out, ref), (offset, vocab_limit, (out != ref).nonzero().flatten().tolist())


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
