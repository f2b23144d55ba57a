"""Beam search and the repetition controls against transformers' ``generate`` on tiny random
captioners of every family (ViT-GPT2, BLIP, GIT, ClipCap): the same token ids."""
from __future__ import annotations

import pytest
import torch
from hf_models import (
    BERT_CLS,
    BERT_PAD,
    BERT_SEP,
    CLIPCAP_STOP,
    EOS,
    IMAGE,
    PAD,
    clipcap_prefix,
    make_blip,
    make_clipcap,
    make_git,
    make_model,
    save,
    save_blip,
    save_clipcap,
    save_git,
)

import mmgen_engine as mm
from mmgen_engine import InputError, SamplingParams

PROMPT_IDS = [5, 6, 7]
# how each family's stop-token head row is changed: scaled, or a copy of the row of the token greedy
# output repeats most, scaled (values that make rows of a batch end at different steps)
EOS_HEAD = {"vit-gpt2": ("copy", 1.2), "blip": ("scale", 1.5), "git": ("scale", 1.5), "clipcap": ("copy", 1.001)}


def pixels(batch, seed=7):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def cut(ids: torch.Tensor, eos: int, pad: int, n: int) -> list[list[int]]:
    """Rows up to and including their first eos, padded to ``n`` (transformers fills a finished
    beam with pad or eos; the engine with pad)."""
    rows = []
    for row in ids.tolist():
        row = row[:row.index(eos) + 1] if eos in row else row
        rows.append(row + [pad] * (n - len(row)))
    return rows


class Family:
    """A tiny upstream model of one family, its converted pipeline and transformers' generate. The
    stop token's row of the output head is changed as :data:`EOS_HEAD` says so that rows of a batch
    end at different steps (the random models rarely stop otherwise)."""

    def __init__(self, name, tmp_path, seed=1):
        self.name = name
        if name == "vit-gpt2":
            self.model = make_model(seed=seed)
            head, self.eos, self.pad = self.model.decoder.lm_head.weight, EOS, PAD
        elif name == "blip":
            self.model = make_blip(seed=seed)
            head, self.eos, self.pad = self.model.text_decoder.cls.predictions.decoder.weight, BERT_SEP, BERT_PAD
        elif name == "git":
            self.model = make_git(seed=seed)
            head, self.eos, self.pad = self.model.output.weight, BERT_SEP, BERT_PAD
        else:
            self.model, self.clip = make_clipcap(seed=seed)
            head, self.eos, self.pad = self.model.gpt.lm_head.weight, CLIPCAP_STOP, CLIPCAP_STOP
        how, factor = EOS_HEAD[name]
        with torch.no_grad():
            if how == "copy":
                tokens = self.hf(pixels(4), 12, do_sample=False).flatten()
                head[self.eos] = head[torch.bincount(tokens[tokens != self.eos]).argmax()] * factor
            else:
                head[self.eos] *= factor
        if name == "vit-gpt2":
            src = save(self.model, tmp_path / "hf")
        elif name == "blip":
            src = save_blip(self.model, tmp_path / "hf")
        elif name == "git":
            src = save_git(self.model, tmp_path / "hf")
        else:
            src = save_clipcap(self.model, self.clip, tmp_path / "src")
        self.pipe = mm.load(mm.convert(src, tmp_path / "engine"))

    def hf(self, px, n, prompt_ids=(), **kwargs) -> torch.Tensor:
        """transformers' generated ids (the prompt and start token dropped)."""
        with torch.no_grad():
            if self.name == "vit-gpt2":
                return self.model.generate(pixel_values=px, max_new_tokens=n, **kwargs)[:, 1:]
            if self.name == "blip":
                ids = torch.tensor([[BERT_CLS, *prompt_ids, BERT_SEP]] * px.shape[0]) if prompt_ids else None
                seq = self.model.generate(pixel_values=px, input_ids=ids, max_new_tokens=n, **kwargs)
                return seq[:, 1 + len(prompt_ids):]
            if self.name == "git":
                ids = torch.tensor([[BERT_CLS, *prompt_ids]] * px.shape[0])
                seq = self.model.generate(pixel_values=px, input_ids=ids, max_new_tokens=n, **kwargs)
                return seq[:, ids.shape[1]:]
            return self.model.gpt.generate(inputs_embeds=clipcap_prefix(self.model, self.clip, px), max_new_tokens=n,
                                           eos_token_id=CLIPCAP_STOP, pad_token_id=CLIPCAP_STOP, **kwargs)

    def check(self, px, n, sampling: SamplingParams, prompt_ids=(), min_new_tokens=0):
        hf_args = {f: getattr(sampling, f) for f in ("num_beams", "length_penalty", "early_stopping",
                                                     "num_return_sequences", "repetition_penalty",
                                                     "no_repeat_ngram_size")}
        ref = self.hf(px, n, prompt_ids, do_sample=False, min_new_tokens=min_new_tokens, **hf_args)
        ours = self.pipe.generate_ids(px, n, min_new_tokens, sampling, prompt_ids=list(prompt_ids) or None)
        assert ours.shape == (px.shape[0] * sampling.num_return_sequences, n)
        assert cut(ours, self.eos, self.pad, n) == cut(ref, self.eos, self.pad, n), (self.name, sampling)
        return ours


FAMILIES = ["vit-gpt2", "blip", "git", "clipcap"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return Family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("beams, early_stopping, length_penalty, returns", [
    (2, False, 1.0, 1), (3, True, 1.0, 2), (4, "never", 0.5, 4), (3, False, -1.5, 3), (5, "never", 2.0, 1),
])
def test_beam_search_matches_transformers(family, beams, early_stopping, length_penalty, returns):
    sampling = SamplingParams(num_beams=beams, early_stopping=early_stopping, length_penalty=length_penalty,
                              num_return_sequences=returns)
    ours = family.check(pixels(4), 14, sampling)
    # rows of the batch end at different steps (the test would prove little otherwise)
    ends = [row.index(family.eos) if family.eos in row else 14 for row in ours.tolist()]
    assert len(set(ends)) > 1 or length_penalty > 1  # a strong length penalty favours the longest


@pytest.mark.parametrize("min_new", [0, 5])
def test_beam_search_with_a_prompt_and_min_new_tokens(family, min_new):
    prompt = () if family.name in ("vit-gpt2", "clipcap") else PROMPT_IDS
    family.check(pixels(2, seed=3), 10, SamplingParams(num_beams=3, num_return_sequences=2), prompt, min_new)


@pytest.mark.parametrize("penalty, ngram", [(1.6, 0), (0.6, 0), (1.0, 2), (1.3, 3), (1.0, 1)])
@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`")
def test_repetition_controls_match_transformers(family, penalty, ngram, beams):
    sampling = SamplingParams(num_beams=beams, repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    ours = family.check(pixels(3, seed=5), 16, sampling)
    if ngram == 1:  # no token twice: what the plain decode does somewhere
        def repeats(ids):
            return any(len(set(r)) < len(r) for r in cut(ids, family.eos, -1, 0) for r in [[t for t in r if t >= 0]])
        assert not repeats(ours)
        assert repeats(family.pipe.generate_ids(pixels(3, seed=5), 16, 0, SamplingParams(num_beams=beams)))


def test_caption_returns_every_sequence_in_image_order(tmp_path):
    family = Family("blip", tmp_path)
    images = [(torch.rand(IMAGE, IMAGE, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
              for i in range(2)]
    sampling = SamplingParams(num_beams=3, num_return_sequences=3)
    captions = family.pipe.caption(images, max_new_tokens=8, sampling=sampling)
    assert len(captions) == 6
    assert captions[:3] == family.pipe.caption(images[:1], max_new_tokens=8, sampling=sampling)
    assert captions[0] == family.pipe.caption(images[:1], max_new_tokens=8,
                                              sampling=SamplingParams(num_beams=3))[0]


def test_triton_backend_gives_the_reference_beams(tmp_path, monkeypatch):
    family = Family("vit-gpt2", tmp_path, seed=2)
    px = pixels(2, seed=9)
    sampling = SamplingParams(num_beams=3, num_return_sequences=2, repetition_penalty=1.2, no_repeat_ngram_size=2)
    monkeypatch.setenv("MMGEN_BACKEND", "reference")
    reference = family.pipe.generate_ids(px, 8, sampling=sampling)
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    assert torch.equal(family.pipe.generate_ids(px, 8, sampling=sampling), reference)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, do_sample=True), "beam search samples no tokens"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(length_penalty=float("nan")), "length_penalty"),
])
def test_invalid_values_are_one_line_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match) as err:
        SamplingParams(**kwargs)
    assert "\n" not in str(err.value)


def test_tasks_without_beams_refuse_them(txt2img):
    with pytest.raises(InputError, match="beam search"):
        txt2img.generate("a red circle", sampling=SamplingParams(num_beams=2, guidance_scale=4.0))
    with pytest.raises(InputError, match="repetition"):
        txt2img.generate("a red circle", sampling=SamplingParams(repetition_penalty=1.2, guidance_scale=4.0))


def test_engine_runs_beams_and_repetition_controls_among_other_requests(family):
    """Beam requests take K slots together in mm.Engine's continuous batch, beside plain, sampled and
    penalized requests, and give the pipeline's captions; a beam request wider than the engine's
    slots is refused."""
    images = [(torch.rand(IMAGE, IMAGE, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
              for i in range(5)]
    samplings = [SamplingParams(num_beams=3), None,
                 SamplingParams(num_beams=2, num_return_sequences=2, no_repeat_ngram_size=2),
                 SamplingParams(do_sample=True, seed=3, repetition_penalty=1.5),
                 SamplingParams(num_beams=4, early_stopping=True, length_penalty=0.5)]
    requests = [mm.CaptionRequest(image, max_new_tokens=n, sampling=sampling)
                for image, n, sampling in zip(images, [12, 10, 14, 8, 12], samplings)]
    with mm.Engine(family.pipe, slots=5) as engine:  # the 4 beams wait for slots to free
        handles = [engine.submit(r) for r in requests]
        results = [h.result(timeout=120) for h in handles]
        too_wide = engine.submit(mm.CaptionRequest(images[0], sampling=SamplingParams(num_beams=6)))
        with pytest.raises(InputError, match="num_beams 6 needs as many slots"):
            too_wide.result(timeout=60)
    for request, result in zip(requests, results):
        alone = family.pipe.caption([request.image], max_new_tokens=request.max_new_tokens, sampling=request.sampling)
        assert result == (alone[0] if len(alone) == 1 else alone)
    assert handles[0].token_ids == family.pipe.generate_ids(
        family.pipe.preprocess([images[0]]), 12, sampling=samplings[0]).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graph_beams_match_eager_beams(tmp_path, dtype):
    family = Family("blip", tmp_path)
    pipe = mm.load(tmp_path / "engine", device="cuda", dtype=dtype)
    px = pixels(3).cuda()
    sampling = SamplingParams(num_beams=4, num_return_sequences=2, repetition_penalty=1.2)
    graphed = pipe.generate_ids(px, 12, sampling=sampling)
    pipe.use_cuda_graphs = False
    assert torch.equal(graphed, pipe.generate_ids(px, 12, sampling=sampling))
    if dtype == "float32":  # and transformers' beams, on the GPU too
        family.model.cuda()
        assert cut(graphed.cpu(), family.eos, family.pad, 12) == cut(
            family.hf(px, 12, do_sample=False, num_beams=4, num_return_sequences=2, repetition_penalty=1.2).cpu(),
            family.eos, family.pad, 12)


def test_cli_caption_beams_and_bad_values(tmp_path):
    import json
    import subprocess
    import sys

    from mmgen_engine.demo import world

    images = []
    for i, (image, _) in enumerate(world.sample(2, 3)):
        images.append(str(tmp_path / f"{i}.png"))
        image.save(images[-1])
    model = str(mm.demo_model("captioning"))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mmgen_engine.cli", "caption", *images, "--model", model, *args],
                              capture_output=True, text=True, timeout=300)

    done = run("--num-beams", "3", "--num-return-sequences", "2", "--no-repeat-ngram-size", "3", "--json")
    assert done.returncode == 0, done.stderr
    pipe = mm.load(model)
    sampling = SamplingParams(num_beams=3, num_return_sequences=2, no_repeat_ngram_size=3)
    expected = pipe.caption(images, sampling=sampling)
    assert [row["captions"] for row in json.loads(done.stdout)] == [expected[:2], expected[2:]]
    for args, match in [(("--num-beams", "0"), "num_beams"), (("--num-return-sequences", "2"), "num_return_sequences"),
                        (("--early-stopping", "maybe"), "early-stopping"), (("--repetition-penalty", "-1"),
                                                                             "repetition_penalty"),
                        (("--no-repeat-ngram-size", "-3"), "no_repeat_ngram_size")]:
        failed = run(*args)
        assert failed.returncode == 2 and match in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr


def test_the_readme_example_reproduces_transformers(tmp_path):
    """README's "Beam search and repetition controls" example, as written there."""
    family = Family("vit-gpt2", tmp_path)
    px = pixels(2, seed=4)
    with torch.no_grad():
        ids = family.model.generate(pixel_values=px, max_new_tokens=16, num_beams=4, length_penalty=0.8,
                                    early_stopping=True, num_return_sequences=2, no_repeat_ngram_size=3)
    ours = family.pipe.generate_ids(px, 16, sampling=SamplingParams(
        num_beams=4, length_penalty=0.8, early_stopping=True, num_return_sequences=2, no_repeat_ngram_size=3))
    assert cut(ours, EOS, PAD, 16) == cut(ids[:, 1:], EOS, PAD, 16)
