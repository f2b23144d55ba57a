"""Parity of the ``hf-blip``, ``hf-git`` and ``clipcap`` converters + engine against transformers
(and ClipCap's own modules over transformers' GPT-2 and CLIP), with tiny random models."""
from __future__ import annotations

import json

import pytest
import torch
from hf_models import (
    BERT_CLS,
    BERT_PAD,
    BERT_SEP,
    BLIP_BOS,
    CLIPCAP_STOP,
    IMAGE,
    clipcap_prefix,
    engine_logits,
    make_blip,
    make_clipcap,
    make_git,
    make_wordpiece_tokenizer,
    padded,
    save_blip,
    save_clipcap,
    save_git,
)

import mmgen_engine as mm
from mmgen_engine.errors import ConversionError, InputError

PROMPT = "w5 W6 w7"  # the tokenizer lower-cases: ids 5, 6, 7
PROMPT_IDS = [5, 6, 7]


def pixels(batch, seed=7):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def assert_varied(ids):
    assert len(set(ids.flatten().tolist())) > 5, "degenerate random model: the test would prove little"


def scaled_error(ours, ref):
    """Max error over the largest reference logit (at least 1): fp32 rounding grows with the logits."""
    return (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())


# ---- BLIP -------------------------------------------------------------------------------------------

def blip_pipe(model, tmp_path, **save):
    return mm.load(mm.convert(save_blip(model, tmp_path / "hf", **save), tmp_path / "engine"))


def hf_blip_greedy(model, px, n, prompt_ids=None):
    input_ids = None if prompt_ids is None else torch.tensor([[BERT_CLS, *prompt_ids, BERT_SEP]] * px.shape[0])
    with torch.no_grad():
        seq = model.generate(pixel_values=px, input_ids=input_ids, max_new_tokens=n, do_sample=False, num_beams=1)
    start = 1 + (0 if prompt_ids is None else len(prompt_ids))  # bos, then the prompt
    return padded(seq[:, start:], n, BERT_PAD)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("widths", [(32, 48), (64, 48)], ids=["narrow-vision", "wide-vision"])
def test_blip_greedy_ids_match_transformers(tmp_path, batch, widths):
    model = make_blip(seed=batch, vision_width=widths[0], text_width=widths[1])
    pipe = blip_pipe(model, tmp_path)
    assert pipe.config.architecture == "blip" and pipe.config.source_format == "hf-blip"
    px = pixels(batch)
    ours = pipe.generate_ids(px, 24)
    assert torch.equal(ours, hf_blip_greedy(model, px, 24))
    assert_varied(ours)
    with_prompt = pipe.generate_ids(px, 24, prompt_ids=PROMPT_IDS)
    assert torch.equal(with_prompt, hf_blip_greedy(model, px, 24, PROMPT_IDS))
    assert not torch.equal(with_prompt, ours)


def test_blip_logits_match_transformers_fp32(tmp_path):
    model = make_blip(seed=3, init=0.02)
    pipe = blip_pipe(model, tmp_path)
    px = pixels(3, seed=1)
    tokens = torch.cat([torch.full((3, 1), BLIP_BOS), torch.randint(5, 120, (3, 11))], dim=1)
    with torch.no_grad():
        ref = model(pixel_values=px, input_ids=tokens).logits
    assert scaled_error(engine_logits(pipe, px, tokens), ref) <= 1e-4


def test_blip_caption_text_and_prompt(tmp_path):
    """caption() decodes as BLIP's processor does (special tokens skipped), prompt first."""
    model = make_blip(seed=5)
    pipe = blip_pipe(model, tmp_path, vocab_txt=True)  # the tokenizer rebuilt from vocab.txt
    images = [(torch.rand(IMAGE, IMAGE, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
              for i in range(2)]
    tok = make_wordpiece_tokenizer()
    for prompt, ids in [(None, None), (PROMPT, PROMPT_IDS)]:
        ours = pipe.caption(images, max_new_tokens=12, prompt=prompt)
        ref = hf_blip_greedy(model, pipe.preprocess(images), 12, ids)
        rows = [(ids or []) + (r[:r.index(BERT_SEP)] if BERT_SEP in r else r) for r in ref.tolist()]
        assert ours == [t.strip() for t in tok.decode_batch(rows, skip_special_tokens=True)]
    assert all(c.startswith("w5 w6 w7") for c in pipe.caption(images, max_new_tokens=4, prompt=PROMPT))


def test_blip_untied_head_and_saved_tied_copies(tmp_path):
    untied = make_blip(seed=2, tie=False)
    with torch.no_grad():
        untied.text_decoder.cls.predictions.decoder.weight.normal_(0, 0.5)
        untied.text_decoder.cls.predictions.decoder.bias.normal_(0, 0.5)
    pipe = blip_pipe(untied, tmp_path / "untied")
    assert not pipe.config.decoder.tie_word_embeddings
    px = pixels(2)
    assert torch.equal(pipe.generate_ids(px, 16), hf_blip_greedy(untied, px, 16))
    # a checkpoint that saved the tied head (as older transformers did) converts; a differing one does not
    from safetensors.torch import load_file, save_file
    tied = make_blip(seed=2)
    src = save_blip(tied, tmp_path / "tied")
    state = load_file(str(src / "model.safetensors"))
    head = "text_decoder.cls.predictions."
    state[head + "decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"].clone()
    state[head + "decoder.bias"] = state[head + "bias"].clone()
    save_file(state, str(src / "model.safetensors"))
    assert torch.equal(mm.load(mm.convert(src, tmp_path / "e1")).generate_ids(px, 8), hf_blip_greedy(tied, px, 8))
    state[head + "decoder.weight"][0, 0] += 1
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="differs from"):
        mm.convert(src, tmp_path / "e2")


# ---- GIT --------------------------------------------------------------------------------------------

def git_pipe(model, tmp_path, **save):
    return mm.load(mm.convert(save_git(model, tmp_path / "hf", **save), tmp_path / "engine"))


def hf_git_greedy(model, px, n, prompt_ids=()):
    input_ids = torch.tensor([[BERT_CLS, *prompt_ids]] * px.shape[0])
    with torch.no_grad():
        seq = model.generate(pixel_values=px, input_ids=input_ids, max_new_tokens=n, do_sample=False, num_beams=1)
    return padded(seq[:, input_ids.shape[1]:], n, BERT_PAD)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("tie", [False, True], ids=["own-head", "tied-head"])
def test_git_greedy_ids_match_transformers(tmp_path, batch, tie):
    model = make_git(seed=batch + 2 * tie, tie=tie)
    pipe = git_pipe(model, tmp_path)
    assert pipe.config.architecture == "git" and pipe.model.decoder.uses_prefix
    px = pixels(batch)
    ours = pipe.generate_ids(px, 24)
    assert torch.equal(ours, hf_git_greedy(model, px, 24))
    assert_varied(ours)
    assert torch.equal(pipe.generate_ids(px, 24, prompt_ids=PROMPT_IDS), hf_git_greedy(model, px, 24, PROMPT_IDS))


def test_git_logits_match_transformers_fp32(tmp_path):
    """Image tokens as a bidirectional prefix, causal text, text positions counting text only."""
    model = make_git(seed=3, init=0.02)
    pipe = git_pipe(model, tmp_path)
    px = pixels(3, seed=1)
    tokens = torch.cat([torch.full((3, 1), BERT_CLS), torch.randint(5, 120, (3, 11))], dim=1)
    with torch.no_grad():
        ref = model(pixel_values=px, input_ids=tokens).logits[:, -tokens.shape[1]:]
    assert scaled_error(engine_logits(pipe, px, tokens), ref) <= 1e-4


def test_git_caption_with_center_crop(tmp_path):
    """Non-square images through CLIPImageProcessor's shortest-edge resize and center crop."""
    model = make_git(seed=4)
    pipe = git_pipe(model, tmp_path, crop=True)
    assert pipe.config.preprocess.shortest_edge == IMAGE + 8
    from transformers import CLIPImageProcessor
    images = [(torch.rand(h, w, 3, generator=torch.Generator().manual_seed(h)) * 255).to(torch.uint8).numpy()
              for h, w in [(50, 37), (37, 61)]]
    px = CLIPImageProcessor.from_pretrained(tmp_path / "hf")(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pipe.preprocess(images), px)
    ref = hf_git_greedy(model, px, 10)
    rows = [r[:r.index(BERT_SEP)] if BERT_SEP in r else r for r in ref.tolist()]
    expected = [t.strip() for t in make_wordpiece_tokenizer().decode_batch(rows, skip_special_tokens=True)]
    assert pipe.caption(images, max_new_tokens=10) == expected


def test_git_prompt_beyond_the_text_positions_is_rejected(tmp_path):
    pipe = git_pipe(make_git(seed=1), tmp_path)
    with pytest.raises(InputError, match="after a prefix of 17"):
        pipe.generate_ids(pixels(1), 31, prompt_ids=[5] * 10)  # 17 image + 11 + 30 fed > 17 + 40
    assert pipe.generate_ids(pixels(1), 30, prompt_ids=[5] * 10).shape == (1, 30)  # exactly fits
    with pytest.raises(InputError, match="vocabulary"):
        pipe.generate_ids(pixels(1), 4, prompt_ids=[5, 10_000])


# ---- ClipCap ----------------------------------------------------------------------------------------

def clipcap_pipe(model, clip, tmp_path, **save):
    return mm.load(mm.convert(save_clipcap(model, clip, tmp_path / "src", **save), tmp_path / "engine"))


def hf_clipcap_greedy(model, clip, px, n, stop=CLIPCAP_STOP):
    """ClipCap's generate2 (greedy, stop after ".") through transformers' generate from the prefix
    (``stop`` None: never stop)."""
    with torch.no_grad():
        seq = model.gpt.generate(inputs_embeds=clipcap_prefix(model, clip, px), max_new_tokens=n, do_sample=False,
                                 num_beams=1, eos_token_id=stop, pad_token_id=stop if stop is not None else 0)
    return padded(seq, n, 0 if stop is None else stop)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("weights", ["pt", "safetensors"])
def test_clipcap_greedy_ids_match(tmp_path, batch, weights):
    model, clip = make_clipcap(seed=batch)
    pipe = clipcap_pipe(model, clip, tmp_path, weights=weights)
    cfg = pipe.config
    assert (cfg.architecture, cfg.prefix_length, cfg.projection_dim) == ("clipcap", 4, 24)
    assert cfg.generation.decoder_start_token_id is None and cfg.generation.eos_token_id == CLIPCAP_STOP
    px = pixels(batch)
    ours = pipe.generate_ids(px, 24)
    assert torch.equal(ours, hf_clipcap_greedy(model, clip, px, 24))
    assert_varied(ours)


def test_clipcap_logits_and_prefix_match_fp32(tmp_path):
    model, clip = make_clipcap(seed=3, hidden=(40, 56))  # a deeper mapper: tanh between every layer
    pipe = clipcap_pipe(model, clip, tmp_path)
    assert pipe.config.mapper_sizes == [24, 40, 56, 512]
    px = pixels(3, seed=1)
    prefix = clipcap_prefix(model, clip, px)
    with torch.inference_mode():
        assert (pipe.model.encode(px) - prefix).abs().max().item() <= 1e-5
    tokens = torch.randint(0, 99, (3, 9))
    with torch.no_grad():
        embeds = torch.cat([prefix, model.gpt.transformer.wte(tokens)], dim=1)
        ref = model.gpt(inputs_embeds=embeds).logits[:, prefix.shape[1]:]
    assert scaled_error(engine_logits(pipe, px, tokens), ref) <= 1e-4


def test_clipcap_caption_keeps_the_stop_token(tmp_path):
    """Captions end with ClipCap's stop token "." included; the stop is whatever id the tokenizer
    gives "." (here one the model emits mid-sentence for the first image)."""
    model, clip = make_clipcap(seed=6)
    images = [(torch.rand(IMAGE, IMAGE, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
              for i in range(3)]
    from transformers import CLIPImageProcessor
    px = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})(
        images=images, return_tensors="pt")["pixel_values"]
    row = hf_clipcap_greedy(model, clip, px, 12, stop=None)[0].tolist()
    stop = next(t for j, t in enumerate(row) if j >= 2 and t not in row[:j])  # first emitted at step j
    pipe = mm.load(mm.convert(save_clipcap(model, clip, tmp_path / "src", stop=stop), tmp_path / "engine"))
    assert pipe.config.generation.eos_token_id == stop
    ref = hf_clipcap_greedy(model, clip, px, 20, stop=stop).tolist()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "src" / "tokenizer.json"))
    expected = [tok.decode(r[:r.index(stop) + 1] if stop in r else r).strip() for r in ref]
    assert pipe.caption(images, max_new_tokens=20) == expected
    assert expected[0].endswith(".") and ref[0].index(stop) == row.index(stop) >= 2
    with pytest.raises(InputError, match="prefix of 4"):
        pipe.generate_ids(px[:1], 40)  # 4 prefix + 39 fed > 40 positions


# ---- conversion errors ------------------------------------------------------------------------------

def test_unsupported_variants_are_refused(tmp_path):
    blip = save_blip(make_blip(), tmp_path / "blip")
    cfg = json.loads((blip / "config.json").read_text())
    cfg["architectures"] = ["BlipForQuestionAnswering"]
    (blip / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="not a BLIP captioning model"):
        mm.convert(blip, tmp_path / "e1")

    git = save_git(make_git(), tmp_path / "git")
    cfg = json.loads((git / "config.json").read_text())
    cfg["num_image_with_embedding"] = 6
    (git / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="video GIT"):
        mm.convert(git, tmp_path / "e2")

    model, clip = make_clipcap()
    src = save_clipcap(model, clip, tmp_path / "cc")
    state = torch.load(src / "coco_weights.pt", weights_only=True)
    state["clip_project.transformer.layers.0.weight"] = torch.zeros(2)
    torch.save(state, src / "coco_weights.pt")
    with pytest.raises(ConversionError, match="transformer mapping network"):
        mm.convert(src, tmp_path / "e3")


def test_broken_sources_fail_with_one_line(tmp_path):
    from safetensors.torch import load_file, save_file
    git = save_git(make_git(), tmp_path / "git")
    state = load_file(str(git / "model.safetensors"))
    state.pop("git.visual_projection.visual_projection.1.weight")
    save_file(state, str(git / "model.safetensors"))
    with pytest.raises(ConversionError, match="missing tensor.*visual_projection.1.weight"):
        mm.convert(git, tmp_path / "e1")

    blip = save_blip(make_blip(), tmp_path / "blip")
    (blip / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "DonutImageProcessor"}))
    with pytest.raises(ConversionError, match="unsupported image processor 'DonutImageProcessor'"):
        mm.convert(blip, tmp_path / "e2")

    model, clip = make_clipcap()
    src = save_clipcap(model, clip, tmp_path / "cc")
    state = load_file(str(src / "clip" / "model.safetensors"))
    state.pop("visual_projection.weight")
    save_file(state, str(src / "clip" / "model.safetensors"))
    with pytest.raises(ConversionError, match="visual_projection"):
        mm.convert(src, tmp_path / "e3")
    (src / "coco_weights.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConversionError, match="corrupt or truncated"):
        mm.convert(src, tmp_path / "e4", source_format="clipcap")


def test_detection_and_half_precision(tmp_path):
    """Each source is recognized from its contents; a float16 conversion keeps greedy ids close."""
    from mmgen_engine.convert import detect_format
    model, clip = make_clipcap()
    paths = {"hf-blip": save_blip(make_blip(), tmp_path / "b"), "hf-git": save_git(make_git(), tmp_path / "g"),
             "clipcap": save_clipcap(model, clip, tmp_path / "c")}
    for name, path in paths.items():
        assert detect_format(path) == name
    half = mm.load(mm.convert(paths["hf-git"], tmp_path / "half", dtype="float16"))
    assert half.config.dtype == "float16" and half.model.decoder.wte.dtype == torch.float16
    assert half.generate_ids(pixels(2), 6).shape == (2, 6)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(mapper_sizes=[24, 512]) if c["architecture"] == "clipcap" else None, None),
    (lambda c: c.update(architecture="git"), "needs a BertConfig decoder"),
    (lambda c: c.update(prefix_length=5), "mapper_sizes must run from"),
    (lambda c: c["generation"].update(decoder_start_token_id=None, eos_token_id=500), "outside the vocabulary"),
    (lambda c: c["decoder"].update(cross_attention=True), "has no cross-attention"),
    (lambda c: c["preprocess"].update(shortest_edge=16), "center crop"),
], ids=["consistent-edit", "decoder-family", "prefix-length", "eos-range", "cross-attention", "crop"])
def test_edited_checkpoint_configs_fail_at_load(tmp_path, edit, message):
    """A converted ClipCap checkpoint whose config.json was edited inconsistently: one clear line."""
    model, clip = make_clipcap()
    out = mm.convert(save_clipcap(model, clip, tmp_path / "src"), tmp_path / "engine")
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    if message is None:  # an edit that keeps the config valid but no longer matches the weights
        with pytest.raises(mm.CheckpointError, match="mapper"):
            mm.load(out)
        return
    with pytest.raises(mm.CheckpointError, match=message):
        mm.load(out)
