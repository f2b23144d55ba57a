"""Typed, validated configuration dataclasses of engine checkpoints.

``config.json`` of an engine checkpoint is the JSON form of one top-level config (e.g.
:class:`CaptioningConfig`). The classes are pydantic dataclasses: field types are checked strictly
(``"4"`` is no integer, ``true`` no number; a JSON integer is a valid float), floats must be finite,
sizes lie in bounds (the ``MAX_*`` constants) and unknown fields are refused; each class's
``_check`` adds the checks across fields. :func:`from_dict` is the entry point for JSON data: any
problem is one :class:`~mmgen_engine.errors.CheckpointError` line naming the field
(``config.json.decoder.num_heads: ...``), so a bad checkpoint fails at load time instead of deep
inside a forward pass, or by asking for absurd amounts of memory.

The bounds lie far above every published model of these families and low enough that no product
of sizes overflows int64 and no config alone can make the loader build a giant model.

Generation defaults. A task config may carry an optional ``generation_defaults`` block
(:class:`GenerationDefaults`): the sampling (every :class:`SamplingDefaults` field is a field of
``mm.SamplingParams``), and for captioning the new-token budget (``max_new_tokens`` /
``min_new_tokens``, or transformers' ``max_length`` / ``min_length``, which count the decoder
prompt). Converters write it from the source (transformers' ``generation_config.json``, min-dalle's
defaults, the settings a demo model was trained and evaluated with); a pipeline called with
``sampling=None`` (or the CLI with the flag left out) uses it, an explicit argument overrides it,
and without the block the task's built-in defaults apply (:data:`BUILTIN_GENERATION_DEFAULTS`,
what every engine did before the block existed), so older checkpoints load and behave as before.

The block keeps ``format_version`` 1. Configs refuse unknown fields, so an engine older than the
block refuses a checkpoint that has one, with the one line ``config.json: unknown field
'generation_defaults'``, instead of silently generating with other defaults than the checkpoint
asks for; deleting the block makes such a checkpoint load there with the built-in defaults. A new
``format_version`` would have told old engines no more than that line does, and would have made
every converted checkpoint unreadable to them, block or not (and the public contract names
version 1).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from .errors import CheckpointError
from .gesture_format import PARENTS

FORMAT_NAME = "mmgen"
FORMAT_VERSION = 1
TASKS = ("captioning", "text-to-image", "speech-to-gesture", "image-detokenizer")

MAX_LAYERS = 512          # repeated blocks of one stack (GPT-3 has 96)
MAX_LEVELS = 8            # resolution levels of an up-sampling decoder (2**7 = 128x)
MAX_WIDTH = 2 ** 17       # hidden, intermediate and channel widths (131072)
MAX_VOCAB = 2 ** 20       # vocabulary and codebook sizes, so token ids are below it
MAX_POSITIONS = 2 ** 20   # sequence positions
MAX_IMAGE_SIZE = 2 ** 14  # image sides, in pixels

Int = Annotated[int, Strict()]
Bool = StrictBool
Str = StrictStr
Float = Annotated[float, Strict()]  # finite: every class has allow_inf_nan=False
Positive = Annotated[float, Strict(), Field(gt=0)]
Layers = Annotated[int, Strict(), Field(gt=0, le=MAX_LAYERS)]
Levels = Annotated[int, Strict(), Field(gt=0, le=MAX_LEVELS)]
Width = Annotated[int, Strict(), Field(gt=0, le=MAX_WIDTH)]
Vocab = Annotated[int, Strict(), Field(gt=0, le=MAX_VOCAB)]
TokenId = Annotated[int, Strict(), Field(ge=0, lt=MAX_VOCAB)]
Positions = Annotated[int, Strict(), Field(gt=0, le=MAX_POSITIONS)]
Pixels = Annotated[int, Strict(), Field(gt=0, le=MAX_IMAGE_SIZE)]
RGB = Annotated[list[Float], Field(min_length=3, max_length=3)]
Dtype = Literal["float32", "float16", "bfloat16"]
Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]
DetokenizerArchitecture = Literal["vqgan", "dvae"]

# SamplingParams' bounds (mmgen_engine.runtime.limits and .sampler), repeated here because the format
# definitions sit below the runtime; tests/test_generation_defaults.py checks that they agree
FLOAT32_MAX = 3.4028234663852886e38     # float(numpy.finfo(numpy.float32).max)
FLOAT32_TINY = 1.1754943508222875e-38   # float(numpy.finfo(numpy.float32).smallest_normal)
MAX_NEW_TOKENS = 4096
MAX_BEAMS = 64
INT64_MAX = 2 ** 63 - 1

NonNegative64 = Annotated[int, Strict(), Field(ge=0, le=INT64_MAX)]
NewTokens = Annotated[int, Strict(), Field(ge=1, le=MAX_NEW_TOKENS)]
MinNewTokens = Annotated[int, Strict(), Field(ge=0, le=MAX_NEW_TOKENS)]

DTYPES = get_args(Dtype)
DETOKENIZER_ARCHITECTURES = get_args(DetokenizerArchitecture)

SCHEMA = ConfigDict(extra="forbid", allow_inf_nan=False)


def validated(cls):
    """A frozen pydantic dataclass with the schema's settings."""
    return dataclass(frozen=True, config=SCHEMA)(cls)


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def from_dict(cls, data, where: str = "config"):
    """Build config class ``cls`` from JSON data ``data`` (a dict): types, bounds, unknown and missing
    fields, then the checks across fields; any problem raises one :class:`CheckpointError` line that
    names the first bad field as ``where.a.b[0]``."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as e:
        raise CheckpointError(_error_line(e.errors()[0], where)) from None


def _error_line(error: dict, where: str) -> str:
    """One pydantic error as ``where.path: message``; an unknown or missing field is named in the
    message (the path is its object), a ``_check`` failure keeps its own words."""
    loc, kind = list(error["loc"]), error["type"]
    if kind in ("unexpected_keyword_argument", "missing"):
        name = loc.pop()
        text = f"{'unknown' if kind == 'unexpected_keyword_argument' else 'missing'} field {reprlib.repr(name)}"
    elif kind == "value_error":
        text = str(error["ctx"]["error"])
    else:
        text = error["msg"]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return " ".join(f"{where}{path}: {text}".split())


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_heads(hidden_size: int, num_heads: int):
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")


@validated
class ViTConfig:
    """ViT image encoder (patch embedding + CLS token + learned positions + pre-LN blocks + final
    LayerNorm): ViT, BLIP's vision model, and with ``patch_bias`` off, ``pre_norm`` on and the
    quick GELU, the CLIP vision tower (GIT, ClipCap)."""

    hidden_size: Width
    num_layers: Layers
    num_heads: Width
    intermediate_size: Width
    image_size: Pixels
    patch_size: Pixels
    num_channels: Width = 3
    layer_norm_eps: Positive = 1e-12
    activation: Activation = "gelu"
    qkv_bias: Bool = True
    patch_bias: Bool = True
    pre_norm: Bool = False  # CLIP's LayerNorm on the embeddings before the first block
    final_norm: Bool = True  # False: no final LayerNorm (LLaVA reads the states of inner blocks)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def blocks(self) -> int:
        """Repeated blocks of the model (see :attr:`CaptioningConfig.blocks`)."""
        return self.num_layers

    @model_validator(mode="after")
    def _check(self):
        _check_heads(self.hidden_size, self.num_heads)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        return self


@validated
class TextDecoderConfig:
    """The sizes every text decoder has; a family's config adds its own fields."""

    vocab_size: Vocab
    hidden_size: Width
    num_layers: Layers
    num_heads: Width
    intermediate_size: Width
    max_positions: Positions
    layer_norm_eps: Positive
    activation: Activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def blocks(self) -> int:
        return self.num_layers

    @model_validator(mode="after")
    def _check(self):
        _check_heads(self.hidden_size, self.num_heads)
        return self


@validated
class GPT2Config(TextDecoderConfig):
    """GPT-2 decoder: blocks ln_1 > attn, (ln_cross > cross-attn,) ln_2 > mlp. Without
    ``cross_attention`` the encoder states are a prefix of input embeddings (ClipCap)."""

    layer_norm_eps: Positive = 1e-5
    activation: Activation = "gelu_tanh"
    scale_attn_weights: Bool = True
    scale_attn_by_inverse_layer_idx: Bool = False
    tie_word_embeddings: Bool = True
    cross_attention: Bool = True


@validated
class BertConfig(TextDecoderConfig):
    """BERT-style post-LayerNorm text decoder (BLIP's text decoder, GIT's): embeddings + LayerNorm,
    blocks ``h = ln(h + attn(h)); (h = ln(h + cross(h));) h = ln(h + mlp(h))``, then the head.
    ``encoder_hidden_size`` set: cross-attention to encoder states of that width (BLIP); None: the
    encoder states are a bidirectional prefix in front of the causal text (GIT), and the text
    positions count the text only. ``head_transform``: BERT's LM head ``ln(act(dense(h)))`` before
    the vocabulary projection (BLIP); the projection is tied to the word embeddings when
    ``tie_word_embeddings`` and always has a bias."""

    layer_norm_eps: Positive = 1e-12
    activation: Activation = "gelu"
    encoder_hidden_size: Width | None = None
    head_transform: Bool = False
    tie_word_embeddings: Bool = False


@validated
class OPTConfig(TextDecoderConfig):
    """OPT decoder (HF ``OPTForCausalLM``), pre-LayerNorm (``do_layer_norm_before``: every published
    OPT but 350m, BLIP-2's language models): token embeddings ``word_embed_proj_dim`` wide (None: the hidden
    width), raised to the hidden width by ``project_in`` when narrower, plus learned positions
    (OPT's table without its two offset rows: position ``p`` reads row ``p``); blocks ``h +=
    attn(ln1(h)); h += mlp(ln2(h))`` with biases and a ReLU MLP; a final LayerNorm, ``project_out``
    back to the embedding width when it differs, and the head (tied to the token embeddings unless
    ``tie_word_embeddings`` is false). Input embeddings in front of the text (BLIP-2's queries) are a
    causal prefix whose positions count."""

    layer_norm_eps: Positive = 1e-5
    activation: Literal["relu", "gelu", "gelu_tanh", "quick_gelu"] = "relu"
    word_embed_proj_dim: Width | None = None
    tie_word_embeddings: Bool = True

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (and of the head's input)."""
        return self.word_embed_proj_dim or self.hidden_size


@validated
class QFormerConfig:
    """BLIP-2's Querying Transformer on its inference path (queries only): ``num_query_tokens``
    learned queries, a LayerNorm, then BERT-style post-LayerNorm layers ``h = ln(h + attn(h));
    (h = ln(h + cross(h, image));) h = ln(h + mlp(h))``, bidirectional, with cross-attention to the
    ``encoder_hidden_size``-wide image states in layers ``0, f, 2f, ...`` (``f`` the
    ``cross_attention_frequency``)."""

    hidden_size: Width
    num_layers: Layers
    num_heads: Width
    intermediate_size: Width
    num_query_tokens: Positions
    encoder_hidden_size: Width
    cross_attention_frequency: Layers = 2
    layer_norm_eps: Positive = 1e-12
    activation: Activation = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def blocks(self) -> int:
        return self.num_layers

    @model_validator(mode="after")
    def _check(self):
        _check_heads(self.hidden_size, self.num_heads)
        return self


RopeKind = Literal["default", "linear", "llama3"]


@validated
class RopeConfig:
    """Rotary position embedding frequencies, transformers' ``rope_parameters`` kinds of LLaMA:
    ``inv_freq[i] = theta ** (-2i / head_dim)``, then for ``linear`` divided by ``factor``, and for
    ``llama3`` (LLaMA 3.1) divided by ``factor`` where the wavelength ``2 pi / inv_freq`` exceeds
    ``original_max_positions / low_freq_factor``, kept where it is below ``original_max_positions /
    high_freq_factor``, interpolated smoothly between."""

    kind: RopeKind = "default"
    theta: Positive = 10000.0
    factor: Positive = 1.0
    low_freq_factor: Positive | None = None
    high_freq_factor: Positive | None = None
    original_max_positions: Positions | None = None

    @model_validator(mode="after")
    def _check(self):
        llama3 = (self.low_freq_factor, self.high_freq_factor, self.original_max_positions)
        if self.kind == "llama3":
            if None in llama3:
                raise ValueError("llama3 rope needs low_freq_factor, high_freq_factor and original_max_positions")
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValueError(f"llama3 rope needs high_freq_factor ({self.high_freq_factor}) above "
                                 f"low_freq_factor ({self.low_freq_factor})")
        elif llama3 != (None, None, None):
            raise ValueError("low_freq_factor, high_freq_factor and original_max_positions are llama3 rope fields")
        if self.kind == "default" and self.factor != 1:
            raise ValueError(f"default rope has no factor (got {self.factor})")
        return self


@validated
class LlamaConfig:
    """LLaMA-family decoder (HF ``LlamaForCausalLM``): token embeddings, blocks ``h += attn(rms1(h));
    h += mlp(rms2(h))`` with grouped-query attention (``num_kv_heads`` K/V heads shared by
    ``num_heads / num_kv_heads`` query heads each), rotary positions, the SwiGLU MLP
    ``down(silu(gate(x)) * up(x))``, a final RMSNorm and the head. The image states of LLaVA are a
    causal prefix of input embeddings whose positions count."""

    vocab_size: Vocab
    hidden_size: Width
    num_layers: Layers
    num_heads: Width
    num_kv_heads: Width
    head_dim: Width
    intermediate_size: Width
    max_positions: Positions
    rms_norm_eps: Positive = 1e-6
    rope: RopeConfig = Field(default_factory=RopeConfig)
    attention_bias: Bool = False
    mlp_bias: Bool = False
    tie_word_embeddings: Bool = False

    @property
    def blocks(self) -> int:
        return self.num_layers

    @model_validator(mode="after")
    def _check(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary embeddings rotate pairs)")
        if self.num_heads * self.head_dim > MAX_WIDTH:
            raise ValueError(f"num_heads x head_dim = {self.num_heads * self.head_dim} exceeds {MAX_WIDTH}")
        return self


@validated
class LlavaConfig:
    """LLaVA's image path (HF ``LlavaForConditionalGeneration``): the CLIP tower's states after
    ``feature_layers`` blocks (each a count of blocks run, 0 the embeddings after ``ln_pre``; several
    are concatenated along the width), without the CLS state unless ``keep_cls`` (transformers'
    ``vision_feature_select_strategy`` "full"; "default" drops it), then the projector
    ``linear_2(act(linear_1(x)))``. The projected states replace the ``image_token_id`` placeholder
    of the prompt."""

    image_token_id: TokenId
    feature_layers: Annotated[list[Annotated[int, Strict(), Field(ge=0, le=MAX_LAYERS)]],
                              Field(min_length=1, max_length=MAX_LAYERS)]
    keep_cls: Bool = False
    projector_bias: Bool = True
    projector_activation: Activation = "gelu"


@validated
class GenerationConfig:
    """Special token ids of text generation. ``decoder_start_token_id`` None: no start token, the
    first token follows the image prefix directly (ClipCap). ``include_eos``: the stop token is part
    of the text (ClipCap stops at its ".")."""

    decoder_start_token_id: TokenId | None
    eos_token_id: TokenId
    pad_token_id: TokenId
    include_eos: Bool = False

    @property
    def special_ids(self) -> dict[str, int]:
        """The token ids the decoder uses, by field name."""
        ids = {"decoder_start_token_id": self.decoder_start_token_id, "eos_token_id": self.eos_token_id,
               "pad_token_id": self.pad_token_id}
        return {name: i for name, i in ids.items() if i is not None}


@validated
class ImagePreprocessConfig:
    """Resize (PIL, ``resample`` is a PIL filter id) > rescale > normalize, as ViTImageProcessor and
    BlipImageProcessor do. With ``shortest_edge`` the resize keeps the aspect ratio and makes the
    shorter side that long, then a center crop cuts ``height x width`` (CLIPImageProcessor). With
    ``pad_to_square`` the image is first padded to a square of its longer side, centered, with the
    mean color ``int(mean * 255)`` (LLaVA's processor, ``do_pad``)."""

    height: Pixels
    width: Pixels
    resample: Annotated[int, Strict(), Field(ge=0, le=5)] = 2
    shortest_edge: Pixels | None = None
    do_resize: Bool = True
    do_rescale: Bool = True
    rescale_factor: Float = 1 / 255
    do_normalize: Bool = True
    image_mean: RGB = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: Annotated[list[Positive], Field(min_length=3, max_length=3)] = Field(
        default_factory=lambda: [0.5, 0.5, 0.5])
    pad_to_square: Bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.shortest_edge is not None and not (self.do_resize and max(self.height, self.width)
                                                   <= self.shortest_edge):
            raise ValueError(f"a {self.height}x{self.width} center crop needs a resize whose shortest edge "
                             f"({self.shortest_edge}) is at least as long")
        return self


def _float32(low: float, high: float, zero: bool = False) -> AfterValidator:
    """A float in ``[low, high]`` (or exactly 0 with ``zero``), in the words of SamplingParams' check."""
    def check(value: float) -> float:
        if not (low <= value <= high or (zero and value == 0)):
            allowed = f"a number in [{low:.8g}, {high:.8g}]"
            raise ValueError(f"must be {'0 or ' if zero else ''}{allowed} (float32 without overflow or underflow)")
        return value

    return AfterValidator(check)


Float32 = Annotated[float, Strict(), _float32(-FLOAT32_MAX, FLOAT32_MAX)]
Float32Positive = Annotated[float, Strict(), _float32(FLOAT32_TINY, FLOAT32_MAX)]
Guidance = Annotated[float, Strict(), _float32(FLOAT32_TINY, FLOAT32_MAX, zero=True)]
Probability = Annotated[float, Strict(), _float32(FLOAT32_TINY, 1.0)]


@validated
class SamplingDefaults:
    """The sampling of a checkpoint's generation defaults: the fields of ``mm.SamplingParams``, with
    its defaults for the fields left out and its bounds (see
    :class:`~mmgen_engine.runtime.sampler.SamplingParams`). ``guidance_scale`` is text-to-image's
    only (None there: min-dalle's 16); beam search (``num_beams > 1``) is captioning's only, and the
    repetition controls are not text-to-image's."""

    do_sample: Bool = False
    temperature: Float32Positive = 1.0
    top_k: NonNegative64 = 0
    top_p: Probability = 1.0
    guidance_scale: Guidance | None = None
    seed: NonNegative64 | None = None
    num_beams: Annotated[int, Strict(), Field(ge=1, le=MAX_BEAMS)] = 1
    length_penalty: Float32 = 1.0
    early_stopping: Bool | Literal["never"] = False
    num_return_sequences: Annotated[int, Strict(), Field(ge=1, le=MAX_BEAMS)] = 1
    repetition_penalty: Float32Positive = 1.0
    no_repeat_ngram_size: MinNewTokens = 0

    def fields(self) -> dict:
        """The fields as ``mm.SamplingParams`` keyword arguments."""
        return dataclasses.asdict(self)

    @model_validator(mode="after")
    def _check(self):
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam search samples no tokens: use num_beams > 1 with do_sample false")
        if self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences {self.num_return_sequences} is more than num_beams "
                             f"{self.num_beams}")
        return self


@validated
class GenerationDefaults:
    """A checkpoint's generation defaults (``config.json`` ``generation_defaults``), what a call
    that leaves an argument out uses (explicit argument > these > the task's built-in defaults,
    :data:`BUILTIN_GENERATION_DEFAULTS`):

    - ``sampling``: the ``mm.SamplingParams`` of ``sampling=None`` (None: the built-in sampling);
    - captioning only: ``max_new_tokens`` / ``min_new_tokens``, the budget of ``caption()`` /
      ``generate_ids()`` when left out; or, as transformers' ``generation_config.json`` gives them,
      ``max_length`` / ``min_length``, which count the decoder prompt (the start token and any text
      prompt): the budget of a call is then ``max_length`` minus its prompt length, at least 1, and
      ``min_length`` minus it, at least 0 (transformers' rule). ``max_new_tokens`` wins over
      ``max_length`` and ``min_new_tokens`` over ``min_length`` when both are set, as in
      transformers; a minimum above the call's maximum is cut to it.
    """

    sampling: SamplingDefaults | None = None
    max_new_tokens: NewTokens | None = None
    min_new_tokens: MinNewTokens | None = None
    max_length: Positions | None = None
    min_length: Annotated[int, Strict(), Field(ge=0, le=MAX_POSITIONS)] | None = None

    LENGTHS: ClassVar[tuple[str, ...]] = ("max_new_tokens", "min_new_tokens", "max_length", "min_length")

    def new_tokens(self, prompt_length: int) -> tuple[int | None, int | None]:
        """``(max_new_tokens, min_new_tokens)`` for a call whose decoder prompt (start token and text
        prompt) is ``prompt_length`` tokens long; None where the block sets neither form."""
        top = self.max_new_tokens
        if top is None and self.max_length is not None:
            top = min(max(self.max_length - prompt_length, 1), MAX_NEW_TOKENS)
        low = self.min_new_tokens
        if low is None and self.min_length is not None:
            low = min(max(self.min_length - prompt_length, 0), MAX_NEW_TOKENS)
        return top, low

    @model_validator(mode="after")
    def _check(self):
        if None not in (self.min_new_tokens, self.max_new_tokens) and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens {self.min_new_tokens} is more than max_new_tokens {self.max_new_tokens}")
        if None not in (self.min_length, self.max_length) and self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} is more than max_length {self.max_length}")
        return self


# Each task's defaults where a checkpoint has no generation_defaults block (or its block leaves a
# part out): what the engine has always used. Captioning: greedy, 20 new tokens; text-to-image:
# min-dalle's generate_image (top-k 256, supercondition 16, temperature 1); speech-to-gesture:
# seeded sampling at temperature 0.5, top-p 0.9 (a silent speaker stays still).
BUILTIN_GENERATION_DEFAULTS = {
    "captioning": {"sampling": {}, "max_new_tokens": 20, "min_new_tokens": 0},
    "text-to-image": {"sampling": {"do_sample": True, "top_k": 256, "guidance_scale": 16.0}},
    "speech-to-gesture": {"sampling": {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 0}},
}


def _check_generation_defaults(block: GenerationDefaults | None, task: str) -> None:
    """What a task's generation defaults may hold: guidance for text-to-image only, beams and token
    budgets for captioning only."""
    if block is None:
        return
    where = "generation_defaults"
    if task != "captioning":
        for name in GenerationDefaults.LENGTHS:
            if getattr(block, name) is not None:
                raise ValueError(f"{where}.{name}: {task} draws a fixed number of tokens; only captioning "
                                 f"takes a token budget")
    s = block.sampling
    if s is None:
        return
    if task != "captioning" and s.num_beams > 1:
        raise ValueError(f"{where}.sampling.num_beams: beam search is for captioning, not {task}")
    if task == "text-to-image" and (s.repetition_penalty != 1 or s.no_repeat_ngram_size):
        raise ValueError(f"{where}.sampling: text-to-image has no repetition controls (repetition_penalty, "
                         f"no_repeat_ngram_size)")
    if task != "text-to-image" and s.guidance_scale is not None:
        raise ValueError(f"{where}.sampling.guidance_scale: {task} has no guidance; leave it out")


QUANTIZE_METHODS = ("int8",)
MIN_GROUP_SIZE = 16  # a scale per fewer weights than this would cost more bytes than int8 saves


@validated
class QuantizationConfig:
    """Weight-only quantization of a checkpoint (``config.json`` ``"quantization"``).

    ``method`` "int8": symmetric int8 weights with float32 scales (see
    :mod:`mmgen_engine.ops.quant`), per output channel (``group_size`` null) or per group of
    ``group_size`` input columns. ``modules`` "decoder": every linear layer of the decoder (attention
    projections, cross-attention, MLP, OPT's projections, BERT's head transform) and its LM head
    (the text, image-token or motion-token head); encoders and detokenizers stay floating point. A
    quantized linear stores ``NAME.weight`` int8 ``[out, in]`` and ``NAME.weight_scale`` float32
    (``[out]`` or ``[out, ceil(in / group_size)]``); its bias keeps the checkpoint's dtype. A head tied
    to the token embeddings stores an int8 copy as ``decoder.lm_head`` beside the floating ``decoder.wte``
    the lookups read.

    The block keeps ``format_version`` 1: an engine without it refuses such a checkpoint with the
    one line ``config.json: unknown field 'quantization'`` (configs refuse unknown fields), so no
    old reader can misread the int8 tensors.

    As an option (``mm.load(quantize=...)``, ``mmgen convert --quantize``) it is written
    ``"int8"`` (per channel) or ``"int8-g128"`` (groups of 128): :meth:`parse`, :attr:`spec`.
    """

    method: Literal["int8"]
    group_size: Annotated[int, Strict(), Field(ge=MIN_GROUP_SIZE, le=MAX_WIDTH)] | None = None
    modules: Literal["decoder"] = "decoder"

    @property
    def spec(self) -> str:
        """The option string: ``"int8"`` or ``"int8-g128"``."""
        return self.method if self.group_size is None else f"{self.method}-g{self.group_size}"

    @classmethod
    def parse(cls, spec, error: type = CheckpointError) -> QuantizationConfig | None:
        """``None`` -> None; ``"int8"`` (per output channel) or ``"int8-gN"`` (groups of ``N`` input
        columns, ``N`` >= 16) -> the config. Anything else raises ``error`` with one line."""
        if spec is None:
            return None
        usage = "None, 'int8' (per output channel) or 'int8-gN' (groups of N input columns, e.g. 'int8-g128')"
        if not isinstance(spec, str):
            raise error(f"quantize must be {usage}, got {type(spec).__name__}")
        method, _, group = spec.partition("-g")
        if method not in QUANTIZE_METHODS or (group and not (group.isascii() and group.isdigit())) \
                or spec.endswith("-g"):
            raise error(f"quantize must be {usage}, got {spec!r}")
        size = int(group) if group else None
        if size is not None and not MIN_GROUP_SIZE <= size <= MAX_WIDTH:
            raise error(f"quantize {spec!r}: the group size must be in [{MIN_GROUP_SIZE}, {MAX_WIDTH}]")
        return cls(method=method, group_size=size)


@validated
class CheckpointConfig:
    """The fields every top-level checkpoint config starts with; a subclass narrows ``task`` and
    ``architecture`` to its own values and adds its parts."""

    format: Literal["mmgen"]
    format_version: Annotated[int, Strict(), Field(ge=1, le=FORMAT_VERSION)]
    task: Str
    architecture: Str
    source_format: Str
    dtype: Dtype


@validated
class CaptioningConfig(CheckpointConfig):
    """An image-captioning checkpoint: a ViT-family image encoder and a text decoder.

    - ``vit-gpt2``: GPT-2 with cross-attention to the ViT states (through a linear
      ``enc_to_dec_proj`` when the widths differ);
    - ``blip``: BLIP's BERT decoder with cross-attention to the ViT states;
    - ``git``: the CLIP tower's states, projected (linear + LayerNorm), are a bidirectional prefix of
      GIT's BERT decoder;
    - ``clipcap``: the CLIP image embedding (the final-normed CLS state times ``projection_dim``
      projection) goes through an MLP with tanh between layers (``mapper_sizes``, input first) to
      ``prefix_length`` GPT-2 input embeddings, a causal prefix of a GPT-2 without cross-attention;
    - ``llava``: the CLIP tower's states after ``llava.feature_layers`` blocks, through LLaVA's
      projector, replace the ``<image>`` placeholder inside the prompt of a LLaMA-family decoder:
      the prompt's text before the placeholder and the image states are a causal prefix of input
      embeddings, the text after it the decoder prompt;
    - ``blip2``: BLIP-2's ViT states go through the Q-Former (``qformer``); its query outputs,
      projected to the OPT decoder's width, are a causal prefix of input embeddings in front of the
      start token (OPT's ``</s>``) and the prompt.
    """

    task: Literal["captioning"]
    architecture: Literal["vit-gpt2", "blip", "git", "clipcap", "llava", "blip2"]
    encoder: ViTConfig
    decoder: GPT2Config | BertConfig | LlamaConfig | OPTConfig
    generation: GenerationConfig
    preprocess: ImagePreprocessConfig
    enc_to_dec_proj: Bool = False
    projection_dim: Width | None = None
    mapper_sizes: Annotated[list[Width], Field(max_length=MAX_LAYERS)] = Field(default_factory=list)
    prefix_length: Annotated[int, Strict(), Field(ge=0, le=MAX_POSITIONS)] = 0
    generation_defaults: GenerationDefaults | None = None
    llava: LlavaConfig | None = None
    qformer: QFormerConfig | None = None
    quantization: QuantizationConfig | None = None

    DECODERS: ClassVar[dict] = {"vit-gpt2": GPT2Config, "blip": BertConfig, "git": BertConfig,
                                "clipcap": GPT2Config, "llava": LlamaConfig, "blip2": OPTConfig}

    @property
    def blocks(self) -> int:
        """Repeated blocks (layers, ResNet blocks) of the model: each holds at least one tensor, so
        weights with fewer tensors cannot match, which the loader checks before building the model."""
        qformer = self.qformer.blocks if self.qformer is not None else 0
        return self.encoder.blocks + self.decoder.blocks + max(len(self.mapper_sizes) - 1, 0) + qformer

    @field_validator("decoder", mode="wrap")
    @classmethod
    def _decoder_of_architecture(cls, value, handler, info: ValidationInfo):
        """A JSON decoder object is read as the architecture's decoder family, so that its errors
        are that family's; a config object given directly is checked by ``_check``."""
        family = cls.DECODERS.get(info.data.get("architecture"))
        if family is None or not isinstance(value, dict):
            return handler(value)
        for other in sorted(set(cls.DECODERS.values()) - {family}, key=lambda c: c.__name__):
            foreign = sorted(value.keys() & (_field_names(other) - _field_names(family)))
            if foreign:
                raise ValueError(f"architecture {info.data['architecture']!r} needs a {family.__name__} decoder; "
                                 f"{foreign[0]!r} is a {other.__name__} field")
        return _adapter(family).validate_python(value)

    @model_validator(mode="after")
    def _check(self):
        arch, enc, dec = self.architecture, self.encoder, self.decoder
        if type(dec) is not self.DECODERS[arch]:
            raise ValueError(f"decoder: architecture {arch!r} needs a {self.DECODERS[arch].__name__} decoder")
        cross = (dec.cross_attention if isinstance(dec, GPT2Config) else
                 dec.encoder_hidden_size is not None if isinstance(dec, BertConfig) else False)
        if cross != (arch in ("vit-gpt2", "blip")):
            raise ValueError(f"decoder: architecture {arch!r} "
                             f"{'needs' if arch in ('vit-gpt2', 'blip') else 'has no'} cross-attention")
        if arch == "vit-gpt2" and not self.enc_to_dec_proj and enc.hidden_size != dec.hidden_size:
            raise ValueError(f"encoder width {enc.hidden_size} != decoder width {dec.hidden_size} and no "
                             f"enc_to_dec_proj")
        if self.enc_to_dec_proj and arch != "vit-gpt2":
            raise ValueError("enc_to_dec_proj is a vit-gpt2 field")
        if arch == "blip" and dec.encoder_hidden_size != enc.hidden_size:
            raise ValueError(f"the decoder cross-attends to {dec.encoder_hidden_size}-wide states but the "
                             f"encoder is {enc.hidden_size} wide")
        if arch == "clipcap":
            m = self.mapper_sizes
            if (self.projection_dim is None or not self.prefix_length or len(m) < 2 or m[0] != self.projection_dim
                    or m[-1] != self.prefix_length * dec.hidden_size):
                raise ValueError(f"mapper_sizes must run from projection_dim {self.projection_dim} to "
                                 f"prefix_length x decoder width = {self.prefix_length * dec.hidden_size}, got {m}")
        elif self.projection_dim is not None or self.mapper_sizes or self.prefix_length:
            raise ValueError("projection_dim, mapper_sizes and prefix_length are clipcap fields")
        if (self.llava is None) == (arch == "llava"):
            raise ValueError(f"architecture {arch!r} {'needs' if arch == 'llava' else 'has no'} a 'llava' block")
        if self.llava is not None:
            deepest = max(self.llava.feature_layers)
            if deepest > enc.num_layers:
                raise ValueError(f"llava.feature_layers: layer {deepest} is beyond the encoder's {enc.num_layers}")
            if self.llava.image_token_id >= dec.vocab_size:
                raise ValueError(f"llava.image_token_id is outside the vocabulary of {dec.vocab_size}")
        if (self.qformer is None) == (arch == "blip2"):
            raise ValueError(f"architecture {arch!r} {'needs' if arch == 'blip2' else 'has no'} a 'qformer' block")
        if self.qformer is not None:
            if self.qformer.encoder_hidden_size != enc.hidden_size:
                raise ValueError(f"qformer cross-attends to {self.qformer.encoder_hidden_size}-wide states but the "
                                 f"encoder is {enc.hidden_size} wide")
            if dec.embed_dim != dec.hidden_size:
                raise ValueError(f"blip2 puts its queries in the decoder's input embeddings, so its "
                                 f"word_embed_proj_dim ({dec.embed_dim}) must equal its hidden_size "
                                 f"({dec.hidden_size})")
        if enc.num_channels != 3:
            raise ValueError(f"encoder.num_channels must be 3 (RGB input), got {enc.num_channels}")
        p, size = self.preprocess, enc.image_size
        if (p.do_resize or p.shortest_edge) and (p.height, p.width) != (size, size):
            raise ValueError(f"preprocess makes {p.height}x{p.width} images but the encoder takes {size}x{size}")
        gen = self.generation
        if gen.decoder_start_token_id is None and arch != "clipcap":
            raise ValueError(f"generation.decoder_start_token_id is required for {arch!r}")
        for name, value in gen.special_ids.items():
            if value >= dec.vocab_size:
                raise ValueError(f"generation.{name} is outside the vocabulary of {dec.vocab_size}")
        _check_generation_defaults(self.generation_defaults, self.task)
        return self


@validated
class BartConfig:
    """One half of min-dalle's BART: pre- and post-LayerNorm attention blocks (bias-free), the GLU
    feed-forward, learned positions and LayerNorms after the embedding and at the end."""

    vocab_size: Vocab
    hidden_size: Width
    num_layers: Layers
    num_heads: Width
    glu_size: Width
    max_positions: Positions
    layer_norm_eps: Positive = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def blocks(self) -> int:
        return self.num_layers

    @model_validator(mode="after")
    def _check(self):
        _check_heads(self.hidden_size, self.num_heads)
        return self


@validated
class ImageGenerationConfig:
    """How image tokens are generated: the decoder starts from ``bos_token_id`` and samples among codes
    ``0..image_vocab_size-1``, ``grid_size**2`` of them (row-major); the text rows are padded with
    ``text_pad_token_id`` to the encoder's ``max_positions``."""

    bos_token_id: TokenId
    image_vocab_size: Vocab
    grid_size: Annotated[int, Strict(), Field(gt=0, le=math.isqrt(MAX_POSITIONS))]
    text_pad_token_id: TokenId = 1


@validated
class VQGANConfig:
    """Taming-transformers VQGAN decoder: codebook -> post_quant_conv -> conv_in -> mid (ResNet,
    attention, ResNet) -> ``len(ch_mult)`` levels, highest first, of ``num_res_blocks + 1`` ResNet
    blocks (+ attention on ``attn_levels``) and a 2x upsample on every level but 0 -> GroupNorm +
    SiLU -> conv_out. Level ``i`` is ``ch * ch_mult[i]`` wide. ``output`` maps the conv's output to
    pixels: ``"minus1_1"`` ``clamp((x + 1) / 2, 0, 1)`` (taming), ``"0_1"`` ``clamp(x, 0, 1)``
    (min-dalle)."""

    codebook_size: Vocab
    embed_dim: Width
    z_channels: Width
    ch: Width
    ch_mult: Annotated[list[Width], Field(min_length=1, max_length=MAX_LEVELS)]
    num_res_blocks: Annotated[int, Strict(), Field(ge=0, le=MAX_LAYERS)]  # taming allows 0: one block per level
    attn_levels: Annotated[list[Int], Field(max_length=MAX_LEVELS)] = Field(default_factory=list)
    out_channels: Width = 3
    norm_groups: Width = 32
    norm_eps: Positive = 1e-6
    output: Literal["minus1_1", "0_1"] = "minus1_1"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def blocks(self) -> int:
        return len(self.ch_mult) * (self.num_res_blocks + 1)

    @model_validator(mode="after")
    def _check(self):
        levels = range(len(self.ch_mult))
        if len(set(self.attn_levels)) != len(self.attn_levels) or any(i not in levels for i in self.attn_levels):
            raise ValueError(f"attn_levels must be distinct levels in 0..{len(self.ch_mult) - 1}, "
                             f"got {self.attn_levels}")
        widths = [self.ch * m for m in self.ch_mult]
        if max(widths) > MAX_WIDTH:
            raise ValueError(f"level widths ch x ch_mult {widths} must be at most {MAX_WIDTH}")
        bad = sorted({w for w in widths if w % self.norm_groups})
        if bad:
            raise ValueError(f"channel count(s) {bad} are not divisible into {self.norm_groups} GroupNorm groups")
        if self.out_channels != 3:
            raise ValueError(f"out_channels must be 3 (RGB), got {self.out_channels}")
        return self


@validated
class DVAEConfig:
    """OpenAI DALL-E dVAE decoder: code embedding (the one-hot 1x1 input conv) -> ``group_count``
    groups of ``n_blk_per_group`` residual blocks, group ``g`` (1-based) ``n_hid * 2**(group_count
    - g)`` wide, a 2x nearest upsample after every group but the last -> ReLU + 1x1 conv to
    ``2 * output_channels`` (logit-Laplace location and scale; the location is the image)."""

    vocab_size: Vocab
    n_init: Width
    n_hid: Width
    n_blk_per_group: Layers
    group_count: Levels = 4
    output_channels: Width = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def post_gain(self) -> float:
        """Weight of a block's residual path: ``1 / (number of blocks)**2``."""
        return 1 / (self.group_count * self.n_blk_per_group) ** 2

    @property
    def blocks(self) -> int:
        return self.group_count * self.n_blk_per_group

    @model_validator(mode="after")
    def _check(self):
        if self.n_hid % 4:
            raise ValueError(f"n_hid must be a multiple of 4 (a block's hidden width is a quarter of its "
                             f"output), got {self.n_hid}")
        if self.output_channels != 3:
            raise ValueError(f"output_channels must be 3 (RGB), got {self.output_channels}")
        return self


@validated
class DetokenizerConfig:
    """The image detokenizer: image token ids ``[B, h, w]`` -> pixels; exactly the sub-config named by
    ``architecture`` is set."""

    architecture: DetokenizerArchitecture
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

    @property
    def blocks(self) -> int:
        return self.model.blocks

    @model_validator(mode="after")
    def _check(self):
        for name in DETOKENIZER_ARCHITECTURES:
            if (getattr(self, name) is None) == (name == self.architecture):
                raise ValueError(f"architecture {self.architecture!r} needs exactly the {self.architecture!r} "
                                 f"sub-config ({name!r} is {'missing' if name == self.architecture else 'set too'})")
        return self


@validated
class TextToImageConfig(CheckpointConfig):
    """A text-to-image checkpoint: min-dalle's BART encoder/decoder and an image detokenizer."""

    task: Literal["text-to-image"]
    architecture: Literal["dalle-bart"]
    encoder: BartConfig
    decoder: BartConfig
    generation: ImageGenerationConfig
    detokenizer: DetokenizerConfig
    generation_defaults: GenerationDefaults | None = None
    quantization: QuantizationConfig | None = None

    @property
    def blocks(self) -> int:
        return self.encoder.blocks + self.decoder.blocks + self.detokenizer.blocks

    @model_validator(mode="after")
    def _check(self):
        enc, dec, gen = self.encoder, self.decoder, self.generation
        if enc.hidden_size != dec.hidden_size:
            raise ValueError(f"encoder width {enc.hidden_size} != decoder width {dec.hidden_size}")
        if gen.grid_size ** 2 != dec.max_positions:
            raise ValueError(f"a {gen.grid_size}x{gen.grid_size} token grid needs {gen.grid_size ** 2} decoder "
                             f"positions, the decoder has {dec.max_positions}")
        if not gen.image_vocab_size <= dec.vocab_size or gen.bos_token_id >= dec.vocab_size:
            raise ValueError(f"generation: image_vocab_size and bos_token_id must lie in the decoder's "
                             f"vocabulary of {dec.vocab_size}")
        if gen.text_pad_token_id >= enc.vocab_size:
            raise ValueError("generation.text_pad_token_id is outside the text vocabulary")
        if gen.image_vocab_size > self.detokenizer.codebook_size:
            raise ValueError(f"the decoder samples {gen.image_vocab_size} codes but the detokenizer has "
                             f"{self.detokenizer.codebook_size}")
        _check_generation_defaults(self.generation_defaults, self.task)
        return self


@validated
class ImageDetokenizerConfig(CheckpointConfig):
    """A stand-alone image detokenizer checkpoint (a converted VQGAN or dVAE decoder)."""

    task: Literal["image-detokenizer"]
    architecture: DetokenizerArchitecture
    detokenizer: DetokenizerConfig

    @property
    def blocks(self) -> int:
        return self.detokenizer.blocks

    @model_validator(mode="after")
    def _check(self):
        if self.architecture != self.detokenizer.architecture:
            raise ValueError(f"architecture {self.architecture!r} differs from detokenizer.architecture "
                             f"{self.detokenizer.architecture!r}")
        return self


@validated
class AudioEncoderConfig:
    """a2g-gpt's audio encoder: two Conv1d (kernel 3, stride 2, padding 1, exact GELU) over log-mel
    frames, learned positions, pre-LN transformer blocks, a final LayerNorm."""

    n_mels: Width
    hidden_size: Width
    num_layers: Layers
    num_heads: Width
    intermediate_size: Width
    max_positions: Positions
    layer_norm_eps: Positive = 1e-5

    @property
    def blocks(self) -> int:
        return self.num_layers

    @model_validator(mode="after")
    def _check(self):
        _check_heads(self.hidden_size, self.num_heads)
        return self


@validated
class MotionVQConfig:
    """The decoder of a T2M-GPT-style motion VQ-VAE: codebook -> Conv1d -> ReLU -> ``levels`` x
    (ResStack with dilations ``growth**i`` reversed, nearest 2x upsample, Conv1d) -> Conv1d -> ReLU ->
    Conv1d to ``2 * joints`` normalized coordinates per frame."""

    codebook_size: Vocab
    code_dim: Width
    width: Width
    depth: Layers
    growth: Positions
    joints: Width = 52
    levels: Levels = 2

    @property
    def downsample_factor(self) -> int:
        return 2 ** self.levels

    @property
    def blocks(self) -> int:
        return self.levels * self.depth

    @model_validator(mode="after")
    def _check(self):
        if self.growth ** (self.depth - 1) > MAX_POSITIONS:
            raise ValueError(f"the largest dilation growth**(depth - 1) = {self.growth}**{self.depth - 1} must be "
                             f"at most {MAX_POSITIONS}")
        return self


@validated
class GestureConfig:
    """How audio becomes poses: the audio front end, the frame rate, the sliding windows (see
    :mod:`mmgen_engine.pipelines.gesture_windows`), the decoder's special tokens and the skeleton
    (parent of each joint, -1 for the root)."""

    bos_token_id: TokenId
    eos_token_id: TokenId
    skeleton: list[Int]
    front_end: Str = "log_mel_400"
    sample_rate: Positions = 16000
    fps: Positions = 15
    window_frames: Positions = 64
    seed_tokens: Positions = 4

    @model_validator(mode="after")
    def _check(self):
        if (self.front_end, self.sample_rate) != ("log_mel_400", 16000):
            raise ValueError(f"unsupported audio front end {self.front_end!r} at {self.sample_rate} Hz "
                             f"(log_mel_400 at 16000 Hz)")
        if self.skeleton != PARENTS:
            raise ValueError("skeleton: a2g-gpt's poses are the PATS 52-joint upper body; this skeleton differs")
        return self


@validated
class SpeechToGestureConfig(CheckpointConfig):
    """A speech-to-gesture checkpoint (a2g-gpt): audio encoder, GPT-2 decoder with cross-attention
    over motion tokens, motion VQ decoder."""

    task: Literal["speech-to-gesture"]
    architecture: Literal["a2g-gpt"]
    audio_encoder: AudioEncoderConfig
    decoder: GPT2Config
    motion: MotionVQConfig
    gesture: GestureConfig
    generation_defaults: GenerationDefaults | None = None
    quantization: QuantizationConfig | None = None

    @property
    def window_tokens(self) -> int:
        return self.gesture.window_frames // self.motion.downsample_factor

    @property
    def blocks(self) -> int:
        return self.audio_encoder.blocks + self.decoder.blocks + self.motion.blocks

    @model_validator(mode="after")
    def _check(self):
        enc, dec, motion, g = self.audio_encoder, self.decoder, self.motion, self.gesture
        if not dec.cross_attention or enc.hidden_size != dec.hidden_size:
            raise ValueError(f"the decoder must cross-attend to the {enc.hidden_size}-wide audio states")
        if g.window_frames % motion.downsample_factor or g.seed_tokens >= self.window_tokens:
            raise ValueError(f"gesture: a window of {g.window_frames} frames must be whole motion tokens "
                             f"({motion.downsample_factor} frames each) and longer than its {g.seed_tokens} "
                             f"seed tokens")
        if dec.max_positions < self.window_tokens + 1:
            raise ValueError(f"the decoder's {dec.max_positions} positions do not hold a window's "
                             f"{self.window_tokens} tokens after bos")
        ids = {g.bos_token_id, g.eos_token_id}
        if len(ids) != 2 or min(ids) < motion.codebook_size or max(ids) >= dec.vocab_size:
            raise ValueError(f"gesture: bos and eos must be distinct ids after the {motion.codebook_size} motion "
                             f"codes, inside the vocabulary of {dec.vocab_size}")
        if len(g.skeleton) != motion.joints:
            raise ValueError(f"gesture.skeleton has {len(g.skeleton)} joints, the motion decoder {motion.joints}")
        mels = (g.sample_rate // 160) * (g.window_frames - g.seed_tokens * motion.downsample_factor)
        if mels % g.fps:
            raise ValueError(f"gesture: windows of {g.window_frames} frames seeded with {g.seed_tokens} tokens do "
                             f"not start on a log-mel frame at {g.fps} fps")
        positions = math.ceil(math.ceil(math.ceil(g.window_frames * (g.sample_rate // 160) / g.fps) / 2) / 2)
        if enc.n_mels != 64 or enc.max_positions != positions:
            raise ValueError(f"audio_encoder: a window gives {positions} states of 64 log-mel bins, the encoder "
                             f"takes {enc.max_positions} of {enc.n_mels}")
        _check_generation_defaults(self.generation_defaults, self.task)
        return self


# task -> top-level config class; the one place a task name chooses a config type.
CONFIG_CLASSES = {"captioning": CaptioningConfig, "text-to-image": TextToImageConfig,
                  "speech-to-gesture": SpeechToGestureConfig, "image-detokenizer": ImageDetokenizerConfig}
