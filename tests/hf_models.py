"""Tiny random Hugging Face captioners for parity tests: VisionEncoderDecoder (ViT + GPT-2), BLIP,
GIT, and ClipCap (its published modules over transformers' GPT-2 and CLIP).

``initializer_range`` 0.5 makes the random models opinionated, so greedy decoding produces varied
tokens instead of immediately ending.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

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


# ---- BLIP, GIT, ClipCap ---------------------------------------------------------------------------
# BERT-style special ids of the tiny tokenizers: [PAD] 0, [UNK] 1, [SEP] 2, [CLS] 3, BLIP's [DEC] 4
BERT_PAD, BERT_SEP, BERT_CLS, BLIP_BOS = 0, 2, 3, 4
BERT_VOCAB = 120


def make_wordpiece_tokenizer(vocab_size: int = BERT_VOCAB) -> Tokenizer:
    """A BERT-style tokenizer: words ``w5 .. w{n}``, lower-casing BertNormalizer, WordPiece decoding."""
    vocab = {"[PAD]": BERT_PAD, "[UNK]": 1, "[SEP]": BERT_SEP, "[CLS]": BERT_CLS, "[DEC]": BLIP_BOS}
    for i in range(5, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[DEC]"])
    return tok


def make_blip(seed=0, vision_width=32, text_width=48, init=0.5, tie=True, vocab=BERT_VOCAB, layers=2):
    from transformers import BlipConfig, BlipForConditionalGeneration
    torch.manual_seed(seed)
    cfg = BlipConfig(
        vision_config=dict(hidden_size=vision_width, intermediate_size=37, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=IMAGE, patch_size=8, initializer_range=init),
        text_config=dict(vocab_size=vocab, hidden_size=text_width, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40, bos_token_id=BLIP_BOS,
                         sep_token_id=BERT_SEP, pad_token_id=BERT_PAD, initializer_range=init,
                         tie_word_embeddings=tie),
        tie_word_embeddings=tie)
    model = BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a random head bias and damped special tokens: long, varied greedy output
        model.text_decoder.cls.predictions.bias.normal_(0, 0.1)
        model.text_decoder.cls.predictions.bias[[BERT_PAD, BERT_SEP]] -= 1
    return model


def save_blip(model, path: Path, vocab_txt: bool = False) -> Path:
    from transformers import BlipImageProcessor
    model.save_pretrained(path)
    BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    _save_bert_tokenizer(path, vocab_txt, model.config.text_config.vocab_size)
    return path


def _save_bert_tokenizer(path: Path, vocab_txt: bool, vocab_size: int) -> None:
    tok = make_wordpiece_tokenizer(vocab_size)
    if vocab_txt:  # the slow tokenizer's files: vocab.txt in id order
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        (path / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab))
    else:
        tok.save(str(path / "tokenizer.json"))


def make_git(seed=0, vision_width=32, text_width=48, init=0.5, tie=False, layers=2):
    from transformers import GitConfig, GitForCausalLM
    torch.manual_seed(seed)
    cfg = GitConfig(
        vision_config=dict(hidden_size=vision_width, intermediate_size=37, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=IMAGE, patch_size=8, initializer_range=init),
        vocab_size=BERT_VOCAB, hidden_size=text_width, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, initializer_range=init, bos_token_id=BERT_CLS,
        eos_token_id=BERT_SEP, pad_token_id=BERT_PAD, tie_word_embeddings=tie)
    model = GitForCausalLM(cfg).eval()
    with torch.no_grad():
        model.output.bias.normal_(0, 0.1)
        model.output.bias[[BERT_PAD, BERT_SEP]] -= 1
    return model


def save_git(model, path: Path, crop: bool = False) -> Path:
    """With ``crop`` the processor resizes the shortest edge to IMAGE + 8 and center-crops IMAGE."""
    from transformers import CLIPImageProcessor
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE + 8 * crop},
                       crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    _save_bert_tokenizer(path, False, model.config.vocab_size)
    return path


# ClipCap (github.com/rmokady/CLIP_prefix_caption) is not packaged: its two modules, as published
class ClipCapMLP(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(torch.nn.Linear(sizes[i], sizes[i + 1], bias=True))
            if i < len(sizes) - 2:
                layers.append(torch.nn.Tanh())
        self.model = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class ClipCaptionModel(torch.nn.Module):
    def __init__(self, prefix_length, gpt, prefix_size, hidden=None):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = gpt
        d = gpt.transformer.wte.weight.shape[1]
        sizes = (prefix_size, (d * prefix_length) // 2, d * prefix_length) if hidden is None else \
            (prefix_size, *hidden, d * prefix_length)
        self.clip_project = ClipCapMLP(sizes)


CLIPCAP_STOP = 13  # "." in the tiny GPT-2-style vocabulary, as in GPT-2's


def make_clipcap(seed=0, prefix_length=4, projection_dim=24, init=0.2, hidden=None):
    """``(ClipCaptionModel, CLIPVisionModelWithProjection)`` with tiny random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, GPT2LMHeadModel
    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=40,
                                     initializer_range=init))
    model = ClipCaptionModel(prefix_length, gpt, projection_dim, hidden).eval()
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
        patch_size=8, projection_dim=projection_dim, initializer_range=init)).eval()
    with torch.no_grad():
        gpt.lm_head.weight[CLIPCAP_STOP] *= 0.2
    return model, clip


def save_clipcap(model, clip, path: Path, weights: str = "pt", stop: int = CLIPCAP_STOP) -> Path:
    """ClipCap's files; the tokenizer spells token ``stop`` "." (ClipCap's stop token)."""
    from transformers import CLIPImageProcessor
    path.mkdir(parents=True)
    state = model.state_dict()
    if weights == "pt":
        torch.save(state, path / "coco_weights.pt")
    else:
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path / "coco_weights.safetensors"))
    clip.save_pretrained(path / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
                       ).save_pretrained(path / "clip")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    del vocab[f"t{stop}"]
    vocab["."] = stop
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path / "tokenizer.json"))
    return path


def clipcap_prefix(model, clip, pixel_values):
    """ClipCap's prefix embeddings ``[B, P, D]`` from CLIP's image embedding, as its predict.py makes them."""
    with torch.no_grad():
        return model.clip_project(clip(pixel_values=pixel_values).image_embeds).view(
            pixel_values.shape[0], model.prefix_length, -1)


def engine_logits(pipe, pixel_values, tokens):
    """Logits the engine assigns after every position of ``tokens [B, T]``: prefill (with the image
    prefix or cross-attention states) on the first token, decode steps on the rest."""
    from mmgen_engine.runtime import CrossKVCache, KVCache
    model = pipe.model
    dec = model.decoder
    with torch.inference_mode():
        states = model.encode(pixel_values)
        b, t = tokens.shape
        prefix = states.shape[1] if dec.uses_prefix else 0
        layers, heads, head_dim, _ = dec.cache_geometry()
        cache = KVCache.allocate(layers, b, heads, prefix + t, head_dim, states.dtype, states.device)
        lengths = torch.full((b,), states.shape[1])
        cross = CrossKVCache.allocate(layers, lengths, heads, 0 if dec.uses_prefix else states.shape[1], head_dim,
                                      states.dtype, states.device)
        out = [dec.prefill(tokens[:, :1], states, cache, cross)]
        for i in range(1, t):
            cache.span = prefix + i + 1
            out.append(dec.decode_step(tokens[:, i], torch.full((b,), prefix + i), cache, cross))
    return torch.stack(out, dim=1)


def padded(seq: torch.Tensor, length: int, pad: int) -> torch.Tensor:
    """``seq [B, n]`` padded with ``pad`` to ``[B, length]`` (HF generate stops when every row is done)."""
    return torch.cat([seq, torch.full((seq.shape[0], length - seq.shape[1]), pad, dtype=seq.dtype)], dim=1)
