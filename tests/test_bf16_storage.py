"""bfloat16 weight storage on CPU (``mm.load(dtype="bfloat16")``): the decoder's linear weights and its
head stored bfloat16 and row-major (the layout the native kernel streams), everything else float32,
float32 compute - what the float32 model computes on the rounded weights; and the bfloat16 compute
kept where ``$MMGEN_CPU_BF16_COMPUTE`` asks for it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import IMAGE, make_model, save
from torch import nn

import mmgen_engine as mm
from mmgen_engine import InputError
from mmgen_engine.demo import gesture_world
from mmgen_engine.demo.world import HELD_OUT_SEED, sample
from mmgen_engine.models import head_weight
from mmgen_engine.pipelines import BF16_COMPUTE_ENV, weight_format


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    return mm.convert(save(make_model(seed=5, tie=request.param), tmp / "hf"), tmp / "float")


@pytest.fixture(autouse=True)
def float32_compute(monkeypatch):
    """The storage under test, whatever this machine's default."""
    monkeypatch.setenv(BF16_COMPUTE_ENV, "float32")


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(n)) * 2 - 1


def linear_weights(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """``{name in the model's state dict: tensor}`` of the decoder's linear weights and its head."""
    out = {f"decoder.{n}.weight": m.weight for n, m in decoder.named_modules() if isinstance(m, nn.Linear)}
    return {**out, "decoder.lm_head": head_weight(decoder)}


def test_the_decoder_linears_and_head_are_bf16_row_major_the_rest_float32(checkpoint):
    pipe = mm.load(checkpoint, dtype="bfloat16")
    decoder = pipe.model.decoder
    weights = linear_weights(decoder)
    assert len(weights) > 8 and isinstance(decoder.lm_head, nn.Parameter)  # a tied head gets its own copy
    for name, w in weights.items():
        assert w.dtype == torch.bfloat16 and w.is_contiguous(), name
    rest = [(n, t) for n, t in pipe.model.state_dict().items() if n not in weights and t.is_floating_point()]
    assert rest and all(t.dtype == torch.float32 for _, t in rest), [n for n, t in rest if t.dtype != torch.float32]
    assert pipe.dtype == torch.float32 and decoder.wte.dtype == torch.float32
    assert weight_format(pipe) == {"dtype": "float32", "decoder_weights": "bfloat16", "quantization": None}
    # the float32 load is untouched: no copy of the head, column-major weights, float32 throughout
    plain = mm.load(checkpoint)
    assert weight_format(plain)["decoder_weights"] == "float32" and not hasattr(plain.model, "fp32_tensors")
    assert not plain.model.decoder.layers[0].mlp.fc1.weight.is_contiguous()


def rounded(path):
    """The float32 pipeline of ``path`` with its decoder's linear weights and head rounded to bfloat16
    (a tied head rounded in its own copy, the embedding lookups not): what bf16 storage computes."""
    pipe = mm.load(path, stage_backend="engine")
    decoder = pipe.model.decoder
    with torch.no_grad():
        for m in decoder.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.bfloat16().float()
        decoder.lm_head = nn.Parameter(head_weight(decoder).detach().bfloat16().float(), requires_grad=False)
    return pipe


def test_bf16_storage_computes_float32_on_the_rounded_weights(checkpoint):
    stored = mm.load(checkpoint, dtype="bfloat16")
    px = images(3)
    ids = stored.generate_ids(px, max_new_tokens=12)
    assert torch.equal(ids, rounded(checkpoint).generate_ids(px, max_new_tokens=12))
    float32 = mm.load(checkpoint).generate_ids(px, max_new_tokens=12)
    assert (ids == float32).float().mean() >= 0.5  # close to float32 too, though not bound to be equal


def _blip(tmp):
    from hf_models import make_blip, save_blip
    return save_blip(make_blip(seed=1), tmp / "hf"), None


def _git(tmp):
    from hf_models import make_git, save_git
    return save_git(make_git(seed=1), tmp / "hf"), None


def _clipcap(tmp):
    from hf_models import make_clipcap, save_clipcap
    return save_clipcap(*make_clipcap(seed=1), tmp / "src"), None


def _blip2(tmp):
    from test_convert_blip2 import make_blip2, prompt_ids, save_blip2
    return save_blip2(make_blip2(seed=4, init=0.05), tmp / "hf"), prompt_ids()


def _llava(tmp):
    from test_convert_llava import QUESTION, make_llava, prompt_ids, save_llava
    return save_llava(make_llava(seed=2, init=0.05), tmp / "hf"), prompt_ids(QUESTION)


@pytest.mark.parametrize("family", [_blip, _git, _clipcap, _blip2, _llava], ids=lambda f: f.__name__[1:])
def test_every_captioner_family_stores_bf16_and_computes_on_the_rounded_weights(family, tmp_path):
    source, prompt = family(tmp_path)
    path = mm.convert(source, tmp_path / "engine")
    stored = mm.load(path, dtype="bfloat16", stage_backend="engine")
    assert weight_format(stored) == {"dtype": "float32", "decoder_weights": "bfloat16", "quantization": None}
    enc = stored.config.encoder
    px = torch.rand(2, 3, enc.image_size, enc.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = stored.generate_ids(px, max_new_tokens=8, prompt_ids=prompt)
    assert torch.equal(ids, rounded(path).generate_ids(px, max_new_tokens=8, prompt_ids=prompt))


def test_bf16_compute_where_asked(checkpoint, monkeypatch):
    monkeypatch.setenv(BF16_COMPUTE_ENV, "bfloat16")
    pipe = mm.load(checkpoint, dtype="bfloat16")
    assert pipe.dtype == pipe.model.encoder.patch_embed.weight.dtype == torch.bfloat16
    assert weight_format(pipe) == {"dtype": "bfloat16", "decoder_weights": "bfloat16", "quantization": None}
    assert pipe.generate_ids(images(1), max_new_tokens=4).shape == (1, 4)
    monkeypatch.setenv(BF16_COMPUTE_ENV, "bf16")
    with pytest.raises(InputError, match=f"^\\${BF16_COMPUTE_ENV} must be 'float32' or 'bfloat16', got 'bf16'$"):
        mm.load(checkpoint, dtype="bfloat16")


def test_int8_with_bfloat16_is_unchanged(checkpoint):
    """Quantized decoders have no float linear weights to store: bfloat16 is their compute dtype."""
    pipe = mm.load(checkpoint, dtype="bfloat16", quantize="int8")
    assert weight_format(pipe) == {"dtype": "bfloat16", "decoder_weights": "int8", "quantization": "int8"}


def test_the_demo_models_with_bf16_weights():
    captioner = mm.load(mm.demo_model("captioning"), dtype="bfloat16")
    assert weight_format(captioner)["decoder_weights"] == "bfloat16"
    items = sample(24, HELD_OUT_SEED + 50_000)
    captions = captioner.caption([image for image, _ in items], max_new_tokens=16)
    assert sum(c == want for c, (_, want) in zip(captions, items)) >= 21
    pipe = mm.load(mm.demo_model("text-to-image"), dtype="bfloat16")
    assert weight_format(pipe) == {"dtype": "float32", "decoder_weights": "bfloat16", "quantization": None}
    images_ = pipe.generate(["a red circle"], 1, mm.SamplingParams(do_sample=True, top_k=4, guidance_scale=2.0, seed=1))
    assert images_[0].size == (64, 64)
    pipe = mm.load(mm.demo_model("speech-to-gesture"), dtype="bfloat16")
    assert weight_format(pipe) == {"dtype": "float32", "decoder_weights": "bfloat16", "quantization": None}
    audio, _ = gesture_world.clip(gesture_world.HELD_OUT_SEED + 100, 2.0)
    pipe.recorded_steps.record_after = 0  # the recorded CPU steps replay the bf16-weight products too
    poses = pipe.generate(audio, gesture_world.SAMPLE_RATE)
    assert len(pipe.recorded_steps) and poses.shape == (30, 52, 2) and np.isfinite(poses).all()
    pipe.record_cpu_steps = False
    assert np.array_equal(pipe.generate(audio, gesture_world.SAMPLE_RATE), poses)
