"""Parity of the ``hf-vision-encoder-decoder`` converter + engine against transformers."""
from __future__ import annotations

import json

import pytest
import torch
from hf_models import EOS, IMAGE, PAD, START, make_model, save

import mmgen_engine as mm
from mmgen_engine.runtime import CrossKVCache, KVCache


def convert_and_load(model, tmp_path, names="v4", weights="safetensors", dtype=None):
    src = save(model, tmp_path / "hf", names=names, weights=weights)
    out = mm.convert(src, tmp_path / "engine", dtype=dtype)
    return mm.load(out)


def hf_greedy(model, pixel_values, max_new_tokens, min_new_tokens=0):
    with torch.no_grad():
        seq = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, do_sample=False, num_beams=1)
    seq = seq[:, 1:]  # drop the decoder start token
    pad = torch.full((seq.shape[0], max_new_tokens - seq.shape[1]), PAD, dtype=seq.dtype)
    return torch.cat([seq, pad], dim=1)


def engine_logits(pipe, pixel_values, tokens):
    """Logits the engine assigns at every position of ``tokens [B, T]`` (start token first),
    by prefill on the first token and decode steps on the rest."""
    model = pipe.model
    with torch.inference_mode():
        states = model.encode(pixel_values)
        b, t = tokens.shape
        layers, heads, head_dim, _ = model.decoder.cache_geometry()
        cache = KVCache.allocate(layers, b, heads, t, head_dim, states.dtype, states.device)
        lengths = torch.full((b,), states.shape[1])
        cross = CrossKVCache.allocate(layers, lengths, heads, states.shape[1], head_dim, states.dtype, states.device)
        out = [model.decoder.prefill(tokens[:, :1], states, cache, cross)]
        for i in range(1, t):
            cache.span = i + 1
            out.append(model.decoder.decode_step(tokens[:, i], torch.full((b,), i), cache, cross))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("names", ["v4", "v5"])
@pytest.mark.parametrize("widths", [(32, 48), (48, 48)], ids=["proj", "same-width"])
@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_ids_match_transformers(tmp_path, names, widths, batch):
    model = make_model(*widths, seed=batch)
    pipe = convert_and_load(model, tmp_path, names=names)
    assert pipe.config.enc_to_dec_proj == (widths[0] != widths[1])
    px = torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))
    ours = pipe.generate_ids(px, max_new_tokens=24)
    ref = hf_greedy(model, px, 24)
    assert torch.equal(ours, ref)
    assert len(set(ours.flatten().tolist())) > 5, "degenerate random model: the test would prove little"


@pytest.mark.parametrize("init", [0.02, 0.5])
def test_logits_match_transformers_fp32(tmp_path, init):
    model = make_model(seed=3, init=init)
    pipe = convert_and_load(model, tmp_path)
    px = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([torch.full((3, 1), START), torch.randint(3, 99, (3, 11))], dim=1)
    with torch.no_grad():
        ref = model(pixel_values=px, decoder_input_ids=tokens).logits
    ours = engine_logits(pipe, px, tokens)
    # 1e-4 at the usual weight scale; the 0.5-scale model has logits in the hundreds, where fp32
    # rounding alone is ~1e-6 relative, so the bound scales with the largest logit
    scale = max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("variant", [
    dict(tie=False), dict(qkv_bias=False), dict(inverse_layer_scale=True), dict(activation="gelu"),
    dict(enc_layers=1, dec_layers=3),
], ids=["untied-head", "no-qkv-bias", "inverse-layer-scale", "erf-gelu", "layer-counts"])
def test_config_variants(tmp_path, variant):
    model = make_model(seed=11, **variant)
    pipe = convert_and_load(model, tmp_path)
    px = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pipe.generate_ids(px, 16), hf_greedy(model, px, 16))


def test_pytorch_bin_and_min_new_tokens(tmp_path):
    model = make_model(seed=5)
    pipe = convert_and_load(model, tmp_path, weights="bin")
    px = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pipe.generate_ids(px, 12, min_new_tokens=12), hf_greedy(model, px, 12, 12))


def test_eos_stops_rows_and_pads(tmp_path):
    model = make_model(seed=1)
    with torch.no_grad():  # make eos likely so that rows end at different steps
        model.decoder.lm_head.weight[EOS] *= 12
    pipe = convert_and_load(model, tmp_path)
    px = torch.randn(6, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    ours = pipe.generate_ids(px, 20)
    assert torch.equal(ours, hf_greedy(model, px, 20))
    ended = [(row == EOS).nonzero()[0, 0].item() for row in ours if (row == EOS).any()]
    assert len(set(ended)) > 1, f"rows should end at different steps, got {ended}"
    assert len(ended) < len(ours), "at least one row should run to max_new_tokens"
    for row in ours:
        if (row == EOS).any():
            first = (row == EOS).nonzero()[0, 0]
            assert (row[first + 1:] == PAD).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_conversion(tmp_path, dtype, monkeypatch):
    """Engine error vs the fp32 model is at most twice transformers' own error in that dtype (bf16
    computed in bf16, as on GPU; tests/test_bf16_storage.py covers the CPU's bf16 storage)."""
    monkeypatch.setenv("MMGEN_CPU_BF16_COMPUTE", "bfloat16")
    model = make_model(seed=2, init=0.02)
    pipe = convert_and_load(model, tmp_path, dtype=dtype)
    cfg = json.loads((tmp_path / "engine" / "config.json").read_text())
    half = getattr(torch, dtype)
    assert cfg["dtype"] == dtype and pipe.model.decoder.wte.dtype == half
    px = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    tokens = torch.cat([torch.full((2, 1), START), torch.randint(3, 99, (2, 6))], dim=1)
    with torch.no_grad():
        ref = model(pixel_values=px, decoder_input_ids=tokens).logits
        peer = model.to(half)(pixel_values=px.to(half), decoder_input_ids=tokens).logits.float()
    ours = engine_logits(pipe, px.to(half), tokens).float()
    peer_err = (peer - ref).abs().max().item()
    assert (ours - ref).abs().max().item() <= 2 * peer_err + 1e-3


def test_load_with_dtype_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MMGEN_CPU_BF16_COMPUTE", "bfloat16")  # the whole model in bf16
    model = make_model(seed=4)
    src = save(model, tmp_path / "hf")
    out = mm.convert(src, tmp_path / "engine")
    pipe = mm.load(out, dtype="bfloat16")
    assert pipe.model.encoder.patch_embed.weight.dtype == torch.bfloat16
    ids = pipe.generate_ids(torch.randn(1, 3, IMAGE, IMAGE), 5)
    assert ids.shape == (1, 5)


def test_caption_decodes_with_tokenizer(tmp_path):
    model = make_model(seed=6)
    pipe = convert_and_load(model, tmp_path)
    img = (torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()
    ids = pipe.generate_ids(pipe.preprocess([img]), 10)
    words = [f"w{i}" for i in ids[0].tolist() if i not in (PAD, START, EOS)]
    assert pipe.caption([img], max_new_tokens=10) == [" ".join(words)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_cuda_greedy_ids_match(tmp_path, dtype):
    # half precision: a milder init (at 0.5 this tiny model's activations are large enough that even
    # CPU bf16 picks tokens 23% of the largest |logit| below the fp32 best; at 0.2, 0.8%)
    model = make_model(seed=8, init=0.5 if dtype is None else 0.2)
    src = save(model, tmp_path / "hf")
    out = mm.convert(src, tmp_path / "engine")
    px = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(9))
    gpu = mm.load(out, device="cuda", dtype=dtype).generate_ids(px, 16).cpu()
    if dtype is None:
        assert torch.equal(gpu, hf_greedy(model, px, 16))
    else:
        # half-precision rounding may flip a near-tie, so check that every token the GPU picked is a
        # near-argmax of the fp32 model's logits, teacher-forced on the GPU's own tokens (until eos)
        tokens = torch.cat([torch.full((4, 1), START), gpu[:, :-1]], dim=1)
        logits = engine_logits(mm.load(out), px, tokens)  # (B, T, V) fp32 on CPU
        picked = logits.gather(2, gpu[:, :, None])[..., 0]
        best = logits.max(dim=2).values
        tol = {"float16": 0.03, "bfloat16": 0.05}[dtype] * logits.abs().amax(dim=2)
        live = torch.cumsum((tokens == EOS).long(), dim=1) == 0  # steps before this row's eos
        assert ((best - picked <= tol) | ~live).all()
        assert (gpu[:, 0] == logits[:, 0].argmax(dim=1)).float().mean() >= 0.75


def test_source_variants_legacy_bin_sharded_vocab_merges_and_no_bos(tmp_path):
    """Legacy (pre-zip) pytorch_model.bin, sharded safetensors, a GPT-2 vocab.json + merges.txt
    tokenizer instead of tokenizer.json, and a config with a decoder start token but no bos."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    model = make_model(seed=12)
    src = save(model, tmp_path / "hf")
    px = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(6))
    ref = hf_greedy(model, px, 10)
    state = load_file(str(src / "model.safetensors"))

    legacy = save(model, tmp_path / "legacy")
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)

    sharded = save(model, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(sharded / shard))
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    bpe = save(model, tmp_path / "bpe")
    (bpe / "tokenizer.json").unlink()
    vocab = {f"w{i}": i for i in range(99)}
    (bpe / "vocab.json").write_text(json.dumps(vocab))
    (bpe / "merges.txt").write_text("#version: 0.2\n")
    (bpe / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "w2"}}))
    cfg = json.loads((bpe / "config.json").read_text())
    for part in (cfg, cfg["decoder"]):
        part.pop("bos_token_id", None)
    (bpe / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((bpe / "generation_config.json").read_text())
    gen.pop("bos_token_id", None)
    (bpe / "generation_config.json").write_text(json.dumps(gen))

    for name in ("legacy", "sharded", "bpe"):
        pipe = mm.load(mm.convert(tmp_path / name, tmp_path / f"engine_{name}"))
        assert torch.equal(pipe.generate_ids(px, 10), ref), name
    tok = Tokenizer.from_file(str(tmp_path / "engine_bpe" / "tokenizer.json"))
    assert tok.decode([2, 5], skip_special_tokens=True) == "w5"  # w2 marked special from the map


def test_prefill_of_a_longer_prompt_matches_transformers(tmp_path):
    model = make_model(seed=13, init=0.02)
    pipe = convert_and_load(model, tmp_path)
    px = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(8))
    tokens = torch.cat([torch.full((2, 1), START), torch.randint(3, 99, (2, 8))], dim=1)
    with torch.no_grad():
        ref = model(pixel_values=px, decoder_input_ids=tokens).logits
    dec = pipe.model.decoder
    with torch.inference_mode():
        states = pipe.model.encode(px)
        layers, heads, head_dim, _ = dec.cache_geometry()
        cache = KVCache.allocate(layers, 2, heads, 9, head_dim, states.dtype, states.device)
        cross = CrossKVCache.allocate(layers, torch.full((2,), states.shape[1]), heads, states.shape[1], head_dim,
                                      states.dtype, states.device)
        last = dec.prefill(tokens[:, :6], states, cache, cross)  # 6 prompt tokens at once
        steps = [last]
        for i in range(6, 9):
            cache.span = i + 1
            steps.append(dec.decode_step(tokens[:, i], torch.full((2,), i), cache, cross))
    torch.testing.assert_close(torch.stack(steps, 1), ref[:, 5:], atol=1e-4, rtol=1e-4)


def test_seeded_sampling_through_the_decode_loop(tmp_path):
    model = make_model(seed=14)
    pipe = convert_and_load(model, tmp_path)
    px = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(10))
    params = mm.SamplingParams(do_sample=True, temperature=1.5, top_k=20, seed=123)
    a, b = pipe.generate_ids(px, 16, sampling=params), pipe.generate_ids(px, 16, sampling=params)
    c = pipe.generate_ids(px, 16, sampling=mm.SamplingParams(do_sample=True, temperature=1.5, top_k=20, seed=124))
    greedy = pipe.generate_ids(px, 16)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, greedy)


def test_build_info_reports_the_api_keys():
    info = mm.build_info()
    assert {"version", "cuda", "cuda_archs", "triton", "backends"} <= set(info)
    assert isinstance(info["cuda"], bool) and isinstance(info["triton"], bool)
    assert info["version"] == mm.__version__ and "decode_attention" in info["backends"]
