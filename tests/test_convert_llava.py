"""Parity of the ``hf-llava`` converter + engine (CLIP tower, projector, LLaMA-family decoder with
grouped-query attention and rotary positions) against transformers' ``LlavaForConditionalGeneration``,
with tiny random models built offline; bad input and unsupported configs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from llava_models import BOS, EOS, IMAGE, IMAGE_TOKEN, PAD, hf_processor, make_llama_tokenizer, make_llava, save_llava

import mmgen_engine as mm
from mmgen_engine.errors import ConversionError, InputError
from mmgen_engine.pipelines.captioning import LLAVA_PROMPT
from mmgen_engine.runtime import KVCache

QUESTION = "USER: <image>\nWhat is it? ASSISTANT:"
TOKENIZER = make_llama_tokenizer()
GQA = {"mqa": 1, "gqa": 2, "mha": 4}  # K/V heads of the 4 query heads
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


def pixels(batch, seed=7):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def llava_pipe(model, tmp_path, **save):
    return mm.load(mm.convert(save_llava(model, tmp_path / "hf", **save), tmp_path / "engine"))


def prompt_ids(prompt: str) -> list[int]:
    """The prompt's ids after BOS, as the pipeline takes them (the one <image> placeholder kept)."""
    return TOKENIZER.encode(prompt, add_special_tokens=False).ids


def hf_input_ids(model, prompt: str, batch: int) -> torch.Tensor:
    """LlavaProcessor's ids: BOS, the prompt with <image> repeated once per image token."""
    ids = [BOS, *prompt_ids(prompt)]
    at = ids.index(IMAGE_TOKEN)
    ids = ids[:at] + [IMAGE_TOKEN] * model.config.image_seq_length + ids[at + 1:]
    return torch.tensor([ids] * batch)


def hf_greedy(model, px, n, prompt=QUESTION, **kwargs):
    ids = hf_input_ids(model, prompt, px.shape[0])
    with torch.no_grad():
        seq = model.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, **kwargs)
    out = seq[:, ids.shape[1]:]
    return torch.cat([out, torch.full((out.shape[0], n - out.shape[1]), PAD)], dim=1)


def engine_logits(pipe, px, prompt: str, tokens: torch.Tensor) -> torch.Tensor:
    """The engine's logits after the prompt and after each of ``tokens [B, T]`` fed one decode step
    at a time -> ``[B, 1 + T, V]``."""
    model, dec, device = pipe.model, pipe.model.decoder, pipe.device
    ids = torch.tensor([[BOS, *prompt_ids(prompt)]] * px.shape[0], device=device)
    at = ids[0].tolist().index(IMAGE_TOKEN)
    tokens = tokens.to(device)
    with torch.inference_mode():
        states = model.prefix(model.encode(px.to(device, pipe.dtype)), ids[:, :at])
        prompt_rest = ids[:, at + 1:]
        start = states.shape[1] + prompt_rest.shape[1]
        layers, heads, head_dim, _ = dec.cache_geometry()
        cache = KVCache.allocate(layers, px.shape[0], heads, start + tokens.shape[1], head_dim, states.dtype, device)
        out = [dec.prefill(prompt_rest, states, cache, None)]
        for i in range(tokens.shape[1]):
            cache.span = start + i + 1
            out.append(dec.decode_step(tokens[:, i], torch.full((px.shape[0],), start + i, device=device), cache,
                                       None))
    return torch.stack(out, dim=1).float().cpu()


def scaled_error(ours, ref):
    return (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def assert_varied(ids):
    assert len(set(ids.flatten().tolist())) > 8, "degenerate random model: the test would prove little"


@pytest.mark.parametrize("kv", GQA.values(), ids=GQA.keys())
def test_greedy_ids_match_transformers_for_each_kv_head_count(tmp_path, kv):
    model = make_llava(seed=kv, kv_heads=kv)
    pipe = llava_pipe(model, tmp_path)
    dec = pipe.model.decoder
    assert pipe.config.architecture == "llava" and dec.uses_prefix
    assert dec.cache_geometry()[1] == kv  # the cache holds the K/V heads only
    px = pixels(3)
    ours = pipe.generate_ids(px, 24, prompt_ids=prompt_ids(QUESTION))
    assert torch.equal(ours, hf_greedy(model, px, 24))
    assert_varied(ours)
    # no text around the image: BOS, the image, nothing after it
    assert torch.equal(pipe.generate_ids(px, 12, prompt_ids=prompt_ids("<image>")),
                       hf_greedy(model, px, 12, prompt="<image>"))


@pytest.mark.parametrize("rope", ROPES, ids=ROPES.keys())
def test_rope_kinds_match_transformers(tmp_path, rope):
    """Greedy ids and fp32 logits (within 1e-4 of the largest) over positions past the llama3
    variant's original context of 16."""
    model = make_llava(seed=5, rope=ROPES[rope])
    pipe = llava_pipe(model, tmp_path)
    assert pipe.config.decoder.rope.kind == rope
    px = pixels(2, seed=3)
    ours = pipe.generate_ids(px, 30, prompt_ids=prompt_ids(QUESTION))
    assert torch.equal(ours, hf_greedy(model, px, 30))
    tokens = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([hf_input_ids(model, QUESTION, 2), tokens], dim=1)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits[:, -tokens.shape[1] - 1:]
    assert scaled_error(engine_logits(pipe, px, QUESTION, tokens), ref) <= 1e-4


def test_rows_ending_at_different_steps(tmp_path):
    model = make_llava(seed=11)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2.5  # some rows end early, at different steps
    pipe = llava_pipe(model, tmp_path)
    px = pixels(6, seed=2)
    ref = hf_greedy(model, px, 24)
    ends = {row.index(EOS) if EOS in row else None for row in ref.tolist()}
    assert len(ends - {None}) >= 2 and None in ends, f"the rows must end at different steps, got {ends}"
    assert torch.equal(pipe.generate_ids(px, 24, prompt_ids=prompt_ids(QUESTION)), ref)


@pytest.mark.parametrize("variant", [
    dict(tie=True), dict(attention_bias=True, mlp_bias=True, projector_bias=False),
    dict(feature_layer=[-1, -3], strategy="full"), dict(feature_layer=-1, heads=2, kv_heads=2, text_width=48),
], ids=["tied-head", "biases", "two-layers-full", "last-layer"])
def test_variants_match_transformers(tmp_path, variant):
    model = make_llava(seed=4, **variant)
    pipe = llava_pipe(model, tmp_path)
    px = pixels(2, seed=5)
    assert torch.equal(pipe.generate_ids(px, 16, prompt_ids=prompt_ids(QUESTION)), hf_greedy(model, px, 16))
    tokens = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([hf_input_ids(model, QUESTION, 2), tokens], dim=1)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits[:, -tokens.shape[1] - 1:]
    assert scaled_error(engine_logits(pipe, px, QUESTION, tokens), ref) <= 1e-4


def test_beam_search_matches_transformers(tmp_path):
    model = make_llava(seed=6)
    pipe = llava_pipe(model, tmp_path)
    px = pixels(2, seed=8)
    ours = pipe.generate_ids(px, 10, prompt_ids=prompt_ids(QUESTION), sampling=mm.SamplingParams(num_beams=3))
    assert torch.equal(ours, hf_greedy(model, px, 10, num_beams=3))


@pytest.mark.parametrize("controls", [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
                                      dict(num_beams=3, repetition_penalty=1.5)], ids=["penalty", "ngram", "beams"])
def test_repetition_controls_see_the_whole_prompt(tmp_path, controls):
    """As transformers' generate: the controls count the prompt's every id, the text before the image
    and the placeholder once per image token included, not just the decoder prompt."""
    model = make_llava(seed=15)
    pipe = llava_pipe(model, tmp_path)
    px = pixels(3, seed=2)
    ours = pipe.generate_ids(px, 20, prompt_ids=prompt_ids(QUESTION), sampling=mm.SamplingParams(**controls))
    assert torch.equal(ours, hf_greedy(model, px, 20, **controls))


@pytest.mark.parametrize("processor", ["clip", "llava-pad"])
def test_caption_matches_the_processor_and_generate(tmp_path, processor):
    """Non-square images through the processor (CLIPImageProcessor's shortest edge + center crop,
    or LlavaImageProcessor's pad-to-square first) and the conversation prompt, tokenized as
    LlavaProcessor does; the caption is the decoded answer."""
    model = make_llava(seed=9)
    save = dict(processor="clip", crop=8) if processor == "clip" else dict(processor="llava", pad=True, crop=8)
    pipe = llava_pipe(model, tmp_path, **save)
    assert pipe.config.preprocess.pad_to_square == (processor == "llava-pad")
    images = [(torch.rand(h, w, 3, generator=torch.Generator().manual_seed(h)) * 255).to(torch.uint8).numpy()
              for h, w in [(50, 37), (37, 61)]]
    hf = hf_processor(tmp_path / "hf")
    inputs = hf(images=images, text=[QUESTION] * 2, return_tensors="pt")
    assert torch.equal(pipe.preprocess(images), inputs["pixel_values"])
    assert torch.equal(inputs["input_ids"], hf_input_ids(model, QUESTION, 2))
    with torch.no_grad():
        seq = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = [t.strip() for t in hf.batch_decode(seq[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert pipe.caption(images, max_new_tokens=12, prompt=QUESTION) == expected
    # the default prompt: LLaVA-1.5's conversation around a caption instruction
    default = hf(images=images, text=[LLAVA_PROMPT] * 2, return_tensors="pt")
    with torch.no_grad():
        seq = model.generate(**default, max_new_tokens=8, do_sample=False)
    expected = [t.strip() for t in hf.batch_decode(seq[:, default["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert pipe.caption(images, max_new_tokens=8) == expected


def test_bad_prompts_are_one_line_errors(tmp_path):
    pipe = llava_pipe(make_llava(seed=1), tmp_path)
    image = np.zeros((40, 40, 3), np.uint8)
    for prompt, message in [("USER: What is it? ASSISTANT:", "no <image> placeholder"),
                            ("USER: <image> <image> ASSISTANT:", "2 <image> placeholders")]:
        with pytest.raises(InputError, match=message) as e:
            pipe.caption([image], prompt=prompt)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="no <image> placeholder"):
        pipe.generate_ids(pixels(1), 4, prompt_ids=[5, 6])
    with pytest.raises(InputError, match="same position in every row"):
        pipe.generate_ids(pixels(2), 4, prompt_ids=[[IMAGE_TOKEN, 5], [5, IMAGE_TOKEN]])
    # 160 positions: BOS + 16 image states + the prompt + new tokens must fit
    with pytest.raises(InputError, match="exceeds the model's 160 positions"):
        pipe.caption([image], prompt="<image>" + "a" * 140, max_new_tokens=20)
    with pytest.raises(InputError, match="exceeds the model's 160 positions"):
        pipe.generate_ids(pixels(1), 145, prompt_ids=prompt_ids("<image>"))
    assert pipe.generate_ids(pixels(1), 144, prompt_ids=prompt_ids("<image>")).shape == (1, 144)  # exactly fits


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (cfg[section] if section else cfg)[field] = value
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"text_config.rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'dynamic' is not supported"),
    ({"text_config.rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'yarn' is not supported"),
    ({"text_config.rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "rope type 'longrope' is not supported"),
    ({"text_config.model_type": "mistral"}, "text model 'mistral' is not supported"),
    ({"text_config.hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy 'cls' is not supported"),
    ({"vision_feature_layer": 7}, "vision_feature_layer 7 must index"),
])
def test_unsupported_configs_are_refused(tmp_path, changes, message):
    path = save_llava(make_llava(seed=1), tmp_path / "hf")
    edit_config(path, **changes)
    with pytest.raises(ConversionError, match=message) as e:
        mm.convert(path, tmp_path / "engine")
    assert "\n" not in str(e.value)


def test_missing_projector_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    path = save_llava(make_llava(seed=1), tmp_path / "hf")
    weights = load_file(str(path / "model.safetensors"))
    del weights["multi_modal_projector.linear_2.weight"]
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ConversionError, match="multi-modal projector is missing") as e:
        mm.convert(path, tmp_path / "engine")
    assert "\n" not in str(e.value)


def reference_logits(model, px, tokens):
    """transformers' fp32 logits after the question and after each of ``tokens``."""
    ids = torch.cat([hf_input_ids(model, QUESTION, px.shape[0]), tokens], dim=1)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits[:, -tokens.shape[1] - 1:]


def test_detection_and_bf16_on_cpu(tmp_path, monkeypatch):
    """A bfloat16 conversion computed in bf16: detected as hf-llava, its logits within bf16's tolerance
    of transformers' fp32 logits."""
    monkeypatch.setenv("MMGEN_CPU_BF16_COMPUTE", "bfloat16")
    model = make_llava(seed=2, init=0.05)
    path = save_llava(model, tmp_path / "hf")
    assert mm.convert(path, tmp_path / "engine", dtype="bfloat16")
    pipe = mm.load(tmp_path / "engine")
    assert pipe.config.source_format == "hf-llava" and pipe.dtype == torch.bfloat16
    assert pipe.model.decoder.wte.dtype == pipe.model.encoder.patch_embed.weight.dtype == torch.bfloat16
    px = pixels(2)
    tokens = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(3))
    assert scaled_error(engine_logits(pipe, px, QUESTION, tokens), reference_logits(model, px, tokens)) <= 4e-2
    assert pipe.generate_ids(px, 6, prompt_ids=prompt_ids(QUESTION)).shape == (2, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_graphs_and_half_precision(tmp_path, dtype):
    """On CUDA (default backends: Triton/CUDA kernels, the rotary step fused into decode attention):
    graph replays give the eager ids; fp32 gives the CPU reference's ids; fp16 / bf16 logits stay
    within their tolerance of transformers' fp32 logits."""
    model = make_llava(seed=13, kv_heads=2, rope=ROPES["llama3"], init=0.05)
    path = mm.convert(save_llava(model, tmp_path / "hf"), tmp_path / "engine")
    pipe = mm.load(path, device="cuda", dtype=dtype)
    cpu = mm.load(path) if dtype == "float32" else None
    for batch, seed in ((1, 0), (3, 1), (4, 2)):
        px = pixels(batch, seed)
        pipe.use_cuda_graphs = True
        graph = pipe.generate_ids(px, 16, prompt_ids=prompt_ids(QUESTION))
        pipe.use_cuda_graphs = False
        assert torch.equal(graph, pipe.generate_ids(px, 16, prompt_ids=prompt_ids(QUESTION))), (batch, seed)
        if cpu is not None:
            assert torch.equal(graph.cpu(), cpu.generate_ids(px, 16, prompt_ids=prompt_ids(QUESTION))), (batch, seed)
    px = pixels(2, seed=3)
    tokens = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(3))
    tolerance = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}[dtype]
    assert scaled_error(engine_logits(pipe, px, QUESTION, tokens), reference_logits(model, px, tokens)) <= tolerance


@pytest.mark.parametrize("kv", [1, 2], ids=["mqa", "gqa"])
def test_triton_backend_gives_the_reference_ids(tmp_path, monkeypatch, kv):
    """Every op forced to Triton (its interpreter on CPU): the rms_norm, rotary, GQA flash-attention
    and GQA decode-attention kernels with the rotary step fused (helper "ops"' kernels)."""
    pytest.importorskip("triton")
    pipe = llava_pipe(make_llava(seed=12, kv_heads=kv, rope=ROPES["llama3"]), tmp_path)
    px = pixels(2, seed=4)
    ref = pipe.generate_ids(px, 10, prompt_ids=prompt_ids(QUESTION))
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    assert torch.equal(pipe.generate_ids(px, 10, prompt_ids=prompt_ids(QUESTION)), ref)
    assert_varied(ref)


def test_hub_layout_v4_keys_and_rope_scaling(tmp_path):
    """The hub's llava-hf layout (transformers v4): ``vision_tower.vision_model.*`` keys, a sparse
    ``text_config`` with v4's ``rope_scaling`` + ``rope_theta``, no ``generation_config.json`` (the pad
    id at the top level)."""
    from safetensors.torch import load_file, save_file
    model = make_llava(seed=14, rope=ROPES["linear"])
    path = save_llava(model, tmp_path / "hf")
    weights = load_file(str(path / "model.safetensors"))
    v4 = {("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") else k): t
          for k, t in weights.items()}
    assert len(v4) == len(weights) and any(k.startswith("vision_tower.vision_model.") for k in v4)
    save_file(v4, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    for key in ("head_dim", "attention_bias", "mlp_bias", "rms_norm_eps", "pad_token_id", "bos_token_id",
                "eos_token_id"):
        text.pop(key)
    text.update(rope_scaling={"type": "linear", "factor": rope["factor"]}, rope_theta=rope["rope_theta"],
                rms_norm_eps=1e-6)
    cfg["pad_token_id"] = PAD
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").unlink()
    pipe = mm.load(mm.convert(path, tmp_path / "engine"))
    assert pipe.config.decoder.rope.kind == "linear" and pipe.config.generation.pad_token_id == PAD
    px = pixels(2, seed=6)
    assert torch.equal(pipe.generate_ids(px, 16, prompt_ids=prompt_ids(QUESTION)), hf_greedy(model, px, 16))
