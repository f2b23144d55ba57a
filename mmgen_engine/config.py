"""Typed, validated configuration dataclasses of engine checkpoints.

``config.json`` of an engine checkpoint is the JSON form of one top-level config (e.g.
:class:`CaptioningConfig`). ``from_dict`` rejects unknown keys, missing keys, wrong types and
out-of-range values with a :class:`~mmgen_engine.errors.CheckpointError` naming the field, so a bad
checkpoint fails at load time with one clear line instead of deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from .errors import CheckpointError
from .gesture_format import PARENTS

FORMAT_NAME = "mmgen"
FORMAT_VERSION = 1
TASKS = ("captioning", "text-to-image", "speech-to-gesture", "image-detokenizer")
DTYPES = ("float32", "float16", "bfloat16")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def _check_type(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:  # X | None: report X's own error, not a generic type mismatch
            return _check_type(value, args[0], where)
        if isinstance(value, dict) and all(dataclasses.is_dataclass(a) for a in args):
            # an object: parse it as the alternative it fits best (fewest unknown fields; a tie goes
            # on to trying each), so that a bad value gets that config's own error message
            unknown = [len(set(value) - {f.name for f in dataclasses.fields(a)}) for a in args]
            if unknown.count(min(unknown)) == 1:
                return _check_type(value, args[unknown.index(min(unknown))], where)
        for arg in args:
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
    """ViT image encoder (patch embedding + CLS token + learned positions + pre-LN blocks + final
    LayerNorm): ViT, BLIP's vision model, and with ``patch_bias`` off, ``pre_norm`` on and the
    quick GELU, the CLIP vision tower (GIT, ClipCap)."""

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
    patch_bias: bool = True
    pre_norm: bool = False  # CLIP's LayerNorm on the embeddings before the first block

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
class TextDecoderConfig:
    """The sizes every text decoder has; a family's config adds its own fields."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float
    activation: str

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
class GPT2Config(TextDecoderConfig):
    """GPT-2 decoder: blocks ln_1 > attn, (ln_cross > cross-attn,) ln_2 > mlp. Without
    ``cross_attention`` the encoder states are a prefix of input embeddings (ClipCap)."""

    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    cross_attention: bool = True


@dataclass(frozen=True)
class BertConfig(TextDecoderConfig):
    """BERT-style post-LayerNorm text decoder (BLIP's text decoder, GIT's): embeddings + LayerNorm,
    blocks ``h = ln(h + attn(h)); (h = ln(h + cross(h));) h = ln(h + mlp(h))``, then the head.
    ``encoder_hidden_size`` set: cross-attention to encoder states of that width (BLIP); None: the
    encoder states are a bidirectional prefix in front of the causal text (GIT), and the text
    positions count the text only. ``head_transform``: BERT's LM head ``ln(act(dense(h)))`` before
    the vocabulary projection (BLIP); the projection is tied to the word embeddings when
    ``tie_word_embeddings`` and always has a bias."""

    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    encoder_hidden_size: int | None = None
    head_transform: bool = False
    tie_word_embeddings: bool = False

    def validate(self, where: str):
        super().validate(where)
        if self.encoder_hidden_size is not None:
            _positive(where, encoder_hidden_size=self.encoder_hidden_size)


@dataclass(frozen=True)
class GenerationConfig:
    """Special token ids of text generation. ``decoder_start_token_id`` None: no start token, the
    first token follows the image prefix directly (ClipCap). ``include_eos``: the stop token is part
    of the text (ClipCap stops at its ".")."""

    decoder_start_token_id: int | None
    eos_token_id: int
    pad_token_id: int
    include_eos: bool = False

    def validate(self, where: str):
        for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise CheckpointError(f"{where}.{name} must be >= 0")


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """Resize (PIL, ``resample`` is a PIL filter id) > rescale > normalize, as ViTImageProcessor and
    BlipImageProcessor do. With ``shortest_edge`` the resize keeps the aspect ratio and makes the
    shorter side that long, then a center crop cuts ``height x width`` (CLIPImageProcessor)."""

    height: int
    width: int
    resample: int = 2
    shortest_edge: int | None = None
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
        if self.shortest_edge is not None and not (self.do_resize and max(self.height, self.width)
                                                   <= self.shortest_edge):
            raise CheckpointError(f"{where}: a {self.height}x{self.width} center crop needs a resize whose "
                                  f"shortest edge ({self.shortest_edge}) is at least as long")


@dataclass(frozen=True)
class CheckpointConfig:
    """The fields every top-level checkpoint config starts with; a subclass names its ``TASK`` and
    ``ARCHITECTURES`` and calls :meth:`validate_header` from its ``validate``."""

    format: str
    format_version: int
    task: str
    architecture: str
    source_format: str
    dtype: str

    TASK: typing.ClassVar[str] = ""
    ARCHITECTURES: typing.ClassVar[tuple[str, ...]] = ()

    def validate_header(self, where: str):
        if self.task != self.TASK:
            raise CheckpointError(f"{where}.task must be {self.TASK!r}, got {self.task!r}")
        if self.architecture not in self.ARCHITECTURES:
            raise CheckpointError(f"{where}: unknown {self.TASK} architecture {self.architecture!r}")
        if self.dtype not in DTYPES:
            raise CheckpointError(f"{where}.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class CaptioningConfig(CheckpointConfig):
    """An image-captioning checkpoint: a ViT-family image encoder and a text decoder.

    - ``vit-gpt2``: GPT-2 with cross-attention to the ViT states (through a linear
      ``enc_to_dec_proj`` when the widths differ);
    - ``blip``: BLIP's BERT decoder with cross-attention to the ViT states;
    - ``git``: the CLIP tower's states, projected (linear + LayerNorm), are a bidirectional prefix of
      GIT's BERT decoder;
    - ``clipcap``: the CLIP image embedding (the final-normed CLS state times ``projection_dim``
      projection) goes through an MLP with tanh between layers (``mapper_sizes``, input first) to
      ``prefix_length`` GPT-2 input embeddings, a causal prefix of a GPT-2 without cross-attention.
    """

    encoder: ViTConfig
    decoder: GPT2Config | BertConfig
    generation: GenerationConfig
    preprocess: ImagePreprocessConfig
    enc_to_dec_proj: bool = False
    projection_dim: int | None = None
    mapper_sizes: list[int] = field(default_factory=list)
    prefix_length: int = 0

    TASK = "captioning"
    ARCHITECTURES = ("vit-gpt2", "blip", "git", "clipcap")
    DECODERS: typing.ClassVar[dict] = {"vit-gpt2": "GPT2Config", "blip": "BertConfig", "git": "BertConfig",
                                       "clipcap": "GPT2Config"}

    def validate(self, where: str):
        self.validate_header(where)
        arch, enc, dec = self.architecture, self.encoder, self.decoder
        if type(dec).__name__ != self.DECODERS[arch]:
            raise CheckpointError(f"{where}.decoder: architecture {arch!r} needs a {self.DECODERS[arch]} decoder")
        cross = dec.cross_attention if isinstance(dec, GPT2Config) else dec.encoder_hidden_size is not None
        if cross != (arch in ("vit-gpt2", "blip")):
            raise CheckpointError(f"{where}.decoder: architecture {arch!r} "
                                  f"{'needs' if arch in ('vit-gpt2', 'blip') else 'has no'} cross-attention")
        if arch == "vit-gpt2" and not self.enc_to_dec_proj and enc.hidden_size != dec.hidden_size:
            raise CheckpointError(f"{where}: encoder width {enc.hidden_size} != decoder width "
                                  f"{dec.hidden_size} and no enc_to_dec_proj")
        if self.enc_to_dec_proj and arch != "vit-gpt2":
            raise CheckpointError(f"{where}: enc_to_dec_proj is a vit-gpt2 field")
        if arch == "blip" and dec.encoder_hidden_size != enc.hidden_size:
            raise CheckpointError(f"{where}: the decoder cross-attends to {dec.encoder_hidden_size}-wide states "
                                  f"but the encoder is {enc.hidden_size} wide")
        if arch == "clipcap":
            _positive(where, projection_dim=self.projection_dim, prefix_length=self.prefix_length)
            m = self.mapper_sizes
            if len(m) < 2 or min(m) <= 0 or m[0] != self.projection_dim or m[-1] != self.prefix_length * dec.hidden_size:
                raise CheckpointError(f"{where}.mapper_sizes must run from projection_dim {self.projection_dim} to "
                                      f"prefix_length x decoder width = {self.prefix_length * dec.hidden_size}, "
                                      f"got {m}")
        elif self.projection_dim is not None or self.mapper_sizes or self.prefix_length:
            raise CheckpointError(f"{where}: projection_dim, mapper_sizes and prefix_length are clipcap fields")
        if enc.num_channels != 3:
            raise CheckpointError(f"{where}.encoder.num_channels must be 3 (RGB input), got {enc.num_channels}")
        p, size = self.preprocess, enc.image_size
        if (p.do_resize or p.shortest_edge) and (p.height, p.width) != (size, size):
            raise CheckpointError(f"{where}.preprocess makes {p.height}x{p.width} images but the encoder takes "
                                  f"{size}x{size}")
        gen = self.generation
        if gen.decoder_start_token_id is None and arch != "clipcap":
            raise CheckpointError(f"{where}.generation.decoder_start_token_id is required for {arch!r}")
        for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(gen, name)
            if value is not None and value >= dec.vocab_size:
                raise CheckpointError(f"{where}.generation.{name} is outside the vocabulary of {dec.vocab_size}")


@dataclass(frozen=True)
class BartConfig:
    """One half of min-dalle's BART: pre- and post-LayerNorm attention blocks (bias-free), the GLU
    feed-forward, learned positions and LayerNorms after the embedding and at the end."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    glu_size: int
    max_positions: int
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, where: str):
        _positive(where, vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, glu_size=self.glu_size, max_positions=self.max_positions,
                  layer_norm_eps=self.layer_norm_eps)
        if self.hidden_size % self.num_heads:
            raise CheckpointError(f"{where}: hidden_size {self.hidden_size} is not divisible by num_heads "
                                  f"{self.num_heads}")


@dataclass(frozen=True)
class ImageGenerationConfig:
    """How image tokens are generated: the decoder starts from ``bos_token_id`` and samples among codes
    ``0..image_vocab_size-1``, ``grid_size**2`` of them (row-major); the text rows are padded with
    ``text_pad_token_id`` to the encoder's ``max_positions``."""

    bos_token_id: int
    image_vocab_size: int
    grid_size: int
    text_pad_token_id: int = 1

    def validate(self, where: str):
        _positive(where, image_vocab_size=self.image_vocab_size, grid_size=self.grid_size)
        if self.bos_token_id < 0 or self.text_pad_token_id < 0:
            raise CheckpointError(f"{where}: token ids must be >= 0")


@dataclass(frozen=True)
class TextToImageConfig(CheckpointConfig):
    """A text-to-image checkpoint: min-dalle's BART encoder/decoder and an image detokenizer."""

    encoder: BartConfig
    decoder: BartConfig
    generation: ImageGenerationConfig
    detokenizer: "DetokenizerConfig"

    TASK = "text-to-image"
    ARCHITECTURES = ("dalle-bart",)

    def validate(self, where: str):
        self.validate_header(where)
        enc, dec, gen = self.encoder, self.decoder, self.generation
        if enc.hidden_size != dec.hidden_size:
            raise CheckpointError(f"{where}: encoder width {enc.hidden_size} != decoder width {dec.hidden_size}")
        if gen.grid_size ** 2 != dec.max_positions:
            raise CheckpointError(f"{where}: a {gen.grid_size}x{gen.grid_size} token grid needs "
                                  f"{gen.grid_size ** 2} decoder positions, the decoder has {dec.max_positions}")
        if not gen.image_vocab_size <= dec.vocab_size or gen.bos_token_id >= dec.vocab_size:
            raise CheckpointError(f"{where}.generation: image_vocab_size and bos_token_id must lie in the "
                                  f"decoder's vocabulary of {dec.vocab_size}")
        if gen.text_pad_token_id >= enc.vocab_size:
            raise CheckpointError(f"{where}.generation.text_pad_token_id is outside the text vocabulary")
        if gen.image_vocab_size > self.detokenizer.codebook_size:
            raise CheckpointError(f"{where}: the decoder samples {gen.image_vocab_size} codes but the "
                                  f"detokenizer has {self.detokenizer.codebook_size}")


VQGAN_OUTPUTS = ("minus1_1", "0_1")
DETOKENIZER_ARCHITECTURES = ("vqgan", "dvae")


@dataclass(frozen=True)
class VQGANConfig:
    """Taming-transformers VQGAN decoder: codebook -> post_quant_conv -> conv_in -> mid (ResNet,
    attention, ResNet) -> ``len(ch_mult)`` levels, highest first, of ``num_res_blocks + 1`` ResNet
    blocks (+ attention on ``attn_levels``) and a 2x upsample on every level but 0 -> GroupNorm +
    SiLU -> conv_out. Level ``i`` is ``ch * ch_mult[i]`` wide. ``output`` maps the conv's output to
    pixels: ``"minus1_1"`` ``clamp((x + 1) / 2, 0, 1)`` (taming), ``"0_1"`` ``clamp(x, 0, 1)``
    (min-dalle)."""

    codebook_size: int
    embed_dim: int
    z_channels: int
    ch: int
    ch_mult: list[int]
    num_res_blocks: int
    attn_levels: list[int] = field(default_factory=list)
    out_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    output: str = "minus1_1"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self, where: str):
        _positive(where, codebook_size=self.codebook_size, embed_dim=self.embed_dim,
                  z_channels=self.z_channels, ch=self.ch, norm_groups=self.norm_groups, norm_eps=self.norm_eps)
        if self.num_res_blocks < 0:  # taming allows 0: one ResNet block per level
            raise CheckpointError(f"{where}.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not self.ch_mult or min(self.ch_mult) <= 0:
            raise CheckpointError(f"{where}.ch_mult must be a non-empty list of positive integers, got {self.ch_mult}")
        levels = range(len(self.ch_mult))
        if len(set(self.attn_levels)) != len(self.attn_levels) or any(i not in levels for i in self.attn_levels):
            raise CheckpointError(f"{where}.attn_levels must be distinct levels in 0..{len(self.ch_mult) - 1}, "
                                  f"got {self.attn_levels}")
        bad = sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups})
        if bad:
            raise CheckpointError(f"{where}: channel count(s) {bad} are not divisible into {self.norm_groups} "
                                  f"GroupNorm groups")
        if self.out_channels != 3:
            raise CheckpointError(f"{where}.out_channels must be 3 (RGB), got {self.out_channels}")
        if self.output not in VQGAN_OUTPUTS:
            raise CheckpointError(f"{where}.output must be one of {VQGAN_OUTPUTS}, got {self.output!r}")


@dataclass(frozen=True)
class DVAEConfig:
    """OpenAI DALL-E dVAE decoder: code embedding (the one-hot 1x1 input conv) -> ``group_count``
    groups of ``n_blk_per_group`` residual blocks, group ``g`` (1-based) ``n_hid * 2**(group_count
    - g)`` wide, a 2x nearest upsample after every group but the last -> ReLU + 1x1 conv to
    ``2 * output_channels`` (logit-Laplace location and scale; the location is the image)."""

    vocab_size: int
    n_init: int
    n_hid: int
    n_blk_per_group: int
    group_count: int = 4
    output_channels: int = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def post_gain(self) -> float:
        """Weight of a block's residual path: ``1 / (number of blocks)**2``."""
        return 1 / (self.group_count * self.n_blk_per_group) ** 2

    def validate(self, where: str):
        _positive(where, vocab_size=self.vocab_size, n_init=self.n_init, n_hid=self.n_hid,
                  n_blk_per_group=self.n_blk_per_group, group_count=self.group_count)
        if self.n_hid % 4:
            raise CheckpointError(f"{where}.n_hid must be a multiple of 4 (a block's hidden width is a "
                                  f"quarter of its output), got {self.n_hid}")
        if self.output_channels != 3:
            raise CheckpointError(f"{where}.output_channels must be 3 (RGB), got {self.output_channels}")


@dataclass(frozen=True)
class DetokenizerConfig:
    """The image detokenizer: image token ids ``[B, h, w]`` -> pixels; exactly the sub-config named by
    ``architecture`` is set."""

    architecture: str
    vqgan: VQGANConfig | None = None
    dvae: DVAEConfig | None = None

    @property
    def model(self) -> VQGANConfig | DVAEConfig:
        """The config of the architecture in use."""
        return self.vqgan if self.architecture == "vqgan" else self.dvae

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side."""
        return self.model.downsample_factor

    @property
    def codebook_size(self) -> int:
        """Number of distinct image token ids."""
        return self.vqgan.codebook_size if self.architecture == "vqgan" else self.dvae.vocab_size

    def validate(self, where: str):
        if self.architecture not in DETOKENIZER_ARCHITECTURES:
            raise CheckpointError(f"{where}.architecture must be one of {DETOKENIZER_ARCHITECTURES}, "
                                  f"got {self.architecture!r}")
        for name in DETOKENIZER_ARCHITECTURES:
            if (getattr(self, name) is None) == (name == self.architecture):
                raise CheckpointError(f"{where}: architecture {self.architecture!r} needs exactly the "
                                      f"{self.architecture!r} sub-config ({name!r} is "
                                      f"{'missing' if name == self.architecture else 'set too'})")


@dataclass(frozen=True)
class ImageDetokenizerConfig(CheckpointConfig):
    """A stand-alone image detokenizer checkpoint (a converted VQGAN or dVAE decoder)."""

    detokenizer: DetokenizerConfig

    TASK = "image-detokenizer"
    ARCHITECTURES = DETOKENIZER_ARCHITECTURES

    def validate(self, where: str):
        self.validate_header(where)
        if self.architecture != self.detokenizer.architecture:
            raise CheckpointError(f"{where}: architecture {self.architecture!r} differs from "
                                  f"detokenizer.architecture {self.detokenizer.architecture!r}")


@dataclass(frozen=True)
class AudioEncoderConfig:
    """a2g-gpt's audio encoder: two Conv1d (kernel 3, stride 2, padding 1, exact GELU) over log-mel
    frames, learned positions, pre-LN transformer blocks, a final LayerNorm."""

    n_mels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float = 1e-5

    def validate(self, where: str):
        _positive(where, n_mels=self.n_mels, hidden_size=self.hidden_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                  max_positions=self.max_positions, layer_norm_eps=self.layer_norm_eps)
        _check_transformer(where, self.hidden_size, self.num_heads, "gelu")


@dataclass(frozen=True)
class MotionVQConfig:
    """The decoder of a T2M-GPT-style motion VQ-VAE: codebook -> Conv1d -> ReLU -> ``levels`` x
    (ResStack with dilations ``growth**i`` reversed, nearest 2x upsample, Conv1d) -> Conv1d -> ReLU ->
    Conv1d to ``2 * joints`` normalized coordinates per frame."""

    codebook_size: int
    code_dim: int
    width: int
    depth: int
    growth: int
    joints: int = 52
    levels: int = 2

    @property
    def downsample_factor(self) -> int:
        return 2 ** self.levels

    def validate(self, where: str):
        _positive(where, codebook_size=self.codebook_size, code_dim=self.code_dim, width=self.width,
                  depth=self.depth, growth=self.growth, joints=self.joints, levels=self.levels)


GESTURE_FRONT_ENDS = ("log_mel_400",)


@dataclass(frozen=True)
class GestureConfig:
    """How audio becomes poses: the audio front end, the frame rate, the sliding windows (see
    :mod:`mmgen_engine.pipelines.gesture_windows`), the decoder's special tokens and the skeleton
    (parent of each joint, -1 for the root)."""

    bos_token_id: int
    eos_token_id: int
    skeleton: list[int]
    front_end: str = "log_mel_400"
    sample_rate: int = 16000
    fps: int = 15
    window_frames: int = 64
    seed_tokens: int = 4

    def validate(self, where: str):
        _positive(where, fps=self.fps, window_frames=self.window_frames, seed_tokens=self.seed_tokens)
        if self.front_end not in GESTURE_FRONT_ENDS or self.sample_rate != 16000:
            raise CheckpointError(f"{where}: unsupported audio front end {self.front_end!r} at "
                                  f"{self.sample_rate} Hz (log_mel_400 at 16000 Hz)")
        if self.skeleton != PARENTS:
            raise CheckpointError(f"{where}.skeleton: a2g-gpt's poses are the PATS 52-joint upper body; "
                                  f"this skeleton differs")


@dataclass(frozen=True)
class SpeechToGestureConfig(CheckpointConfig):
    """A speech-to-gesture checkpoint (a2g-gpt): audio encoder, GPT-2 decoder with cross-attention
    over motion tokens, motion VQ decoder."""

    audio_encoder: AudioEncoderConfig
    decoder: GPT2Config
    motion: MotionVQConfig
    gesture: GestureConfig

    TASK = "speech-to-gesture"
    ARCHITECTURES = ("a2g-gpt",)

    @property
    def window_tokens(self) -> int:
        return self.gesture.window_frames // self.motion.downsample_factor

    def validate(self, where: str):
        self.validate_header(where)
        enc, dec, motion, g = self.audio_encoder, self.decoder, self.motion, self.gesture
        if not dec.cross_attention or enc.hidden_size != dec.hidden_size:
            raise CheckpointError(f"{where}: the decoder must cross-attend to the {enc.hidden_size}-wide audio "
                                  f"states")
        if g.window_frames % motion.downsample_factor or g.seed_tokens >= self.window_tokens:
            raise CheckpointError(f"{where}.gesture: a window of {g.window_frames} frames must be whole motion "
                                  f"tokens ({motion.downsample_factor} frames each) and longer than its "
                                  f"{g.seed_tokens} seed tokens")
        if dec.max_positions < self.window_tokens + 1:
            raise CheckpointError(f"{where}: the decoder's {dec.max_positions} positions do not hold a window's "
                                  f"{self.window_tokens} tokens after bos")
        ids = {g.bos_token_id, g.eos_token_id}
        if len(ids) != 2 or min(ids) < motion.codebook_size or max(ids) >= dec.vocab_size:
            raise CheckpointError(f"{where}.gesture: bos and eos must be distinct ids after the "
                                  f"{motion.codebook_size} motion codes, inside the vocabulary of {dec.vocab_size}")
        if len(g.skeleton) != motion.joints:
            raise CheckpointError(f"{where}.gesture.skeleton has {len(g.skeleton)} joints, the motion decoder "
                                  f"{motion.joints}")
        mels = (g.sample_rate // 160) * (g.window_frames - g.seed_tokens * motion.downsample_factor)
        if mels % g.fps:
            raise CheckpointError(f"{where}.gesture: windows of {g.window_frames} frames seeded with "
                                  f"{g.seed_tokens} tokens do not start on a log-mel frame at {g.fps} fps")
        positions = math.ceil(math.ceil(math.ceil(g.window_frames * (g.sample_rate // 160) / g.fps) / 2) / 2)
        if enc.n_mels != 64 or enc.max_positions != positions:
            raise CheckpointError(f"{where}.audio_encoder: a window gives {positions} states of 64 log-mel bins, "
                                  f"the encoder takes {enc.max_positions} of {enc.n_mels}")


# task -> top-level config class; the one place a task name chooses a config type.
CONFIG_CLASSES = {"captioning": CaptioningConfig, "text-to-image": TextToImageConfig,
                  "speech-to-gesture": SpeechToGestureConfig, "image-detokenizer": ImageDetokenizerConfig}
