"""Image captioning: image -> vision encoder -> text decoder (cross-attention or image prefix) -> text.

Architectures: ViT-GPT2, BLIP, GIT, ClipCap (see :class:`~mmgen_engine.config.CaptioningConfig`).
Preprocessing reproduces Hugging Face's ``ViTImageProcessor``, ``BlipImageProcessor`` and
``CLIPImageProcessor`` (PIL backend) bit for bit: RGB, PIL resize with the configured filter to
(height, width) or, with ``shortest_edge``, keeping the aspect ratio (the longer side
``int(shortest_edge * long / short)``) then a center crop to (height, width), ``uint8 -> float64 *
rescale_factor -> float32``, ``(x - mean) / std`` in float32, channels first.

A text prompt (``caption(..., prompt="a picture of")``) is tokenized without special tokens and put
after the start token, as BLIP's and GIT's processors and ``generate`` do; the caption then starts
with the prompt, as theirs do.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tokenizers import Tokenizer

from ..checkpoint import assign_weights, load_weights, torch_dtype
from ..config import CaptioningConfig
from ..errors import CheckpointError, InputError, one_line
from ..models import ARCHITECTURES
from ..runtime import CUDAGraphs, GraphedCall, SamplingParams, generate
from ..runtime.layout import column_major_weights

def load_image(image) -> PIL.Image.Image:
    """A path, ``PIL.Image`` or ``HxWx3`` uint8 array -> RGB ``PIL.Image``; bad input -> InputError."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{path}: image file not found")
        try:
            with PIL.Image.open(path) as im:  # PIL refuses decompression bombs here
                im.load()
                return im.convert("RGB")
        except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise InputError(f"{path}: unreadable image ({one_line(e)})") from None
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise InputError(f"image arrays must be HxWx3 uint8, got {image.dtype} of shape {image.shape}")
        return PIL.Image.fromarray(image, "RGB")
    raise InputError(f"unsupported image input of type {type(image).__name__}; "
                     f"pass a file path, a PIL.Image or an HxWx3 uint8 array")


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shorter side to ``shortest_edge`` (transformers'
    ``get_resize_output_image_size`` with ``default_to_square=False``)."""
    short, long = sorted((width, height))
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


class CaptioningPipeline:
    """Captions images with a converted ViT-GPT2, BLIP, GIT or ClipCap checkpoint (see
    :func:`mmgen_engine.load`)."""

    task = "captioning"

    def __init__(self, model, tokenizer: Tokenizer, config: CaptioningConfig, device: torch.device):
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self.dtype = model.decoder.wte.dtype
        # on CUDA the encoder (per batch size), the prefill and the decode steps (per batch bucket)
        # are captured as CUDA graphs and replayed; set False to run them eagerly (same tokens)
        self.use_cuda_graphs = device.type == "cuda"
        if device.type == "cuda":
            self._graphs = CUDAGraphs(model.decoder, self.dtype, device)
            self._graphed_encode = GraphedCall(model.encode)
        p = config.preprocess
        self._mean = np.array(p.image_mean, dtype=np.float32)[:, None, None]
        self._std = np.array(p.image_std, dtype=np.float32)[:, None, None]

    @classmethod
    def from_checkpoint(cls, path: Path, config: CaptioningConfig, device: torch.device,
                        dtype: torch.dtype | None) -> "CaptioningPipeline":
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{tok_file}: unreadable tokenizer ({one_line(e)})") from None
        model = ARCHITECTURES[config.architecture](config, device="meta")
        assign_weights(model, load_weights(path, device), str(path), torch_dtype(config.dtype), dtype)
        if device.type == "cpu":
            column_major_weights(model.decoder)
        return cls(model, tokenizer, config, device)

    def preprocess(self, images) -> torch.Tensor:
        """Images (paths, PIL images or uint8 arrays) -> ``pixel_values [B, 3, H, W]`` float32."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("no images given")
        p = self.config.preprocess
        out = []
        for image in images:
            im = load_image(image)
            if p.shortest_edge:
                im = im.resize(resized_size(*im.size, p.shortest_edge), resample=p.resample)
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
        """The ids of a text prompt as they follow the start token (no special tokens)."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def generate_ids(self, pixel_values: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                     sampling: SamplingParams | None = None, prompt_ids=None) -> torch.LongTensor:
        """``pixel_values [B, 3, H, W]`` (preprocessed) -> generated ids ``[B, max_new_tokens]``, start
        token and prompt excluded; after ``eos`` a row holds ``pad_token_id``. Greedy when ``sampling``
        is None. ``prompt_ids``: text ids that follow the start token in every row (a list, ``[T]`` or
        ``[B, T]``), e.g. :meth:`tokenize_prompt` of BLIP's "a picture of"."""
        enc = self.config.encoder
        want = (enc.num_channels, enc.image_size, enc.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise InputError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}], got {shape}")
        if pixel_values.shape[0] == 0:
            raise InputError("pixel_values has an empty batch")
        gen = self.config.generation
        prompt = self._prompt(pixel_values.shape[0], prompt_ids)
        with torch.inference_mode():
            encode = self._graphed_encode if self.use_cuda_graphs else self.model.encode
            states = encode(pixel_values.to(self.device, self.dtype))
            batch = states.shape[0]
            lengths = torch.full((batch,), states.shape[1], dtype=torch.int64, device=self.device)
            return generate(self.model.decoder, prompt, states, lengths, max_new_tokens,
                            eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                            min_new_tokens=min_new_tokens, sampling=sampling,
                            graphs=self._graphs if self.use_cuda_graphs else None)

    def _prompt(self, batch: int, prompt_ids) -> torch.Tensor:
        """``[B, T]`` decoder input: the start token (if the model has one), then the prompt ids."""
        start = self.config.generation.decoder_start_token_id
        ids = torch.as_tensor([] if prompt_ids is None else prompt_ids, dtype=torch.int64)
        if ids.dim() == 1:
            ids = ids.expand(batch, -1)
        vocab = self.config.decoder.vocab_size
        if ids.dim() != 2 or ids.shape[0] != batch:
            raise InputError(f"prompt_ids must be [T] or [{batch}, T], got {tuple(ids.shape)}")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
            raise InputError(f"prompt_ids must lie in the vocabulary 0..{vocab - 1}")
        if start is not None:
            ids = torch.cat([torch.full((batch, 1), start, dtype=torch.int64), ids], dim=1)
        return ids.to(self.device)

    def caption(self, images, max_new_tokens: int = 20, sampling: SamplingParams | None = None,
                prompt: str | None = None) -> list[str]:
        """Captions of ``images`` (a list of paths, PIL images or HxWx3 uint8 arrays). With a text
        ``prompt`` the model continues it and the caption starts with it."""
        prompt_ids = self.tokenize_prompt(prompt) if prompt is not None else []
        ids = self.generate_ids(self.preprocess(images), max_new_tokens, sampling=sampling,
                                prompt_ids=prompt_ids).tolist()
        gen = self.config.generation
        eos, keep = gen.eos_token_id, int(gen.include_eos)
        rows = [prompt_ids + (row[:row.index(eos) + keep] if eos in row else row) for row in ids]  # no padding
        return [text.strip() for text in self.tokenizer.decode_batch(rows, skip_special_tokens=True)]
