"""Weight-only int8 of the models (``mm.load(quantize=...)``, ``mm.convert(quantize=...)``, ``mmgen convert
--quantize``): what is quantized, the conversion round trip, the demo models quantized, the float path
left alone, and quantized checkpoints a reader cannot run refused with one line."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hf_models import IMAGE, make_model, save
from safetensors.torch import load_file, save_file

import mmgen_engine as mm
from mmgen_engine import CheckpointError, InputError
from mmgen_engine.checkpoint import read_header
from mmgen_engine.cli import main
from mmgen_engine.config import QuantizationConfig
from mmgen_engine.demo import gesture_world
from mmgen_engine.demo.world import HELD_OUT_SEED, sample
from mmgen_engine.layers import QuantizedLinear
from mmgen_engine.ops.linear import linear_int8_chunked


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoints(request, tmp_path_factory):
    """A tiny ViT-GPT2 converted as float32 and with ``--quantize int8-g16``."""
    tmp = tmp_path_factory.mktemp("quantize")
    src = save(make_model(seed=3, tie=request.param), tmp / "hf")
    return mm.convert(src, tmp / "float"), mm.convert(src, tmp / "int8-g16", quantize="int8-g16"), src


def images(n: int) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8) for i in range(n)]


def quantized_names(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def test_the_decoder_and_its_head_are_quantized_the_encoder_is_not(checkpoints):
    _, quantized, _ = checkpoints
    cfg = json.loads((quantized / "config.json").read_text())
    assert cfg["quantization"] == {"method": "int8", "group_size": 16, "modules": "decoder"}
    assert cfg["format_version"] == 1
    header = read_header(quantized / "model.safetensors")
    int8 = {name for name, t in header.items() if t.dtype == torch.int8}
    decoder_linears = {n for n in header if n.startswith("decoder.layers.") and n.endswith(".weight")
                       and header[n].shape[0] > 1 and "ln" not in n}
    assert decoder_linears and decoder_linears <= int8
    assert "decoder.lm_head.weight" in int8 and header["decoder.lm_head.weight_scale"].dtype == torch.float32
    assert header["decoder.lm_head.weight_scale"].shape == (99, 3)  # 48 inputs in groups of 16
    assert header["decoder.wte"].dtype == torch.float32  # the embedding lookups stay float
    assert not any(name.startswith("encoder.") for name in int8)
    pipe = mm.load(quantized)
    names = quantized_names(pipe.model)
    assert "decoder.lm_head" in names and all(n.startswith("decoder.") for n in names)
    assert len(names) == len(int8)


def test_convert_then_load_equals_quantizing_at_load(checkpoints):
    floating, quantized, _ = checkpoints
    stored, at_load = mm.load(quantized), mm.load(floating, quantize="int8-g16")
    a, b = stored.model.state_dict(), at_load.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = stored.preprocess(images(3))
    ids = stored.generate_ids(pixels, max_new_tokens=12)
    assert torch.equal(ids, at_load.generate_ids(pixels, max_new_tokens=12))
    # loading a quantized checkpoint with its own setting is loading it as stored
    assert torch.equal(ids, mm.load(quantized, quantize="int8-g16").generate_ids(pixels, max_new_tokens=12))


def test_the_float_path_is_untouched(checkpoints):
    floating, _, _ = checkpoints
    plain, quantized = mm.load(floating), mm.load(floating, quantize="int8")
    assert not quantized_names(plain.model) and not hasattr(plain.model, "fp32_tensors")
    assert all(not t.dtype == torch.int8 for t in plain.model.state_dict().values())
    # the float parts of a quantized model are the float model's, bit for bit
    float_state, q_state = plain.model.state_dict(), quantized.model.state_dict()
    for name in ("decoder.wte", "decoder.wpe", "encoder.layers.0.attn.qkv.weight", "decoder.layers.0.attn.qkv.bias"):
        assert torch.equal(float_state[name], q_state[name]), name
    # the quantized model computes with the int8 weights: close to the float logits, not equal
    with torch.inference_mode():  # as the pipelines run
        states = plain.model.encode(plain.preprocess(images(2)))
        lf, lq = (p.model.decoder.prefill(torch.ones(2, 1, dtype=torch.int64), states, *caches(p.model.decoder, states))
                  for p in (plain, quantized))
    err = (lf - lq).abs().max() / lf.abs().max()
    assert 0 < err < 0.05, err


def caches(decoder, states):
    """Fresh self- and cross-attention caches for ``decoder`` over encoder ``states [B, S, D]``."""
    (batch, length), (layers, heads, head_dim, positions) = states.shape[:2], decoder.cache_geometry()
    self_kv = torch.zeros(2, layers, batch, heads, positions, head_dim)
    cross_kv = torch.zeros(2, layers, batch, heads, length, head_dim)
    return (SimpleNamespace(k=self_kv[0], v=self_kv[1], span=positions),
            SimpleNamespace(k=cross_kv[0], v=cross_kv[1], lengths=torch.full((batch,), length)))


def test_quantize_options_are_checked():
    assert QuantizationConfig.parse("int8") == QuantizationConfig(method="int8")
    assert QuantizationConfig.parse("int8-g128").group_size == 128 and QuantizationConfig.parse(None) is None
    for bad in ("int4", "int8-g", "int8-g8", "int8-gx", "INT8", "", 8):
        with pytest.raises(InputError) as e:
            mm.load(mm.demo_model("captioning"), quantize=bad)
        assert "\n" not in str(e.value) and "quantize" in str(e.value)
    with pytest.raises(InputError, match="not supported with ONNX Runtime"):
        mm.load(mm.demo_model("captioning"), quantize="int8", stage_backend="onnxruntime")


def test_a_quantized_checkpoint_is_not_quantized_again_another_way(checkpoints):
    _, quantized, _ = checkpoints
    with pytest.raises(InputError, match="quantized as 'int8-g16'"):
        mm.load(quantized, quantize="int8")


def _edit(src, dst, config=None, tensors=None):
    """A copy of checkpoint ``src`` at ``dst`` with ``config(cfg)`` / ``tensors(state)`` applied."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    state = load_file(str(src / "model.safetensors"))
    save_file(tensors(state) if tensors else state, str(dst / "model.safetensors"))
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (dst / "preprocessor_config.json").write_bytes((src / "preprocessor_config.json").read_bytes())
    return dst


def _without(state, name):
    state.pop(name)
    return state


def _replace(state, name, value):
    state[name] = value
    return state


BAD = {
    "unknown method": (lambda c: {**c, "quantization": {**c["quantization"], "method": "int4"}}, None,
                       r"quantization\.method"),
    "unknown modules": (lambda c: {**c, "quantization": {**c["quantization"], "modules": "all"}}, None,
                        r"quantization\.modules"),
    "tiny groups": (lambda c: {**c, "quantization": {**c["quantization"], "group_size": 4}}, None,
                    r"quantization\.group_size"),
    "another group size": (lambda c: {**c, "quantization": {**c["quantization"], "group_size": 32}}, None,
                           r"weight_scale' has shape \(\d+, 3\), the config implies \(\d+, 2\)"),
    "missing scales": (None, lambda s: _without(s, "decoder.layers.0.mlp.fc1.weight_scale"),
                       r"missing tensor\(s\) decoder.layers.0.mlp.fc1.weight_scale"),
    "wrong scale shape": (None, lambda s: _replace(s, "decoder.lm_head.weight_scale", torch.ones(99)),
                          r"'decoder.lm_head.weight_scale' has shape \(99,\)"),
    "float16 scales": (None, lambda s: _replace(s, "decoder.lm_head.weight_scale",
                                                s["decoder.lm_head.weight_scale"].half()),
                       r"'decoder.lm_head.weight_scale' is float16, expected float32"),
    "float weights": (None, lambda s: _replace(s, "decoder.lm_head.weight", s["decoder.lm_head.weight"].float()),
                      r"'decoder.lm_head.weight' is float32, expected int8"),
    "no quantization block": (lambda c: {k: v for k, v in c.items() if k != "quantization"}, None,
                              r"(missing|unexpected) tensor\(s\) decoder\."),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_quantized_checkpoint_a_reader_cannot_run_is_refused_with_one_line(checkpoints, tmp_path, case):
    _, quantized, _ = checkpoints
    config, tensors, match = BAD[case]
    bad = _edit(quantized, tmp_path / "bad", config, tensors)
    with pytest.raises(CheckpointError, match=match) as e:
        mm.load(bad)
    assert "\n" not in str(e.value)


def test_a_float_checkpoint_claiming_quantization_is_refused(checkpoints, tmp_path):
    floating, _, _ = checkpoints
    quant = {"method": "int8", "group_size": None, "modules": "decoder"}
    bad = _edit(floating, tmp_path / "bad", lambda c: {**c, "quantization": quant})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) .*weight_scale") as e:
        mm.load(bad)
    assert "\n" not in str(e.value)


def test_the_cli_flag(checkpoints, tmp_path, capsys):
    floating, quantized, src = checkpoints
    out = tmp_path / "cli"
    assert main(["convert", str(src), str(out), "--quantize", "int8-g16", "--quiet"]) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(quantized / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 16
    assert main(["convert", str(src), str(tmp_path / "bad"), "--quantize", "int3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmgen: error: quantize must be") and "\n" not in err


def test_the_quantized_demo_captioner_captions_held_out_scenes():
    pipe = mm.load(mm.demo_model("captioning"), quantize="int8")
    linears = {f"decoder.{n}" for n, m in mm.load(mm.demo_model("captioning")).model.decoder.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert quantized_names(pipe.model) == linears | {"decoder.lm_head"}  # the tied head: an int8 copy
    items = sample(24, HELD_OUT_SEED + 50_000)
    captions = pipe.caption([image for image, _ in items], max_new_tokens=16)
    assert sum(c == want for c, (_, want) in zip(captions, items)) >= 21


def test_the_quantized_demo_txt2img_and_gesture_models_run():
    pipe = mm.load(mm.demo_model("text-to-image"), quantize="int8-g128")
    names = quantized_names(pipe.model)
    assert "decoder.lm_head" in names and all(n.startswith("decoder.") for n in names)
    images = pipe.generate(["a red circle"], 1, mm.SamplingParams(do_sample=True, top_k=4, guidance_scale=2.0, seed=1))
    assert images[0].size == (64, 64)
    with mm.Engine(mm.demo_model("speech-to-gesture"), quantize="int8") as engine:  # mm.Engine loads it too
        pipe = engine.models["default"]
        assert "decoder.lm_head" in quantized_names(pipe.model)
        assert not any(n.startswith(("encoder.", "motion.")) for n in quantized_names(pipe.model))
        audio, _ = gesture_world.clip(gesture_world.HELD_OUT_SEED + 100, 2.0)
        pipe.recorded_steps.record_after = 0  # the CPU steps recorded at once: they replay the int8 products too
        poses = pipe.generate(audio, gesture_world.SAMPLE_RATE)
        assert len(pipe.recorded_steps) and poses.shape == (30, 52, 2) and np.isfinite(poses).all()
        pipe.record_cpu_steps = False
        assert np.array_equal(pipe.generate(audio, gesture_world.SAMPLE_RATE), poses)


def test_a_quantized_checkpoint_exports_its_stages_and_refuses_its_decoder(checkpoints, tmp_path):
    pytest.importorskip("onnxscript")
    _, quantized, _ = checkpoints
    with pytest.raises(InputError, match="decoder of a quantized checkpoint") as e:
        mm.export_onnx(quantized, tmp_path / "decoder", parts=["decoder_prefill"])
    assert "\n" not in str(e.value) and not (tmp_path / "decoder").exists()
    out = mm.export_onnx(quantized, tmp_path / "stages")  # the default: the float one-shot stages only
    assert set(json.loads((out / "manifest.json").read_text())["parts"]) == {"image_encoder"}


def test_int8_products_run_inside_and_outside_inference_mode(checkpoints):
    _, quantized, _ = checkpoints
    pipe = mm.load(quantized)
    layer = next(m for m in pipe.model.decoder.modules() if isinstance(m, QuantizedLinear))
    x = torch.randn(3, layer.in_features)
    for product in (layer, lambda x: linear_int8_chunked(x, layer.op_weight, layer.bias)):
        with torch.inference_mode():
            inside = product(x)
        assert torch.equal(product(x), inside)  # the kept chunk buffer is not an inference tensor out here
