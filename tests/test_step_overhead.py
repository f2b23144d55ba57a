"""Per-step overhead on CPU: the recorded decode steps (:mod:`mmgen_engine.runtime.recorded`), the
top-p threshold and the NumPy Philox draws must leave every token as it was.

``PINNED`` are the demo gesture model's tokens recorded with the engine before these paths existed
(commit b6dea7e): eager steps, recorded steps and the sampler's CPU shortcuts must all reproduce them.
"""
from __future__ import annotations

import pytest
import torch

import mmgen_engine as mm
from mmgen_engine import ops
from mmgen_engine.demo import gesture_world as world
from mmgen_engine.demo import world as demo_world
from mmgen_engine.ops import registry
from mmgen_engine.ops.random import uniform_at, uniform_cpu, uniform_numpy
from mmgen_engine.ops.sampling import filter_logits
from mmgen_engine.runtime import CrossKVCache, KVCache, RecordedSteps, generate
from mmgen_engine.runtime.sampler import Sampler

S = mm.SamplingParams
SAMPLINGS = {"greedy": S(), "topp": S(do_sample=True, temperature=1.3, top_p=0.95, seed=5),
             "topk": S(do_sample=True, temperature=2.0, top_k=20, seed=9)}
PINNED = {
    'greedy': [
        [406, 261, 166, 433, 389, 5, 261, 389, 389, 389, 389, 216, 471, 151, 256, 194],
        [471, 151, 256, 194, 194, 276, 0, 182, 411, 306, 85, 85, 85, 85, 85, 195],
    ],
    'topp': [
        [248, 203, 508, 286, 415, 394, 261, 21, 214, 267, 156, 123, 350, 21, 29, 291],
        [350, 21, 29, 291, 77, 159, 97, 326, 472, 2, 56, 406, 465, 406, 392, 85],
    ],
    'topk': [
        [7, 261, 80, 417, 464, 170, 197, 65, 246, 104, 246, 246, 369, 502, 177, 180],
        [369, 502, 177, 180, 38, 8, 149, 222, 380, 340, 266, 7, 56, 391, 325, 325],
    ],
    'greedy_silence': [
        [18, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145],
        [145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 145, 391, 391, 391],
    ],
}


def top_p_sorted_reference(logits, top_p):
    """The top-p filter as the sampler computed it before (the decisions made in sorted order, then
    scattered back): the oracle of the one-threshold form."""
    rows, vocab = logits.shape
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    probs = e / e.sum(dim=-1, keepdim=True)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = probs.gather(1, order).cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
    position = torch.arange(vocab).expand(rows, vocab)
    starts = torch.ones_like(sorted_logits, dtype=torch.bool)
    starts[:, 1:] = sorted_logits[:, 1:] != sorted_logits[:, :-1]
    group_start = torch.where(starts, position, 0).cummax(dim=-1).values
    keep_sorted = before.gather(1, group_start) < top_p[:, None]
    keep = keep_sorted.scatter(1, order, keep_sorted)
    return torch.where(keep, logits, float("-inf"))


@pytest.fixture(scope="module")
def demo():
    return mm.load(mm.demo_model("speech-to-gesture"))


@pytest.fixture(scope="module")
def clips():
    seed = world.HELD_OUT_SEED + 100
    return {"speech": world.clip(seed, 6.0)[0], "silence": world.near_silence(seed, 6.0)}


@pytest.mark.parametrize("recorded", [False, True])
def test_demo_tokens_are_pinned(demo, clips, recorded):
    demo.record_cpu_steps = recorded
    demo.recorded_steps = RecordedSteps(demo.model.decoder, record_after=0)  # recorded from the first step
    try:
        for name, sampling in SAMPLINGS.items():
            assert demo.generate_tokens(clips["speech"], world.SAMPLE_RATE, sampling) == PINNED[name], name
        assert demo.generate_tokens(clips["silence"], world.SAMPLE_RATE, S()) == PINNED["greedy_silence"]
        assert (len(demo.recorded_steps) > 0) == recorded
    finally:
        demo.record_cpu_steps = True
        demo.recorded_steps = RecordedSteps(demo.model.decoder)


def test_recorded_steps_are_bitwise_the_eager_step(demo):
    decoder = demo.model.decoder
    layers, heads, head_dim, _ = decoder.cache_geometry()
    steps = RecordedSteps(decoder, record_after=2)
    g = torch.Generator().manual_seed(0)
    cross = CrossKVCache(torch.randn(layers, 3, heads, 37, head_dim, generator=g),
                         torch.randn(layers, 3, heads, 37, head_dim, generator=g), torch.tensor([37, 5, 20]))
    k, v = (torch.randn(layers, 3, heads, 11, head_dim, generator=g) for _ in range(2))
    with torch.inference_mode():
        for span in (4, 11, 4):
            for run in range(4):
                tokens = torch.randint(0, 500, (3,), generator=g)
                positions = torch.tensor([span - 1, span - 2, 0])
                eager_cache, cache = KVCache(k.clone(), v.clone(), span), KVCache(k.clone(), v.clone(), span)
                want = decoder.decode_step(tokens, positions, eager_cache, cross)
                got = steps(tokens, positions, cache, cross)
                assert torch.equal(got, want) and torch.equal(cache.k, eager_cache.k), (span, run)
                assert torch.equal(cache.v, eager_cache.v)
        assert len(steps) == 2  # one recording per span, made on its third run
        states = torch.randn(3, 37, decoder.cfg.hidden_size, generator=g)
        prompt = torch.randint(0, 500, (3, 5), generator=g)
        for run in range(3):  # the prefill, recorded on its third run: caches and logits bitwise eager
            eager_cache, cache = KVCache(k.clone(), v.clone(), 11), KVCache(k.clone(), v.clone(), 11)
            eager_cross, rec_cross = (CrossKVCache(cross.k.clone(), cross.v.clone(), cross.lengths) for _ in range(2))
            want = decoder.prefill(prompt, states, eager_cache, eager_cross)
            assert torch.equal(steps.prefill(prompt, states, cache, rec_cross), want)
            assert torch.equal(cache.k, eager_cache.k) and torch.equal(rec_cross.v, eager_cross.v)
        assert len(steps) == 3
        # another row count is another key
        steps(tokens[:1], positions[:1], KVCache(k[:, :1].clone(), v[:, :1].clone(), 4),
              CrossKVCache(cross.k[:, :1], cross.v[:, :1], cross.lengths[:1]))
        assert len(steps) == 3  # run once: not recorded


@pytest.mark.parametrize("n", [1, 7, 300])
def test_uniform_numpy_is_uniform_at(n):
    g = torch.Generator().manual_seed(n)
    seeds = torch.randint(0, 2**62, (n,), generator=g) * 2 + 1
    seeds[0] = 2**63 - 1
    offsets = torch.randint(0, 2**40, (n,), generator=g)
    rows = torch.randint(0, 2**31, (n,), generator=g)
    cols = torch.randint(0, 2**32, (n,), generator=g)
    want = uniform_at(seeds, offsets, rows, cols)
    assert torch.equal(uniform_numpy(seeds, offsets, rows, cols), want)
    assert torch.equal(uniform_cpu(seeds, offsets, rows, cols), want)  # native where built


@pytest.mark.parametrize("vocab", [1, 2, 9, 512, 5003])
def test_top_p_threshold_is_the_sorted_decision(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = 6
    logits = torch.randn(rows, vocab, generator=g) * 4
    logits[1] = (logits[1] * 2).round() / 2  # many ties
    logits[2, : vocab // 2] = logits[2, 0]  # a wide tie group at the top
    logits[3, ::2] = float("-inf")  # tokens a top-k already removed
    if vocab > 1:
        logits[3, 1] = 5.0
    for p in (1e-6, 0.3, 0.9, 0.999, 1.0):
        top_p = torch.full((rows,), p)
        top_p[0] = 0.5
        top_p[5] = 1.0
        got = filter_logits(logits, torch.ones(rows), torch.zeros(rows, dtype=torch.int64), top_p)
        assert torch.equal(got, top_p_sorted_reference(logits, top_p)), p


def test_backend_switch_is_read_at_every_dispatch(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    x = torch.zeros(2)
    assert registry.dispatch("layer_norm", x) is registry.resolve("layer_norm", "cpu", torch.float32, None)
    monkeypatch.setenv(registry.ENV_VAR, "nonsense")
    with pytest.raises(registry.BackendError):
        registry.dispatch("layer_norm", x)
    monkeypatch.setenv(registry.ENV_VAR, "layer_norm=reference")
    assert registry.forced_backend("layer_norm") == "reference" and registry.forced_backend("sample") is None


LOOP_SAMPLINGS = {"greedy": S(), "topp": S(do_sample=True, temperature=0.5, top_p=0.9, seed=1),
                  "topk_topp": S(do_sample=True, top_k=50, top_p=0.8, seed=3),
                  "plain": S(do_sample=True, temperature=3.0, seed=4)}


def _loop(demo, sampling, recorded, eos=None, prompt_len=3):
    """The demo decoder's tokens for two rows of random encoder states (the pipeline's vocabulary
    slice), as many as fill its 18 positions after a prompt of ``prompt_len``."""
    decoder = demo.model.decoder
    g = torch.Generator().manual_seed(3)
    states = torch.randn(2, 37, decoder.cfg.hidden_size, generator=g)
    prompt = torch.tensor([[512, 5, 7, 3, 8], [512, 9, 9, 1, 2]])[:, :prompt_len]
    return generate(decoder, prompt, states, torch.tensor([37, 20]), 17 - prompt_len, eos_token_id=eos,
                    pad_token_id=513, min_new_tokens=2, sampling=sampling, vocab_limit=512, recorded=recorded)


@pytest.mark.parametrize("name", LOOP_SAMPLINGS)
def test_recorded_loop_is_the_eager_loop(demo, name):
    """The whole step recorded (decoder step, pick, bookkeeping; the sampled pick's uniforms drawn
    ahead): bitwise the eager loop's tokens, with rows that stop early, on the calls that record
    it and those that replay it."""
    sampling = LOOP_SAMPLINGS[name]
    eos = int(_loop(demo, sampling, None)[0, 4])  # row 0 stops after its 5th token
    want = _loop(demo, sampling, None, eos)
    assert (want == 513).any()
    steps = RecordedSteps(demo.model.decoder, record_after=2)
    for call in range(4):  # eager, eager, recording, replay
        assert torch.equal(_loop(demo, sampling, steps, eos), want), call
    assert any(key[0] == "step+pick" for key in steps._recorded)
    # a request of another length replays the recordings of the spans it shares (the output buffer
    # is sized in buckets): only its prefill runs eagerly
    eager_keys, recorded = len(steps._runs), len(steps)
    assert torch.equal(_loop(demo, sampling, steps, eos, 5), _loop(demo, sampling, None, eos, 5))
    assert len(steps._runs) == eager_keys + 1 and len(steps) == recorded


def test_gumbel_noise_rounds_alike_over_any_subset():
    """What Sampler.draw_ahead relies on: ``log(-log(u))`` of an element is the same bitwise whether
    torch takes it over the few tokens the filters keep (the reference) or over the whole table."""
    n = 4096
    u = uniform_numpy(torch.full((n,), 2**62 + 5), torch.arange(n) // 512, torch.zeros(n, dtype=torch.int64),
                      torch.arange(n) % 512)
    table = torch.log(-torch.log(u))
    g = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100, 513, n):
        idx = torch.randperm(n, generator=g)[:m]
        assert torch.equal(torch.log(-torch.log(u[idx])), table[idx]), m


@pytest.mark.parametrize("vocab_limit", [None, 7, 300])
def test_drawn_uniforms_sample_as_the_reference(vocab_limit):
    """sample_drawn with Sampler.draw_ahead's noise: ops.sample's tokens, per-row offsets and stream rows."""
    g = torch.Generator().manual_seed(11)
    rows, vocab, offsets = 3, 300, 6
    for params in (S(do_sample=True, temperature=0.7, top_p=0.9, seed=2**63 - 1),
                   S(do_sample=True, top_k=5, seed=0), S(do_sample=True, temperature=5.0, seed=12)):
        sampler = Sampler(params, rows, torch.device("cpu"), vocab_limit=vocab_limit)
        sampler.load(params, index=1, stream_rows=[7])
        assert sampler.draw_ahead(offsets, vocab_limit or vocab, capacity=offsets + 3)
        for offset in range(offsets):
            logits = torch.randn(rows, vocab, generator=g) * 3
            at = torch.tensor([offset, max(0, offset - 2), offset])
            want = ops.sample(logits, sampler.temperature, sampler.top_k, sampler.top_p, sampler.do_sample,
                              sampler.seeds, at, None, vocab_limit, False, sampler.rows)
            assert torch.equal(sampler(logits, at), want), (params, offset)
    sampler.load(S())
    assert not sampler.draw_ahead(offsets, vocab)  # greedy: nothing to draw


def test_span_bucket_replays_a_one_off_request(demo):
    """With a span bucket the steps of one request share recordings (a request replays after a few
    of its own steps); replayed or eager, the bucketed loop is bitwise itself, and on the demo
    model the tokens are those of exact spans."""
    want = _loop(demo, S(), None)
    eager = RecordedSteps(demo.model.decoder, record_after=10**9, span_bucket=8)
    assert torch.equal(_loop(demo, S(), eager), want)
    steps = RecordedSteps(demo.model.decoder, record_after=2, span_bucket=8)
    assert torch.equal(_loop(demo, S(), steps), want)
    assert len(steps) == 2  # spans 8 and 16: each recorded on its third step


def test_captioning_replays_its_steps():
    """The captioner on CPU records its steps in span buckets: a request replays after a few of its
    own steps (RECORD_AFTER), and the demo captioner's captions are those of every step eager."""
    pipe = mm.load(mm.demo_model("captioning"))
    images = [image for image, _ in demo_world.sample(3, demo_world.HELD_OUT_SEED + 7)]
    pipe.record_cpu_steps = False
    want = pipe.caption(images)
    pipe.record_cpu_steps = True
    assert pipe.caption(images) == want
    assert len(pipe.recorded_steps) >= 1 and pipe.recorded_steps.span_bucket > 1  # replayed within the request
    assert pipe.caption(images) == want
