"""The native decode step of small GPT-2-style decoders (:mod:`mmgen_engine.ops.decoder_step`,
csrc/cpu/decoder_step.cpp) against its spec, the decoder's per-op step (``MMGEN_CPU_NATIVE_STEP=0``):
logits and cache writes over awkward shapes, layouts and activations, where it steps aside, its
one-line errors, and whole generations (greedy and sampled) with identical tokens."""
from __future__ import annotations

import pytest
import torch

import mmgen_engine as mm
from mmgen_engine.config import GPT2Config
from mmgen_engine.demo import gesture_world as world
from mmgen_engine.models.gpt2 import GPT2Decoder
from mmgen_engine.models.quantize import quantize_model
from mmgen_engine.ops import decoder_step
from mmgen_engine.runtime import CrossKVCache, KVCache, RecordedSteps
from mmgen_engine.runtime.layout import column_major_weights

pytestmark = pytest.mark.skipif(decoder_step._C is None, reason="native library built without the decoder step")
ENV = decoder_step.ENV_VAR


def make_decoder(dim=24, heads=3, hidden=40, layers=2, vocab=37, positions=20, cross=True,
                 activation="gelu_tanh", tied=True, layout="row", seed=0) -> GPT2Decoder:
    cfg = GPT2Config(vocab_size=vocab, hidden_size=dim, num_layers=layers, num_heads=heads, intermediate_size=hidden,
                     max_positions=positions, layer_norm_eps=1e-5, activation=activation, scale_attn_weights=True,
                     scale_attn_by_inverse_layer_idx=not tied, tie_word_embeddings=tied, cross_attention=cross)
    dec = GPT2Decoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    for p in dec.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    if layout == "column":
        column_major_weights(dec)
    elif layout == "mixed":  # every other 2-D weight column-major
        for i, p in enumerate(q for q in dec.parameters() if q.dim() == 2):
            if i % 2:
                p.data = p.data.t().contiguous().t()
    return dec


def caches(dec: GPT2Decoder, rows: int, cross_rows: int, slots: int = 20, enc: int = 7, seed: int = 1):
    layers, heads, dh, _ = dec.cache_geometry()
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(layers, rows, heads, slots, dh, generator=gen) for _ in range(2))
    ck, cv = (torch.randn(layers, cross_rows, heads, enc, dh, generator=gen) for _ in range(2))
    lengths = torch.randint(1, enc + 1, (cross_rows,), generator=gen)
    return k, v, ck, cv, lengths


def both_steps(monkeypatch, dec, tokens, positions, span, k, v, ck, cv, lengths):
    """``(logits, k, v)`` of the per-op step and of the native step, each on its own copy of the caches."""
    out = []
    for env in ("0", "1"):
        monkeypatch.setenv(ENV, env)
        kk, vv = k.clone(), v.clone()
        out.append((dec.decode_step(tokens, positions, KVCache(kk, vv, span), CrossKVCache(ck, cv, lengths)), kk, vv))
    monkeypatch.delenv(ENV)
    return out


def assert_close(native, spec, what):
    scale = spec.abs().max().item()
    err = (native - spec).abs().max().item()
    assert err <= 2e-6 * max(scale, 1.0), f"{what}: max error {err:.3g} at scale {scale:.3g}"


CASES = [  # (dim, heads, hidden, layers, vocab, cross, activation, tied, layout, rows, cross_rows)
    (24, 3, 40, 2, 37, True, "gelu_tanh", True, "row", 3, 3),
    (24, 3, 40, 2, 37, True, "gelu", False, "column", 4, 2),  # two rows per cross row (beams)
    (40, 5, 72, 3, 51, False, "quick_gelu", False, "mixed", 5, 5),
    (8, 1, 8, 1, 2, True, "gelu", True, "column", 1, 1),  # one head of 8, a vocabulary of 2
    (36, 2, 19, 1, 300, False, "gelu_tanh", True, "row", 2, 2),  # head_dim 18, odd hidden, vocab > 16*dim
    (128, 4, 512, 3, 514, True, "gelu_tanh", True, "column", 1, 1),  # the gesture demo decoder's shape
]


@pytest.mark.parametrize("case", CASES, ids=[f"d{c[0]}h{c[1]}f{c[2]}L{c[3]}v{c[4]}-{'x' if c[5] else 'p'}-{c[6]}-"
                                             f"{'tied' if c[7] else 'head'}-{c[8]}-r{c[9]}/{c[10]}" for c in CASES])
def test_native_step_matches_the_per_op_step(monkeypatch, case):
    dim, heads, hidden, layers, vocab, cross, act, tied, layout, rows, cross_rows = case
    dec = make_decoder(dim, heads, hidden, layers, vocab, cross=cross, activation=act, tied=tied, layout=layout)
    k, v, ck, cv, lengths = caches(dec, rows, cross_rows)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    assert decoder_step.native_step(dec, dec._step_spec, tokens, k) is not None  # the case runs natively
    positions = torch.randint(0, 13, (rows,), generator=gen)
    positions[0] = 12  # the last slot of the span
    (spec, ks, vs), (native, kn, vn) = both_steps(monkeypatch, dec, tokens, positions, 13, k, v, ck, cv, lengths)
    assert native.shape == spec.shape == (rows, vocab) and native.dtype == torch.float32
    assert_close(native, spec, "logits")
    assert_close(kn, ks, "k cache")
    assert_close(vn, vs, "v cache")
    written = torch.zeros_like(k, dtype=torch.bool)
    written[:, torch.arange(rows), :, positions] = True
    assert torch.equal(kn[~written], k[~written]) and torch.equal(vn[~written], v[~written]), "wrote outside its slots"


def test_the_native_step_runs_where_it_should(monkeypatch):
    dec = make_decoder()
    k = torch.zeros(2, 1, 3, 20, 8)
    tokens = torch.zeros(1, dtype=torch.int64)
    assert decoder_step.native_step(dec, dec._step_spec, tokens, k) is not None
    monkeypatch.setenv(ENV, "0")
    assert decoder_step.native_step(dec, dec._step_spec, tokens, k) is None
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("MMGEN_BACKEND", "reference")  # a forced backend: the per-op path
    assert decoder_step.native_step(dec, dec._step_spec, tokens, k) is None
    monkeypatch.delenv("MMGEN_BACKEND")
    assert decoder_step.native_step(dec, dec._step_spec, tokens, k.half()) is None  # a half-precision cache
    monkeypatch.setattr(decoder_step, "MAX_BYTES", 1000)  # a decoder too large for one thread
    dec.wte.data = dec.wte.data.clone()  # a changed storage: decided again
    assert decoder_step.native_step(dec, dec._step_spec, tokens, k) is None


def test_int8_and_bf16_decoders_take_the_per_op_path():
    k = torch.zeros(2, 1, 3, 20, 8)
    tokens = torch.zeros(1, dtype=torch.int64)
    dec = make_decoder()
    model = torch.nn.Module()
    model.decoder = dec
    quantize_model(model, mm.config.QuantizationConfig(method="int8", group_size=None, modules="decoder"))
    assert dec._step_spec() is None
    assert decoder_step.native_step(dec, dec._step_spec, tokens, k) is None
    bf16 = make_decoder().to(torch.bfloat16)
    assert decoder_step.native_step(bf16, bf16._step_spec, tokens, k) is None


def test_replaced_weights_are_seen(monkeypatch):
    """The native step reads the weights in place; a parameter given new storage is picked up."""
    dec = make_decoder()
    k, v, ck, cv, lengths = caches(dec, 2, 2)
    tokens, positions = torch.tensor([3, 4]), torch.tensor([2, 5])
    before = both_steps(monkeypatch, dec, tokens, positions, 8, k, v, ck, cv, lengths)[1][0]
    dec.layers[0].mlp.fc2.weight.data = dec.layers[0].mlp.fc2.weight.data * 2
    (spec, _, _), (native, _, _) = both_steps(monkeypatch, dec, tokens, positions, 8, k, v, ck, cv, lengths)
    assert not torch.allclose(native, before)
    assert_close(native, spec, "logits after the change")


@pytest.mark.parametrize("bad, message", [
    (lambda t, p, n: t.__setitem__(0, 37), "token id out of range"),
    (lambda t, p, n: t.__setitem__(0, -1), "token id out of range"),
    (lambda t, p, n: p.__setitem__(1, 8), "position out of range"),  # at the span
    (lambda t, p, n: n.__setitem__(0, 8), "cross length out of range"),
    (lambda t, p, n: n.__setitem__(0, 0), "cross length out of range"),
])
def test_bad_ids_are_refused_before_anything_is_written(bad, message):
    dec = make_decoder()
    k, v, ck, cv, lengths = caches(dec, 2, 2)
    tokens, positions = torch.tensor([3, 4]), torch.tensor([2, 5])
    bad(tokens, positions, lengths)
    kk, vv = k.clone(), v.clone()
    with pytest.raises(ValueError, match=message) as err:
        dec.decode_step(tokens, positions, KVCache(kk, vv, 8), CrossKVCache(ck, cv, lengths))
    assert "\n" not in str(err.value)
    assert torch.equal(kk, k) and torch.equal(vv, v)


def test_a_recording_holds_one_native_call_and_replays_it_bitwise():
    dec = make_decoder(layout="column")
    k, v, ck, cv, lengths = caches(dec, 3, 3)
    tokens, positions = torch.tensor([3, 4, 36]), torch.tensor([2, 5, 9])
    eager_k, eager_v = k.clone(), v.clone()
    eager = dec.decode_step(tokens, positions, KVCache(eager_k, eager_v, 10), CrossKVCache(ck, cv, lengths))
    recorded = RecordedSteps(dec, record_after=0)
    rec_k, rec_v = k.clone(), v.clone()
    recorded(tokens, positions, KVCache(rec_k, rec_v, 10), CrossKVCache(ck, cv, lengths))  # records
    (replay,) = recorded._recorded.values()
    kinds = [n.kind() for n in replay.graph.nodes()]
    assert kinds.count("mmgen::decoder_step") == 1 and "aten::linear" not in kinds
    rec_k, rec_v = k.clone(), v.clone()
    logits = recorded(tokens, positions, KVCache(rec_k, rec_v, 10), CrossKVCache(ck, cv, lengths))
    assert torch.equal(logits, eager) and torch.equal(rec_k, eager_k) and torch.equal(rec_v, eager_v)


@pytest.fixture(scope="module")
def gesture_demo():
    return mm.load(mm.demo_model("speech-to-gesture"))


@pytest.mark.parametrize("sampling", [mm.SamplingParams(),
                                      mm.SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, seed=3),
                                      mm.SamplingParams(do_sample=True, temperature=1.5, top_k=30, seed=4)],
                         ids=["greedy", "top-p", "top-k"])
def test_gesture_demo_tokens_equal_the_per_op_steps(monkeypatch, gesture_demo, sampling):
    """The demo model (its decoder takes the native step) gives the tokens of its per-op steps."""
    assert decoder_step.native_step(gesture_demo.model.decoder, gesture_demo.model.decoder._step_spec,
                                    torch.zeros(1, dtype=torch.int64), torch.zeros(1)) is not None
    audio = world.clip(world.HELD_OUT_SEED + 7, 9.0)[0]
    native = gesture_demo.generate_tokens(audio, world.SAMPLE_RATE, sampling)
    monkeypatch.setenv(ENV, "0")
    assert gesture_demo.generate_tokens(audio, world.SAMPLE_RATE, sampling) == native


def test_captioning_demo_ids_equal_the_per_op_steps(monkeypatch):
    """Beam search and greedy on the demo captioner (a GPT-2 with cross-attention): same ids."""
    from mmgen_engine.demo import world as demo_world
    pipe = mm.load(mm.demo_model("captioning"))
    dec = pipe.model.decoder
    assert decoder_step.native_step(dec, dec._step_spec, torch.zeros(1, dtype=torch.int64), torch.zeros(1)) is not None
    images = [image for image, _ in demo_world.sample(3, seed=11)]
    cases = [mm.SamplingParams(), mm.SamplingParams(num_beams=3)]
    native = [pipe.caption(images, sampling=s) for s in cases]
    monkeypatch.setenv(ENV, "0")
    assert [pipe.caption(images, sampling=s) for s in cases] == native


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_native_prefill_matches_the_per_op_prefill(monkeypatch, prompt_len):
    """A cross-attention decoder's prompt runs through the native step a token at a time: the same
    logits and caches as the per-op prefill."""
    dec = make_decoder(layout="column")
    k, v, ck, cv, lengths = caches(dec, 3, 3)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 37, (3, prompt_len), generator=gen)
    states = torch.randn(3, 7, 24, generator=gen)
    out = []
    for env in ("0", "1"):
        monkeypatch.setenv(ENV, env)
        kk, vv, ckk, cvv = k.clone(), v.clone(), ck.clone(), cv.clone()
        out.append((dec.prefill(tokens, states, KVCache(kk, vv, 20), CrossKVCache(ckk, cvv, lengths)), kk, vv, ckk))
    (spec, ks, vs, cks), (native, kn, vn, ckn) = out
    assert_close(native, spec, "logits")
    assert_close(kn[:, :, :, :prompt_len], ks[:, :, :, :prompt_len], "k cache")
    assert_close(vn[:, :, :, :prompt_len], vs[:, :, :, :prompt_len], "v cache")
    assert torch.equal(ckn, cks)


@pytest.mark.parametrize("vocab, limit", [(300, None), (514, 512), (5, None)])
def test_native_pick_equals_the_reference_pick(monkeypatch, vocab, limit):
    """csrc/cpu/sampling.cpp against ops.sampling's torch pick on the same drawn noise: greedy and
    sampled rows mixed, temperatures, top-k (with ties at the boundary), top-p, both together,
    per-row offsets, a vocabulary slice."""
    from mmgen_engine.ops import sampling
    if sampling._C is None:
        pytest.skip("native library built without sample_drawn")
    gen = torch.Generator().manual_seed(7)
    n = limit or vocab
    rows, offsets = 6, 4
    drawn = torch.log(-torch.log(torch.rand(rows, offsets + 2, n, generator=gen)))
    settings = [  # temperature, top_k, top_p per row
        ([0.5, 1.0, 2.0, 0.7, 1.3, 0.9], [0, 0, 0, 0, 0, 0], [0.9, 1.0, 0.5, 0.95, 0.1, 1.0]),
        ([1.0] * 6, [1, 3, 40, 0, n, n + 5], [1.0] * 6),
        ([0.8] * 6, [5, 0, 50, 2, 0, 7], [0.9, 0.8, 1.0, 0.3, 0.99, 0.6]),
    ]
    checked = 0
    for temperature, top_k, top_p in settings:
        for trial in range(12):
            logits = torch.randn(rows, vocab, generator=gen) * 3
            if trial % 3 == 0:
                logits = logits.round()  # many ties
            do_sample = torch.ones(rows, dtype=torch.bool)
            if trial % 2:
                do_sample[2] = False
            offset = torch.randint(0, offsets, (rows,) if trial % 4 else (1,), generator=gen)
            args = (logits, torch.tensor(temperature), torch.tensor(top_k), torch.tensor(top_p), do_sample, offset,
                    None, limit, drawn)
            native = sampling.sample_drawn(*args)
            monkeypatch.setenv(ENV, "0")
            reference = sampling.sample_drawn(*args)
            monkeypatch.delenv(ENV)
            assert torch.equal(native, reference), (temperature, top_k, top_p, trial)
            checked += rows
    assert checked == 3 * 12 * rows


def test_native_pick_refuses_an_offset_not_drawn():
    from mmgen_engine.ops import sampling
    if sampling._C is None:
        pytest.skip("native library built without sample_drawn")
    one = torch.ones(1)
    with pytest.raises(ValueError, match="offset 3 not drawn"):
        sampling.sample_drawn(torch.zeros(1, 4), one, torch.zeros(1, dtype=torch.int64), one,
                              torch.ones(1, dtype=torch.bool), torch.tensor([3]), None, None, torch.zeros(1, 3, 4))


def test_caches_of_another_geometry_are_refused():
    dec = make_decoder()
    k, v, ck, cv, lengths = caches(dec, 2, 2)
    tokens, positions = torch.tensor([3, 4]), torch.tensor([2, 5])
    step = decoder_step.native_step(dec, dec._step_spec, tokens, k)
    for bad in (k[:, :, :2], k[:1], k[..., :4], k[:, :1]):
        with pytest.raises(ValueError, match="decoder step: k"):
            step(tokens, positions, bad, v, 8, ck, cv, lengths)
    with pytest.raises(ValueError, match="decoder step: cross k"):
        step(tokens, positions, k, v, 8, ck[..., :4], cv, lengths)
    with pytest.raises(ValueError, match="int64 lengths"):
        step(tokens, positions, k, v, 8, ck, cv, lengths.int())


def test_a_recording_outlives_a_weight_swap_without_reading_freed_memory():
    """A replay after ``p.data = ...`` runs on the weights it was recorded with (their storage kept
    alive), as a recording of the per-op step would; once the decoder's step was rebuilt for the new
    weights, the old recording says so in one line instead of running some other step."""
    dec = make_decoder(layout="column")
    k, v, ck, cv, lengths = caches(dec, 2, 2)
    tokens, positions = torch.tensor([3, 4]), torch.tensor([2, 5])
    cross = CrossKVCache(ck, cv, lengths)
    before = dec.decode_step(tokens, positions, KVCache(k.clone(), v.clone(), 8), cross)
    recorded = RecordedSteps(dec, record_after=0)
    recorded(tokens, positions, KVCache(k.clone(), v.clone(), 8), cross)
    for p in dec.parameters():
        p.data = torch.zeros_like(p.data)  # the old storages lose their last other owner
    assert torch.equal(recorded(tokens, positions, KVCache(k.clone(), v.clone(), 8), cross), before)
    after = dec.decode_step(tokens, positions, KVCache(k.clone(), v.clone(), 8), cross)  # rebuilt
    assert torch.equal(after, torch.zeros_like(after))
    with pytest.raises(RuntimeError, match="changed after it was recorded"):
        recorded(tokens, positions, KVCache(k.clone(), v.clone(), 8), cross)


def test_recordings_follow_the_native_switch(monkeypatch):
    """``MMGEN_CPU_NATIVE_STEP`` is part of a recording's key: with it off, the per-op step is recorded."""
    dec = make_decoder(layout="column")
    k, v, ck, cv, lengths = caches(dec, 2, 2)
    tokens, positions = torch.tensor([3, 4]), torch.tensor([2, 5])
    recorded = RecordedSteps(dec, record_after=0)
    recorded(tokens, positions, KVCache(k, v, 8), CrossKVCache(ck, cv, lengths))
    monkeypatch.setenv(ENV, "0")
    recorded(tokens, positions, KVCache(k, v, 8), CrossKVCache(ck, cv, lengths))
    kinds = [{n.kind() for n in replay.graph.nodes()} for replay in recorded._recorded.values()]
    assert len(kinds) == 2 and ("mmgen::decoder_step" in kinds[0]) and ("aten::linear" in kinds[1])


def test_native_paths_refuse_what_they_cannot_read():
    from mmgen_engine.ops import sampling
    from mmgen_engine.ops.random import uniform_at, uniform_cpu
    # broadcast counters, as uniform_at takes them
    seeds, offsets, rows, cols = torch.tensor([5, 2**62]), torch.tensor([3]), torch.tensor([0]), torch.arange(2)
    assert torch.equal(uniform_cpu(seeds, offsets, rows, cols), uniform_at(seeds, offsets, rows, cols))
    # an int32 top_k or a short noise table: the torch pick, never the native one
    gen = torch.Generator().manual_seed(3)
    logits, drawn = torch.randn(2, 9, generator=gen), torch.randn(2, 4, 9, generator=gen)
    args = dict(temperature=torch.ones(2), top_p=torch.full((2,), 0.8), do_sample=torch.ones(2, dtype=torch.bool),
                offset=torch.tensor([1]), guidance=None, vocab_limit=None)
    want = sampling.sample_drawn(logits, top_k=torch.tensor([3, 0]), drawn=drawn, **args)
    assert torch.equal(sampling.sample_drawn(logits, top_k=torch.tensor([3, 0], dtype=torch.int32), drawn=drawn,
                                             **args), want)
    assert not sampling._native_fits(logits, args["temperature"], torch.tensor([3, 0]), args["top_p"],
                                     args["do_sample"], args["offset"], 9, drawn[:1])
    # the decoder step: tensors off the CPU or of another rank are refused in one line
    dec = make_decoder()
    k, v, ck, cv, lengths = caches(dec, 2, 2)
    step = decoder_step.native_step(dec, dec._step_spec, torch.tensor([3, 4]), k)
    with pytest.raises(ValueError, match="integer \\[rows\\]"):
        step(torch.tensor([[3, 4]]), torch.tensor([2, 5]), k, v, 8, ck, cv, lengths)
    with pytest.raises(ValueError, match="on the CPU"):
        step(torch.tensor([3, 4]), torch.tensor([2, 5]), k.to("meta"), v, 8, ck, cv, lengths)
