"""Image detokenizers: tiny random upstream decoders (taming-transformers VQGAN, OpenAI dall_e dVAE,
min-dalle's VQGAN), saved in their own formats, converted with ``mm.convert`` and decoded with the
engine, must give the upstream pixels; bad sources and bad tokens give one clear error."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_bad_input import cli_error
from upstream import import_upstream

import mmgen_engine as mm
from mmgen_engine import CheckpointError, ConversionError, InputError
from mmgen_engine.config import DetokenizerConfig, DVAEConfig, VQGANConfig
from mmgen_engine.convert.taming_vqgan import vqgan_from_tensors
from mmgen_engine.models import build_detokenizer
from mmgen_engine.pipelines.detokenizer import check_image_tokens, to_pil
from mmgen_engine.runtime.layout import channels_last_weights

ATOL = 1e-4  # pixels in [0, 1], fp32 on CPU


# --- upstream models and their outputs (the references) ------------------------------------------

def taming_vqmodel(ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, embed_dim, n_codes, seed):
    """A taming VQModel's decoder half (Decoder, post_quant_conv, VectorQuantizer) with seeded random
    weights, and its state dict under VQModel's names plus encoder/quant_conv/loss tensors that the
    converter must drop. conv_out is damped so that most pixels are not clamped."""
    from taming.modules.diffusionmodules.model import Decoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    torch.manual_seed(seed)
    resolution = 8 * 2 ** (len(ch_mult) - 1)
    decoder = Decoder(ch=ch, out_ch=3, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                      attn_resolutions=attn_resolutions, in_channels=3, resolution=resolution,
                      z_channels=z_channels).eval()
    post_quant_conv = torch.nn.Conv2d(embed_dim, z_channels, 1)
    quantize = VectorQuantizer(n_codes, embed_dim, beta=0.25)
    with torch.no_grad():
        quantize.embedding.weight.normal_()  # taming's init is +-1/n: every code would look alike
        decoder.conv_out.weight.mul_(0.3)
    state = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    state |= {f"post_quant_conv.{k}": v for k, v in post_quant_conv.state_dict().items()}
    state |= {f"quantize.{k}": v for k, v in quantize.state_dict().items()}
    state |= {"encoder.conv_in.weight": torch.randn(ch, 3, 3, 3),
              "quant_conv.weight": torch.randn(embed_dim, z_channels, 1, 1),
              "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}

    def reference(tokens):
        with torch.no_grad():
            z = post_quant_conv(quantize.embedding.weight[tokens].permute(0, 3, 1, 2))
            return ((decoder(z) + 1) / 2).clamp(0, 1)

    return state, reference


def dalle_decoder(n_blk_per_group, seed, n_hid=64, n_init=32, vocab_size=512):
    """``dall_e.Decoder`` with seeded random weights and its reference: one-hot codes ->
    ``unmap_pixels(sigmoid(x[:, :3]))``."""
    from dall_e import Decoder
    from dall_e.utils import unmap_pixels

    torch.manual_seed(seed)
    decoder = Decoder(n_init=n_init, n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size).eval()
    with torch.no_grad():
        for p in decoder.parameters():  # upstream zero-inits the biases; give them values too
            if p.dim() == 1:
                p.normal_(0, 0.1)

    def reference(tokens):
        with torch.no_grad():
            one_hot = F.one_hot(tokens, vocab_size).permute(0, 3, 1, 2).float()
            return unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3].float()))

    return decoder, reference


def assert_parity(ref, got, shape):
    assert got.dtype == torch.float32 and got.shape == ref.shape == shape, (got.dtype, got.shape, ref.shape, shape)
    inside = ((ref > 0.01) & (ref < 0.99)).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of the reference pixels are unclamped: the test would be weak"
    assert (got - ref).abs().max().item() <= ATOL


# --- taming VQGAN ---------------------------------------------------------------------------------

# (ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, embed_dim, n_codes, file format, token grid)
VQGAN_CASES = {
    "attn-top-level-ckpt": (32, (1, 2), 1, [8], 16, 8, 50, "lightning", (2, 4, 6)),
    "no-attn-3-levels-pt": (32, (1, 1, 2), 2, [], 8, 8, 37, "pt", (2, 16)),
    "attn-levels-0-2-safetensors": (32, (1, 2, 2), 1, [32, 8], 4, 12, 70, "safetensors", (1, 3, 3)),
    "one-block-per-level-pt": (32, (1, 2), 0, [], 8, 8, 40, "pt", (1, 4, 4)),
}


def save_state(state, path, fmt):
    """Write ``state`` to ``path`` as safetensors, a Lightning checkpoint or a plain ``torch.save``."""
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "lightning":
        torch.save({"state_dict": state, "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8"}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("case", list(VQGAN_CASES))
def test_taming_vqgan_matches_upstream(case, tmp_path):
    *arch, fmt, grid = VQGAN_CASES[case]
    state, reference = taming_vqmodel(*arch, seed=len(case))
    src = tmp_path / "src"
    src.mkdir()
    save_state(state, src / {"lightning": "last.ckpt", "pt": "vq.pth", "safetensors": "vq.safetensors"}[fmt], fmt)
    (src / "model.yaml").write_text("model: {}\n")  # other files beside the weights are fine
    out = mm.convert(src, tmp_path / "engine")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["task"], cfg["architecture"], cfg["source_format"]) == ("image-detokenizer", "vqgan", "taming-vqgan")
    ch, ch_mult, nrb, attn_res, z, embed, codes = arch
    levels = len(ch_mult)
    assert cfg["detokenizer"]["vqgan"] == {
        "codebook_size": codes, "embed_dim": embed, "z_channels": z, "ch": ch, "ch_mult": list(ch_mult),
        "num_res_blocks": nrb, "out_channels": 3, "norm_eps": 1e-6, "output": "minus1_1",
        "attn_levels": [i for i in range(levels) if 8 * 2 ** (levels - 1 - i) in attn_res]}

    pipe = mm.load(out)
    assert isinstance(pipe, mm.ImageDetokenizer) and pipe.downsample_factor == 2 ** (levels - 1)
    tokens = check_image_tokens(torch.randint(0, codes, grid, generator=torch.Generator().manual_seed(1)), codes)
    b, h, w = tokens.shape
    f = pipe.downsample_factor
    assert_parity(reference(tokens), pipe.decode_tokens(tokens.view(grid)), (b, 3, h * f, w * f))


def test_vqgan_dtype_conversion_and_pil(tmp_path):
    state, reference = taming_vqmodel(*VQGAN_CASES["attn-top-level-ckpt"][:7], seed=5)
    out = mm.convert(save_state(state, tmp_path / "vq.pt", "pt"), tmp_path / "engine", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    pipe = mm.load(out, dtype="float32")
    tokens = torch.randint(0, 50, (2, 4, 4))
    got = pipe.decode_tokens(tokens)
    assert (got - reference(tokens)).abs().max().item() < 0.05  # bf16-rounded weights
    images = pipe.to_pil(got)
    assert [im.size for im in images] == [(8, 8)] * 2 and images[0].mode == "RGB"


# --- OpenAI dVAE ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_blk_per_group,fmt", [(1, "pt"), (2, "safetensors"), (2, "pickle")])
def test_openai_dvae_matches_upstream(n_blk_per_group, fmt, tmp_path):
    decoder, reference = dalle_decoder(n_blk_per_group, seed=n_blk_per_group)
    if fmt == "pickle":  # OpenAI's decoder.pkl is the whole pickled module
        src = tmp_path / "decoder.pkl"
        torch.save(decoder, src)
        with pytest.raises(ConversionError, match="--trust-pickle"):
            mm.convert(src, tmp_path / "engine")
        out = mm.convert(src, tmp_path / "engine", trust_pickle=True)
    else:
        out = mm.convert(save_state(decoder.state_dict(), tmp_path / f"dvae.{fmt}", fmt), tmp_path / "engine")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architecture"], cfg["source_format"], cfg["dtype"]) == ("dvae", "openai-dvae", "float32")
    assert cfg["detokenizer"]["dvae"] == {"vocab_size": 512, "n_init": 32, "n_hid": 64,
                                          "n_blk_per_group": n_blk_per_group, "group_count": 4, "output_channels": 3}
    pipe = mm.load(out)
    tokens = torch.randint(0, 512, (2, 3, 4), generator=torch.Generator().manual_seed(2))
    assert_parity(reference(tokens), pipe.decode_tokens(tokens), (2, 3, 24, 32))


# --- min-dalle's VQGAN (its real architecture, through the function its converter uses) ----------

def test_min_dalle_vqgan_matches_upstream():
    VQGanDetokenizer = import_upstream("min_dalle.models").VQGanDetokenizer

    torch.manual_seed(0)
    upstream = VQGanDetokenizer().eval()
    with torch.no_grad():
        upstream.decoder.conv_out.weight.mul_(0.3)
        upstream.decoder.conv_out.bias.fill_(0.5)  # min-dalle clamps x itself to [0, 1]
    config, tensors = vqgan_from_tensors(upstream.state_dict(), codebook_key="embedding.weight", norm_eps=1e-5,
                                         output="0_1", where="detoker.pt")
    assert config == {"codebook_size": 16384, "embed_dim": 256, "z_channels": 256, "ch": 128,
                      "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_levels": [4], "out_channels": 3,
                      "norm_eps": 1e-5, "output": "0_1"}
    model = build_detokenizer(DetokenizerConfig("vqgan", vqgan=VQGANConfig(**config)), device="meta")
    model.load_state_dict(tensors, assign=True)
    tokens = torch.randint(0, 16384, (1, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = upstream(False, tokens.view(1, 256)).permute(2, 0, 1)[None] / 255  # [256, 256, 3] * 255
        got = model(tokens)
    assert_parity(ref, got, (1, 3, 256, 256))


# --- the Triton kernels (interpreter on CPU) ------------------------------------------------------

@pytest.mark.parametrize("arch", ["vqgan", "dvae"])
def test_triton_backend_matches_reference(arch, monkeypatch):
    pytest.importorskip("triton")
    from mmgen_engine.ops.registry import TRITON_DEVICES

    if "cpu" not in TRITON_DEVICES and not torch.cuda.is_available():
        pytest.skip("Triton runs neither on a GPU nor in its interpreter here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = (DetokenizerConfig("vqgan", vqgan=VQGANConfig(codebook_size=20, embed_dim=4, z_channels=8, ch=8,
                                                        ch_mult=[1, 2], num_res_blocks=1, attn_levels=[1],
                                                        norm_groups=4))
           if arch == "vqgan" else
           DetokenizerConfig("dvae", dvae=DVAEConfig(vocab_size=20, n_init=8, n_hid=8, n_blk_per_group=1)))
    torch.manual_seed(0)
    model = build_detokenizer(cfg, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    channels_last_weights(model)  # as the pipelines store them
    tokens = torch.randint(0, 20, (2, 2, 3), device=device)
    with torch.no_grad():
        monkeypatch.setenv("MMGEN_BACKEND", "reference")
        ref = model(tokens)
        monkeypatch.setenv("MMGEN_BACKEND", "triton")
        got = model(tokens)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4


# --- bad sources ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def taming_file(tmp_path_factory):
    state, _ = taming_vqmodel(*VQGAN_CASES["attn-top-level-ckpt"][:7], seed=0)
    return save_state(state, tmp_path_factory.mktemp("taming") / "last.ckpt", "lightning")


@pytest.fixture(scope="module")
def dvae_state():
    return dalle_decoder(1, seed=0)[0].state_dict()


def edited_state(path, edit, tmp_path):
    """A copy of the Lightning checkpoint ``path`` whose state dict went through ``edit``."""
    data = torch.load(path, weights_only=True)
    edit(data["state_dict"])
    return save_state(data["state_dict"], tmp_path / "edited.ckpt", "lightning")


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("decoder.up.0.block.1.conv2.weight"), "missing tensor.*decoder.up.0.block.1.conv2.weight"),
    (lambda s: s.update({"decoder.up.0.block.1.extra.weight": torch.zeros(2)}), "unused tensor.*extra"),
    (lambda s: s.update({"post_quant_conv.weight": torch.zeros(16, 9, 1, 1)}), "post_quant_conv.weight.*has shape"),
    (lambda s: s.update({"decoder.mid.attn_1.k.weight": torch.zeros(64, 32, 1, 1)}),
     "cannot build decoder.mid.attn_1.qkv"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("decoder.up.1.block.1.")],
     "different numbers of ResNet blocks"),
    (lambda s: s.update({"decoder.conv_out.weight": torch.zeros(4, 32, 3, 3)}), "out_channels must be 3"),
])
def test_inconsistent_taming_sources(taming_file, tmp_path, edit, match):
    with pytest.raises(ConversionError, match=match):
        mm.convert(edited_state(taming_file, edit, tmp_path), tmp_path / "out", source_format="taming-vqgan")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("blocks.group_2.block_1.res_path.conv_3.b"), "missing tensor.*group_2.block_1.res_path.conv_3.b"),
    (lambda s: s.update({"blocks.group_7.block_1.res_path.conv_1.w": torch.zeros(1)}), "unused tensor.*group_7"),
    (lambda s: s.update({"blocks.group_1.block_1.res_path.conv_2.w": torch.zeros(128, 128, 1, 1)}), "has shape"),
    (lambda s: s.update({"blocks.input.w": torch.zeros(32, 512, 3, 3)}), "expected a 1x1 conv weight"),
    (lambda s: s.update({"blocks.output.conv.w": torch.zeros(5, 64, 1, 1)}), "2 per image channel"),
])
def test_inconsistent_dvae_sources(dvae_state, tmp_path, edit, match):
    state = dict(dvae_state)
    edit(state)
    with pytest.raises(ConversionError, match=match):
        mm.convert(save_state(state, tmp_path / "dvae.pt", "pt"), tmp_path / "out")


def test_corrupt_and_unreadable_sources(taming_file, tmp_path, capsys):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(taming_file.read_bytes()[:2000])
    with pytest.raises(ConversionError, match="unrecognized"):
        mm.convert(cut, tmp_path / "out")
    err = cli_error(capsys, ["convert", cut, tmp_path / "out", "--from", "taming-vqgan"])
    assert "corrupt or truncated PyTorch file" in err
    st = save_state({"decoder.conv_in.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "w.safetensors", "safetensors")
    st.write_bytes(st.read_bytes()[:-20])
    with pytest.raises(ConversionError, match="corrupt or truncated safetensors"):
        mm.convert(st, tmp_path / "out", source_format="openai-dvae")
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ConversionError, match="not a safetensors or PyTorch weights file"):
        mm.convert(text, tmp_path / "out", source_format="taming-vqgan")
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(taming_file, two / "a.ckpt")
    shutil.copy(taming_file, two / "b.ckpt")
    with pytest.raises(ConversionError, match="expected one safetensors or PyTorch weights file.*found 2"):
        mm.convert(two, tmp_path / "out", source_format="taming-vqgan")
    assert not (tmp_path / "out").exists()


def test_pickles_need_trust(taming_file, dvae_state, tmp_path, capsys):
    from dall_e import Decoder

    module = Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    module.load_state_dict(dvae_state)
    pkl = tmp_path / "decoder.pkl"
    torch.save(module, pkl)
    err = cli_error(capsys, ["convert", pkl, tmp_path / "out"])
    assert "refused to load" in err and "--trust-pickle" in err
    # a Lightning checkpoint with pickled objects beside the weights (hyper-parameters, callbacks)
    data = torch.load(taming_file, weights_only=True)
    data["hyper_parameters"] = argparse.Namespace(lr=1e-4)
    torch.save(data, tmp_path / "objects.ckpt")
    with pytest.raises(ConversionError, match="refused to load.*--trust-pickle"):
        mm.convert(tmp_path / "objects.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    mm.load(mm.convert(tmp_path / "objects.ckpt", tmp_path / "out", trust_pickle=True))


# --- bad checkpoints and bad tokens ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dvae_engine(dvae_state, tmp_path_factory):
    root = tmp_path_factory.mktemp("dvae")
    return mm.convert(save_state(dvae_state, root / "dvae.pt", "pt"), root / "engine")


@pytest.fixture(scope="module")
def dvae_pipe(dvae_engine):
    return mm.load(dvae_engine)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["detokenizer"].update(vqgan={"codebook_size": 4, "embed_dim": 4, "z_channels": 4, "ch": 32,
                                              "ch_mult": [1], "num_res_blocks": 1}), "exactly the 'dvae' sub-config"),
    (lambda c: c["detokenizer"]["dvae"].update(colour=1), "detokenizer.dvae: unknown field"),
    (lambda c: c.update(architecture="vqgan"), "differs from detokenizer.architecture"),
    (lambda c: c["detokenizer"]["dvae"].update(n_hid=66), "multiple of 4"),
    (lambda c: c["detokenizer"]["dvae"].update(n_blk_per_group=2), "missing tensor"),
    (lambda c: c["detokenizer"]["dvae"].update(n_init="8"), "n_init: Input should be a valid integer"),
])
def test_invalid_detokenizer_checkpoint(dvae_engine, tmp_path, edit, match):
    ckpt = shutil.copytree(dvae_engine, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        mm.load(ckpt)


@pytest.mark.parametrize("tokens,match", [
    (torch.full((1, 2, 2), 512), r"must be in \[0, 512\), got values in \[512, 512\]"),
    (torch.tensor([[[0, -1]]]), r"got values in \[-1, 0\]"),
    (torch.zeros(1, 2, 2), "integer dtype, got float32"),
    (torch.zeros(1, 2, 2, dtype=torch.bool), "integer dtype, got bool"),
    (torch.zeros(4, dtype=torch.long), r"\[B, h, w\] or \[B, h\*w\], got shape \(4,\)"),
    (torch.zeros(1, 1, 2, 2, dtype=torch.long), "got shape"),
    (torch.zeros(2, 15, dtype=torch.long), "15 image tokens per row are not a square grid"),
    (torch.zeros(0, 16, dtype=torch.long), "empty"),
    ([[1, 2], [3, 4]], "got list"),
])
def test_bad_tokens(dvae_pipe, tokens, match):
    with pytest.raises(InputError, match=match):
        dvae_pipe.decode_tokens(tokens)


def test_token_forms_agree(dvae_pipe):
    tokens = torch.randint(0, 512, (2, 3, 3))
    grid = dvae_pipe.decode_tokens(tokens)
    assert torch.equal(dvae_pipe.decode_tokens(tokens.view(2, 9).int()), grid)
    assert torch.equal(dvae_pipe.decode_tokens(tokens.numpy()), grid)
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        to_pil(grid[:, :2])
