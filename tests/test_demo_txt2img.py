"""The bundled demo text-to-image model (a tiny min-dalle trained by
``scripts/train_demo_txt2img.py``, converted with ``mm.convert(..., source_format="min-dalle")``):
chained with the bundled captioner, its images for the one-object prompts show the prompt's color
and shape. Also: the training script writes min-dalle's formats (its modules load strictly into
min-dalle's ``DalleBartEncoder`` / ``DalleBartDecoder`` and taming's ``Decoder`` and compute the same
thing), and the shipped vocabulary works with min-dalle's own ``TextTokenizer``.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from upstream import import_upstream

import mmgen_engine as mm
from mmgen_engine.demo.world import COLORS, RELATIONS, SHAPES

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"a {c} {s}" for c in COLORS for s in SHAPES]  # the 18 one-object prompts
# the demo's recommended sampling: min-dalle's supercondition (guidance) 2, top-k 4, temperature 1
SAMPLING = dict(do_sample=True, top_k=4, guidance_scale=2.0, temperature=1.0)


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_txt2img", ROOT / "scripts" / "train_demo_txt2img.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def objects(caption: str) -> list[str]:
    """The ``a {color} {shape}`` phrases of a caption."""
    return re.findall(r"\ba \w+ \w+", caption)


@pytest.fixture(scope="module")
def pipe():
    return mm.load(mm.demo_model("text-to-image"))


def test_demo_txt2img_images_show_the_prompt_color_and_shape(pipe, captioner):
    images = pipe.generate(PROMPTS, images_per_prompt=1, sampling=mm.SamplingParams(**SAMPLING, seed=1234))
    assert len(images) == len(PROMPTS) and all(im.size == (64, 64) for im in images)
    captions = captioner.caption(images, max_new_tokens=16)
    hits = [p in objects(c) for p, c in zip(PROMPTS, captions)]
    assert sum(hits) >= 0.75 * len(PROMPTS), [(p, c) for p, c, ok in zip(PROMPTS, captions, hits) if not ok]


def test_demo_txt2img_config(pipe):
    gen = pipe.config.generation
    assert gen.grid_size == 16 and gen.bos_token_id == gen.image_vocab_size  # the extra start-token row
    assert pipe.config.detokenizer.codebook_size == gen.image_vocab_size


def test_demo_txt2img_vocabulary_with_min_dalle_tokenizer():
    TextTokenizer = import_upstream("min_dalle.text_tokenizer").TextTokenizer
    path = mm.demo_model("text-to-image")
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf8"))
    merges = (path / "merges.txt").read_text(encoding="utf8").split("\n")[1:-1]  # as min-dalle reads it
    tok = TextTokenizer(vocab, merges)
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    words = {"a", *COLORS, *SHAPES, *" ".join(RELATIONS).split()}
    for word in words:
        ids = tok.tokenize(word)
        assert len(ids) == 3 and ids[0] == 0 and ids[-1] == 2 and ids[1] not in (1, 3), (word, ids)
    ids = tok.tokenize("a red circle left of a blue square")
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) == 10 and 3 not in ids
    assert 3 not in tok.tokenize("zebra 42!")  # any lower-case ASCII text still has tokens
    # the script's tokenizer (used for training) is min-dalle's
    script = _script()
    mine = script.TextTokenizer(*script.build_text_vocab())
    for text in ["a purple triangle right of a green circle", "Hello, World! 123", "a  yellow   square"]:
        assert mine.tokenize(text) == tok.tokenize(text)


def test_training_script_modules_are_min_dalle_and_taming_layouts():
    """Small instances of the script's modules load with strict=True into the upstream modules and
    give the same outputs: what the script saves is min-dalle's checkpoint format."""
    md = import_upstream("min_dalle.models")
    taming = import_upstream("taming.modules.diffusionmodules.model")
    script = _script()
    torch.manual_seed(0)
    vocab, width, glu, codes = 50, 128, 96, 40
    enc = script.TextEncoder(vocab, width, 2, glu).eval()
    dec = script.ImageDecoder(codes, width, 2, glu).eval()
    for m in (enc, dec):
        script.init_weights(m)
        for p in m.parameters():
            if p.dim() == 1:  # LayerNorms away from 1 / 0
                p.data.add_(0.1 * torch.randn_like(p))
    up_enc = md.DalleBartEncoder(2, width, width // 64, vocab, 64, glu, device="cpu").eval()
    up_dec = md.DalleBartDecoder(codes, width, width // 64, glu, 2, device="cpu").eval()
    up_enc.load_state_dict(enc.state_dict(), strict=True)
    up_dec.load_state_dict(dec.state_dict(), strict=True)
    rows = torch.full((1, 64), 1, dtype=torch.long)
    rows[0, :5] = torch.tensor([0, 7, 9, 11, 2])
    text = torch.cat([script.uncond_rows(rows), rows])  # min-dalle's [uncond; prompt]
    prev = torch.randint(0, codes, (1, 256))
    prev[0, 0] = codes  # the start token: the extra embedding row
    mask = (text != 1)[:, None, None, :]
    with torch.no_grad():
        states = enc(text)
        torch.testing.assert_close(states, up_enc(text), atol=1e-5, rtol=1e-5)
        ours = dec(prev.repeat(2, 1), states, mask)
        theirs, _ = up_dec(mask, states, torch.zeros(2, 4, 256, width), prev, torch.arange(256))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    detok = script.Detokenizer(codes, 32, 32, (1, 1, 2), 2).eval()
    up = taming.Decoder(ch=32, out_ch=3, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                        resolution=64, z_channels=32).eval()
    for m in up.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-5  # min-dalle's GroupNorm eps (taming: 1e-6)
    sd = detok.state_dict()
    up.load_state_dict({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}, strict=True)
    assert set(sd) - {k for k in sd if k.startswith("decoder.")} == {
        "embedding.weight", "post_quant_conv.weight", "post_quant_conv.bias"}
    tokens = torch.randint(0, codes, (2, 256))
    with torch.no_grad():
        z = detok.post_quant_conv(detok.embedding(tokens.reshape(2, 16, 16)).permute(0, 3, 1, 2))
        torch.testing.assert_close(detok.decode_codes(tokens), up(z).clamp(0, 1), atol=1e-5, rtol=1e-5)
