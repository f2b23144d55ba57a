"""Text-to-image (DALL·E Mega / Mini through min-dalle): prompt -> BART encoder -> image tokens
sampled one by one with supercondition -> VQGAN -> pixels.

Tokenization is min-dalle's ``TextTokenizer``: emoji spelled out (``emoji.demojize``), lower case,
non-ASCII dropped, words split on single spaces, each word BPE'd from its characters after a leading
``"Ġ"`` (the pair of lowest merge rank merged first, its first occurrence only), unknown subwords ->
``<unk>``, then ``<s> ... </s>``. Rows are cut to the 64-token context as min-dalle cuts them and
padded with ``<pad>`` (1). Each request runs as two decoder rows: the prompt and the unconditioned
row ``[<s>, last token, pad ...]`` built from the prompt row's first and last real token, combined
per step as ``uncond * (1 - g) + cond * g`` (``g`` = ``guidance_scale``, min-dalle's supercondition
factor).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import torch

from ..checkpoint import check_tokenizer, load_model, read_json
from ..config import TextToImageConfig
from ..errors import CheckpointError, InputError, one_line
from ..files import open_regular_file
from ..models import build_model
from ..runtime import CUDAGraphs, SamplingParams
from ..runtime.layout import channels_last_weights, column_major_weights
from ..runtime.limits import MAX_IMAGES_PER_CALL, MAX_NEW_TOKENS, check_count, check_int, check_prompt
from ..runtime.sampler import check_sampling
from .detokenizer import decode, to_pil
from .generation_defaults import builtin_sampling, default_sampling
from .stages import Stages

# min-dalle's defaults (generate_image: top_k 256, supercondition_factor 16, temperature 1): the
# sampling of a checkpoint without generation defaults
DEFAULT_SAMPLING = builtin_sampling("text-to-image")
WORD_START = chr(ord(" ") + 256)  # "Ġ"
STREAM_EVERY = 32
PROGRESS_EVERY = 8  # generate(progress=...) reports every this many image tokens


class MinDalleTokenizer:
    """min-dalle's BPE tokenizer (see the module docstring) over ``vocab.json`` + ``merges.txt``."""

    def __init__(self, vocab: dict[str, int], merges: list[str]):
        self.vocab = vocab
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.bos, self.eos, self.unk = vocab["<s>"], vocab["</s>"], vocab["<unk>"]

    @classmethod
    def from_files(cls, vocab_path: Path, merges_path: Path) -> MinDalleTokenizer:
        vocab = read_json(vocab_path)  # bounded in size and nesting
        try:
            with open_regular_file(merges_path, "min-dalle's merges.txt", CheckpointError) as f:
                merges = f.read().decode("utf-8").split("\n")[1:-1]  # header line, final newline
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{merges_path}: unreadable tokenizer merges ({one_line(e)})") from None
        if (not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values())
                or not all(t in vocab for t in ("<s>", "</s>", "<unk>"))):
            raise CheckpointError(f"{vocab_path}: not a min-dalle vocabulary (token -> integer id, with ids for "
                                  f"<s>, </s>, <unk>)")
        return cls(vocab, merges)

    @functools.lru_cache(maxsize=4096)
    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = [WORD_START, *word]
        while len(parts) > 1:
            pairs = list(zip(parts[:-1], parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            i = pairs.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """``[<s>, ids..., </s>]`` of ``text`` exactly as min-dalle's ``TextTokenizer.tokenize``."""
        from emoji import demojize

        text = demojize(text, delimiters=("", "")).lower().encode("ascii", errors="ignore").decode()
        ids = [self.vocab.get(part, self.unk) for word in text.split(" ") if word for part in self._bpe(word)]
        return [self.bos, *ids, self.eos]


class TextToImagePipeline(Stages):
    """Generates images from prompts with a converted min-dalle checkpoint (see :func:`mmgen_engine.load`)."""

    task = "text-to-image"

    def __init__(self, model, tokenizer: MinDalleTokenizer, config: TextToImageConfig, device: torch.device):
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self.dtype = model.decoder.wte.dtype
        gen = config.generation
        self.text_len = config.encoder.max_positions
        self.num_tokens = gen.grid_size ** 2
        # sampling=None: the checkpoint's generation defaults, else min-dalle's (DEFAULT_SAMPLING); a
        # guidance_scale left out is min-dalle's 16
        self.default_sampling = _guided(default_sampling(config), DEFAULT_SAMPLING.guidance_scale)
        # on CUDA the prefill and decode steps are replayed from CUDA graphs (False: eager, same tokens)
        self.use_cuda_graphs = device.type == "cuda"
        if device.type == "cuda":
            self._graphs = CUDAGraphs(model.decoder, self.dtype, device, guided=True,
                                      vocab_limit=gen.image_vocab_size)
        self._init_stages({"text_encoder": self._encode_text, "detokenizer": model.detokenizer})

    def _encode_text(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """Encoder states ``[B, 64, D]`` of text rows ``[B, 64]``, their padding masked."""
        return self.model.encoder(text_tokens, (text_tokens != self.config.generation.text_pad_token_id).sum(1))

    @classmethod
    def from_checkpoint(cls, path: Path, config: TextToImageConfig, device: torch.device,
                        dtype: torch.dtype | None, rebuild=None) -> TextToImagePipeline:
        default_sampling(config, str(path / "config.json"))  # refused before anything is read
        tokens = config.generation.grid_size ** 2
        if tokens > MAX_NEW_TOKENS:  # refused at load, not at every call as a max_new_tokens the user never set
            raise CheckpointError(f"{path}: a {config.generation.grid_size}x{config.generation.grid_size} token grid "
                                  f"is {tokens} image tokens, over the limit of {MAX_NEW_TOKENS} new tokens")
        tokenizer = MinDalleTokenizer.from_files(path / "vocab.json", path / "merges.txt")
        check_tokenizer(str(path / "vocab.json"), tokenizer.vocab.values(), config.encoder.vocab_size,
                        {"text_pad_token_id": config.generation.text_pad_token_id})
        model = load_model(path, config, build_model, device, dtype, rebuild)  # rebuild: quantize at load
        if device.type == "cpu":
            column_major_weights(model.decoder)
        channels_last_weights(model.detokenizer)
        return cls(model, tokenizer, config, device)

    def tokenize(self, prompts) -> torch.Tensor:
        """Prompt strings (a string or a list of at most ``MAX_IMAGES_PER_CALL``, each of at most
        ``MAX_PROMPT_CHARS`` characters) -> text rows ``[B, 64]`` as min-dalle makes them (cut to
        the context, with a warning, then padded)."""
        prompts = _prompt_list(prompts)
        pad = self.config.generation.text_pad_token_id
        rows = torch.full((len(prompts), self.text_len), pad, dtype=torch.int64)
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt)
            if len(ids) == 2:
                raise InputError(f"prompt {prompt!r} is empty (no words left after min-dalle's normalization: "
                                 f"lower-case ASCII)")
            if len(ids) > self.text_len:
                warnings.warn(f"prompt {prompt[:40]!r}... has {len(ids)} tokens; cut to the model's "
                              f"{self.text_len} as min-dalle does", stacklevel=3)
                ids = ids[:self.text_len]
            rows[i, :len(ids)] = torch.tensor(ids)
        return rows

    def _check_text(self, text_tokens) -> torch.Tensor:
        """Rows ``[B, 64]`` -> their lengths; real tokens first, then only padding."""
        pad, vocab = self.config.generation.text_pad_token_id, self.config.encoder.vocab_size
        if (not isinstance(text_tokens, torch.Tensor) or text_tokens.dim() != 2 or text_tokens.is_floating_point()
                or text_tokens.dtype == torch.bool or text_tokens.shape[1] != self.text_len):
            shape = tuple(text_tokens.shape) if isinstance(text_tokens, torch.Tensor) else type(text_tokens).__name__
            raise InputError(f"text_tokens must be an integer tensor [B, {self.text_len}], got {shape}")
        if text_tokens.shape[0] == 0:
            raise InputError("text_tokens has an empty batch")
        check_count("text_tokens rows", text_tokens.shape[0])
        if bool(((text_tokens < 0) | (text_tokens >= vocab)).any()):
            raise InputError(f"text_tokens holds ids outside the vocabulary [0, {vocab})")
        real = text_tokens != pad
        lengths = real.sum(dim=1)
        positions = torch.arange(self.text_len)
        if bool((real != (positions < lengths[:, None])).any()) or bool((lengths < 2).any()):
            raise InputError("each text_tokens row must be <s> ... </s> (at least 2 tokens) followed only by "
                             f"padding ({pad})")
        return lengths

    def _params(self, sampling: SamplingParams | None) -> SamplingParams:
        """The sampling of a call: ``sampling``, or the checkpoint's defaults when it is None; a
        ``guidance_scale`` of None is the defaults' (min-dalle always superconditions)."""
        if check_sampling(sampling) is None:
            return self.default_sampling
        return _guided(sampling, self.default_sampling.guidance_scale)

    def generate_tokens_stream(self, text_tokens: torch.Tensor, sampling: SamplingParams | None = None,
                               every: int | None = STREAM_EVERY):
        """Like :meth:`generate_tokens`, yielding the tokens so far ``[B, n]`` every ``every`` tokens."""
        lengths = self._check_text(text_tokens)
        params = self._params(sampling)
        gen = self.config.generation
        batch = text_tokens.shape[0]
        uncond = torch.full_like(text_tokens, gen.text_pad_token_id)
        uncond[:, 0] = text_tokens[:, 0]
        uncond[:, 1] = text_tokens[torch.arange(batch), lengths - 1]
        rows = torch.cat([uncond, text_tokens])
        row_lengths = torch.cat([torch.full_like(lengths, 2), lengths]).to(self.device)
        # the encoder runs once per distinct row (several images of a prompt share theirs)
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        with torch.inference_mode():  # not around the yields: the caller runs between them
            unique = unique.to(self.device)
            states = self.stages["text_encoder"](unique)[inverse.to(self.device)]
        prompt = torch.full((2 * batch, 1), gen.bos_token_id, dtype=torch.int64, device=self.device)
        yield from self.decode_stream(prompt, states, row_lengths, self.num_tokens, eos_token_id=None,
                                      pad_token_id=gen.bos_token_id, sampling=params, guided=True,
                                      vocab_limit=gen.image_vocab_size, every=every)

    def generate_tokens(self, text_tokens: torch.Tensor, sampling: SamplingParams | None = None) -> torch.LongTensor:
        """Text rows ``[B, 64]`` (min-dalle's tokenizer output, see :meth:`tokenize`) -> image tokens
        ``[B, grid**2]``, row-major. ``sampling`` None: the checkpoint's generation defaults
        (:attr:`default_sampling`; without them min-dalle's: top-k 256, guidance 16); a
        ``guidance_scale`` of None is the defaults'; ``top_k=1`` (or ``do_sample=False``) is
        deterministic."""
        for tokens in self.generate_tokens_stream(text_tokens, sampling, every=None):
            pass
        return tokens

    def decode_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, h, w]`` or ``[B, h*w]`` -> pixels ``[B, 3, H, W]`` float32 in [0, 1]."""
        det = self.config.detokenizer
        return decode(self.stages["detokenizer"], image_tokens, det.codebook_size, det.downsample_factor, self.device)

    def _partial(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens so far, the rest of the grid filled as min-dalle fills it (its start token, when it
        is a code of the detokenizer; else code 0)."""
        gen = self.config.generation
        fill = gen.bos_token_id if gen.bos_token_id < self.config.detokenizer.codebook_size else 0
        full = torch.full((tokens.shape[0], self.num_tokens), fill, dtype=torch.int64, device=tokens.device)
        full[:, :tokens.shape[1]] = tokens
        return full

    def _request(self, prompts, images_per_prompt, sampling) -> tuple[torch.Tensor, SamplingParams]:
        """The text rows (each prompt's ``images_per_prompt`` times) and the sampling of a request,
        every limit checked before a prompt is tokenized."""
        images_per_prompt = check_int("images_per_prompt", images_per_prompt, 1, MAX_IMAGES_PER_CALL)
        params = self._params(sampling)
        prompts = _prompt_list(prompts)
        check_count(f"images ({len(prompts)} prompts x {images_per_prompt} images_per_prompt)",
                    len(prompts) * images_per_prompt)
        return self.tokenize(prompts).repeat_interleave(images_per_prompt, dim=0), params

    def generate_stream(self, prompts, images_per_prompt: int = 1, sampling: SamplingParams | None = None,
                        every: int | None = STREAM_EVERY):
        """Like :meth:`generate`, yielding the partial images every ``every`` tokens (None: only the
        final ones), then the final ones."""
        text, params = self._request(prompts, images_per_prompt, sampling)
        for tokens in self.generate_tokens_stream(text, params, every):
            yield to_pil(self.decode_tokens(self._partial(tokens)))

    def generate(self, prompts, images_per_prompt: int = 1, sampling: SamplingParams | None = None,
                 progress: Callable[[int, int], object] | None = None) -> list:
        """``images_per_prompt`` images per prompt (a string or a list), as PIL images in prompt order;
        at most ``MAX_IMAGES_PER_CALL`` in all. ``progress``, if given, is called as
        ``progress(done, total)`` while the image tokens are drawn: ``done`` of every image's
        ``total`` (``grid_size ** 2``) tokens so far, every :data:`PROGRESS_EVERY` tokens and once
        at the end."""
        if progress is not None and not callable(progress):
            raise InputError(f"progress must be a callable or None, got {type(progress).__name__}")
        text, params = self._request(prompts, images_per_prompt, sampling)
        every = PROGRESS_EVERY if progress is not None else None
        for tokens in self.generate_tokens_stream(text, params, every):
            if progress is not None:
                if tokens.is_cuda:  # the host runs ahead of the device: report tokens that exist
                    torch.cuda.current_stream(tokens.device).synchronize()
                progress(tokens.shape[1], self.num_tokens)
        return to_pil(self.decode_tokens(tokens))


def _guided(sampling: SamplingParams, guidance_scale: float) -> SamplingParams:
    """``sampling`` with ``guidance_scale`` where it has none."""
    if sampling.guidance_scale is not None:
        return sampling
    return dataclasses.replace(sampling, guidance_scale=guidance_scale)


def _prompt_list(prompts) -> list[str]:
    """``prompts`` (a string or a list or tuple of them) as a list of checked prompts (see
    :func:`~mmgen_engine.runtime.limits.check_prompt`), at most ``MAX_IMAGES_PER_CALL``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        hint = " (decode bytes to str first)" if isinstance(prompts, (bytes, bytearray)) else ""
        raise InputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}{hint}")
    if not prompts:
        raise InputError("no prompts given")
    check_count("prompts", len(prompts))
    return [check_prompt(prompt, f"prompt {i}" if len(prompts) > 1 else "prompt") for i, prompt in enumerate(prompts)]


def image_grid(images: list, columns: int) -> PIL.Image.Image:
    """Images of one size tiled row by row, ``columns`` per row."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = PIL.Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid
