"""Sampler: greedy, top-k (ties kept), top-p mass, temperature, seeding, parameter validation."""
from __future__ import annotations

import math

import pytest
import torch

from mmgen_engine import InputError, SamplingParams
from mmgen_engine.ops import sample
from mmgen_engine.ops.sampling import filter_logits
from mmgen_engine.runtime import Sampler


def rows(b, value, dtype=torch.float32):
    return torch.full((b,), value, dtype=dtype)


def draw(logits, params: SamplingParams, n: int) -> torch.Tensor:
    """``n`` independent tokens from one row of logits."""
    sampler = Sampler(params, n, logits.device)
    return sampler(logits.expand(n, -1).contiguous())


def test_greedy_is_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 5.0]])
    assert Sampler(None, 2, logits.device)(logits).tolist() == [1, 0]


def test_top_k_never_leaves_top_k():
    torch.manual_seed(0)
    logits = torch.randn(1, 97)
    top = set(logits[0].topk(5).indices.tolist())
    tokens = draw(logits, SamplingParams(do_sample=True, top_k=5, seed=1), 4000)
    assert set(tokens.tolist()) <= top
    assert len(set(tokens.tolist())) == 5


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[4.0, 1.0, 3.0, 3.0, 3.0, 0.0]])
    kept = filter_logits(logits, rows(1, 1.0), rows(1, 2, torch.int64), rows(1, 1.0))
    assert torch.isfinite(kept[0]).tolist() == [True, False, True, True, True, False]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    for p, expect in [(0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (0.9, 3), (0.95, 4), (1.0, 5)]:
        kept = filter_logits(logits, rows(1, 1.0), rows(1, 0, torch.int64), rows(1, p))
        assert int(torch.isfinite(kept).sum()) == expect, p
    tokens = draw(logits, SamplingParams(do_sample=True, top_p=0.8, seed=3), 4000)
    assert set(tokens.tolist()) == {0, 1, 2}
    freq = torch.bincount(tokens, minlength=5).float() / 4000
    renorm = probs[0, :3] / probs[0, :3].sum()
    assert torch.allclose(freq[:3], renorm, atol=0.03)


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
    seq_a = torch.stack([a(logits) for _ in range(5)])
    seq_b = torch.stack([b(logits) for _ in range(5)])
    seq_c = torch.stack([c(logits) for _ in range(5)])
    assert torch.equal(seq_a, seq_b)
    assert not torch.equal(seq_a, seq_c)


def test_per_row_do_sample_mixes_greedy_and_sampled():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    noise = torch.empty(4, 30).exponential_(generator=torch.Generator().manual_seed(2))
    do_sample = torch.tensor([True, False, True, False])
    out = sample(logits, rows(4, 1.0), rows(4, 0, torch.int64), rows(4, 1.0), do_sample, noise)
    greedy = logits.argmax(-1)
    assert out[1] == greedy[1] and out[3] == greedy[3]
    assert torch.equal(out[[0, 2]], (logits.softmax(-1) / noise).argmax(-1)[[0, 2]])


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=math.inf), dict(temperature=math.nan),
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-3), dict(seed="x"),
    dict(guidance_scale=-1.0), dict(do_sample="yes"),
])
def test_out_of_range_parameters_are_rejected(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)
