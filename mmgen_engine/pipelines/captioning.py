"""Image captioning: image -> ViT -> GPT-2 with cross-attention -> BPE text.

Preprocessing reproduces Hugging Face's ``ViTImageProcessor`` (PIL backend) bit for bit: RGB,
PIL resize to (height, width) with the configured filter, ``uint8 -> float64 * rescale_factor ->
float32``, ``(x - mean) / std`` in float32, channels first.
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


class CaptioningPipeline:
    """Captions images with a converted ViT-GPT2 checkpoint (see :func:`mmgen_engine.load`)."""

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
            if p.do_resize:
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

    def generate_ids(self, pixel_values: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                     sampling: SamplingParams | None = None) -> torch.LongTensor:
        """``pixel_values [B, 3, H, W]`` (preprocessed) -> generated ids ``[B, max_new_tokens]``, start
        token excluded; after ``eos`` a row holds ``pad_token_id``. Greedy when ``sampling`` is None."""
        enc = self.config.encoder
        want = (enc.num_channels, enc.image_size, enc.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise InputError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}], got {shape}")
        if pixel_values.shape[0] == 0:
            raise InputError("pixel_values has an empty batch")
        gen = self.config.generation
        with torch.inference_mode():
            encode = self._graphed_encode if self.use_cuda_graphs else self.model.encode
            states = encode(pixel_values.to(self.device, self.dtype))
            batch = states.shape[0]
            lengths = torch.full((batch,), states.shape[1], dtype=torch.int64, device=self.device)
            prompt = torch.full((batch, 1), gen.decoder_start_token_id, dtype=torch.int64, device=self.device)
            return generate(self.model.decoder, prompt, states, lengths, max_new_tokens,
                            eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                            min_new_tokens=min_new_tokens, sampling=sampling,
                            graphs=self._graphs if self.use_cuda_graphs else None)

    def caption(self, images, max_new_tokens: int = 20, sampling: SamplingParams | None = None) -> list[str]:
        """Captions of ``images`` (a list of paths, PIL images or HxWx3 uint8 arrays)."""
        ids = self.generate_ids(self.preprocess(images), max_new_tokens, sampling=sampling).tolist()
        eos = self.config.generation.eos_token_id
        rows = [row[:row.index(eos)] if eos in row else row for row in ids]  # the padding is not text
        return [text.strip() for text in self.tokenizer.decode_batch(rows, skip_special_tokens=True)]
