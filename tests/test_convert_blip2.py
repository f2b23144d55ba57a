"""Parity of the ``hf-blip2`` converter + engine (BLIP-2: ViT, Q-Former, OPT) against transformers'
``Blip2ForConditionalGeneration``, and of the OPT decoder alone against ``OPTForCausalLM``, with tiny
random models built offline and OPT-style byte-level BPE tokenizers built with ``tokenizers``."""
from __future__ import annotations

import json

import pytest
import torch
from hf_models import IMAGE, padded
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import mmgen_engine as mm
from mmgen_engine.errors import CheckpointError, ConversionError, InputError

# OPT's special ids: <s> 0, <pad> 1, </s> 2 (BOS and EOS), <unk> 3; BLIP-2's <image> after the BPE
BOS, PAD, EOS = 2, 1, 2
BPE_SIZE = 300
IMAGE_TOKEN = BPE_SIZE
VOCAB = BPE_SIZE + 4  # the model's vocabulary is padded beyond the tokenizer's, as OPT's is
QUERIES = 5
CORPUS = ["Question: what is on the table? Answer: a cat sitting on a wooden table next to a cup of coffee.",
          "a picture of two dogs playing in the snow", "an old red car parked on the street",
          "Question: how many people are there? Answer: three people walking along the beach at sunset"] * 4
PROMPT = "Question: what is on the table? Answer:"


def make_tokenizer() -> Tokenizer:
    """OPT's tokenizer in miniature: byte-level BPE trained on a few sentences, OPT's special tokens
    first, BLIP-2's ``<image>`` added after the vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["<image>"])
    assert tok.token_to_id("</s>") == EOS and tok.token_to_id("<image>") == IMAGE_TOKEN
    return tok


def opt_text_config(**overrides) -> dict:
    return {**dict(model_type="opt", vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, ffn_dim=64,
                   num_attention_heads=4, max_position_embeddings=48, bos_token_id=BOS, eos_token_id=EOS,
                   pad_token_id=PAD), **overrides}


def randomize(model, init):
    """Every tensor random (biases and LayerNorms too), so that each one matters."""
    for p in model.parameters():
        p.normal_(0, init if p.dim() > 1 else 0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.add_(1)


def make_blip2(seed=0, init=0.5, eos=EOS, qformer_layers=3, frequency=2, text=None):
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    torch.manual_seed(seed)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8, initializer_range=init),
        qformer_config=dict(hidden_size=24, num_hidden_layers=qformer_layers, num_attention_heads=2,
                            intermediate_size=40, cross_attention_frequency=frequency, encoder_hidden_size=32,
                            initializer_range=init),
        text_config=text or opt_text_config(eos_token_id=eos), num_query_tokens=QUERIES,
        image_token_index=IMAGE_TOKEN, initializer_range=init)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        randomize(model, init)
        emb = model.get_input_embeddings().weight
        emb[[PAD, EOS]] *= 0.2  # damped special tokens: long, varied greedy output
    return model


def save_blip2(model, path):
    from transformers import BlipImageProcessor
    model.save_pretrained(path)
    BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    make_tokenizer().save(str(path / "tokenizer.json"))
    return path


def blip2_pipe(model, tmp_path):
    return mm.load(mm.convert(save_blip2(model, tmp_path / "hf"), tmp_path / "engine"))


def pixels(batch, seed=7):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def prompt_ids(prompt=PROMPT) -> list[int]:
    return make_tokenizer().encode(prompt, add_special_tokens=False).ids


def hf_input_ids(batch, ids=()):
    """What Blip2Processor gives: the image placeholders, then the tokenizer's BOS and the prompt."""
    return torch.tensor([[IMAGE_TOKEN] * QUERIES + [BOS, *ids]] * batch)


def hf_greedy(model, px, n, ids=(), **kwargs):
    input_ids = hf_input_ids(px.shape[0], ids)
    with torch.no_grad():
        seq = model.generate(pixel_values=px, input_ids=input_ids, max_new_tokens=n, do_sample=False, num_beams=1,
                             **kwargs)
    return padded(seq[:, input_ids.shape[1]:], n, PAD)


def engine_logits(pipe, pixel_values, tokens):
    """The engine's logits after every position of ``tokens [B, T]`` (the BOS first): the queries and
    the BOS prefilled, then one decode step per token, on the pipeline's device and dtype."""
    from mmgen_engine.runtime import CrossKVCache, KVCache
    dec, device = pipe.model.decoder, pipe.device
    tokens = tokens.to(device)
    with torch.inference_mode():
        states = pipe.model.encode(pixel_values.to(device, pipe.dtype))
        b, t = tokens.shape
        prefix = states.shape[1]
        layers, heads, head_dim, _ = dec.cache_geometry()
        cache = KVCache.allocate(layers, b, heads, prefix + t, head_dim, states.dtype, device)
        cross = CrossKVCache.allocate(layers, torch.full((b,), prefix), heads, 0, head_dim, states.dtype, device)
        out = [dec.prefill(tokens[:, :1], states, cache, cross)]
        for i in range(1, t):
            cache.span = prefix + i + 1
            out.append(dec.decode_step(tokens[:, i], torch.full((b,), prefix + i, device=device), cache, cross))
    return torch.stack(out, dim=1).float().cpu()


def reference_logits(model, px, tokens):
    """transformers' fp32 logits after every position of ``tokens`` (the queries' placeholders first)."""
    with torch.no_grad():
        return model(pixel_values=px, input_ids=torch.cat([hf_input_ids(px.shape[0])[:, :QUERIES], tokens], 1)
                     ).logits[:, QUERIES:]


def assert_varied(ids):
    assert len(set(ids.flatten().tolist())) > 5, "degenerate random model: the test would prove little"


def scaled_error(ours, ref):
    return (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("batch", [1, 3])
def test_blip2_greedy_ids_match_transformers(tmp_path, batch):
    model = make_blip2(seed=batch)
    pipe = blip2_pipe(model, tmp_path)
    cfg = pipe.config
    assert (cfg.architecture, cfg.source_format, cfg.qformer.num_query_tokens) == ("blip2", "hf-blip2", QUERIES)
    assert cfg.generation.decoder_start_token_id == BOS and pipe.model.decoder.uses_prefix
    px = pixels(batch)
    ours = pipe.generate_ids(px, 24)
    assert torch.equal(ours, hf_greedy(model, px, 24))
    assert_varied(ours)
    ids = prompt_ids()
    with_prompt = pipe.generate_ids(px, 24, prompt_ids=ids)
    assert torch.equal(with_prompt, hf_greedy(model, px, 24, ids))
    assert not torch.equal(with_prompt, ours)


def test_blip2_rows_ending_at_different_steps(tmp_path):
    """An eos that some rows emit early and others late or never: finished rows pad, the rest go on."""
    px = pixels(4, seed=3)
    free = hf_greedy(make_blip2(seed=5), px, 20)
    # the token row 0 emits first at step 3 is the eos: row 0 ends there, the others elsewhere or never
    eos = int(free[0, 3])
    assert eos not in free[0, :3].tolist()
    model = make_blip2(seed=5, eos=eos)
    pipe = blip2_pipe(model, tmp_path)
    assert pipe.config.generation.eos_token_id == eos
    ours = pipe.generate_ids(px, 20)
    ref = hf_greedy(model, px, 20)
    assert torch.equal(ours, ref)
    ends = {row.index(eos) if eos in row else None for row in ours.tolist()}
    assert len(ends) >= 2 and 3 in ends, f"rows should end at different steps: {ends}"


def test_blip2_logits_match_transformers_fp32(tmp_path):
    model = make_blip2(seed=4, init=0.05)
    pipe = blip2_pipe(model, tmp_path)
    px = pixels(3, seed=1)
    tokens = torch.cat([torch.full((3, 1), BOS), torch.randint(4, BPE_SIZE, (3, 11))], dim=1)
    assert scaled_error(engine_logits(pipe, px, tokens), reference_logits(model, px, tokens)) <= 1e-4


@pytest.mark.parametrize("layers,frequency", [(1, 1), (4, 3)])
def test_blip2_qformer_cross_attention_frequency(tmp_path, layers, frequency):
    """Cross-attention in layers 0, f, 2f, ... only (every layer with f = 1)."""
    model = make_blip2(seed=6, qformer_layers=layers, frequency=frequency)
    pipe = blip2_pipe(model, tmp_path)
    crossing = [layer.cross is not None for layer in pipe.model.qformer]
    assert crossing == [i % frequency == 0 for i in range(layers)]
    px = pixels(2, seed=2)
    assert torch.equal(pipe.generate_ids(px, 16), hf_greedy(model, px, 16))


def test_blip2_caption_with_and_without_a_question(tmp_path):
    """caption() from image files through BlipImageProcessor's preprocessing, decoded as the processor's
    batch_decode does (the prompt, then the answer)."""
    from transformers import BlipImageProcessor
    model = make_blip2(seed=2)
    pipe = blip2_pipe(model, tmp_path)
    images = [(torch.rand(h, w, 3, generator=torch.Generator().manual_seed(h)) * 255).to(torch.uint8).numpy()
              for h, w in [(50, 37), (32, 61)]]
    px = BlipImageProcessor.from_pretrained(tmp_path / "hf")(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pipe.preprocess(images), px)
    tok = make_tokenizer()
    for prompt in (None, PROMPT):
        ids = prompt_ids(prompt) if prompt else []
        ref = hf_greedy(model, px, 12, ids)
        rows = [ids + (r[:r.index(EOS)] if EOS in r else r) for r in ref.tolist()]
        expected = [t.strip() for t in tok.decode_batch(rows, skip_special_tokens=True)]
        assert pipe.caption(images, max_new_tokens=12, prompt=prompt) == expected
    assert all(c.startswith(PROMPT) for c in pipe.caption(images, max_new_tokens=3, prompt=PROMPT))


def test_blip2_beam_search_matches_transformers(tmp_path):
    model = make_blip2(seed=7)
    pipe = blip2_pipe(model, tmp_path)
    px = pixels(2, seed=5)
    ids = prompt_ids()
    input_ids = hf_input_ids(2, ids)
    with torch.no_grad():
        seq = model.generate(pixel_values=px, input_ids=input_ids, max_new_tokens=10, do_sample=False, num_beams=3)
    ours = pipe.generate_ids(px, 10, prompt_ids=ids, sampling=mm.SamplingParams(num_beams=3))
    assert torch.equal(ours, padded(seq[:, input_ids.shape[1]:], 10, PAD))


def test_blip2_prompt_longer_than_the_context_is_refused(tmp_path):
    pipe = blip2_pipe(make_blip2(seed=1), tmp_path)
    # 5 queries + bos + 30 prompt tokens + 13 new tokens - 1 fed = 47 <= 48 positions; one more is too many
    assert pipe.generate_ids(pixels(1), 13, prompt_ids=[5] * 30).shape == (1, 13)
    with pytest.raises(InputError, match="after a prefix of 5"):
        pipe.generate_ids(pixels(1), 14, prompt_ids=[5] * 30)


# ---- bad input ---------------------------------------------------------------------------------------

def test_blip2_with_t5_is_refused(tmp_path):
    t5 = dict(model_type="t5", vocab_size=VOCAB, d_model=48, d_kv=12, d_ff=64, num_layers=1, num_heads=4,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = make_blip2(seed=0, text=t5)
    with pytest.raises(ConversionError, match=r"BLIP-2 with a 't5' language model is not supported; supported: "
                                              r"BLIP-2 with an OPT language model") as e:
        mm.convert(save_blip2(model, tmp_path / "hf"), tmp_path / "engine")
    assert "\n" not in str(e.value)


def edit_config(src, **text):
    config = json.loads((src / "config.json").read_text())
    config["text_config"].update(text)
    (src / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit,message", [
    (dict(do_layer_norm_before=False), "post-LayerNorm OPT"),
    (dict(enable_bias=False), "without biases"),
    (dict(_remove_final_layer_norm=True), "without its final LayerNorm"),
    (dict(activation_function="silu"), "unsupported activation 'silu'"),
    (dict(word_embed_proj_dim=32), "word_embed_proj_dim \\(32\\) must equal its hidden_size \\(48\\)"),
])
def test_unsupported_opt_variants_are_refused(tmp_path, edit, message):
    src = save_blip2(make_blip2(seed=0), tmp_path / "hf")
    edit_config(src, **edit)
    with pytest.raises(ConversionError, match=message):
        mm.convert(src, tmp_path / "engine")


@pytest.mark.parametrize("name", ["language_projection.weight", "query_tokens",
                                  "qformer.encoder.layer.2.crossattention.attention.value.bias",
                                  "language_model.model.decoder.layers.1.fc1.bias"])
def test_missing_tensors_are_refused(tmp_path, name):
    src = save_blip2(make_blip2(seed=0), tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    del state[name]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=f"missing tensor\\(s\\) {name}"):
        mm.convert(src, tmp_path / "engine")


def test_text_path_tensors_are_dropped_and_extra_ones_refused(tmp_path):
    """The Q-Former's text-path MLP (use_qformer_text_input) converts and plays no part; an unknown tensor
    is refused; a saved copy of the tied head must equal the embeddings."""
    model = make_blip2(seed=3)
    src = save_blip2(model, tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    state["qformer.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(40, 24)
    state["language_model.lm_head.weight"] = state["language_model.model.decoder.embed_tokens.weight"].clone()
    save_file(state, str(src / "model.safetensors"))
    px = pixels(1)
    assert torch.equal(mm.load(mm.convert(src, tmp_path / "e1")).generate_ids(px, 8), hf_greedy(model, px, 8))
    state["language_model.lm_head.weight"][0, 0] += 1
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="differs from"):
        mm.convert(src, tmp_path / "e2")
    del state["language_model.lm_head.weight"]
    state["qformer.extra.weight"] = torch.zeros(2)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="unused tensor\\(s\\) qformer.extra.weight"):
        mm.convert(src, tmp_path / "e3")


def test_edited_engine_config_fails_at_load(tmp_path):
    out = mm.convert(save_blip2(make_blip2(seed=0), tmp_path / "hf"), tmp_path / "engine")
    config = json.loads((out / "config.json").read_text())
    config["qformer"]["encoder_hidden_size"] = 16
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="qformer cross-attends to 16-wide states but the encoder is 32 wide"):
        mm.load(out)
    del config["qformer"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="architecture 'blip2' needs a 'qformer' block"):
        mm.load(out)


# ---- the OPT decoder alone ---------------------------------------------------------------------------

def engine_opt(hf_model):
    """An engine OPTDecoder holding ``OPTForCausalLM``'s weights, mapped by the converter's rules."""
    from mmgen_engine.config import OPTConfig, from_dict
    from mmgen_engine.convert.hf_blip2 import OPT_DEFAULTS, opt_config, opt_decoder_rules
    from mmgen_engine.convert.hf_towers import settings
    from mmgen_engine.convert.keymap import apply_rules, rule
    from mmgen_engine.models import OPTDecoder
    text = settings(hf_model.config.to_dict(), OPT_DEFAULTS, "opt")
    cfg = opt_config(text, "opt")
    rules = opt_decoder_rules("model.decoder.", cfg)
    if not cfg["tie_word_embeddings"]:
        rules.append(rule("decoder.lm_head", "lm_head.weight"))
    state = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight" or not cfg["tie_word_embeddings"]}
    tensors = apply_rules(rules, state, {"dec": cfg["num_layers"]})
    decoder = OPTDecoder(from_dict(OPTConfig, cfg))
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in tensors.items()})
    return decoder


@pytest.mark.parametrize("embed_dim,tie", [(None, True), (32, True), (32, False)],
                         ids=["plain", "project-in-out", "project-in-out-untied"])
def test_opt_decoder_matches_opt_for_causal_lm(embed_dim, tie):
    """Logits within 1e-4 (prefill then decode steps) and greedy ids equal to OPTForCausalLM.generate,
    with OPT-350m's project_in / project_out (on a pre-LN stack) and with an untied head."""
    from transformers import OPTConfig, OPTForCausalLM

    from mmgen_engine.runtime import CrossKVCache, KVCache, generate
    torch.manual_seed(0)
    extra = {} if embed_dim is None else {"word_embed_proj_dim": embed_dim}
    hf = OPTForCausalLM(OPTConfig(**opt_text_config(tie_word_embeddings=tie, **extra))).eval()
    with torch.no_grad():
        randomize(hf, 0.3)
        hf.get_input_embeddings().weight[[PAD, EOS]] *= 0.2
    dec = engine_opt(hf)
    tokens = torch.cat([torch.full((2, 1), BOS), torch.randint(4, BPE_SIZE, (2, 9))], dim=1)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
    layers, heads, head_dim, _ = dec.cache_geometry()
    cache = KVCache.allocate(layers, 2, heads, tokens.shape[1], head_dim, torch.float32, "cpu")
    cross = CrossKVCache.allocate(layers, torch.zeros(2), heads, 0, head_dim, torch.float32, "cpu")
    with torch.inference_mode():
        ours = [dec.prefill(tokens[:, :3], torch.zeros(2, 0, embed_dim or 48), cache, cross)]
        for i in range(3, tokens.shape[1]):
            cache.span = i + 1
            ours.append(dec.decode_step(tokens[:, i], torch.full((2,), i), cache, cross))
    assert scaled_error(torch.stack(ours, 1), ref[:, 2:]) <= 1e-4
    with torch.no_grad():
        seq = hf.generate(input_ids=tokens[:, :4], max_new_tokens=16, do_sample=False, num_beams=1)
    ids = generate(dec, tokens[:, :4], torch.zeros(2, 0, embed_dim or 48), torch.zeros(2), 16, eos_token_id=EOS,
                   pad_token_id=PAD)
    assert torch.equal(ids, padded(seq[:, 4:], 16, PAD))
    assert_varied(ids)


def test_blip2_half_precision_keeps_the_qformer_in_fp32(tmp_path):
    """A half-precision conversion stores the Q-Former and its queries in float32, as transformers keeps
    them in float16; the logits stay close to transformers' float16 model."""
    from transformers import Blip2ForConditionalGeneration
    model = make_blip2(seed=4, init=0.05)
    src = save_blip2(model, tmp_path / "hf")
    pipe = mm.load(mm.convert(src, tmp_path / "engine", dtype="float16"))
    m = pipe.model
    assert m.query_tokens.dtype == m.ln_query.weight.dtype == m.qformer[0].attn.qkv.weight.dtype == torch.float32
    assert m.projection.weight.dtype == m.decoder.wte.dtype == m.encoder.patch_embed.weight.dtype == torch.float16
    hf = Blip2ForConditionalGeneration.from_pretrained(src, dtype=torch.float16).eval()
    assert hf.query_tokens.dtype == hf.qformer.layernorm.weight.dtype == torch.float32
    px = pixels(2, seed=1)
    tokens = torch.cat([torch.full((2, 1), BOS), torch.randint(4, BPE_SIZE, (2, 7))], dim=1)
    with torch.no_grad():
        ref = hf(pixel_values=px.half(), input_ids=torch.cat([hf_input_ids(2)[:, :QUERIES], tokens], 1)).logits
    assert scaled_error(engine_logits(pipe, px, tokens), ref[:, QUERIES:].float()) <= 1e-2


def test_blip2_bf16_on_cpu(tmp_path, monkeypatch):
    """A bfloat16 conversion on CPU computed in bf16: logits within bf16's tolerance of transformers'
    fp32 logits."""
    monkeypatch.setenv("MMGEN_CPU_BF16_COMPUTE", "bfloat16")
    model = make_blip2(seed=4, init=0.05)
    pipe = mm.load(mm.convert(save_blip2(model, tmp_path / "hf"), tmp_path / "engine", dtype="bfloat16"))
    assert pipe.dtype == pipe.model.encoder.patch_embed.weight.dtype == torch.bfloat16
    px = pixels(2, seed=1)
    tokens = torch.cat([torch.full((2, 1), BOS), torch.randint(4, BPE_SIZE, (2, 7))], dim=1)
    assert scaled_error(engine_logits(pipe, px, tokens), reference_logits(model, px, tokens)) <= 4e-2
    assert pipe.generate_ids(px, 6, prompt_ids=prompt_ids()).shape == (2, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_blip2_cuda_graphs_and_half_precision(tmp_path, dtype):
    """On CUDA (default backends): graph replays give the eager ids; fp32 gives the CPU reference's
    ids; fp16 / bf16 logits stay within their tolerance of transformers' fp32 logits."""
    model = make_blip2(seed=13, init=0.05)
    path = mm.convert(save_blip2(model, tmp_path / "hf"), tmp_path / "engine")
    pipe = mm.load(path, device="cuda", dtype=dtype)
    cpu = mm.load(path) if dtype == "float32" else None
    ids = prompt_ids()
    for batch, seed in ((1, 0), (3, 1), (4, 2)):
        px = pixels(batch, seed)
        pipe.use_cuda_graphs = True
        graph = pipe.generate_ids(px, 16, prompt_ids=ids)
        pipe.use_cuda_graphs = False
        assert torch.equal(graph, pipe.generate_ids(px, 16, prompt_ids=ids)), (batch, seed)
        if cpu is not None:
            assert torch.equal(graph.cpu(), cpu.generate_ids(px, 16, prompt_ids=ids)), (batch, seed)
    px = pixels(2, seed=3)
    tokens = torch.cat([torch.full((2, 1), BOS), torch.randint(4, BPE_SIZE, (2, 7))], dim=1)
    tolerance = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}[dtype]
    assert scaled_error(engine_logits(pipe, px, tokens), reference_logits(model, px, tokens)) <= tolerance


# ---- serving and the Triton backend ------------------------------------------------------------------

def test_blip2_in_the_engine_equals_the_pipeline_alone(tmp_path):
    """mm.Engine serves BLIP-2 captions: requests of mixed prompts, lengths and sampling in fewer slots
    than requests, each caption what the pipeline gives for that request alone."""
    pipe = blip2_pipe(make_blip2(seed=8), tmp_path)
    g = torch.Generator().manual_seed(0)
    pictures = [(torch.rand(IMAGE, IMAGE, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(3)]
    sampled = [None, mm.SamplingParams(do_sample=True, temperature=0.9, top_k=20, seed=3)]
    requests = [(pictures[i % 3], [None, PROMPT, "a picture of"][i % 3], [9, 4, 7][i % 3], sampled[i % 2])
                for i in range(6)]
    expected = [pipe.caption([image], max_new_tokens=n, sampling=s, prompt=p)[0] for image, p, n, s in requests]
    assert len(set(expected)) >= 4, f"degenerate random model: {expected}"
    engine = mm.Engine(pipe, slots=2)
    try:
        handles = [engine.submit(mm.CaptionRequest(image, prompt=p, max_new_tokens=n, sampling=s))
                   for image, p, n, s in requests]
        assert [h.result(timeout=120) for h in handles] == expected
    finally:
        engine.shutdown(drain=False, timeout=120)


def test_blip2_triton_backend_gives_the_reference_ids(tmp_path, monkeypatch):
    """Every op forced to Triton (its interpreter on CPU), bias_relu and the prefix prefill included."""
    pytest.importorskip("triton")
    from mmgen_engine.ops import registry
    pipe = blip2_pipe(make_blip2(seed=9), tmp_path)
    px = pixels(2, seed=4)
    ids = prompt_ids("a picture of")
    monkeypatch.delenv("MMGEN_BACKEND", raising=False)
    expected = pipe.generate_ids(px, 6, prompt_ids=ids)
    registry.resolve.cache_clear()
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    try:
        assert registry.dispatch("bias_relu", px) is not registry._TABLE["bias_relu"]["reference"].fn
        ours = pipe.generate_ids(px, 6, prompt_ids=ids)
    finally:
        registry.resolve.cache_clear()
    assert torch.equal(ours, expected)


def test_blip2_generation_settings_come_from_the_text_config(tmp_path):
    """transformers' BLIP-2 generate runs the language model's generate with settings from text_config:
    generation_config.json's eos and max_length play no part, and a call without arguments gives 20 new
    tokens; the converted model does the same."""
    model = make_blip2(seed=10)
    model.generation_config.max_length = QUERIES + 1 + 9
    model.generation_config.eos_token_id = 5
    pipe = blip2_pipe(model, tmp_path)
    assert pipe.config.generation.eos_token_id == EOS and pipe.config.generation_defaults is None
    px = pixels(2, seed=6)
    input_ids = hf_input_ids(2)
    with torch.no_grad():
        seq = model.generate(pixel_values=px, input_ids=input_ids, do_sample=False)
    ours = pipe.generate_ids(px)
    assert ours.shape == (2, 20) and torch.equal(ours, padded(seq[:, input_ids.shape[1]:], 20, PAD))


def test_blip2_repetition_controls_match_transformers(tmp_path):
    """repetition_penalty and no_repeat_ngram_size over BOS, the prompt and the caption (transformers
    also counts the queries' placeholder ids, which this model never generates)."""
    model = make_blip2(seed=11)
    pipe = blip2_pipe(model, tmp_path)
    px = pixels(2, seed=8)
    ids = prompt_ids()
    controls = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)
    ref = hf_greedy(model, px, 16, ids, **controls)
    assert IMAGE_TOKEN not in ref.tolist()
    ours = pipe.generate_ids(px, 16, prompt_ids=ids, sampling=mm.SamplingParams(**controls))
    assert torch.equal(ours, ref) and not torch.equal(ours, hf_greedy(model, px, 16, ids))


def test_malformed_text_config_is_one_line(tmp_path):
    src = save_blip2(make_blip2(seed=0), tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["text_config"] = [1, 2]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"text_config: expected an object, got \[1, 2\]"):
        mm.convert(src, tmp_path / "engine")
