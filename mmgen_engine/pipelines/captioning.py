"""Image captioning: image -> vision encoder -> text decoder (cross-attention or image prefix) -> text.

Architectures: ViT-GPT2, BLIP, GIT, ClipCap, LLaVA, BLIP-2 (see
:class:`~mmgen_engine.config.CaptioningConfig`).
Preprocessing reproduces Hugging Face's ``ViTImageProcessor``, ``BlipImageProcessor`` and
``CLIPImageProcessor`` (PIL backend) bit for bit: RGB, PIL resize with the configured filter to
(height, width) or, with ``shortest_edge``, keeping the aspect ratio (the longer side
``int(shortest_edge * long / short)``) then a center crop to (height, width), ``uint8 -> float64 *
rescale_factor -> float32``, ``(x - mean) / std`` in float32, channels first.

A text prompt (``caption(..., prompt="a picture of")``) is tokenized without special tokens and put
after the start token, as BLIP's and GIT's processors and ``generate`` do; the caption then starts
with the prompt, as theirs do.

LLaVA's prompt is a conversation with one ``<image>`` placeholder where the image goes
(:data:`LLAVA_PROMPT` when left out, LLaVA-1.5's template around its caption instruction); it is
tokenized as LLaVA's processor does (the model's ``tokenizer.json``, its BOS in front), the text
before the placeholder and the image's states are prefilled as the decoder's prefix, the text after
it is the decoder prompt, and the caption is the answer only (the prompt is not repeated). With
``pad_to_square`` (LlavaImageProcessor's ``do_pad``) the image is first padded to a square with the
mean color, as that processor does. The repetition controls (``repetition_penalty``,
``no_repeat_ngram_size``) see what transformers' ``generate`` sees: the whole prompt with the
placeholder repeated once per image token, then the answer.

BLIP-2's image is its query outputs in front of OPT's BOS (``</s>``, the start token) and the prompt
(e.g. ``"Question: what is on the table? Answer:"``), as ``Blip2Processor`` lays them out (the
queries' placeholders, then the tokenizer's BOS and text); the caption starts with the prompt, as
the processor's ``batch_decode`` of ``generate``'s output does. Its repetition controls likewise see
BOS, the prompt and the caption, not the queries' placeholder ids.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tokenizers import Tokenizer

from ..checkpoint import check_tokenizer, load_model
from ..config import CaptioningConfig
from ..errors import CheckpointError, InputError, one_line
from ..files import open_regular_file
from ..models import build_model
from ..runtime import CUDAGraphs, RecordedSteps, SamplingParams
from ..runtime.beam import beam_search
from ..runtime.layout import column_major_weights
from ..runtime.limits import MAX_PROMPT_TOKENS, MAX_RESIZED_PIXELS, check_count, check_new_tokens, check_prompt
from ..runtime.sampler import check_sampling
from .generation_defaults import default_new_tokens, default_sampling
from .stages import Stages

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# LLaVA-1.5's conversation template ("USER: <image>\n{question} ASSISTANT:") around the caption
# instruction of its COCO evaluation
LLAVA_PROMPT = "USER: <image>\nProvide a one-sentence caption for the provided image. ASSISTANT:"
# CPU recorded decode steps: the multiple the spans read are rounded up to, and the eager runs of a
# step shape before it is recorded (recording a GPT-2 small step costs about RECORD_AFTER steps)
SPAN_BUCKET = 32
RECORD_AFTER = 4


def to_rgb(im: PIL.Image.Image) -> PIL.Image.Image:
    """An image of any PIL mode as 8-bit RGB, converted by value.

    - 16-bit modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``; what Pillow opens 16-bit grayscale
      PNGs as) map 0..65535 onto 0..255 (``round(v / 257)``, the inverse of the usual 8-to-16-bit
      ``v * 257``). ``I`` (32-bit integers) is read the same way, as 16-bit data: it is the mode
      older Pillow versions give 16-bit grayscale PNGs, and what ``I;16`` images convert to;
      values outside 0..65535 are clipped. ``F`` (32-bit floats) is read as ``[0, 1]``, the
      convention of float images in numpy, torch and transformers' processors (which rescale
      floats by 255), clipped to it (NaN as 0).
    - Transparency (an alpha band, or a palette or gray image's transparent color) is composited
      onto white; every other mode goes through PIL's ``convert("RGB")``.

    Transformers' image processors convert with ``convert_to_rgb``: alpha composited onto white
    (as here, so RGBA, LA and transparent-palette images give their processors' pixels), then
    PIL's ``convert("RGB")``, which *clips* ``I;16``, ``I`` and ``F`` values to 0..255 instead of
    scaling them: a 16-bit photo becomes almost all white and captions as nothing. Scaling gives
    the 8-bit image the models were trained on. Unsupported modes raise InputError.
    """
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        values = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        im = PIL.Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    elif im.mode == "F":
        with np.errstate(invalid="ignore"):  # a signaling NaN warns when cast; it reads as 0 like any NaN
            values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        im = PIL.Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), "L")
    try:
        if "A" in im.getbands() or im.info.get("transparency") is not None:
            white = PIL.Image.new("RGBA", im.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:  # a mode PIL cannot convert (e.g. "La")
        raise InputError(f"unsupported image mode {im.mode} ({one_line(e)})") from None


def _decoded(im: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """``im`` loaded and converted to RGB (:func:`to_rgb`); InputError if it is empty, closed or
    cannot be decoded."""
    if im.width == 0 or im.height == 0:
        raise InputError(f"{where}: the image is empty ({im.width}x{im.height} pixels)")
    try:
        im.load()
    # PIL's format decoders raise many types on corrupt data (OSError, SyntaxError, ValueError,
    # struct.error, EOFError, ...): every one means an unreadable image
    except Exception as e:
        raise InputError(f"{where}: unreadable image ({one_line(e)})") from None
    return to_rgb(im)


def load_image(image) -> PIL.Image.Image:
    """A path, ``PIL.Image`` or ``HxWx3`` uint8 array -> RGB ``PIL.Image`` (:func:`to_rgb`); bad
    input -> InputError (a missing or non-regular file, an undecodable or empty image, a closed
    ``PIL.Image``)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        with open_regular_file(path, "image file") as f:
            try:
                im = PIL.Image.open(f)  # PIL refuses decompression bombs here
            except Exception as e:  # any type, as in _decoded
                raise InputError(f"{path}: unreadable image ({one_line(e)})") from None
            with im:
                return _decoded(im, str(path))
    if isinstance(image, PIL.Image.Image):
        return _decoded(image, "PIL image")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise InputError(f"image arrays must be HxWx3 uint8, got {image.dtype} of shape {image.shape}")
        return PIL.Image.fromarray(image, "RGB")
    raise InputError(f"unsupported image input of type {type(image).__name__}; "
                     f"pass a file path, a PIL.Image or an HxWx3 uint8 array")


def _token_ids(ids) -> torch.Tensor:
    """Token ids (a list, numpy array or tensor of integers) as an int64 tensor; InputError for
    anything else, floats and bools included (a float id would be truncated silently)."""
    try:
        tensor = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # ragged, non-numeric, beyond int64
        raise InputError(f"prompt_ids must be integer token ids ({one_line(e)})") from None
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise InputError(f"prompt_ids must be integer token ids, got {str(tensor.dtype).removeprefix('torch.')}")
    return tensor.to(torch.int64)


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shorter side to ``shortest_edge`` (transformers'
    ``get_resize_output_image_size`` with ``default_to_square=False``)."""
    short, long = sorted((width, height))
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


class CaptioningPipeline(Stages):
    """Captions images with a converted ViT-GPT2, BLIP, GIT, ClipCap, LLaVA or BLIP-2 checkpoint (see
    :func:`mmgen_engine.load`)."""

    task = "captioning"

    def __init__(self, model, tokenizer: Tokenizer, config: CaptioningConfig, device: torch.device):
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self.dtype = model.decoder.wte.dtype
        # LLaVA: the id of the <image> placeholder its prompts must hold once (None: other families)
        self.image_token = config.llava.image_token_id if config.llava is not None else None
        # on CUDA the encoder (per batch size), the prefill and the decode steps (per batch bucket)
        # are captured as CUDA graphs and replayed; set False to run them eagerly (same tokens)
        self.use_cuda_graphs = device.type == "cuda"
        if device.type == "cuda":
            self._graphs = CUDAGraphs(model.decoder, self.dtype, device)
        # CPU: the decode steps replayed from recordings (runtime.recorded; a step of GPT-2 small is
        # ~2500 ATen calls, ~6 ms of them Python and dispatch), the spans read rounded up to
        # SPAN_BUCKET slots so that a request's steps share a recording and replay after a few of
        # its own. False: every step eager
        self.record_cpu_steps = device.type == "cpu"
        self.recorded_steps = RecordedSteps(model.decoder, record_after=RECORD_AFTER, span_bucket=SPAN_BUCKET)
        self._init_stages({"image_encoder": model.encode}, graphed=("image_encoder",))
        p = config.preprocess
        self._mean = np.array(p.image_mean, dtype=np.float32)[:, None, None]
        self._std = np.array(p.image_std, dtype=np.float32)[:, None, None]
        # sampling=None: the checkpoint's generation defaults (else greedy), see generation_defaults
        self.default_sampling = default_sampling(config)

    @classmethod
    def from_checkpoint(cls, path: Path, config: CaptioningConfig, device: torch.device,
                        dtype: torch.dtype | None, rebuild=None) -> CaptioningPipeline:
        default_sampling(config, str(path / "config.json"))  # refused before anything is read
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{tok_file}: unreadable tokenizer ({one_line(e)})") from None
        check_tokenizer(str(tok_file), tokenizer.get_vocab(with_added_tokens=True).values(),
                        config.decoder.vocab_size, config.generation.special_ids)
        if config.llava is not None and tokenizer.id_to_token(config.llava.image_token_id) is None:
            raise CheckpointError(f"{tok_file}: no token for llava.image_token_id {config.llava.image_token_id} "
                                  f"(the <image> placeholder)")
        model = load_model(path, config, build_model, device, dtype, rebuild)  # rebuild: quantize at load
        if device.type == "cpu":
            column_major_weights(model.decoder)
        return cls(model, tokenizer, config, device)

    def preprocess(self, images) -> torch.Tensor:
        """Images (paths, PIL images or uint8 arrays; at most ``MAX_IMAGES_PER_CALL``) ->
        ``pixel_values [B, 3, H, W]`` float32."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("no images given")
        check_count("images", len(images))
        p = self.config.preprocess
        out = []
        for image in images:
            im = load_image(image)
            if p.pad_to_square and im.width != im.height:
                side = max(im.size)
                square = PIL.Image.new("RGB", (side, side), tuple(int(m * 255) for m in p.image_mean))
                square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
                im = square
            if p.shortest_edge:
                size = resized_size(*im.size, p.shortest_edge)
                if size[0] * size[1] > MAX_RESIZED_PIXELS:
                    raise InputError(f"a {im.width}x{im.height} image would be resized to {size[0]}x{size[1]} "
                                     f"before its center crop, over the limit of {MAX_RESIZED_PIXELS} pixels "
                                     f"(an extreme aspect ratio); crop it first")
                im = im.resize(size, resample=p.resample)
                top, left = (im.height - p.height) // 2, (im.width - p.width) // 2
                im = im.crop((left, top, left + p.width, top + p.height))
            elif p.do_resize:
                im = im.resize((p.width, p.height), resample=p.resample)
            x = np.asarray(im).transpose(2, 0, 1)  # (3, H, W) uint8
            if p.do_rescale:
                x = (x.astype(np.float64) * p.rescale_factor).astype(np.float32)
            x = x.astype(np.float32, copy=False)
            if p.do_normalize:
                x = (x - self._mean) / self._std
            out.append(x)
        shapes = {x.shape for x in out}
        if len(shapes) != 1:
            raise InputError(f"images of different sizes {sorted(shapes)} cannot be batched without resizing")
        return torch.from_numpy(np.stack(out))

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """The ids of a text prompt as they follow the start token (no special tokens); at most
        ``MAX_PROMPT_CHARS`` characters and ``MAX_PROMPT_TOKENS`` tokens."""
        ids = self.tokenizer.encode(check_prompt(prompt), add_special_tokens=False).ids
        if len(ids) > MAX_PROMPT_TOKENS:
            raise InputError(f"prompt has {len(ids)} tokens; at most {MAX_PROMPT_TOKENS}")
        if self.image_token is not None:
            self._placeholder(ids)
        return ids

    def _placeholder(self, ids: list[int]) -> int:
        """LLaVA: the index of the one ``<image>`` placeholder in ``ids``; InputError if there is
        none or more than one."""
        n = ids.count(self.image_token)
        if n != 1:
            name = self.tokenizer.id_to_token(self.image_token)
            if n == 0:
                raise InputError(f"the prompt has no {name} placeholder; LLaVA puts the image where it stands, "
                                 f"e.g. {LLAVA_PROMPT!r}")
            raise InputError(f"the prompt has {n} {name} placeholders; one image takes exactly one")
        return ids.index(self.image_token)

    def generate_ids(self, pixel_values: torch.Tensor, max_new_tokens: int | None = None,
                     min_new_tokens: int | None = None, sampling: SamplingParams | None = None,
                     prompt_ids=None) -> torch.LongTensor:
        """``pixel_values [B, 3, H, W]`` (preprocessed) -> generated ids ``[B, max_new_tokens]``, start
        token and prompt excluded; after ``eos`` a row holds ``pad_token_id``. ``prompt_ids``: text ids
        that follow the start token in every row (a list, ``[T]`` or ``[B, T]``, at most
        ``MAX_PROMPT_TOKENS``), e.g. :meth:`tokenize_prompt` of BLIP's "a picture of"; for LLaVA the
        whole prompt with its one ``<image>`` placeholder, at the same position in every row (None:
        :data:`LLAVA_PROMPT`). Every argument is checked before the encoder runs.

        Left out (None), ``max_new_tokens``, ``min_new_tokens`` and ``sampling`` are the checkpoint's
        generation defaults (:meth:`default_new_tokens`, :attr:`default_sampling`), else 20, 0 and
        greedy."""
        enc = self.config.encoder
        want = (enc.num_channels, enc.image_size, enc.image_size)
        if (not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point()
                or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise InputError(f"pixel_values must be a float tensor [B, {want[0]}, {want[1]}, {want[2]}], got {shape}")
        if pixel_values.shape[0] == 0:
            raise InputError("pixel_values has an empty batch")
        check_count("images", pixel_values.shape[0])
        check_sampling(sampling)
        sampling = self.default_sampling if sampling is None else sampling
        if sampling is not None and sampling.num_beams > 1 and self.runtime != "engine":
            raise InputError(f"beam search runs on the engine's decoder only; with runtime={self.runtime!r} "
                             f"pass sampling with num_beams=1")
        gen = self.config.generation
        if self.image_token is not None and prompt_ids is None:
            prompt_ids = self.tokenize_prompt(LLAVA_PROMPT)
        text_before, prompt, length = self.split_prompt(self._prompt(pixel_values.shape[0], prompt_ids))
        max_new_tokens, min_new_tokens = self._budget(length, max_new_tokens, min_new_tokens)
        with torch.inference_mode():
            states = self.stage("image_encoder")(pixel_values.to(self.device, self.dtype))
            context = None
            if text_before is not None:
                states = self.model.prefix(states, text_before)
                context = self.image_context(text_before)
            batch = states.shape[0]
            lengths = torch.full((batch,), states.shape[1], dtype=torch.int64, device=self.device)
            if sampling is not None and sampling.num_beams > 1:
                return beam_search(self.model.decoder, prompt, states, lengths, max_new_tokens,
                                   eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                                   min_new_tokens=min_new_tokens, params=sampling,
                                   cuda_graphs=self.use_cuda_graphs, context=context)
            recorded = self.record_cpu_steps and self.runtime == "engine" and self.device.type == "cpu"
            return self.decode_ids(prompt, states, lengths, max_new_tokens, eos_token_id=gen.eos_token_id,
                                   pad_token_id=gen.pad_token_id, min_new_tokens=min_new_tokens, sampling=sampling,
                                   context=context, **({"recorded": self.recorded_steps} if recorded else {}))

    def image_context(self, text_before: torch.Tensor) -> torch.Tensor:
        """LLaVA: the ids in front of the decoder prompt as transformers' input ids hold them, the text
        before the placeholder ``[B, T]`` and the placeholder once per image token: what the
        repetition controls see before the prompt."""
        image = torch.full((text_before.shape[0], self.model.image_tokens), self.image_token, dtype=torch.int64,
                           device=text_before.device)
        return torch.cat([text_before, image], dim=1)

    def split_prompt(self, prompt: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        """``(text_before, decoder_prompt, length)`` of a decoder input ``prompt [B, T]``
        (:meth:`_prompt`): LLaVA's text before its ``<image>`` placeholder (which goes into the
        prefix, :meth:`~mmgen_engine.models.llava.Llava.prefix`), the text after it, and the prompt's
        length with the image's tokens in place of the placeholder (what transformers' ``max_length``
        counts); other families: ``(None, prompt, T)``."""
        if self.image_token is None:
            return None, prompt, prompt.shape[1]
        at = {self._placeholder(row) for row in prompt.tolist()}
        if len(at) != 1:
            raise InputError("prompt_ids: the <image> placeholder must stand at the same position in every row")
        at = at.pop()
        return prompt[:, :at], prompt[:, at + 1:], prompt.shape[1] - 1 + self.model.image_tokens

    def default_new_tokens(self, prompt_length: int = 1) -> tuple[int, int]:
        """``(max_new_tokens, min_new_tokens)`` of a call that leaves them out, for a decoder prompt of
        ``prompt_length`` tokens (the start token and any text prompt): the checkpoint's generation
        defaults (``max_length`` counts the prompt), else 20 and 0."""
        return default_new_tokens(self.config, prompt_length)

    def _budget(self, prompt_length: int, max_new_tokens, min_new_tokens) -> tuple[int, int]:
        """The checked ``(max_new_tokens, min_new_tokens)`` of a call, the checkpoint's where left out."""
        default_max, default_min = self.default_new_tokens(prompt_length)
        top, _ = check_new_tokens(default_max if max_new_tokens is None else max_new_tokens)
        return check_new_tokens(top, min(default_min, top) if min_new_tokens is None else min_new_tokens)

    def _prompt(self, batch: int, prompt_ids) -> torch.Tensor:
        """``[B, T]`` decoder input: the start token (if the model has one), then the prompt ids."""
        start = self.config.generation.decoder_start_token_id
        ids = _token_ids([] if prompt_ids is None else prompt_ids)
        if ids.dim() == 1:
            ids = ids.expand(batch, -1)
        vocab = self.config.decoder.vocab_size
        if ids.dim() != 2 or ids.shape[0] != batch:
            raise InputError(f"prompt_ids must be [T] or [{batch}, T], got {tuple(ids.shape)}")
        if ids.shape[1] > MAX_PROMPT_TOKENS:
            raise InputError(f"prompt_ids has {ids.shape[1]} tokens; at most {MAX_PROMPT_TOKENS}")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
            raise InputError(f"prompt_ids must lie in the vocabulary 0..{vocab - 1}")
        if start is not None:
            ids = torch.cat([torch.full((batch, 1), start, dtype=torch.int64), ids], dim=1)
        return ids.to(self.device)

    def caption(self, images, max_new_tokens: int | None = None, sampling: SamplingParams | None = None,
                prompt: str | None = None) -> list[str]:
        """Captions of ``images`` (a list of paths, PIL images or HxWx3 uint8 arrays). With a text
        ``prompt`` the model continues it and the caption starts with it. ``max_new_tokens`` and
        ``sampling`` left out (None) are the checkpoint's generation defaults, else 20 and greedy (see
        :meth:`generate_ids`). Every argument is checked before an image is read (limits in
        :mod:`~mmgen_engine.runtime.limits`). LLaVA: ``prompt`` is the conversation with one
        ``<image>`` placeholder (None: :data:`LLAVA_PROMPT`) and the caption is the answer alone."""
        if max_new_tokens is not None:
            check_new_tokens(max_new_tokens)
        check_sampling(sampling)
        if prompt is None and self.image_token is not None:
            prompt = LLAVA_PROMPT
        prompt_ids = self.tokenize_prompt(prompt) if prompt is not None else []
        ids = self.generate_ids(self.preprocess(images), max_new_tokens, sampling=sampling,
                                prompt_ids=prompt_ids).tolist()
        gen = self.config.generation
        eos, keep = gen.eos_token_id, int(gen.include_eos)
        shown = [] if self.image_token is not None else prompt_ids  # LLaVA answers: the prompt is not the caption
        rows = [shown + (row[:row.index(eos) + keep] if eos in row else row) for row in ids]  # no padding
        return [text.strip() for text in self.tokenizer.decode_batch(rows, skip_special_tokens=True)]
