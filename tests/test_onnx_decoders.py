"""The autoregressive decoders in ONNX (``decoder_prefill``, ``decoder_step``, LLaVA's
``token_embedding``) and the greedy loop over them (:class:`mmgen_engine.onnx.OrtGenerator`): for the
three demo models and a tiny converted captioner of each family, the ORT loop gives exactly the
ids of the engine's pipelines (captioning's generate_ids, text-to-image's generate_tokens with
top_k=1 and guidance, a gesture window after a context) at batch 1 and 3; the prefill's and a step's
logits and caches match the engine's decoder within the fp32 tolerance of test_onnx_export.py
(1e-4 of the scale); bad input is refused with one line.

Greedy ids match exactly because the loop picks with the engine's own code from logits that agree
to ~1e-6; the tiny random models have no near ties at that scale (a tie would show as a mismatch
here, not pass silently).
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from test_onnx_export import ATOL, FAMILIES, RTOL, _captioner

import mmgen_engine as mm
from mmgen_engine.checkpoint import read_config
from mmgen_engine.onnx import OrtGenerator, load_session, supported_parts
from mmgen_engine.pipelines.audio import log_mel_400
from mmgen_engine.pipelines.captioning import LLAVA_PROMPT
from mmgen_engine.runtime import CrossKVCache, KVCache, SamplingParams, generate

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

DEMOS = ("captioning", "text-to-image", "speech-to-gesture")
DECODER_PARTS = ["decoder_prefill", "decoder_step"]
GREEDY = SamplingParams()
NEW, MIN_NEW = 8, 2  # captions: eos suppressed for 2 tokens, then rows stop at different steps


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``{name: (checkpoint, export)}``: the decoder parts (and LLaVA's token_embedding) of the demo
    models and of one tiny converted captioner per family."""
    root = tmp_path_factory.mktemp("onnx_decoders")
    ckpts = {task: mm.demo_model(task) for task in DEMOS}
    ckpts.update((family, _captioner(root / family, family)) for family in FAMILIES)
    # the exporter traces on one thread (a dozen seconds per model): two processes use both cores
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {name: pool.submit(mm.export_onnx, ckpt, root / name / "onnx",
                                  [p for p in supported_parts(read_config(ckpt))
                                   if p in (*DECODER_PARTS, "token_embedding")])
                for name, ckpt in ckpts.items()}
        return {name: (ckpts[name], job.result()) for name, job in jobs.items()}


@pytest.fixture(scope="module")
def loaded(exports):
    """``{name: (pipeline, OrtGenerator, export)}``, loaded on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            ckpt, out = exports[name]
            cache[name] = (mm.load(ckpt), OrtGenerator(out, checkpoint_dir=ckpt), out)
        return cache[name]
    return get


def _pixels(pipe, batch: int) -> torch.Tensor:
    enc = pipe.config.encoder
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, enc.num_channels, enc.image_size, enc.image_size, generator=g)


def _caption_inputs(pipe, out, pixel_values):
    """What the captioning pipeline hands the decoder loop, the prefix built on ONNX Runtime where the
    model has one to build (LLaVA: token_embedding of the text before <image>, then the image):
    ``(prompt, states, lengths, context, prompt_ids)``."""
    batch = pixel_values.shape[0]
    ids = pipe.tokenize_prompt(LLAVA_PROMPT) if pipe.image_token is not None else []
    start = pipe.config.generation.decoder_start_token_id
    prompt = torch.tensor([([] if start is None else [start]) + ids] * batch, dtype=torch.int64)
    text_before, prompt, _ = pipe.split_prompt(prompt)
    with torch.inference_mode():
        states = pipe.model.encode(pixel_values)
    context = None
    if text_before is not None:
        (embeds,) = load_session(out, "token_embedding").run(None, {"input_ids": text_before.numpy()})
        with torch.inference_mode():
            want = pipe.model.decoder.embed(text_before)
        assert torch.equal(torch.from_numpy(embeds), want)  # a gather: exact
        states = torch.cat([torch.from_numpy(embeds), states], dim=1)
        context = pipe.image_context(text_before)
    lengths = torch.full((batch,), states.shape[1], dtype=torch.int64)
    return prompt, states, lengths, context, ids or None


def _t2i_inputs(pipe, batch: int):
    """Text-to-image's guided rows as the pipeline builds them: ``(prompt, states, lengths, text_tokens)``."""
    prompts = ["a red circle", "a green square on the left", "blue"]
    text = pipe.tokenize((prompts * batch)[:batch])
    gen = pipe.config.generation
    lengths = (text != gen.text_pad_token_id).sum(1)
    uncond = torch.full_like(text, gen.text_pad_token_id)
    uncond[:, 0] = text[:, 0]
    uncond[:, 1] = text[torch.arange(batch), lengths - 1]
    rows = torch.cat([uncond, text])
    row_lengths = torch.cat([torch.full_like(lengths, 2), lengths])
    with torch.inference_mode():
        states = pipe.model.encoder(rows, row_lengths)
    prompt = torch.full((2 * batch, 1), gen.bos_token_id, dtype=torch.int64)
    return prompt, states, row_lengths, text


def _t2i_sampling(pipe) -> SamplingParams:
    return SamplingParams(do_sample=True, top_k=1, guidance_scale=pipe.default_sampling.guidance_scale, seed=0)


def _gesture_inputs(pipe, batch: int, context: list[int]):
    """One window per row (different audio) after ``context``: ``(prompt, states, lengths, audio)``."""
    rng = np.random.default_rng(batch)
    audio = [rng.standard_normal(pipe.plan.window_samples).astype(np.float32) * 0.1 for _ in range(batch)]
    with torch.inference_mode():
        states = pipe.model.encode(torch.stack([log_mel_400(a) for a in audio]))
    prompt = torch.tensor([[pipe.config.gesture.bos_token_id, *context]] * batch, dtype=torch.int64)
    lengths = torch.full((batch,), states.shape[1], dtype=torch.int64)
    return prompt, states, lengths, audio


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["captioning", *FAMILIES])
def test_captions_match_the_engine(loaded, name, batch):
    pipe, ort, out = loaded(name)
    pixel_values = _pixels(pipe, batch)
    prompt, states, lengths, context, prompt_ids = _caption_inputs(pipe, out, pixel_values)
    gen = pipe.config.generation
    want = pipe.generate_ids(pixel_values, NEW, MIN_NEW, sampling=GREEDY, prompt_ids=prompt_ids)
    got = ort.generate(prompt, states, lengths, NEW, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                       min_new_tokens=MIN_NEW, sampling=GREEDY, context=context)
    assert got.dtype == torch.int64 and torch.equal(got, want)


@pytest.mark.parametrize("batch", [1, 3])
def test_text_to_image_tokens_match_the_engine(loaded, batch):
    pipe, ort, _ = loaded("text-to-image")
    prompt, states, lengths, text = _t2i_inputs(pipe, batch)
    sampling, gen = _t2i_sampling(pipe), pipe.config.generation
    want = pipe.generate_tokens(text, sampling)
    stream = list(ort.generate_stream(prompt, states, lengths, pipe.num_tokens, eos_token_id=None,
                                      pad_token_id=gen.bos_token_id, sampling=sampling, guided=True,
                                      vocab_limit=gen.image_vocab_size, every=100))
    assert [s.shape[1] for s in stream] == [100, 200, pipe.num_tokens]
    assert torch.equal(stream[-1], want) and torch.equal(stream[0], want[:, :100])
    assert int(want.max()) < gen.image_vocab_size


@pytest.mark.parametrize("batch", [1, 3])
def test_gesture_window_matches_the_engine(loaded, batch):
    pipe, ort, _ = loaded("speech-to-gesture")
    cfg = pipe.config
    context = [3, 1, 4, 1][:cfg.gesture.seed_tokens]
    prompt, states, lengths, audio = _gesture_inputs(pipe, batch, context)
    args = (prompt, states, lengths, cfg.window_tokens - len(context))
    kwargs = dict(eos_token_id=None, pad_token_id=cfg.gesture.eos_token_id, sampling=GREEDY,
                  vocab_limit=cfg.motion.codebook_size)
    got = ort.generate(*args, **kwargs)
    if batch == 1:  # the pipeline's own window
        assert context + got[0].tolist() == pipe.decode_window(audio[0], context, GREEDY)
    else:
        assert torch.equal(got, generate(pipe.model.decoder, *args, **kwargs))


def _decoder_inputs(loaded, name: str, batch: int):
    """``(pipe, export, prompt, states, lengths)`` the decoder of ``name`` is handed at ``batch``."""
    pipe, _, out = loaded(name)
    if name == "text-to-image":
        prompt, states, lengths, _ = _t2i_inputs(pipe, batch)
    elif name == "speech-to-gesture":
        prompt, states, lengths, _ = _gesture_inputs(pipe, batch, [5, 6])
    else:
        prompt, states, lengths, _, _ = _caption_inputs(pipe, out, _pixels(pipe, batch))
    return pipe, out, prompt, states, lengths


def _close(got: np.ndarray, want: torch.Tensor) -> None:
    got, want = torch.from_numpy(got).float(), want.float()
    assert got.shape == want.shape
    scale = want.abs().max().clamp(min=1)
    torch.testing.assert_close(got / scale, want / scale, rtol=RTOL[torch.float32], atol=ATOL[torch.float32])


@pytest.mark.parametrize("name", [*DEMOS, *FAMILIES])
def test_prefill_and_step_match_the_decoder(loaded, name):
    """Logits of the prefill and of one step, and the caches, against the engine's decoder."""
    pipe, out, prompt, states, lengths = _decoder_inputs(loaded, name, 3)
    dec = pipe.model.decoder
    layers, heads, head_dim, _ = dec.cache_geometry()
    rows, prefix = prompt.shape[0], states.shape[1] if dec.uses_prefix else 0
    slots = prefix + prompt.shape[1]
    with torch.inference_mode():
        cache = KVCache.allocate(layers, rows, heads, slots + 1, head_dim, states.dtype, "cpu")
        cross = CrossKVCache.allocate(layers, lengths, heads, 0 if dec.uses_prefix else states.shape[1], head_dim,
                                      states.dtype, "cpu")
        cache.span = slots + 1
        want_first = dec.prefill(prompt, states, cache, cross)
        tokens = torch.arange(rows) % dec.cfg.vocab_size
        want_second = dec.decode_step(tokens, torch.full((rows,), slots), cache, cross)

    feed = {"input_ids": prompt.numpy()}
    if dec.uses_prefix:
        feed["prefix_embeds"] = states.numpy()
    else:
        feed.update(encoder_hidden_states=states.numpy(), encoder_lengths=lengths.numpy())
    prefill = load_session(out, "decoder_prefill")
    first = dict(zip([o.name for o in prefill.get_outputs()], prefill.run(None, feed)))
    _close(first.pop("logits"), want_first)
    for i in range(layers):
        _close(first[f"present.{i}.key"], cache.k[i, :, :, :slots])
        if not dec.uses_prefix:
            _close(first[f"present.{i}.encoder.value"], cross.v[i])

    step = load_session(out, "decoder_step")
    past = {k.replace("present.", "past_key_values.", 1): v for k, v in first.items()}
    feed = {"input_ids": tokens.numpy(), **past, **({} if dec.uses_prefix else {"encoder_lengths": lengths.numpy()})}
    second = dict(zip([o.name for o in step.get_outputs()], step.run(None, feed)))
    _close(second.pop("logits"), want_second)
    assert set(second) == {f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    for i in range(layers):
        _close(second[f"present.{i}.value"], cache.v[i])  # grown by the step's slot


def test_manifest_describes_the_decoder(exports):
    _, out = exports["text-to-image"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["kind"] == "cross" and manifest["decoder"]["prefix_length"] is None
    layers = manifest["decoder"]["num_layers"]
    step = manifest["parts"]["decoder_step"]
    assert step["stage"] == "model.decoder.decode_step"
    names = [io["name"] for io in step["inputs"]]
    assert names[0] == "input_ids" and names[-1] == "encoder_lengths" and len(names) == 2 + 4 * layers
    shapes = {io["name"]: io["shape"] for io in step["inputs"] + step["outputs"]}
    assert shapes["past_key_values.0.key"][::2] == ["batch", "past_len"]
    assert shapes["past_key_values.0.encoder.key"][::2] == ["batch", "encoder_len"]
    assert shapes["logits"] == ["batch", manifest["decoder"]["vocab_size"]]
    prefill = manifest["parts"]["decoder_prefill"]
    assert [io["shape"][:2] for io in prefill["inputs"][:2]] == [["batch", "prompt_len"], ["batch", "encoder_len"]]
    git = json.loads((exports["git"][1] / "manifest.json").read_text())
    assert git["decoder"]["kind"] == "prefix" and git["decoder"]["prefix_length"] == 17
    assert [io["name"] for io in git["parts"]["decoder_prefill"]["inputs"]] == ["input_ids", "prefix_embeds"]


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("sampling", [SamplingParams(do_sample=True, top_k=5), SamplingParams(num_beams=2),
                                      SamplingParams(repetition_penalty=1.2), SamplingParams(no_repeat_ngram_size=2)])
def test_non_greedy_sampling_is_refused(loaded, sampling):
    pipe, ort, out = loaded("captioning")
    prompt, states, lengths, _, _ = _caption_inputs(pipe, out, _pixels(pipe, 1))
    with pytest.raises(mm.InputError) as e:
        ort.generate(prompt, states, lengths, 4, eos_token_id=0, pad_token_id=0, sampling=sampling)
    assert "greedy only" in _one_line(e)


def test_bad_requests_are_refused(loaded):
    pipe, ort, out = loaded("git")
    prompt, states, lengths, _, _ = _caption_inputs(pipe, out, _pixels(pipe, 1))
    kwargs = dict(eos_token_id=1, pad_token_id=0)
    for bad, words in [((prompt, states[:, :-1], lengths, 4), "exactly 17 prefix states"),
                       ((prompt, states, lengths, 10_000), "max_new_tokens"),
                       ((prompt, states, lengths, 60), "positions")]:
        with pytest.raises(mm.InputError) as e:
            ort.generate(*bad, **kwargs)
        assert words in _one_line(e)
    with pytest.raises(mm.InputError) as e:  # the engine's check: guided rows come in pairs
        ort.generate(prompt, states, lengths, 4, guided=True, **kwargs)
    assert "even number of rows" in _one_line(e)
    pipe, ort, _ = loaded("captioning")
    prompt, states, lengths, _, _ = _caption_inputs(pipe, None, _pixels(pipe, 2))
    with pytest.raises(mm.InputError) as e:
        ort.generate(prompt, states[..., :-1], lengths, 4, **kwargs)
    assert "encoder_hidden_states" in _one_line(e)


def test_export_without_the_decoder_is_refused(exports, tmp_path):
    ckpt, out = exports["captioning"]
    copy = shutil.copytree(out, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["parts"]["decoder_step"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(mm.InputError) as e:
        OrtGenerator(copy)
    assert "no decoder_step part" in _one_line(e)
    with pytest.raises(mm.CheckpointError) as e:  # an export of another checkpoint
        OrtGenerator(out, checkpoint_dir=exports["vit-gpt2"][0])
    assert "another checkpoint" in _one_line(e)
