"""``mm.Engine`` with every captioning family (tiny random upstream models converted with
``mm.convert``): ViT-GPT2 and BLIP cross-attend to the image, GIT and ClipCap put it first as a
prefix. Requests of mixed prompts, lengths and sampling share decode steps in fewer slots than
requests, and each caption equals what the pipeline gives for that request alone; then the same
continuous batching with every op forced to Triton (its interpreter on CPU) gives the reference
backend's captions."""
from __future__ import annotations

import contextlib
import importlib

import PIL.Image
import pytest
import torch
from hf_models import IMAGE, make_blip, make_clipcap, make_git, make_model, save, save_blip, save_clipcap, save_git
from llava_models import IMAGE as LLAVA_IMAGE
from llava_models import make_llava, save_llava

import mmgen_engine as mm
from mmgen_engine import SamplingParams

WAIT = 120.0  # the longest any one wait may take; nothing here should come close

# a prompt per family in its tiny tokenizer's words (BLIP's and GIT's lower-case: "W6" is "w6")
FAMILIES = {
    "vit-gpt2": ("vit-gpt2", False, ["w5 w6", "w7"]),
    "blip": ("blip", False, ["w5 W6 w7", "w8"]),
    "git": ("git", True, ["w5 W6 w7", "w8"]),
    "clipcap": ("clipcap", True, ["t5 t6", "t7"]),
    # LLaVA: conversations around the <image> (None: the default one); the text before it differs in
    # length, so these rows are encoded and prefilled apart but decode together
    "llava": ("llava", True, ["USER: <image>\nWhat is it? ASSISTANT:", "<image>\nDescribe:"]),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            tmp = tmp_path_factory.mktemp(family)
            if family == "vit-gpt2":
                src = save(make_model(seed=21), tmp / "hf")
            elif family == "blip":
                src = save_blip(make_blip(seed=21, vision_width=64), tmp / "hf")
            elif family == "git":
                src = save_git(make_git(seed=21), tmp / "hf")
            elif family == "llava":
                src = save_llava(make_llava(seed=21), tmp / "hf")
            else:
                src = save_clipcap(*make_clipcap(seed=21), tmp / "hf")
            made[family] = mm.convert(src, tmp / "engine")
        return made[family]

    return get


def images(n: int, seed: int = 0) -> list:
    """``n`` random images at the models' size: HxWx3 uint8 arrays, every other one as PIL."""
    g = torch.Generator().manual_seed(seed)
    out = [(torch.rand(IMAGE, IMAGE, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(n)]
    return [PIL.Image.fromarray(a) if i % 2 else a for i, a in enumerate(out)]


def sampled(seed: int) -> SamplingParams:
    return SamplingParams(do_sample=True, temperature=0.9, top_k=20, top_p=0.95, seed=seed)


@contextlib.contextmanager
def serving(models, **options):
    engine = mm.Engine(models, **options)
    try:
        yield engine
    finally:
        engine.shutdown(drain=False, timeout=WAIT)


def solo(pipe, image, prompt, max_new_tokens, sampling) -> str:
    return pipe.caption([image], max_new_tokens=max_new_tokens, sampling=sampling, prompt=prompt)[0]


def joined_mid_batch(handles) -> bool:
    """Some request took its slot while another one was decoding (after it started, before it ended)."""
    return any(a.times["started"] < b.times["started"] < a.times["finished"] for a in handles for b in handles)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_captioner_family_in_the_engine_equals_the_pipeline_alone(checkpoints, family):
    architecture, prefix, prompts = FAMILIES[family]
    pipe = mm.load(checkpoints(family))
    assert pipe.config.architecture == architecture and pipe.model.decoder.uses_prefix == prefix
    pictures = images(4, seed=len(family))
    requests = [  # (image, prompt, max_new_tokens, sampling): prompts of 0, 1 and 2-3 tokens, 4 to 14 tokens
        (pictures[i % 4], [None, *prompts][i % 3], [14, 5, 9, 4][i % 4], None if i % 2 else sampled(i))
        for i in range(8)
    ]
    requests.append((pictures[0], prompts[0], 14, SamplingParams(do_sample=False)))
    expected = [solo(pipe, *r) for r in requests]
    assert len(set(expected)) >= 6, f"degenerate random model: {expected}"
    with serving(pipe, slots=3) as engine:
        handles = [engine.submit(mm.CaptionRequest(image, prompt=prompt, max_new_tokens=n, sampling=sampling))
                   for image, prompt, n, sampling in requests]
        results = [h.result(timeout=WAIT) for h in handles]
        metrics = engine.metrics()["models"]["default"]
    assert results == expected
    for handle, (_, prompt, n, _) in zip(handles, requests):
        assert 1 <= handle.tokens <= n
        if prompt is not None and family != "llava":  # LLaVA answers without repeating its prompt
            assert handle.result().startswith(prompt.lower())
    # fewer slots than requests: rows joined while others decoded, and steps were shared
    assert joined_mid_batch(handles)
    assert metrics["occupancy"] > 1 / 3 and metrics["steps"] < sum(h.tokens - 1 for h in handles)


def test_several_captioner_families_served_by_one_engine(checkpoints):
    """One scheduler per model; a request names its model."""
    pipes = {family: mm.load(checkpoints(family)) for family in ("blip", "git")}
    pictures = images(3, seed=9)
    with serving(pipes, slots=2) as engine:
        handles = {(family, i): engine.submit(mm.CaptionRequest(pictures[i], prompt=[None, "w8"][i % 2],
                                                                max_new_tokens=7, sampling=sampled(i), model=family))
                   for family in pipes for i in range(3)}
        results = {key: h.result(timeout=WAIT) for key, h in handles.items()}
        models = engine.metrics()["models"]
    assert all(models[f]["steps"] > 0 for f in pipes)
    for (family, i), caption in results.items():
        assert caption == solo(pipes[family], pictures[i], [None, "w8"][i % 2], 7, sampled(i))
    assert results[("blip", 0)] != results[("git", 0)]


def test_continuous_batching_with_triton_kernels_gives_the_reference_captions(checkpoints, monkeypatch):
    """Three requests of different prompts and lengths in two slots, every op forced to Triton (its
    interpreter: slow, so few short requests), against the reference backend's pipeline alone."""
    pytest.importorskip("triton")
    from mmgen_engine.ops import registry

    pipe = mm.load(checkpoints("vit-gpt2"))
    pictures = images(3, seed=5)
    requests = [(pictures[0], None, 7, None), (pictures[1], "w5 w6", 5, sampled(3)), (pictures[2], "w7", 3, None)]
    monkeypatch.delenv("MMGEN_BACKEND", raising=False)
    expected = [solo(pipe, *r) for r in requests]  # the reference backend (what a CPU picks)
    assert len(set(expected)) == 3

    kernels = importlib.import_module("mmgen_engine.kernels.decode_attention")
    calls = []
    real = kernels.decode_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "decode_attention", counted)
    registry.resolve.cache_clear()  # resolve again, so the counted kernel is the one picked
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    try:
        with serving(pipe, slots=2) as engine:
            handles = [engine.submit(mm.CaptionRequest(image, prompt=prompt, max_new_tokens=n, sampling=sampling))
                       for image, prompt, n, sampling in requests]
            results = [h.result(timeout=WAIT) for h in handles]
    finally:
        registry.resolve.cache_clear()
    assert results == expected
    assert [h.tokens for h in handles] == [7, 5, 3]
    assert joined_mid_batch(handles)
    assert calls and max(calls) >= 2, "the decode steps did not run the Triton kernel over shared rows"


def test_llava_engine_repetition_controls_equal_the_pipeline(tmp_path):
    """The repetition controls see LLaVA's whole prompt in the engine too (the text before the image
    and the image's placeholder ids), as in the pipeline and transformers."""
    pipe = mm.load(mm.convert(save_llava(make_llava(seed=15), tmp_path / "hf"), tmp_path / "engine"))
    g = torch.Generator().manual_seed(0)
    pictures = [(torch.rand(LLAVA_IMAGE + 5, LLAVA_IMAGE, 3, generator=g) * 255).to(torch.uint8).numpy()
                for _ in range(3)]
    controls = [mm.SamplingParams(repetition_penalty=1.5), mm.SamplingParams(num_beams=2, repetition_penalty=1.5),
                mm.SamplingParams(do_sample=True, top_k=20, seed=3, repetition_penalty=1.3)]
    # long text before the image: its ids are in the repetition controls' history
    prompts = [None, "abcdefghijklmnopqrstuvwxyz0123456789 <image> it",
               "ABCDEFGHIJKLMNOPQRSTUVWXYZ!?.,;:+- <image> Say it."]
    requests = [(pictures[i % 3], prompts[i % 3], 30, controls[i % 3]) for i in range(6)]
    expected = [pipe.caption([image], max_new_tokens=n, sampling=s, prompt=p)[0] for image, p, n, s in requests]
    engine = mm.Engine(pipe, slots=3)
    try:
        handles = [engine.submit(mm.CaptionRequest(image, prompt=p, max_new_tokens=n, sampling=s))
                   for image, p, n, s in requests]
        assert [h.result(timeout=120) for h in handles] == expected
    finally:
        engine.shutdown(drain=False, timeout=120)
