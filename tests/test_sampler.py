"""Sampler and the reference ``sample`` op: greedy, top-k (ties kept), top-p mass, temperature,
guidance, vocab_limit, seeding and offsets (one for every row, or per row, with the rows' stream
indices: continuous batching), Philox known answers, parameter validation.

The statistics run on the reference (the spec); tests/test_kernels_sampling.py shows the Triton
kernel picks the same tokens.
"""
from __future__ import annotations

import math

import pytest
import torch

from mmgen_engine import InputError, SamplingParams
from mmgen_engine.ops import sample
from mmgen_engine.ops.random import philox4x32, uniform
from mmgen_engine.ops.sampling import filter_logits
from mmgen_engine.runtime import Sampler


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """Thousands of rows per draw: too many for the Triton interpreter."""
    monkeypatch.setenv("MMGEN_BACKEND", "reference")


def rows(b, value, dtype=torch.float32):
    return torch.full((b,), value, dtype=dtype)


def step(i: int) -> torch.Tensor:
    """The step counter (Philox offset) a caller hands the sampler."""
    return torch.tensor([i])


def draw(logits, params: SamplingParams, n: int) -> torch.Tensor:
    """``n`` independent tokens from one row of logits."""
    sampler = Sampler(params, n, logits.device)
    return sampler(logits.expand(n, -1).contiguous(), step(0))


def kept(logits, top_k=0, top_p=1.0):
    return torch.isfinite(filter_logits(logits, rows(1, 1.0), rows(1, top_k, torch.int64), rows(1, top_p)))[0].tolist()


def test_greedy_is_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 5.0]])
    assert Sampler(None, 2, logits.device)(logits, step(0)).tolist() == [1, 0]


def test_top_k_never_leaves_top_k():
    torch.manual_seed(0)
    logits = torch.randn(1, 97)
    top = set(logits[0].topk(5).indices.tolist())
    tokens = draw(logits, SamplingParams(do_sample=True, top_k=5, seed=1), 4000)
    assert set(tokens.tolist()) <= top
    assert len(set(tokens.tolist())) == 5


def test_top_k_keeps_ties_at_the_boundary():
    assert kept(torch.tensor([[4.0, 1.0, 3.0, 3.0, 3.0, 0.0]]), top_k=2) == [True, False, True, True, True, False]
    # -0.0 == 0.0 is a tie too
    assert kept(torch.tensor([[1.0, 0.0, -0.0, -1.0]]), top_k=2) == [True, True, True, False]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    for p, expect in [(0.3, 1), (0.6, 2), (0.7, 2), (0.8, 3), (0.85, 3), (0.95, 4), (0.99, 5), (1.0, 5)]:
        assert sum(kept(logits, top_p=p)) == expect, p
    tokens = draw(logits, SamplingParams(do_sample=True, top_p=0.8, seed=3), 4000)
    assert set(tokens.tolist()) == {0, 1, 2}
    freq = torch.bincount(tokens, minlength=5).float() / 4000
    renorm = probs[0, :3] / probs[0, :3].sum()
    assert torch.allclose(freq[:3], renorm, atol=0.03)


def test_top_p_keeps_or_removes_ties_together():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    top = torch.softmax(logits, -1)[0, 0].item()
    assert kept(logits, top_p=top + 0.01) == [True, True, True, False]  # mass above the ties < top_p
    assert kept(logits, top_p=top - 0.01) == [True, False, False, False]
    # the most likely tokens are always kept, also when they tie
    assert kept(torch.tensor([[1.0, 1.0, 0.0]]), top_p=0.01) == [True, True, False]


def test_top_p_applies_to_the_top_k_survivors():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    # over the two survivors token 0 has ~0.73 of the mass, so top_p 0.75 needs token 1 as well
    assert kept(logits, top_k=2, top_p=0.75) == [True, True, False, False]
    assert kept(logits, top_k=2, top_p=0.7) == [True, False, False, False]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax_distribution(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 1.5, -0.5, 0.2, 0.1, -2.0]])
    n = 20000
    tokens = draw(logits, SamplingParams(do_sample=True, temperature=temperature, seed=7), n)
    freq = torch.bincount(tokens, minlength=10).float() / n
    expect = torch.softmax(logits[0] / temperature, -1)
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - expect).abs() <= 4 * torch.sqrt(expect * (1 - expect) / n) + 1e-3)


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    a = Sampler(SamplingParams(do_sample=True, seed=42), 8, logits.device)
    b = Sampler(SamplingParams(do_sample=True, seed=42), 8, logits.device)
    c = Sampler(SamplingParams(do_sample=True, seed=43), 8, logits.device)
    seq_a = torch.stack([a(logits, step(i)) for i in range(5)])
    seq_b = torch.stack([b(logits, step(i)) for i in range(5)])
    seq_c = torch.stack([c(logits, step(i)) for i in range(5)])
    assert torch.equal(seq_a, seq_b)
    assert not torch.equal(seq_a, seq_c)
    assert len({tuple(step) for step in seq_a.tolist()}) > 1  # each step draws with its own offset


def test_unseeded_samplers_differ():
    logits = torch.zeros(16, 1000)
    params = SamplingParams(do_sample=True)
    assert not torch.equal(Sampler(params, 16, logits.device)(logits, step(0)),
                           Sampler(params, 16, logits.device)(logits, step(0)))


def test_per_row_do_sample_mixes_greedy_and_sampled():
    """Sampled rows are the Gumbel-max of the spec: argmax(l - log(-log u)) with Philox's u."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    do_sample = torch.tensor([True, False, True, False])
    seeds, offset = torch.tensor([5, 6, 2**40 + 7, 8]), torch.tensor([2**33 + 3])
    out = sample(logits, rows(4, 1.0), rows(4, 0, torch.int64), rows(4, 1.0), do_sample, seeds, offset)
    greedy = logits.argmax(-1)
    assert out[1] == greedy[1] and out[3] == greedy[3]
    u = uniform(seeds, offset, torch.arange(4), 30)
    assert torch.equal(out[[0, 2]], (logits - torch.log(-torch.log(u))).argmax(-1)[[0, 2]])


def test_guidance_combines_unconditioned_and_conditioned_rows():
    g = torch.Generator().manual_seed(2)
    uncond, cond = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    sampler = Sampler(SamplingParams(guidance_scale=4.0), 3, uncond.device, guidance=True)
    tokens = sampler(torch.cat([uncond, cond]), step(0))
    assert torch.equal(tokens, (uncond * (1 - 4.0) + cond * 4.0).argmax(-1))


def test_vocab_limit_restricts_tokens():
    logits = torch.zeros(64, 100)
    logits[:, 90:] = 10.0  # the best tokens lie outside the limit
    for params in [SamplingParams(), SamplingParams(do_sample=True, seed=0)]:
        tokens = Sampler(params, 64, logits.device, vocab_limit=90)(logits, step(0))
        assert int(tokens.max()) < 90


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32_R(10): (counter, key) -> output."""
    for ctr, key, out in [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]:
        assert [int(w) for w in philox4x32(*key, *ctr)] == list(out)


def test_uniform_is_strictly_inside_the_unit_interval():
    u = uniform(torch.tensor([0, 2**62 + 1]), torch.tensor([0]), torch.tensor([0, 1]), 100_000)
    assert u.dtype == torch.float32 and u.shape == (2, 100_000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert not torch.equal(u[0], u[1])


def test_sample_rejects_bad_shapes():
    logits, b = torch.randn(2, 10), 2
    args = dict(temperature=rows(b, 1.0), top_k=rows(b, 0, torch.int64), top_p=rows(b, 1.0),
                do_sample=rows(b, True, torch.bool), seeds=rows(b, 0, torch.int64),
                offset=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="2B rows"):
        sample(logits, **args, guidance=rows(b, 1.0))
    with pytest.raises(ValueError, match="B rows"):
        sample(torch.randn(3, 10), **args)
    with pytest.raises(ValueError, match="vocab_limit"):
        sample(logits, **args, vocab_limit=11)
    with pytest.raises(ValueError, match="vocab_limit"):
        sample(logits, **args, vocab_limit=0)
    with pytest.raises(ValueError, match="offset"):
        sample(logits, **{**args, "offset": torch.zeros((), dtype=torch.int64)})
    with pytest.raises(ValueError, match="offset"):
        sample(logits, **{**args, "offset": torch.zeros(1, dtype=torch.int32)})
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, **{**args, "top_p": rows(3, 1.0)})


@pytest.mark.parametrize("name,bad", [
    ("offset", torch.zeros(3, dtype=torch.int64)),      # neither [1] nor [B]
    ("offset", torch.zeros(1, 2, dtype=torch.int64)),
    ("offset", torch.zeros(2, dtype=torch.int32)),      # [B] of the wrong dtype
    ("offset", torch.zeros(2)),
    ("offset", torch.zeros(2, dtype=torch.int64, device="meta")),  # not on the logits' device
    ("rows", torch.zeros(1, dtype=torch.int64)),        # [1] is not [B]
    ("rows", torch.zeros(3, dtype=torch.int64)),
    ("rows", torch.zeros((), dtype=torch.int64)),
    ("rows", torch.zeros(2, 1, dtype=torch.int64)),
    ("rows", torch.arange(2, dtype=torch.int32)),
    ("rows", torch.arange(2.0)),
    ("rows", torch.arange(2, device="meta")),
])
def test_sample_rejects_bad_offset_and_rows(name, bad):
    logits, b = torch.randn(2, 10), 2
    args = dict(temperature=rows(b, 1.0), top_k=rows(b, 0, torch.int64), top_p=rows(b, 1.0),
                do_sample=rows(b, True, torch.bool), seeds=rows(b, 0, torch.int64),
                offset=torch.zeros(1, dtype=torch.int64), rows=None)
    with pytest.raises(ValueError, match=rf"{name} must be a .*int64 tensor on cpu"):
        sample(logits, **{**args, name: bad})
    for guided in (False, True):  # B is the output rows, also with guidance's 2B logits rows
        ok = dict(args, offset=torch.zeros(b, dtype=torch.int64), rows=torch.arange(b))
        assert sample(torch.randn(2 * b, 10) if guided else logits, **ok,
                      guidance=rows(b, 1.5) if guided else None).shape == (b,)


def test_per_row_offsets_and_rows_pick_each_rows_philox_counter():
    """Row b's uniforms have counter ``(i, rows[b], offset[b] & 0xffffffff, offset[b] >> 32)``: the
    Gumbel-max over them, and a ``[B]`` offset of one value is the ``[1]`` offset."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    seeds, do_sample = torch.tensor([5, 5, 2**40 + 7, 8]), torch.ones(4, dtype=torch.bool)
    offset, stream_rows = torch.tensor([3, 2**32 + 3, 0, 2**33 - 1]), torch.tensor([1, 1, 0, 2**32 - 1])
    params = (rows(4, 1.0), rows(4, 0, torch.int64), rows(4, 1.0), do_sample, seeds)
    for o, r in [(offset, None), (offset[:1], stream_rows), (offset, stream_rows)]:
        out = sample(logits, *params, o, rows=r)
        u = uniform(seeds, o, torch.arange(4) if r is None else r, 30)
        assert torch.equal(out, (logits - torch.log(-torch.log(u))).argmax(-1))
    assert torch.equal(sample(logits, *params, torch.full((4,), 7), rows=torch.arange(4)),
                       sample(logits, *params, torch.tensor([7])))
    # rows 0 and 1 share seed and stream row and differ only in the step counter's high word
    u = uniform(seeds, offset, stream_rows, 30)
    assert not torch.equal(u[0], u[1])


@pytest.mark.parametrize("guided", [False, True])
def test_continuous_batch_rows_draw_what_their_own_batch_draws(guided):
    """Requests at different steps share a batch: row b with ``rows[b] = r`` and ``offset[b] = o``
    draws exactly the token of row r of its own request's batch at the ``[1]`` offset o, wherever it
    sits; and a request's batch drawn over several steps gives the same sequence either way."""
    g = torch.Generator().manual_seed(11)
    vocab, sizes, starts = 60, [2, 3, 1], [4, 2**32 - 1, 0]
    requests = []
    for n in sizes:
        seed = int(torch.randint(0, 2**63 - 1, (), generator=g))
        requests.append(dict(logits=torch.randn(2 * n if guided else n, vocab, generator=g),
                             temperature=rows(n, 1.5), top_k=torch.tensor([0, 20, 5][:n]),
                             top_p=torch.tensor([1.0, 0.9, 0.95][:n]), do_sample=torch.tensor([True, True, False][:n]),
                             seeds=rows(n, seed, torch.int64),
                             guidance=torch.rand(n, generator=g) * 3 if guided else None))
    slots = [(1, 2), (0, 1), (2, 0), (1, 0), (0, 0), (1, 1)]  # (request, its row), interleaved

    def shared(key):
        return torch.stack([requests[q][key][r] for q, r in slots])

    uncond = [requests[q]["logits"][r] for q, r in slots]
    cond = [requests[q]["logits"][r + sizes[q]] for q, r in slots] if guided else []
    batch = dict(logits=torch.stack(uncond + cond), guidance=shared("guidance") if guided else None,
                 **{k: shared(k) for k in ("temperature", "top_k", "top_p", "do_sample", "seeds")})
    stream_rows = torch.tensor([r for _, r in slots])
    drawn = []
    for t in range(6):
        own = [sample(**req, offset=torch.tensor([start + t])) for req, start in zip(requests, starts)]
        out = sample(**batch, offset=torch.tensor([starts[q] + t for q, _ in slots]), rows=stream_rows)
        assert torch.equal(out, torch.stack([own[q][r] for q, r in slots])), t
        drawn.append(out)
    # not by chance: the tokens move with the steps, and rows 0..B-1 at one offset draw others
    assert len({tuple(d.tolist()) for d in drawn}) > 1
    assert not all(torch.equal(d, sample(**batch, offset=torch.tensor([t]))) for t, d in enumerate(drawn))


def test_guidance_scale_needs_a_guided_task_and_vice_versa():
    with pytest.raises(InputError, match="guidance_scale is not supported"):
        Sampler(SamplingParams(guidance_scale=2.0), 1, torch.device("cpu"))
    with pytest.raises(InputError, match="guidance_scale"):
        Sampler(SamplingParams(), 1, torch.device("cpu"), guidance=True)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=math.inf), dict(temperature=math.nan),
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-3), dict(seed="x"),
    dict(guidance_scale=-1.0), dict(do_sample="yes"),
])
def test_out_of_range_parameters_are_rejected(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)
