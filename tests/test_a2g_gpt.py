"""a2g-gpt: the engine against the plain PyTorch definition (mmgen_engine.training.a2g_gpt) and its
GPT part against transformers' GPT2LMHeadModel(add_cross_attention=True); the speech-to-gesture
pipeline's determinism, streaming and bad input."""
from __future__ import annotations

import dataclasses
import json
import wave

import numpy as np
import pytest
import torch

import mmgen_engine as mm
from mmgen_engine.errors import ConversionError, InputError
from mmgen_engine.runtime import CrossKVCache, KVCache
from mmgen_engine.training import a2g_gpt as a2g

TINY = a2g.A2GConfig(width=32, audio_layers=1, audio_heads=2, audio_ff=48, layers=2, heads=2, ff=64, codebook_size=40,
                     code_dim=8, vq_width=16, vq_depth=2)
GREEDY = mm.SamplingParams()


def make_reference(seed=0, cfg=TINY) -> a2g.A2GGpt:
    """Random weights at scales where greedy decoding varies with the audio and the position."""
    torch.manual_seed(seed)
    model = a2g.A2GGpt(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
        model.audio.pos.normal_(0, 1)
        model.gpt.wte.weight.normal_(0, 0.1)
        model.gpt.wpe.weight.normal_(0, 2.0)
        model.motion.quantizer.codebook.normal_(0, 1)
        model.pose_mean.normal_(0, 3)
        model.pose_std.uniform_(0.5, 2)
    return model


def speech_like(seconds, seed=0, rate=16000):
    """Noise whose loudness changes every half second (the random model hears the difference)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    gain = np.repeat(rng.uniform(0.01, 0.5, n // (rate // 2) + 1), rate // 2)[:n]
    return (rng.standard_normal(n) * gain).astype(np.float32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("a2g")
    model = make_reference()
    a2g.save(model, tmp / "src")
    return model, mm.convert(tmp / "src", tmp / "engine")


def engine_tokens(pipe, audio, sampling=GREEDY):
    """Every window's tokens of one generate call, and its poses."""
    return pipe.generate_tokens(audio, 16000, sampling), pipe.generate(audio, 16000, sampling=sampling)


@pytest.mark.parametrize("seconds", [0.5, 4.3, 9.0], ids=["under-a-window", "one-window", "three-windows"])
def test_greedy_tokens_and_poses_match_the_reference(converted, seconds):
    model, path = converted
    pipe = mm.load(path)
    assert pipe.fps == 15.0 and len(pipe.skeleton) == 52 and pipe.skeleton[0] == -1
    audio = speech_like(seconds, seed=int(seconds * 10))
    ref_tokens, ref_poses = a2g.generate(model, audio)
    tokens, poses = engine_tokens(pipe, audio)
    assert tokens == ref_tokens
    assert len(set(sum(tokens, []))) > 3, "degenerate random model: the test would prove little"
    assert poses.shape == ref_poses.shape == (round(seconds * 15), 52, 2) and poses.dtype == np.float32
    assert np.abs(poses - ref_poses).max() <= 1e-4 * max(1.0, np.abs(ref_poses).max())
    assert (poses[:, 0] == 0).all()  # neck-relative


def test_parts_match_the_reference(converted):
    model, path = converted
    pipe = mm.load(path)
    mel = torch.randn(2, TINY.mel_frames, 64)
    codes = torch.randint(0, TINY.codebook_size, (2, 16))
    with torch.inference_mode():
        torch.testing.assert_close(pipe.model.encode(mel), model.audio(mel), atol=1e-5, rtol=1e-5)
        ref = model.denormalize(model.motion.detokenize(codes))
        torch.testing.assert_close(pipe.model.poses(codes), ref, atol=1e-4, rtol=1e-5)


def hf_gpt2(model: a2g.A2GGpt):
    """transformers' GPT2LMHeadModel(add_cross_attention=True) holding the reference decoder's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.cfg
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.width,
                                    n_layer=c.layers, n_head=c.heads, n_inner=c.ff, activation_function="gelu_new",
                                    add_cross_attention=True, layer_norm_epsilon=1e-5)).eval()
    g, state = model.gpt, {}
    state["transformer.wte.weight"], state["transformer.wpe.weight"] = g.wte.weight, g.wpe.weight
    state["transformer.ln_f.weight"], state["transformer.ln_f.bias"] = g.ln_f.weight, g.ln_f.bias
    for i, b in enumerate(g.blocks):
        pre = f"transformer.h.{i}."
        pairs = {"ln_1": b.ln_1, "ln_cross_attn": b.ln_cross, "ln_2": b.ln_2}
        for name, ln in pairs.items():
            state[pre + name + ".weight"], state[pre + name + ".bias"] = ln.weight, ln.bias
        convs = {"attn.c_attn": b.attn.qkv, "attn.c_proj": b.attn.out, "crossattention.q_attn": b.cross.q,
                 "crossattention.c_attn": b.cross.kv, "crossattention.c_proj": b.cross.out, "mlp.c_fc": b.mlp.fc1,
                 "mlp.c_proj": b.mlp.fc2}
        for name, lin in convs.items():  # GPT-2's Conv1D stores [in, out]
            state[pre + name + ".weight"], state[pre + name + ".bias"] = lin.weight.t(), lin.bias
    state["lm_head.weight"] = g.wte.weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing)
    return hf


def test_gpt_part_matches_transformers(converted):
    """Given the same audio states, transformers' GPT-2 with cross-attention, the reference decoder
    and the engine's cached decoder give the same logits."""
    model, path = converted
    pipe = mm.load(path)
    hf = hf_gpt2(model)
    g = torch.Generator().manual_seed(3)
    memory = torch.randn(2, TINY.audio_positions, TINY.width, generator=g)
    tokens = torch.cat([torch.full((2, 1), TINY.bos), torch.randint(0, TINY.codebook_size, (2, 12), generator=g)], 1)
    with torch.no_grad():
        ref = hf(input_ids=tokens, encoder_hidden_states=memory).logits
        torch.testing.assert_close(model.gpt(tokens, memory), ref, atol=1e-4, rtol=1e-4)
    dec = pipe.model.decoder
    layers, heads, head_dim, _ = dec.cache_geometry()
    cache = KVCache.allocate(layers, 2, heads, tokens.shape[1], head_dim, torch.float32, "cpu")
    cross = CrossKVCache.allocate(layers, torch.full((2,), memory.shape[1]), heads, memory.shape[1], head_dim,
                                  torch.float32, "cpu")
    with torch.inference_mode():
        out = [dec.prefill(tokens[:, :1], memory, cache, cross)]
        for i in range(1, tokens.shape[1]):
            cache.span = i + 1
            out.append(dec.decode_step(tokens[:, i], torch.full((2,), i), cache, cross))
    scale = max(1.0, ref.abs().max().item())
    assert (torch.stack(out, 1) - ref).abs().max().item() <= 1e-4 * scale


def write_wav_int16(path, audio, rate, channels=1):
    data = np.clip(audio, -1, 1)
    data = np.repeat(data[:, None], channels, axis=1) if channels > 1 else data[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((data * 32767).astype("<i2").tobytes())


def test_file_array_and_stream_give_identical_poses(converted, tmp_path):
    _, path = converted
    pipe = mm.load(path)
    audio = speech_like(6.0, seed=5, rate=22050)
    wav = tmp_path / "speech.wav"
    write_wav_int16(wav, audio, 22050, channels=2)  # stereo 22.05 kHz int16: mixed down, resampled
    sampling = mm.SamplingParams(do_sample=True, top_k=8, seed=7)
    from_file = pipe.generate(wav, sampling=sampling)
    quantized = np.frombuffer((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes(), "<i2") / 32768
    from_array = pipe.generate(quantized.astype(np.float32), sample_rate=22050, sampling=sampling)
    chunks = list(pipe.generate_stream(wav, sampling=sampling))
    assert np.array_equal(from_file, from_array)
    assert np.array_equal(np.concatenate(chunks), from_file) and from_file.shape == (90, 52, 2)
    assert [c.shape[0] for c in chunks] == [48, 42]  # 48 per window, the rest at the end (no empty chunk)
    other = pipe.generate(wav, sampling=mm.SamplingParams(do_sample=True, top_k=8, seed=8))
    assert not np.array_equal(other, from_file)
    assert np.array_equal(pipe.generate(wav), pipe.generate(wav))  # the default sampling is seeded


def test_pose_statistics_stay_fp32_at_half_precision(converted, tmp_path):
    """Converted or loaded in half precision, the pose mean/std keep fp32: poses of the same tokens
    then differ from fp32 only by the motion decoder's rounding."""
    from safetensors import safe_open
    model, path = converted
    src = tmp_path / "src"
    a2g.save(model, src)
    half = mm.convert(src, tmp_path / "half", dtype="float16")
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert f.get_tensor("pose_mean").dtype == torch.float32
        assert f.get_tensor("decoder.wte").dtype == torch.float16
    codes = torch.randint(0, TINY.codebook_size, (1, 16))
    with torch.inference_mode():
        ref = mm.load(path).model.poses(codes)
        for pipe in (mm.load(half), mm.load(path, dtype="bfloat16")):
            assert pipe.model.pose_mean.dtype == torch.float32
            assert (pipe.model.poses(codes) - ref).abs().max() <= 0.05 * ref.abs().max()


def test_triton_backend_gives_the_reference_tokens(converted, monkeypatch):
    pytest.importorskip("triton")
    _, path = converted
    pipe = mm.load(path)
    audio = speech_like(5.0, seed=2)
    ref, _ = engine_tokens(pipe, audio)
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    assert engine_tokens(pipe, audio)[0] == ref


def test_bad_and_edge_audio(converted, tmp_path):
    _, path = converted
    pipe = mm.load(path)
    with pytest.raises(InputError, match="no audio samples"):
        pipe.generate(np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="sample_rate"):
        pipe.generate(np.zeros(100, np.float32))
    with pytest.raises(InputError, match="absurd sample rate"):
        pipe.generate(np.zeros(100, np.float32), 10)
    for bad in (b"", b"ID3\x04\x00 an mp3", b"RIFF\x10\x00\x00\x00WAVEfmt "):
        (tmp_path / "bad.wav").write_bytes(bad)
        with pytest.raises(InputError):
            pipe.generate(tmp_path / "bad.wav")
    with pytest.raises(InputError, match="guidance"):
        pipe.generate(np.zeros(100, np.float32), 16000, sampling=mm.SamplingParams(guidance_scale=2.0))
    silent = pipe.generate(np.zeros(16000, np.float32), 16000, sampling=GREEDY)  # valid: poses, not an error
    assert silent.shape == (15, 52, 2) and np.isfinite(silent).all()
    tiny = pipe.generate(np.full(10, 0.1, np.float32), 16000, sampling=GREEDY)  # shorter than one frame
    assert tiny.shape == (1, 52, 2)


def test_window_seeds_and_array_layout(converted):
    from mmgen_engine.pipelines.speech_to_gesture import window_seed
    seeds = {window_seed(s, w) for s in (0, 1, 2**63 - 1) for w in range(4)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    _, path = converted
    pipe = mm.load(path)
    audio = speech_like(4.0, seed=1)
    top = mm.SamplingParams(do_sample=True, seed=2**63 - 1)  # the largest seed works across windows
    assert pipe.generate(audio, 16000, sampling=top).shape == (60, 52, 2)
    with pytest.raises(InputError, match="looks like \\[channels, n\\]"):
        pipe.generate(np.stack([audio, audio]), 16000)


def test_long_audio_streams_in_bounded_windows(converted):
    """Ten minutes of audio: the poses come window by window (48 frames each), never all at once."""
    _, path = converted
    pipe = mm.load(path)
    audio = np.tile(speech_like(3.2, seed=9), 188)[:16000 * 600]
    total, sizes = 0, set()
    for chunk in pipe.generate_stream(audio, 16000, sampling=GREEDY):
        total += chunk.shape[0]
        sizes.add(chunk.shape[0])
    assert total == 600 * 15 and max(sizes) == 48


def test_converter_rejects_bad_sources(tmp_path):
    model = make_reference(seed=1)
    src = a2g.save(model, tmp_path / "src")
    cfg = json.loads((src / a2g.CONFIG_FILE).read_text())
    (src / a2g.CONFIG_FILE).write_text(json.dumps({**cfg, "dropout": 0.1}))
    with pytest.raises(ConversionError, match="unknown field.*dropout"):
        mm.convert(src, tmp_path / "e1")
    (src / a2g.CONFIG_FILE).write_text(json.dumps({**cfg, "seed_tokens": 16}))
    with pytest.raises(ConversionError, match="seed_tokens"):
        mm.convert(src, tmp_path / "e2")
    (src / a2g.CONFIG_FILE).write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    state = load_file(str(src / a2g.WEIGHTS_FILE))
    state.pop("gpt.blocks.1.cross.kv.weight")
    save_file(state, str(src / a2g.WEIGHTS_FILE))
    with pytest.raises(ConversionError, match="missing tensor.*cross.kv.weight"):
        mm.convert(src, tmp_path / "e3")
    (src / a2g.WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(ConversionError, match="corrupt or truncated"):
        mm.convert(src, tmp_path / "e4")


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["motion"].update(joints=51), "skeleton has 52 joints, the motion decoder 51"),
    (lambda c: c["gesture"].update(skeleton=[-1] + [0] * 50), "PATS 52-joint upper body"),
    (lambda c: c["gesture"].update(seed_tokens=16), "longer than its 16 seed tokens"),
    (lambda c: c["gesture"].update(bos_token_id=3), "bos and eos"),
    (lambda c: c["gesture"].update(front_end="mfcc"), "unsupported audio front end"),
    (lambda c: c["decoder"].update(hidden_size=64, num_heads=2), "cross-attend"),
    (lambda c: c["gesture"].update(window_frames=60), "do not start on a log-mel frame"),
    (lambda c: c["gesture"].update(window_frames=32, seed_tokens=2), "the encoder takes 107"),
    (lambda c: c["gesture"].update(skeleton=[-1] + list(range(51))), "PATS 52-joint upper body"),
])
def test_edited_checkpoint_configs_fail_at_load(converted, tmp_path, edit, message):
    import shutil
    _, path = converted
    out = shutil.copytree(path, tmp_path / "copy")
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mm.CheckpointError, match=message):
        mm.load(out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graphs_give_the_eager_poses(converted, dtype):
    _, path = converted
    pipe = mm.load(path, device="cuda", dtype=dtype)
    audio = speech_like(7.0, seed=4)
    graphed = pipe.generate(audio, 16000)
    pipe.use_cuda_graphs = False
    assert np.array_equal(graphed, pipe.generate(audio, 16000))
    if dtype == "float32":
        cpu_tokens, _ = engine_tokens(mm.load(path), audio)
        pipe.use_cuda_graphs = True
        assert engine_tokens(pipe, audio)[0] == cpu_tokens


def test_cli_gesture_writes_every_format(converted, tmp_path):
    import subprocess
    import sys
    _, path = converted
    wav = tmp_path / "speech.wav"
    write_wav_int16(wav, speech_like(2.0, seed=3, rate=44100), 44100)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mmgen_engine.cli", "gesture", str(wav), "--model", str(path),
                               *args], capture_output=True, text=True, timeout=300)
    for suffix in (".npz", ".gif", ".mp4"):
        proc = run("-o", str(tmp_path / f"out{suffix}"), "--seed", "3")
        assert proc.returncode == 0, proc.stderr
        assert "30 frames of 52 joints at 15 fps" in proc.stdout
    data = np.load(tmp_path / "out.npz", allow_pickle=False)
    from mmgen_engine.pipelines.speech_to_gesture import DEFAULT_SAMPLING
    expected = mm.load(path).generate(wav, sampling=dataclasses.replace(DEFAULT_SAMPLING, seed=3))
    assert np.array_equal(data["poses"], expected) and float(data["fps"]) == 15.0
    assert list(data["skeleton"]) == mm.load(path).skeleton
    proc = run("-o", str(tmp_path / "out.avi"))
    assert proc.returncode == 2 and "must be one of .npz, .gif, .mp4" in proc.stderr
    proc = run("-o", str(tmp_path / "missing" / "out.gif"))
    assert proc.returncode == 2 and "cannot write there" in proc.stderr
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    proc = subprocess.run([sys.executable, "-m", "mmgen_engine.cli", "gesture", str(tmp_path / "bad.wav"), "--model",
                           str(path), "-o", str(tmp_path / "x.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "bad.wav" in proc.stderr
