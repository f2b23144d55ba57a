"""Typed, validated configuration dataclasses of engine checkpoints.

``config.json`` of an engine checkpoint is the JSON form of one top-level config (for now
:class:`CaptioningConfig`). ``from_dict`` rejects unknown keys, missing keys, wrong types and
out-of-range values with a :class:`~mmgen_engine.errors.CheckpointError` naming the field, so a bad
checkpoint fails at load time with one clear line instead of deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from .errors import CheckpointError

FORMAT_NAME = "mmgen"
FORMAT_VERSION = 1
TASKS = ("captioning", "text-to-image", "speech-to-gesture", "image-detokenizer")
DTYPES = ("float32", "float16", "bfloat16")
ACTIVATIONS = ("gelu", "gelu_tanh")


def _check_type(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, where)
            except CheckpointError:
                continue
        raise CheckpointError(f"{where}: {value!r} is not of type {tp}")
    if tp is type(None):
        if value is not None:
            raise CheckpointError(f"{where}: expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: expected an object, got {value!r}")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CheckpointError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise CheckpointError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from ``data``, checking keys and types, then ``cls.validate()``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CheckpointError(f"{where}: missing field {name!r}")
    obj = cls(**kwargs)
    obj.validate(where)
    return obj


def _positive(where: str, **values):
    for name, v in values.items():
        if v is None or v <= 0:
            raise CheckpointError(f"{where}.{name} must be positive, got {v!r}")


def _check_transformer(where: str, hidden_size: int, num_heads: int, activation: str):
    if hidden_size % num_heads:
        raise CheckpointError(f"{where}: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{where}.activation must be one of {ACTIVATIONS}, got {activation!r}")


@dataclass(frozen=True)
class ViTConfig:
    """ViT image encoder (patch embedding + CLS token + learned positions + pre-LN blocks)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, where: str):
        _positive(where, hidden_size=self.hidden_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                  image_size=self.image_size, patch_size=self.patch_size,
                  num_channels=self.num_channels, layer_norm_eps=self.layer_norm_eps)
        _check_transformer(where, self.hidden_size, self.num_heads, self.activation)
        if self.image_size % self.patch_size:
            raise CheckpointError(f"{where}: image_size {self.image_size} is not divisible by patch_size {self.patch_size}")


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 decoder with cross-attention blocks (ln_1 > attn, ln_cross > cross-attn, ln_2 > mlp)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, where: str):
        _positive(where, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  num_layers=self.num_layers, num_heads=self.num_heads,
                  intermediate_size=self.intermediate_size, max_positions=self.max_positions,
                  layer_norm_eps=self.layer_norm_eps)
        _check_transformer(where, self.hidden_size, self.num_heads, self.activation)


@dataclass(frozen=True)
class GenerationConfig:
    """Special token ids of text generation."""

    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int

    def validate(self, where: str):
        for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) < 0:
                raise CheckpointError(f"{where}.{name} must be >= 0")


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """Resize (PIL, ``resample`` is a PIL filter id) > rescale > normalize, as ViTImageProcessor does."""

    height: int
    width: int
    resample: int = 2
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def validate(self, where: str):
        _positive(where, height=self.height, width=self.width)
        if self.resample not in range(6):
            raise CheckpointError(f"{where}.resample must be a PIL filter id 0..5, got {self.resample}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise CheckpointError(f"{where}: image_mean/image_std must be 3 values, std > 0")


@dataclass(frozen=True)
class CaptioningConfig:
    """An image-captioning checkpoint: ViT encoder, optional width projection, GPT-2 decoder."""

    format: str
    format_version: int
    task: str
    architecture: str
    source_format: str
    dtype: str
    encoder: ViTConfig
    decoder: GPT2Config
    generation: GenerationConfig
    preprocess: ImagePreprocessConfig
    enc_to_dec_proj: bool = False

    def validate(self, where: str):
        if self.task != "captioning":
            raise CheckpointError(f"{where}.task must be 'captioning', got {self.task!r}")
        if self.architecture != "vit-gpt2":
            raise CheckpointError(f"{where}: unknown captioning architecture {self.architecture!r}")
        if self.dtype not in DTYPES:
            raise CheckpointError(f"{where}.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.enc_to_dec_proj and self.encoder.hidden_size != self.decoder.hidden_size:
            raise CheckpointError(
                f"{where}: encoder width {self.encoder.hidden_size} != decoder width "
                f"{self.decoder.hidden_size} and no enc_to_dec_proj")
        if self.encoder.num_channels != 3:
            raise CheckpointError(f"{where}.encoder.num_channels must be 3 (RGB input), got {self.encoder.num_channels}")
        p, size = self.preprocess, self.encoder.image_size
        if p.do_resize and (p.height, p.width) != (size, size):
            raise CheckpointError(f"{where}.preprocess resizes to {p.height}x{p.width} but the encoder takes "
                                  f"{size}x{size}")
        for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.generation, name) >= self.decoder.vocab_size:
                raise CheckpointError(f"{where}.generation.{name} is outside the vocabulary "
                                      f"of {self.decoder.vocab_size}")


# task -> top-level config class; the one place a task name chooses a config type.
CONFIG_CLASSES = {"captioning": CaptioningConfig}
