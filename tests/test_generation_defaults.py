"""Generation defaults carried by the checkpoint (``config.json`` ``generation_defaults``): written by
each converter from its source, used by ``sampling=None`` / arguments and CLI flags left out,
overridden by explicit ones; checkpoints without the block behave as before; a bad block is one
line at load."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from hf_models import IMAGE, make_blip, make_clipcap, make_git, make_model, save, save_blip, save_clipcap, save_git

import mmgen_engine as mm
from mmgen_engine import config as cfg
from mmgen_engine.errors import CheckpointError, ConversionError, InputError
from mmgen_engine.pipelines.speech_to_gesture import DEFAULT_SAMPLING as GESTURE_SAMPLING
from mmgen_engine.pipelines.text_to_image import DEFAULT_SAMPLING as TXT2IMG_SAMPLING
from mmgen_engine.runtime import limits, sampler


def run(*args):
    return subprocess.run([sys.executable, "-m", "mmgen_engine.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def copy_demo(task, tmp_path, block="keep"):
    """A copy of a bundled demo checkpoint whose generation_defaults block is ``block`` (None: none)."""
    out = tmp_path / task
    shutil.copytree(mm.demo_model(task), out)
    if block != "keep":
        config = json.loads((out / "config.json").read_text())
        config.pop("generation_defaults", None)
        if block is not None:
            config["generation_defaults"] = block
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def block_of(path):
    return json.loads((path / "config.json").read_text()).get("generation_defaults")


def pixels(batch=2, seed=0):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# ---- the schema ------------------------------------------------------------------------------------

def test_the_schema_repeats_the_sampler_bounds():
    assert (cfg.FLOAT32_MAX, cfg.FLOAT32_TINY) == (limits.FLOAT32_MAX, limits.FLOAT32_TINY)
    assert (cfg.MAX_NEW_TOKENS, cfg.MAX_BEAMS) == (limits.MAX_NEW_TOKENS, sampler.MAX_BEAMS)
    fields = {f.name: f.default for f in dataclasses.fields(cfg.SamplingDefaults)}
    assert fields == {f.name: f.default for f in dataclasses.fields(mm.SamplingParams)}
    assert mm.SamplingParams(**cfg.SamplingDefaults().fields()) == mm.SamplingParams()


def test_builtin_defaults_are_what_the_engine_always_used():
    assert TXT2IMG_SAMPLING == mm.SamplingParams(do_sample=True, top_k=256, guidance_scale=16.0)
    assert GESTURE_SAMPLING == mm.SamplingParams(do_sample=True, temperature=0.5, top_p=0.9, seed=0)
    assert cfg.BUILTIN_GENERATION_DEFAULTS["captioning"] == {"sampling": {}, "max_new_tokens": 20, "min_new_tokens": 0}


@pytest.mark.parametrize("block, lengths", [
    ({"max_length": 9}, {1: (8, 0), 4: (5, 0), 12: (1, 0)}),
    ({"max_length": 9, "min_length": 4}, {1: (8, 3), 6: (3, 0)}),
    ({"max_new_tokens": 5, "max_length": 30, "min_length": 30}, {1: (5, 5), 3: (5, 5)}),
    ({"min_new_tokens": 2}, {1: (20, 2)}),
    ({"max_new_tokens": 1, "min_new_tokens": 1}, {7: (1, 1)}),
])
def test_budgets_count_the_prompt_as_transformers_does(block, lengths):
    from mmgen_engine.pipelines.generation_defaults import default_new_tokens
    raw = json.loads((mm.demo_model("captioning") / "config.json").read_text())
    config = cfg.from_dict(cfg.CaptioningConfig, {**raw, "generation_defaults": block})
    for prompt_length, expected in lengths.items():
        assert default_new_tokens(config, prompt_length) == expected


BAD_BLOCKS = [
    ("captioning", {"sampling": {"temperature": 0}}, "sampling.temperature: must be a number in"),
    ("captioning", {"sampling": {"top_p": 1.5}}, "sampling.top_p"),
    ("captioning", {"sampling": {"top_k": -1}}, "sampling.top_k"),
    ("captioning", {"sampling": {"do_sample": "yes"}}, "sampling.do_sample"),
    ("captioning", {"sampling": {"num_beams": 65}}, "sampling.num_beams"),
    ("captioning", {"sampling": {"num_beams": 2, "num_return_sequences": 3}}, "more than num_beams"),
    ("captioning", {"sampling": {"num_beams": 2, "do_sample": True}}, "beam search samples no tokens"),
    ("captioning", {"sampling": {"early_stopping": "sometimes"}}, "sampling.early_stopping"),
    ("captioning", {"sampling": {"repetition_penalty": 1e39}}, "sampling.repetition_penalty"),
    ("captioning", {"sampling": {"guidance_scale": 2.0}}, "captioning has no guidance"),
    ("captioning", {"sampling": {"beams": 2}}, "unknown field 'beams'"),
    ("captioning", {"max_new_tokens": 0}, "max_new_tokens"),
    ("captioning", {"max_new_tokens": 4097}, "max_new_tokens"),
    ("captioning", {"max_new_tokens": 3, "min_new_tokens": 4}, "min_new_tokens 4 is more than max_new_tokens 3"),
    ("captioning", {"max_length": 4, "min_length": 5}, "min_length 5 is more than max_length 4"),
    ("captioning", {"max_new_tokens": "20"}, "max_new_tokens"),
    ("captioning", [], "generation_defaults"),
    ("text-to-image", {"sampling": {"guidance_scale": -1}}, "sampling.guidance_scale"),
    ("text-to-image", {"sampling": {"num_beams": 2}}, "beam search is for captioning"),
    ("text-to-image", {"max_new_tokens": 5}, "only captioning takes a token budget"),
    ("text-to-image", {"sampling": {"repetition_penalty": 1.3}}, "no repetition controls"),
    ("text-to-image", {"sampling": {"seed": 2 ** 63}}, "sampling.seed"),
    ("speech-to-gesture", {"sampling": {"guidance_scale": 1.0}}, "speech-to-gesture has no guidance"),
    ("speech-to-gesture", {"min_length": 2}, "only captioning takes a token budget"),
]


@pytest.mark.parametrize("task, block, message", BAD_BLOCKS, ids=[f"{t}-{m[:24]}" for t, _, m in BAD_BLOCKS])
def test_a_bad_block_is_one_line_at_load(task, block, message, tmp_path):
    path = copy_demo(task, tmp_path, block)
    with pytest.raises(CheckpointError) as e:
        mm.load(path)
    text = str(e.value)
    assert "\n" not in text and message in text and "generation_defaults" in text and "config.json" in text


# ---- old checkpoints, and the block in use ---------------------------------------------------------

def test_old_checkpoints_without_the_block_behave_as_before(tmp_path, captioner):
    pipe = mm.load(copy_demo("captioning", tmp_path, None))
    assert pipe.config.generation_defaults is None
    assert pipe.default_sampling == mm.SamplingParams() and pipe.default_new_tokens() == (20, 0)
    px = pipe.preprocess([PIL.Image.new("RGB", (64, 64), (220, 30, 30))])
    ids = pipe.generate_ids(px)
    assert ids.shape == (1, 20) and torch.equal(ids, pipe.generate_ids(px, 20, 0, mm.SamplingParams()))
    assert mm.load(copy_demo("text-to-image", tmp_path, None)).default_sampling == TXT2IMG_SAMPLING
    assert mm.load(copy_demo("speech-to-gesture", tmp_path, None)).default_sampling == GESTURE_SAMPLING


def test_the_bundled_demo_models_carry_their_training_settings():
    blocks = {task: block_of(mm.demo_model(task)) for task in ("captioning", "text-to-image", "speech-to-gesture")}
    assert blocks["captioning"] == {"max_length": 24}  # the training script's generation_config.json: greedy
    assert blocks["speech-to-gesture"] == {"sampling": cfg.BUILTIN_GENERATION_DEFAULTS["speech-to-gesture"]["sampling"]}
    sampling = blocks["text-to-image"]["sampling"]
    assert sampling["do_sample"] and sampling["guidance_scale"] < 16 and sampling["top_k"] < 256
    # the training script writes the same settings (its evaluation defaults) for a retrained model
    from test_demo_txt2img import _script
    script = _script()
    assert script.GENERATION == {"temperature": sampling["temperature"], "top_k": sampling["top_k"],
                                 "supercondition_factor": sampling["guidance_scale"]}


def test_the_demo_text_to_image_defaults_draw_the_prompt(txt2img, captioner):
    """With its own defaults (only the seed set) the demo model draws the one-object prompts (the
    README's table: 96% exact over 288 images; min-dalle's defaults: 1%)."""
    from mmgen_engine.demo.world import COLORS, SHAPES
    prompts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    images = txt2img.generate(prompts, sampling=dataclasses.replace(txt2img.default_sampling, seed=1234))
    exact = sum(c == p for c, p in zip(captioner.caption(images), prompts))
    assert exact >= 0.8 * len(prompts)


def test_captioning_uses_the_block_where_arguments_are_left_out(tmp_path):
    block = {"max_length": 6, "min_length": 5, "sampling": {"do_sample": True, "top_k": 3, "temperature": 2.0,
                                                           "seed": 4}}
    pipe = mm.load(copy_demo("captioning", tmp_path, block))
    sampled = mm.SamplingParams(do_sample=True, top_k=3, temperature=2.0, seed=4)
    assert pipe.default_sampling == sampled
    px = pipe.preprocess([PIL.Image.new("RGB", (64, 64), c) for c in ((220, 30, 30), (30, 70, 220))])
    ids = pipe.generate_ids(px)  # 6 positions after the start token: 5 new tokens, at least 4 before eos
    assert ids.shape == (2, 5) and torch.equal(ids, pipe.generate_ids(px, 5, 4, sampled))
    assert (ids[:, :4] != pipe.config.generation.eos_token_id).all()
    with_prompt = pipe.generate_ids(px, prompt_ids=[5, 6])  # the prompt counts: 6 - 3 = 3 new tokens
    assert with_prompt.shape == (2, 3)
    assert torch.equal(with_prompt, pipe.generate_ids(px, 3, 2, sampled, prompt_ids=[5, 6]))
    # explicit arguments win, each on its own
    greedy = pipe.generate_ids(px, 9, 0, mm.SamplingParams())
    assert greedy.shape == (2, 9) and torch.equal(pipe.generate_ids(px, 9, sampling=mm.SamplingParams()),
                                                 pipe.generate_ids(px, 9, 4, mm.SamplingParams()))
    images = [PIL.Image.new("RGB", (64, 64), (220, 30, 30))]
    assert pipe.caption(images) == pipe.caption(images, max_new_tokens=5, sampling=sampled)
    assert len(pipe.caption(images, max_new_tokens=9, sampling=mm.SamplingParams())[0].split()) >= 4  # min 4
    with pytest.raises(InputError, match="min_new_tokens"):
        pipe.generate_ids(px, 2, 3)  # an explicit minimum above the explicit maximum is still an error
    assert pipe.generate_ids(px, 2).shape == (2, 2)  # the block's minimum is cut to an explicit maximum


def test_beam_and_repetition_defaults_are_passed_through(tmp_path):
    pipe = mm.load(copy_demo("captioning", tmp_path, {"sampling": {"num_beams": 3, "length_penalty": 0.5,
                                                                  "no_repeat_ngram_size": 2}}))
    assert pipe.default_sampling == mm.SamplingParams(num_beams=3, length_penalty=0.5, no_repeat_ngram_size=2)


def test_text_to_image_uses_the_block_where_sampling_is_left_out(tmp_path):
    pipe = mm.load(copy_demo("text-to-image", tmp_path, {"sampling": {"do_sample": True, "top_k": 2,
                                                                     "guidance_scale": 3.0, "seed": 9}}))
    text = pipe.tokenize(["a red circle", "a blue square"])
    expected = pipe.generate_tokens(text, mm.SamplingParams(do_sample=True, top_k=2, guidance_scale=3.0, seed=9))
    assert torch.equal(pipe.generate_tokens(text), expected)
    # an explicit sampling overrides the block; a guidance_scale left out there is the block's
    other = mm.SamplingParams(do_sample=True, top_k=5, seed=1)
    assert torch.equal(pipe.generate_tokens(text, other),
                       pipe.generate_tokens(text, dataclasses.replace(other, guidance_scale=3.0)))
    # a block without guidance_scale: min-dalle's 16
    bare = mm.load(copy_demo("text-to-image", tmp_path / "bare", {"sampling": {"do_sample": True, "top_k": 3}}))
    assert bare.default_sampling == mm.SamplingParams(do_sample=True, top_k=3, guidance_scale=16.0)


def test_speech_to_gesture_uses_the_block_where_sampling_is_left_out(tmp_path):
    pipe = mm.load(copy_demo("speech-to-gesture", tmp_path, {"sampling": {"do_sample": True, "top_k": 8,
                                                                         "seed": 5}}))
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    expected = pipe.generate(audio, 16000, mm.SamplingParams(do_sample=True, top_k=8, seed=5))
    assert np.array_equal(pipe.generate(audio, 16000), expected)
    assert not np.array_equal(pipe.generate(audio, 16000, GESTURE_SAMPLING), expected)


# ---- the CLI ------------------------------------------------------------------------------------------

def test_cli_flags_left_out_use_the_block(tmp_path):
    t2i = copy_demo("text-to-image", tmp_path, {"sampling": {"do_sample": True, "top_k": 2, "guidance_scale": 3.0,
                                                             "seed": 11}})
    proc = run("txt2img", "a green square", "--model", t2i, "-o", tmp_path / "a.png", "--grid", "2")
    assert proc.returncode == 0, proc.stderr
    pipe = mm.load(t2i)
    expected = pipe.generate("a green square", 4)
    got = np.asarray(PIL.Image.open(tmp_path / "a.png"))
    assert np.array_equal(got[:64, :64], np.asarray(expected[0])) and np.array_equal(got[64:, 64:],
                                                                                   np.asarray(expected[3]))
    # a flag given replaces that field only
    proc = run("txt2img", "a green square", "--model", t2i, "-o", tmp_path / "b.png", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    expected = pipe.generate("a green square", sampling=dataclasses.replace(pipe.default_sampling, seed=3))[0]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "b.png")), np.asarray(expected))

    cap = copy_demo("captioning", tmp_path, {"max_new_tokens": 2})
    image = tmp_path / "red.png"
    PIL.Image.new("RGB", (64, 64), (220, 30, 30)).save(image)
    pipe = mm.load(cap)
    short, full = pipe.caption([image])[0], pipe.caption([image], max_new_tokens=9)[0]
    assert short == " ".join(full.split()[:2]) and len(full.split()) > 2
    proc = run("caption", image, "--model", cap)
    assert proc.returncode == 0 and proc.stdout.strip() == short, proc.stderr
    proc = run("caption", image, "--model", cap, "--max-new-tokens", "9")
    assert proc.returncode == 0 and proc.stdout.strip() == full, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["txt2img", "a red circle", "-o", "x.png", "--temperature", "0"], "temperature must be"),
    (["txt2img", "a red circle", "-o", "x.png", "--top-k", "-1"], "top_k must be"),
    (["txt2img", "a red circle", "-o", "x.png", "--guidance", "-2"], "guidance_scale must be"),
    (["txt2img", "a red circle", "-o", "x.png", "--seed", "-1"], "seed must be"),
    (["txt2img", "a red circle", "-o", "x.png", "--temperature", "nan"], "temperature must be"),
    (["gesture", "speech.wav", "-o", "x.npz", "--top-p", "2"], "top_p must be"),
    (["gesture", "speech.wav", "-o", "x.npz", "--greedy", "--temperature", "0.5"], "--greedy"),
    (["caption", "img.png", "--max-new-tokens", "0"], "max_new_tokens must be"),
    (["caption", "img.png", "--max-new-tokens", "5000"], "max_new_tokens must be"),
])
def test_cli_bad_values_exit_2_before_the_model_loads(args, message, tmp_path):
    proc = run(*args, "--model", tmp_path / "no-such-model")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "no-such-model" not in proc.stderr


def test_cli_help_says_where_defaults_come_from():
    for command, flags in (("txt2img", ("--top-k", "--guidance", "--temperature", "--seed")),
                           ("gesture", ("--seed", "--top-p", "--temperature", "--greedy")),
                           ("caption", ("--max-new-tokens",))):
        text = " ".join(run(command, "--help").stdout.split())
        assert "generation defaults" in text
        for flag in flags:
            assert "generation defaults" in text.split(flag)[-1].split(" --")[0], (command, flag)


# ---- converters -----------------------------------------------------------------------------------------

def convert_with(tmp_path, src, generation=None, name="engine"):
    if generation is not None:
        (src / "generation_config.json").write_text(json.dumps(generation))
    return mm.convert(src, tmp_path / name)


@pytest.mark.parametrize("generation, block", [
    ({"bos_token_id": 1, "eos_token_id": 2, "max_length": 20, "do_sample": False, "top_k": 50}, None),
    ({"do_sample": True}, {"sampling": {"do_sample": True, "top_k": 50}}),
    ({"do_sample": True, "top_k": 0, "top_p": 0.9, "temperature": 0.7},
     {"sampling": {"do_sample": True, "top_k": 0, "top_p": 0.9, "temperature": 0.7}}),
    ({"temperature": 0.3, "top_p": 0.5, "num_beams": 1, "length_penalty": 2.0}, None),  # greedy ignores them
    ({"num_beams": 4, "length_penalty": 0.5, "early_stopping": "never", "num_return_sequences": 2, "max_length": 16,
      "no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
     {"sampling": {"num_beams": 4, "length_penalty": 0.5, "early_stopping": "never", "num_return_sequences": 2,
                   "no_repeat_ngram_size": 3, "repetition_penalty": 1.2}, "max_length": 16}),
    ({"max_new_tokens": 7, "max_length": 30, "min_new_tokens": 2, "min_length": 9},
     {"max_new_tokens": 7, "min_new_tokens": 2}),
    ({"min_length": 3, "typical_p": 0.5, "bad_words_ids": [[5]], "forced_eos_token_id": 2, "num_beam_groups": 2},
     {"min_length": 3}),  # unsupported fields are ignored
])
def test_hf_generation_config_becomes_the_block(tmp_path, generation, block):
    out = convert_with(tmp_path, save(make_model(seed=2), tmp_path / "hf"), generation)
    assert block_of(out) == block
    mm.load(out)


def test_hf_unsupported_combinations_convert_with_a_warning(tmp_path):
    src = save(make_model(seed=2), tmp_path / "hf")
    with pytest.warns(UserWarning, match="beam sampling"):
        out = convert_with(tmp_path, src, {"do_sample": True, "num_beams": 3, "top_k": 5})
    assert block_of(out) == {"sampling": {"num_beams": 3}}
    with pytest.warns(UserWarning, match="num_return_sequences"):
        out = convert_with(tmp_path, src, {"do_sample": True, "num_return_sequences": 3}, "engine2")
    assert block_of(out) == {"sampling": {"do_sample": True, "top_k": 50}}


@pytest.mark.parametrize("generation, message", [
    ({"do_sample": True, "temperature": "hot"}, "temperature must be a number"),
    ({"do_sample": "true"}, "do_sample must be true or false"),
    ({"do_sample": True, "temperature": 0.0}, "temperature: must be a number in"),
    ({"max_length": 0}, "max_length"),
    ({"num_beams": 2.5}, "num_beams must be an integer"),
    ({"early_stopping": 1}, "early_stopping must be true, false or \"never\""),
])
def test_hf_bad_generation_settings_are_one_line(tmp_path, generation, message):
    src = save(make_model(seed=2), tmp_path / "hf")
    with pytest.raises(ConversionError) as e:
        convert_with(tmp_path, src, generation)
    assert "\n" not in str(e.value) and message in str(e.value) and "generation_config.json" in str(e.value)


def test_hf_older_exports_read_config_json(tmp_path):
    """Without generation_config.json, transformers takes config.json's top-level generation fields,
    then the decoder's for those the top level leaves at the default."""
    src = save(make_model(seed=2), tmp_path / "hf")
    (src / "generation_config.json").unlink()
    config = json.loads((src / "config.json").read_text())
    config.update(max_length=12, num_beams=1, do_sample=False)
    config["decoder"].update(num_beams=2, max_length=40, top_k=50, repetition_penalty=1.5)
    (src / "config.json").write_text(json.dumps(config))
    out = mm.convert(src, tmp_path / "engine")
    assert block_of(out) == {"sampling": {"num_beams": 2, "repetition_penalty": 1.5}, "max_length": 12}


@pytest.mark.parametrize("family", ["vit-gpt2", "git"])
def test_hf_greedy_defaults_give_transformers_tokens(tmp_path, family):
    """With only pixel values (and a prompt), transformers' generate uses generation_config.json; the
    engine with its arguments left out gives the same tokens."""
    from transformers import GitForCausalLM, VisionEncoderDecoderModel
    make, keep, cls, pad = {"vit-gpt2": (lambda: save(make_model(seed=5), tmp_path / "hf"), 1,
                                         VisionEncoderDecoderModel, 0),
                            "git": (lambda: save_git(make_git(seed=5), tmp_path / "hf"), 1, GitForCausalLM, 0)}[family]
    src = make()
    generation = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**generation, "max_length": 9, "min_length": 7}))
    pipe = mm.load(mm.convert(src, tmp_path / "engine"))
    model = cls.from_pretrained(src).eval()
    px = pixels(2, seed=3)
    with torch.no_grad():
        ref = model.generate(pixel_values=px)[:, keep:]
    ours = pipe.generate_ids(px)
    assert ours.shape == (2, 8)
    assert torch.equal(ours[:, :ref.shape[1]], ref) and (ours[:, ref.shape[1]:] == pad).all()
    assert len(set(ref.flatten().tolist())) > 3
    if family == "git":  # a prompt counts against max_length: [CLS] + 3 prompt ids + 5 new
        prompt = [5, 6, 7]
        with torch.no_grad():
            ref = model.generate(pixel_values=px, input_ids=torch.tensor([[3, *prompt]] * 2))[:, 4:]
        ours = pipe.generate_ids(px, prompt_ids=prompt)
        assert ours.shape == (2, 5) and torch.equal(ours[:, :ref.shape[1]], ref)


def test_blip_git_clipcap_blocks(tmp_path):
    blip = save_blip(make_blip(seed=1), tmp_path / "blip")
    out = convert_with(tmp_path, blip, {"num_beams": 3, "max_length": 20, "min_length": 5}, "blip_engine")
    assert block_of(out) == {"sampling": {"num_beams": 3}, "min_length": 5}
    git = save_git(make_git(seed=1), tmp_path / "git")
    out = convert_with(tmp_path, git, {"max_new_tokens": 11, "no_repeat_ngram_size": 2}, "git_engine")
    assert block_of(out) == {"sampling": {"no_repeat_ngram_size": 2}, "max_new_tokens": 11}
    clipcap = save_clipcap(*make_clipcap(seed=1), tmp_path / "clipcap")
    out = mm.convert(clipcap, tmp_path / "clipcap_engine")
    assert block_of(out) == {"max_new_tokens": 67}  # ClipCap's generate2: greedy, entry_length 67
    assert mm.load(out).default_new_tokens(0) == (67, 0)


def test_min_dalle_block(tmp_path):
    from test_convert_min_dalle import build_source
    src = tmp_path / "min_dalle"
    src.mkdir()
    build_source(src, image_vocab=64)
    out = mm.convert(src, tmp_path / "a")
    assert block_of(out) == {"sampling": {"do_sample": True, "temperature": 1.0, "top_k": 256, "guidance_scale": 16.0}}
    assert mm.load(out).default_sampling == TXT2IMG_SAMPLING
    (src / "generation_config.json").write_text(json.dumps({"top_k": 4, "supercondition_factor": 2, "seed": 7}))
    out = mm.convert(src, tmp_path / "b")
    assert block_of(out) == {"sampling": {"do_sample": True, "temperature": 1.0, "top_k": 4, "guidance_scale": 2.0,
                                          "seed": 7}}
    for bad, message in (({"topk": 4}, "unknown key(s) 'topk'"), ({"top_k": 2.5}, "top_k must be an integer"),
                         ({"temperature": 0}, "temperature")):
        (src / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ConversionError) as e:
            mm.convert(src, tmp_path / "c")
        assert message in str(e.value) and "\n" not in str(e.value)


def test_a2g_block(tmp_path):
    from test_a2g_gpt import make_reference

    from mmgen_engine.training import a2g_gpt as a2g
    a2g.save(make_reference(), tmp_path / "src")
    out = mm.convert(tmp_path / "src", tmp_path / "a")
    assert block_of(out) == {"sampling": {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 0}}
    assert mm.load(out).default_sampling == GESTURE_SAMPLING
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 5, "seed": 2}))
    out = mm.convert(tmp_path / "src", tmp_path / "b")
    assert mm.load(out).default_sampling == mm.SamplingParams(do_sample=True, top_k=5, seed=2)
    for bad, message in (({"guidance_scale": 2.0}, "unknown key(s) 'guidance_scale'"),
                         ({"temperature": -1}, "temperature")):
        (tmp_path / "src" / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ConversionError) as e:
            mm.convert(tmp_path / "src", tmp_path / "c")
        assert message in str(e.value) and "\n" not in str(e.value)


def test_no_warning_for_a_plain_hf_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = mm.convert(save(make_model(seed=2), tmp_path / "hf"), tmp_path / "engine")
    assert block_of(out) is None
