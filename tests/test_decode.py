"""The decode loop across backends and modes: the tiny captioning model decoded with every op forced
to Triton (its interpreter on CPU) gives the reference backend's tokens; on CUDA, steps replayed
from CUDA graphs give exactly the eager steps' tokens, greedy and seeded sampling alike."""
from __future__ import annotations

import pytest
import torch
from hf_models import IMAGE, make_blip, make_clipcap, make_git, make_model, save, save_blip, save_clipcap, save_git

import mmgen_engine as mm
from mmgen_engine import SamplingParams

pytest.importorskip("triton")

SAMPLED = SamplingParams(do_sample=True, temperature=0.8, top_k=7, top_p=0.9, seed=11)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decode")
    return mm.convert(save(make_model(seed=21), tmp / "hf"), tmp / "engine")


@pytest.fixture(scope="module", params=["blip", "git", "clipcap"])
def other_checkpoint(request, tmp_path_factory):
    """BLIP (cross-attention to wider vision states), GIT (bidirectional image prefix), ClipCap
    (causal embedding prefix, no start token)."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "blip":
        src = save_blip(make_blip(seed=21, vision_width=64), tmp / "hf")
    elif request.param == "git":
        src = save_git(make_git(seed=21), tmp / "hf")
    else:
        src = save_clipcap(*make_clipcap(seed=21), tmp / "hf")
    return mm.convert(src, tmp / "engine")


def pixels(batch, seed=0):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_triton_backend_gives_the_reference_tokens(checkpoint, monkeypatch, sampling):
    pipe = mm.load(checkpoint)
    px = pixels(3)
    ref = pipe.generate_ids(px, 12, sampling=sampling)
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    out = pipe.generate_ids(px, 12, sampling=sampling)
    assert torch.equal(out, ref)
    assert (ref != ref[:, :1]).any()  # not a degenerate constant output


@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_triton_backend_gives_the_reference_tokens_for_every_captioner(other_checkpoint, monkeypatch, sampling):
    pipe = mm.load(other_checkpoint)
    px = pixels(3)
    prompt = [] if pipe.config.architecture == "clipcap" else [5, 6]
    ref = pipe.generate_ids(px, 10, sampling=sampling, prompt_ids=prompt)
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    assert torch.equal(pipe.generate_ids(px, 10, sampling=sampling, prompt_ids=prompt), ref)
    assert (ref != ref[:, :1]).any()


def test_eos_suppression_and_padding_are_on_device(checkpoint):
    pipe = mm.load(checkpoint)
    eos, pad = pipe.config.generation.eos_token_id, pipe.config.generation.pad_token_id
    ids = pipe.generate_ids(pixels(4, seed=3), 30, min_new_tokens=5)
    assert not (ids[:, :5] == eos).any()
    for row in ids.tolist():  # after eos only padding
        if eos in row:
            assert set(row[row.index(eos) + 1:]) <= {pad}


def rerun_capture(fn, device):
    """Stands in for CUDA-graph capture on CPU: a replay re-runs the captured function."""
    from mmgen_engine.runtime import graphs
    for _ in range(graphs.WARMUP_CALLS):
        fn()
    out = fn()

    def replay():
        new = fn()
        if isinstance(out, torch.Tensor):
            out.copy_(new)
    return replay, out


def test_graph_bookkeeping_gives_the_eager_tokens(checkpoint, monkeypatch):
    """The CUDAGraphs path (capture before the state is reset, static inputs copied in, the prefill
    and the step replayed, the encoder's static output) with capture replaced by re-running the
    captured function, on CPU: the same tokens as plain eager decoding, over reused buckets."""
    from mmgen_engine.runtime import CUDAGraphs, GraphedCall, generate, graphs

    monkeypatch.setattr(graphs, "capture", rerun_capture)
    pipe = mm.load(checkpoint)
    gen = pipe.config.generation
    pool, encode = CUDAGraphs(pipe.model.decoder, torch.float32, "cpu"), GraphedCall(pipe.model.encode)
    for batch, seed, sampling in ((2, 0, None), (2, 1, SAMPLED), (3, 2, None), (2, 3, SAMPLED)):
        px = pixels(batch, seed)
        states = pipe.model.encode(px)
        assert torch.equal(encode(px), states)
        lengths = torch.full((batch,), states.shape[1])
        prompt = torch.full((batch, 1), gen.decoder_start_token_id)
        kw = dict(eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id, min_new_tokens=seed,
                  sampling=sampling)
        eager = generate(pipe.model.decoder, prompt, states, lengths, 15, **kw)
        graphed = generate(pipe.model.decoder, prompt, encode(px), lengths, 15, graphs=pool, **kw)
        assert torch.equal(graphed, eager), (batch, seed)
    assert len(pool) == 2
    assert len(pool.get(2, states.shape[1], gen.eos_token_id, gen.pad_token_id)._steps) == 2  # greedy, sampling


def test_graph_bookkeeping_with_an_image_prefix(other_checkpoint, monkeypatch):
    """The same for BLIP, GIT and ClipCap: the graphs' state is sized by the decoder's cache slots
    (prefix included) and a prefix model gets no cross cache."""
    from mmgen_engine.runtime import CUDAGraphs, generate, graphs
    monkeypatch.setattr(graphs, "capture", rerun_capture)
    pipe = mm.load(other_checkpoint)
    gen, dec = pipe.config.generation, pipe.model.decoder
    pool = CUDAGraphs(dec, torch.float32, "cpu")
    for batch, seed, sampling in ((2, 0, None), (2, 1, SAMPLED), (3, 2, SAMPLED)):
        states = pipe.model.encode(pixels(batch, seed))
        lengths = torch.full((batch,), states.shape[1])
        prompt = pipe._prompt(batch, [] if gen.decoder_start_token_id is None else [7])
        kw = dict(eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id, sampling=sampling)
        eager = generate(dec, prompt, states, lengths, 12, **kw)
        assert torch.equal(generate(dec, prompt, states, lengths, 12, graphs=pool, **kw), eager), (batch, seed)
    st = pool.get(2, states.shape[1], gen.eos_token_id, gen.pad_token_id).state
    assert st.cache.k.shape[3] == dec.cache_geometry()[3]
    assert st.cross.k.shape[3] == (0 if dec.uses_prefix else states.shape[1])


# ---- CUDA: graphs against eager steps ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_cuda_graph_and_eager_steps_give_identical_tokens(checkpoint, dtype, sampling):
    pipe = mm.load(checkpoint, device="cuda", dtype=dtype)
    for batch, seed in ((1, 0), (3, 1), (4, 2), (3, 3)):  # 3 and 4 share a bucket; reused with new data
        px = pixels(batch, seed)
        pipe.use_cuda_graphs = True
        graph = pipe.generate_ids(px, 20, min_new_tokens=seed, sampling=sampling)
        pipe.use_cuda_graphs = False
        eager = pipe.generate_ids(px, 20, min_new_tokens=seed, sampling=sampling)
        assert torch.equal(graph, eager), (batch, seed)
    assert len(pipe._graphs) == 2  # buckets 1 and 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graphs_for_every_captioner(other_checkpoint, dtype):
    """Prefix models (GIT, ClipCap) and BLIP: graph replays give the eager tokens, and in fp32 the
    CPU reference's."""
    pipe = mm.load(other_checkpoint, device="cuda", dtype=dtype)
    cpu = mm.load(other_checkpoint) if dtype == "float32" else None
    for batch, seed in ((1, 0), (3, 1), (4, 2)):
        px = pixels(batch, seed)
        pipe.use_cuda_graphs = True
        graph = pipe.generate_ids(px, 16, sampling=SAMPLED)
        pipe.use_cuda_graphs = False
        assert torch.equal(graph, pipe.generate_ids(px, 16, sampling=SAMPLED)), (batch, seed)
        if cpu is not None:
            assert torch.equal(graph.cpu(), cpu.generate_ids(px, 16, sampling=SAMPLED)), (batch, seed)


@pytest.mark.gpu
def test_cuda_triton_backend_matches_cpu_reference_in_fp32(checkpoint, monkeypatch):
    px = pixels(3, seed=5)
    cpu = mm.load(checkpoint).generate_ids(px, 16)
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    gpu = mm.load(checkpoint, device="cuda").generate_ids(px, 16).cpu()
    assert torch.equal(gpu, cpu)


def test_cuda_graphs_option_is_validated(checkpoint):
    with pytest.raises(mm.InputError, match="cuda_graphs"):
        mm.load(checkpoint, cuda_graphs="yes")
    assert mm.load(checkpoint, cuda_graphs=False).use_cuda_graphs is False
