"""Tiny random LLaVA-1.5 models (transformers' ``LlavaForConditionalGeneration``: CLIP vision tower,
projector, LLaMA) and a LLaMA-style ``tokenizer.json`` (BPE over characters with the Metaspace
pre-tokenizer, byte fallback, ``<s>`` added in front by its post-processor, ``<image>`` and
``<pad>`` as added special tokens), for the ``hf-llava`` parity tests."""
from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

UNK, BOS, EOS = 0, 1, 2
VOCAB = 128
IMAGE_TOKEN, PAD = 126, 127
IMAGE = 32
PATCH = 8


def make_llama_tokenizer() -> Tokenizer:
    """Characters as tokens (ids 3..), fillers up to id 125, ``<image>`` 126, ``<pad>`` 127."""
    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS}
    for ch in ["▁", "\n", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab[ch] = len(vocab)
    while len(vocab) < IMAGE_TOKEN:
        vocab[f"f{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<s>", special=True),
                            AddedToken("</s>", special=True), AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN and tok.token_to_id("<pad>") == PAD
    return tok


def make_llava(seed=0, kv_heads=2, heads=4, rope=None, layers=2, vision_layers=3, feature_layer=-2,
               strategy="default", tie=False, init=0.2, text_width=64, attention_bias=False, mlp_bias=False,
               projector_bias=True):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=IMAGE, patch_size=PATCH, projection_dim=16,
                              initializer_range=init)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=text_width, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=160,
                       rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
                       initializer_range=init, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                       tie_word_embeddings=tie, attention_bias=attention_bias, mlp_bias=mlp_bias)
    image_tokens = (IMAGE // PATCH) ** 2 + (strategy == "full")
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      image_seq_length=image_tokens, vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=strategy, tie_word_embeddings=tie,
                      multimodal_projector_bias=projector_bias)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    with torch.no_grad():
        head = model.lm_head.weight
        head[[UNK, BOS, IMAGE_TOKEN, PAD]] *= 0.1  # rarely generated, as in a trained model
    return model


def save_llava(model, path: Path, processor: str = "clip", pad: bool = False, crop: int = 0) -> Path:
    """An HF directory: weights and config (``save_pretrained``), ``tokenizer.json`` and the image
    processor's config (CLIPImageProcessor, or LlavaImageProcessor with ``do_pad``); ``crop``: the
    shortest edge is resized to IMAGE + crop before the center crop."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor
    model.save_pretrained(path)
    cls = CLIPImageProcessor if processor == "clip" else LlavaImageProcessor
    extra = {"do_pad": pad} if processor == "llava" else {}
    cls(size={"shortest_edge": IMAGE + crop}, crop_size={"height": IMAGE, "width": IMAGE}, **extra
        ).save_pretrained(path)
    make_llama_tokenizer().save(str(path / "tokenizer.json"))
    return path


def hf_processor(path: Path, strategy: str = "default"):
    """transformers' LlavaProcessor over the saved directory's image processor and tokenizer."""
    from transformers import AutoImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=1)
