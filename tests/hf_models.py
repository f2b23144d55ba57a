"""Tiny random Hugging Face VisionEncoderDecoder (ViT + GPT-2) models for parity tests.

``initializer_range`` 0.5 makes the random models opinionated, so greedy decoding produces varied
tokens instead of immediately ending.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                          VisionEncoderDecoderModel)

START, EOS, PAD = 1, 2, 0
VOCAB = 99
IMAGE = 32


def make_tokenizer() -> Tokenizer:
    vocab = {"<pad>": PAD, "<s>": START, "</s>": EOS}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    return tok


def make_model(enc_width=32, dec_width=48, seed=0, tie=True, qkv_bias=True, inverse_layer_scale=False,
               activation="gelu_new", enc_layers=2, dec_layers=2, init=0.5) -> VisionEncoderDecoderModel:
    torch.manual_seed(seed)
    enc = ViTConfig(hidden_size=enc_width, num_hidden_layers=enc_layers, num_attention_heads=2,
                    intermediate_size=37, image_size=IMAGE, patch_size=8, initializer_range=init,
                    qkv_bias=qkv_bias)
    dec = GPT2Config(n_embd=dec_width, n_layer=dec_layers, n_head=4, vocab_size=VOCAB, n_positions=40,
                     add_cross_attention=True, is_decoder=True, initializer_range=init,
                     bos_token_id=START, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tie,
                     scale_attn_by_inverse_layer_idx=inverse_layer_scale, activation_function=activation)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = START, EOS, PAD
    model = VisionEncoderDecoderModel(cfg).eval()
    with torch.no_grad():
        if not tie:  # give the untied head its own values
            model.decoder.lm_head.weight.normal_(0, init)
        # damp the special tokens so that greedy output is long and varied, not an immediate end
        model.decoder.lm_head.weight[[PAD, START, EOS]] *= 0.2
    return model


def save(model: VisionEncoderDecoderModel, path: Path, names: str = "v4", weights: str = "safetensors") -> Path:
    """Save as an HF directory with transformers v4 key names (what ``save_pretrained`` writes) or
    v5 names (the in-memory module names), as safetensors or ``pytorch_model.bin``."""
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    make_tokenizer().save(str(path / "tokenizer.json"))
    if names == "v5":
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
    if weights == "bin":
        state = load_file(str(path / "model.safetensors"))
        (path / "model.safetensors").unlink()
        torch.save(state, path / "pytorch_model.bin")
    return path
