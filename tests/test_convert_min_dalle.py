"""min-dalle -> engine: parity of the converted model with the upstream package (min-dalle 0.4.11)
built with tiny random weights, offline.

Checked in fp32 on CPU: the tokenizer, the encoder states, the decoder logits teacher-forced for all
256 steps against min-dalle's cached path, greedy (top_k=1) image tokens with supercondition
against min-dalle's own sampling loop, and the VQGAN pixels.
"""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn
from upstream import import_upstream

import mmgen_engine as mm
from mmgen_engine.runtime import CrossKVCache, KVCache

min_dalle_models = import_upstream("min_dalle.models")
TextTokenizer = import_upstream("min_dalle.text_tokenizer").TextTokenizer
taming_model = import_upstream("taming.modules.diffusionmodules.model")

WIDTH, GLU, LAYERS, TEXT_LEN, IMAGE_TOKENS = 128, 96, 2, 64, 256
WORDS = ["a", "red", "blue", "circle", "square", "above", "of", "left"]
MIN_DALLE_BOS = 2 ** 14 - 1


def write_tokenizer(path):
    """A tiny min-dalle vocabulary: BART's specials, the characters, every grammar word by merges."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    merges = []
    for ch in ["Ġ", *"abcdefghijklmnopqrstuvwxyz"]:
        vocab.setdefault(ch, len(vocab))
    for word in WORDS:
        piece = "Ġ"
        for ch in word:
            if (piece, ch) not in merges:
                merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab, [f"{a} {b}" for a, b in merges]


def randomize(module, seed):
    """Random LayerNorm/GroupNorm affine parameters too (upstream initializes them to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return module.eval()


def tiny_detoker(codebook, seed):
    """A small VQGAN in min-dalle's ``VQGanDetokenizer`` layout (taming's Decoder naming), with
    min-dalle's GroupNorm eps; returns (state dict, reference pixel function)."""
    torch.manual_seed(seed)
    dec = taming_model.Decoder(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                               in_channels=3, resolution=16, z_channels=16)
    for m in dec.modules():
        if isinstance(m, nn.GroupNorm):
            m.eps = 1e-5
    randomize(dec, seed)
    emb, post = nn.Embedding(codebook, 24), nn.Conv2d(24, 16, 1)
    with torch.no_grad():
        dec.conv_out.weight.mul_(0.3)
        dec.conv_out.bias.fill_(0.5)
    state = {
        "embedding.weight": emb.weight.detach(),
        **{f"post_quant_conv.{k}": v for k, v in post.state_dict().items()},
        **{f"decoder.{k}": v for k, v in dec.state_dict().items()},
    }

    @torch.no_grad()
    def pixels(tokens):  # [B, h, w]
        z = emb(tokens).permute(0, 3, 1, 2)
        return dec(post(z)).clamp(0, 1)
    return state, pixels


def build_source(path, image_vocab=2 ** 14, seed=0):
    vocab, merges = write_tokenizer(path)
    torch.manual_seed(seed)
    encoder = randomize(min_dalle_models.DalleBartEncoder(
        layer_count=LAYERS, embed_count=WIDTH, attention_head_count=WIDTH // 64, text_vocab_count=len(vocab) + 5,
        text_token_count=TEXT_LEN, glu_embed_count=GLU, device="cpu"), seed + 1)
    decoder = randomize(min_dalle_models.DalleBartDecoder(
        image_vocab_count=image_vocab, embed_count=WIDTH, attention_head_count=WIDTH // 64, glu_embed_count=GLU,
        layer_count=LAYERS, device="cpu"), seed + 2)
    torch.save(encoder.state_dict(), path / "encoder.pt")
    torch.save(decoder.state_dict(), path / "decoder.pt")
    detoker, pixels = tiny_detoker(min(image_vocab, 2 ** 14), seed + 3)
    torch.save(detoker, path / "detoker.pt")
    return encoder, decoder, TextTokenizer(vocab, merges), pixels


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("min_dalle"), tmp_path_factory.mktemp("conv") / "model"
    upstream = build_source(src)
    mm.convert(src, out)  # detected as min-dalle
    return upstream, mm.load(out), out


def text_rows(tokenizer, prompt):
    """min-dalle's two text rows for one prompt: [uncond; cond]."""
    tokens = tokenizer.tokenize(prompt)
    rows = np.ones((2, TEXT_LEN), dtype=np.int64)
    rows[0, :2] = [tokens[0], tokens[-1]]
    rows[1, :len(tokens)] = tokens
    return torch.tensor(rows)


PROMPTS = ["a red circle", "A  Blue square  above a RED circle", "left of 🙂 résumé", "zzz qq", "x" * 70,
           "", "   ", "red" + " red" * 80]


def test_tokenizer_matches_min_dalle(converted):
    (_, _, tokenizer, _), pipe, _ = converted
    for prompt in PROMPTS:
        assert pipe.tokenizer.encode(prompt) == tokenizer.tokenize(prompt), prompt


def test_tokenize_pads_cuts_and_rejects_empty_prompts(converted):
    (_, _, tokenizer, _), pipe, _ = converted
    rows = pipe.tokenize(["a red circle"])
    assert torch.equal(rows, text_rows(tokenizer, "a red circle")[1:])
    long = "red" + " red" * 80
    with pytest.warns(UserWarning, match="cut to the model's 64"):
        cut = pipe.tokenize([long])
    assert cut[0].tolist() == tokenizer.tokenize(long)[:64]
    for empty in ["", "   ", "日本"]:
        with pytest.raises(mm.InputError, match="empty"):
            pipe.tokenize([empty])


def test_encoder_states_match(converted):
    (encoder, _, tokenizer, _), pipe, _ = converted
    for prompt in PROMPTS[:4]:
        rows = text_rows(tokenizer, prompt)
        ref = encoder(rows)
        ours = pipe.model.encoder(rows, (rows != 1).sum(1))
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def upstream_step_logits(encoder, decoder, rows, image_tokens):
    """min-dalle's cached decoder path, teacher-forced: logits ``[256, 2n, V]`` for n images."""
    n = image_tokens.shape[0]
    expanded = [0] * n + [1] * n
    states = encoder(rows)[expanded]
    mask = rows[expanded].not_equal(1)[:, None, None, :]
    attention_state = torch.zeros(LAYERS, 4 * n, IMAGE_TOKENS, WIDTH)
    prev = torch.cat([torch.full((n, 1), MIN_DALLE_BOS), image_tokens[:, :-1]], dim=1)
    out = []
    for i in range(IMAGE_TOKENS):
        logits, attention_state = decoder(mask, states, attention_state, prev[:, [i]], torch.tensor([i]))
        out.append(logits[:, -1])
    return torch.stack(out)


def engine_step_logits(model, rows, image_tokens):
    n = image_tokens.shape[0]
    rows = rows[[0] * n + [1] * n]
    lengths = (rows != 1).sum(1)
    states = model.encoder(rows, lengths)
    layers, heads, dh, positions = model.decoder.cache_geometry()
    cache = KVCache.allocate(layers, 2 * n, heads, positions, dh, torch.float32, "cpu")
    cross = CrossKVCache.allocate(layers, lengths, heads, TEXT_LEN, dh, torch.float32, "cpu")
    prev = torch.cat([torch.full((n, 1), MIN_DALLE_BOS), image_tokens[:, :-1]], dim=1).repeat(2, 1)
    cache.span = 1
    out = [model.decoder.prefill(prev[:, :1], states, cache, cross)]
    for i in range(1, IMAGE_TOKENS):
        cache.span = i + 1
        out.append(model.decoder.decode_step(prev[:, i], torch.full((2 * n,), i), cache, cross))
    return torch.stack(out)


def test_teacher_forced_logits_match_for_all_256_steps(converted):
    (encoder, decoder, tokenizer, _), pipe, _ = converted
    rows = text_rows(tokenizer, "a blue square above a red circle")
    image_tokens = torch.randint(0, 2 ** 14, (2, IMAGE_TOKENS), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = upstream_step_logits(encoder, decoder, rows, image_tokens)
        ours = engine_step_logits(pipe.model, rows, image_tokens)
    assert ours.shape == ref.shape == (IMAGE_TOKENS, 4, 2 ** 14 + 1)
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-4 * scale


def upstream_greedy(encoder, decoder, rows, n, factor):
    """min-dalle's ``generate_raw_image_stream`` loop with top_k=1 for n images of one prompt."""
    expanded = [0] * n + [1] * n
    states = encoder(rows)[expanded]
    mask = rows[expanded].not_equal(1)[:, None, None, :]
    attention_state = torch.zeros(LAYERS, 4 * n, IMAGE_TOKENS, WIDTH)
    tokens = torch.full((n, IMAGE_TOKENS + 1), MIN_DALLE_BOS)
    settings = torch.tensor([1.0, 1, factor])
    for i in range(IMAGE_TOKENS):
        tokens[:, i + 1], attention_state = decoder.sample_tokens(
            settings=settings, attention_mask=mask, encoder_state=states, attention_state=attention_state,
            prev_tokens=tokens[:, [i]], token_index=torch.tensor([i]))
    return tokens[:, 1:]


@pytest.mark.parametrize("factor", [16.0, 3.0])
def test_greedy_tokens_with_supercondition_match(converted, factor):
    (encoder, decoder, tokenizer, _), pipe, _ = converted
    rows = text_rows(tokenizer, "a red circle left of a blue square")
    with torch.inference_mode():
        ref = upstream_greedy(encoder, decoder, rows, 1, factor)
    ours = pipe.generate_tokens(rows[1:], mm.SamplingParams(top_k=1, guidance_scale=factor))
    assert ours.shape == (1, IMAGE_TOKENS)
    assert torch.equal(ours, ref)
    sampled_top1 = pipe.generate_tokens(rows[1:], mm.SamplingParams(do_sample=True, top_k=1, guidance_scale=factor,
                                                                     seed=3))
    assert torch.equal(sampled_top1, ref)


def test_pixels_match_the_vqgan(converted):
    (_, _, _, pixels), pipe, _ = converted
    tokens = torch.randint(0, 2 ** 14, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    ref = pixels(tokens)
    ours = pipe.decode_tokens(tokens.flatten(1))
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    inside = ((ref > 0) & (ref < 1)).float().mean()
    assert inside > 0.3, "the random VQGAN saturates: the comparison would be vacuous"
    assert (ours - ref).abs().max() <= 1e-4


def test_generate_images_stream_and_seeds(converted):
    _, pipe, _ = converted
    params = mm.SamplingParams(do_sample=True, top_k=32, guidance_scale=4.0, seed=7)
    images = pipe.generate(["a red circle", "a blue square"], images_per_prompt=2, sampling=params)
    assert len(images) == 4 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    again = pipe.generate(["a red circle", "a blue square"], images_per_prompt=2, sampling=params)
    assert [np.asarray(a).tobytes() for a in images] == [np.asarray(b).tobytes() for b in again]
    assert np.asarray(images[0]).tobytes() != np.asarray(images[1]).tobytes()  # rows draw their own noise
    stream = []
    for partial in pipe.generate_stream("a red circle", sampling=params, every=64):
        assert not torch.is_inference_mode_enabled()  # the caller's code between yields runs normally
        stream.append(partial)
    assert len(stream) == IMAGE_TOKENS // 64  # partial images after 64, 128 and 192 tokens, then the final ones
    assert (
        np.asarray(stream[-1][0]).tobytes() == np.asarray(pipe.generate("a red circle", sampling=params)[0]).tobytes()
    )


def test_small_image_vocabularies_start_from_the_extra_row(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    build_source(src, image_vocab=300, seed=4)
    pipe = mm.load(mm.convert(src, tmp_path / "out", source_format="min-dalle"))
    gen = pipe.config.generation
    assert (gen.bos_token_id, gen.image_vocab_size) == (300, 300)
    tokens = pipe.generate_tokens(pipe.tokenize(["a red circle"]), mm.SamplingParams(do_sample=True, seed=1))
    assert int(tokens.max()) < 300


def test_bad_text_tokens_are_rejected(converted):
    _, pipe, _ = converted
    good = pipe.tokenize(["a red circle"])
    gap = good.clone()
    gap[0, 10] = 5  # a real token after padding
    bad = {"outside the vocabulary": good.clone().fill_(10 ** 6), "followed only by padding": gap,
           "integer tensor": good.float(), "[B, 64]": good[:, :10]}
    for message, tokens in bad.items():
        with pytest.raises(mm.InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            pipe.generate_tokens(tokens)
    with pytest.raises(mm.InputError, match=r"must be in \[0, 16384\)"):
        pipe.decode_tokens(torch.full((1, 256), 2 ** 14))
    with pytest.raises(mm.InputError):
        pipe.decode_tokens(torch.zeros(1, 250, dtype=torch.long))


def test_txt2img_cli_writes_a_grid_and_rejects_bad_options(converted, tmp_path, capsys):
    from test_bad_input import cli_error

    from mmgen_engine.cli import main

    capsys.readouterr()  # whatever importing the helpers printed
    model = converted[2]
    out = tmp_path / "grid.png"
    assert main(["txt2img", "a red circle", "--model", str(model), "-o", str(out), "--grid", "2", "--top-k", "8",
                 "--guidance", "3", "--seed", "1"]) == 0
    with PIL.Image.open(out) as im:
        assert im.size == (64, 64)
    for argv, message in [(["--grid", "0"], "--grid"), (["--top-k", "-1"], "top_k"), (["--guidance", "-2"], "guidance"),
                          (["--seed", "-5"], "seed")]:
        assert message in cli_error(capsys, ["txt2img", "a red circle", "--model", model, "-o", out, *argv])
    assert ".png" in cli_error(capsys, ["txt2img", "a red circle", "--model", model, "-o", tmp_path / "x.jpg"])
    assert "empty" in cli_error(capsys, ["txt2img", "  ", "--model", model, "-o", out])


def test_triton_backend_gives_the_reference_tokens_and_pixels(tmp_path, monkeypatch):
    """The whole pipeline on the Triton kernels (interpreter on CPU) against the references, on a
    model cut to a 4x4 token grid (the engine reads the grid from the positions table) so that the
    interpreter's 16 steps stay fast."""
    pytest.importorskip("triton")
    src = tmp_path / "src"
    src.mkdir()
    build_source(src, image_vocab=300, seed=6)
    state = torch.load(src / "decoder.pt")
    state["embed_positions.weight"] = state["embed_positions.weight"][:16].clone()
    torch.save(state, src / "decoder.pt")
    pipe = mm.load(mm.convert(src, tmp_path / "out"))
    assert pipe.config.generation.grid_size == 4
    text = pipe.tokenize(["a red circle", "a blue square above a red circle"])
    params = mm.SamplingParams(do_sample=True, top_k=8, guidance_scale=3.0, seed=2)
    ref_tokens = pipe.generate_tokens(text, params)
    ref_pixels = pipe.decode_tokens(ref_tokens)
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    tokens = pipe.generate_tokens(text, params)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(pipe.decode_tokens(tokens), ref_pixels, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_tokens_match_cpu_and_graphs_match_eager(converted, dtype):
    """On CUDA: fp32 greedy tokens equal the CPU reference's; in each dtype the CUDA-graph replay
    gives the eager tokens (greedy and seeded sampling, batches 1 and 3 sharing a bucket)."""
    (_, _, tokenizer, _), cpu_pipe, path = converted
    pipe = mm.load(path, device="cuda", dtype=dtype)
    text = pipe.tokenize(["a red circle", "a blue square above a red circle", "left of a square"])
    greedy = mm.SamplingParams(top_k=1, guidance_scale=4.0)
    if dtype == "float32":
        assert torch.equal(pipe.generate_tokens(text, greedy).cpu(), cpu_pipe.generate_tokens(text, greedy))
    for params in (greedy, mm.SamplingParams(do_sample=True, top_k=64, guidance_scale=8.0, seed=5)):
        for rows in (text[:1], text):
            pipe.use_cuda_graphs = True
            graphed = pipe.generate_tokens(rows, params)
            pipe.use_cuda_graphs = False
            assert torch.equal(pipe.generate_tokens(rows, params), graphed)
    images = pipe.decode_tokens(graphed)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
