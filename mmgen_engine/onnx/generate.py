"""A reference greedy generation loop over the exported decoder parts (``decoder_prefill``,
``decoder_step``) on ONNX Runtime: the engine's :func:`mmgen_engine.runtime.generate.generate_stream`
with the decoder replaced by the two sessions and the caches held as their inputs and outputs.

The token logic is the engine's own: the logits go through :func:`mmgen_engine.runtime.generate.pick`
on a :class:`~mmgen_engine.runtime.generate.DecodeState` (eos suppressed before ``min_new_tokens``,
rows padded after eos, guided pairs combined by the engine's sampler, ``vocab_limit``), so the same
logits give the same tokens. Only greedy decoding is supported (``do_sample=False``, or ``top_k=1``
which keeps the most likely token alone, as the engine's sampler does): sampling would need the
engine's Philox stream, beams and repetition controls their own state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, MMGenError, one_line
from ..runtime.generate import DecodeState, check_fits, pick
from ..runtime.limits import MAX_NEW_TOKENS, check_int, check_new_tokens
from ..runtime.sampler import SamplingParams, check_sampling
from .export import DECODER_PARTS
from .manifest import read_manifest
from .session import load_session


class _CacheFree:
    """The decoder :meth:`DecodeState.allocate` is shown: the sessions hold the K/V caches, so the
    state's own are empty (no layers); ``max_positions`` sizes its token history."""

    uses_prefix = True  # no cross cache in the state either

    def __init__(self, max_positions: int):
        self.max_positions = max_positions

    def cache_geometry(self) -> tuple[int, int, int, int]:
        return 0, 1, 1, self.max_positions


def check_greedy(sampling: SamplingParams | None) -> None:
    """InputError unless ``sampling`` (a :class:`SamplingParams` or None) decodes greedily."""
    check_sampling(sampling)
    if sampling is not None and ((sampling.do_sample and sampling.top_k != 1) or sampling.num_beams > 1
                                 or sampling.repetition_penalty != 1 or sampling.no_repeat_ngram_size):
        raise InputError("the ONNX Runtime generation loop is greedy only: do_sample=False (or top_k=1), "
                         "num_beams=1, no repetition_penalty or no_repeat_ngram_size")


class OrtGenerator:
    """Greedy generation over the decoder parts of the ONNX export ``export_dir`` (``mmgen
    export-onnx``), checked against its manifest and, given ``checkpoint_dir``, against that
    checkpoint; ``device`` as :func:`~mmgen_engine.onnx.load_session` takes it.

    The manifest's ``decoder`` says whether the decoder cross-attends to the encoder states
    (``encoder_hidden_states``, ``encoder_lengths``) or takes them as a prefix (``prefix_embeds``),
    its layers and positions."""

    def __init__(self, export_dir, checkpoint_dir=None, device: str = "cpu"):
        out = Path(export_dir)
        manifest = read_manifest(out)
        missing = [p for p in DECODER_PARTS if p not in manifest["parts"]]
        if missing or not isinstance(manifest.get("decoder"), dict):
            raise InputError(f"{out}: this export has no {' or '.join(missing or DECODER_PARTS)} part; export the "
                             f"decoder too (mmgen export-onnx CHECKPOINT OUT --parts {' '.join(DECODER_PARTS)})")
        if manifest["dtype"] == "bfloat16":
            raise InputError(f"{out}: a bfloat16 export; ONNX Runtime's CPU provider runs float32 and float16")
        self.manifest = manifest
        self.decoder = manifest["decoder"]
        self.uses_prefix = self.decoder["kind"] == "prefix"
        self.dtype = np.dtype(manifest["dtype"])
        self.prefill, self.step = (load_session(out, part, device, checkpoint_dir) for part in DECODER_PARTS)
        self.step_inputs = [i.name for i in self.step.get_inputs()]

    def _run(self, part: str, session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``session``'s outputs by name; an input whose static dimensions differ from the manifest's
        is an InputError naming it."""
        for io in self.manifest["parts"][part]["inputs"]:
            shape = feed[io["name"]].shape
            if len(shape) != len(io["shape"]) or any(isinstance(want, int) and want != got
                                                     for want, got in zip(io["shape"], shape)):
                raise InputError(f"{part} input {io['name']} must have shape {io['shape']}, got {list(shape)}")
        try:
            values = session.run(None, feed)
        except Exception as e:  # onnxruntime's InvalidArgument / Fail / ...
            raise MMGenError(f"ONNX Runtime failed in {part} ({one_line(e)})") from None
        return {o.name: v for o, v in zip(session.get_outputs(), values)}

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """The tokens :meth:`generate_stream` ends with: ``[B, max_new_tokens]``."""
        for tokens in self.generate_stream(*args, **kwargs):
            pass
        return tokens

    @torch.inference_mode()
    def generate_stream(self, prompt: torch.Tensor, encoder_states: torch.Tensor, encoder_lengths: torch.Tensor,
                        max_new_tokens: int, *, eos_token_id: int | None, pad_token_id: int,
                        min_new_tokens: int = 0, sampling: SamplingParams | None = None, guided: bool = False,
                        vocab_limit: int | None = None, every: int | None = None,
                        context: torch.Tensor | None = None):
        """:func:`mmgen_engine.runtime.generate.generate_stream` on the ONNX decoder, greedy only: the
        same arguments (less ``decoder`` and ``graphs``) and yields, ``[B, n]`` int64 CPU tensors.

        ``prompt [R, T]``, ``encoder_states [R, S, D]`` (cross-attention: the states; prefix: the input
        embeddings in front of the prompt), ``encoder_lengths [R]``; R = B, or 2B with ``guided``
        (the unconditioned rows first). ``sampling``: None or greedy (``do_sample=False`` or
        ``top_k=1``; ``guidance_scale`` with ``guided``); anything else is an InputError.
        ``context``: accepted as the engine takes it (the repetition controls', which are refused)."""
        groups = 2 if guided else 1
        if prompt.shape[0] % groups:
            raise InputError(f"guided generation needs an even number of rows, got {prompt.shape[0]}")
        batch, prompt_len = prompt.shape[0] // groups, prompt.shape[1]
        prefix = encoder_states.shape[1] if self.uses_prefix else 0
        max_new_tokens, min_new_tokens = check_new_tokens(max_new_tokens, min_new_tokens)
        check_greedy(sampling)
        if every is not None:
            check_int("every", every, 1, MAX_NEW_TOKENS)
        fed = check_fits(prefix, prompt_len, max_new_tokens, self.decoder["max_positions"])
        seen = 0 if context is None else context.shape[1]
        if seen > prefix:
            raise ValueError(f"a context of {seen} ids needs a prefix at least as long, got {prefix}")
        fixed = self.decoder["prefix_length"]
        if self.uses_prefix and fixed is not None and prefix != fixed:
            raise InputError(f"this decoder takes exactly {fixed} prefix states, got {prefix}")

        st = DecodeState.allocate(_CacheFree(self.decoder["max_positions"]), batch, fed, 0, max_new_tokens,
                                  torch.float32, torch.device("cpu"), eos_token_id, pad_token_id, guided, vocab_limit)
        st.sampler.load(sampling)
        st.min_new.fill_(min_new_tokens)
        st.out.fill_(pad_token_id)

        states = encoder_states.detach().cpu().numpy().astype(self.dtype, copy=False)
        lengths = encoder_lengths.detach().cpu().to(torch.int64).numpy()
        feed = {"input_ids": prompt.detach().cpu().to(torch.int64).numpy()}
        if self.uses_prefix:
            feed["prefix_embeds"] = states
        else:
            feed.update(encoder_hidden_states=states, encoder_lengths=lengths)
        out = self._run("decoder_prefill", self.prefill, feed)
        pick(torch.from_numpy(out.pop("logits")), st)
        # every present.* becomes the next step's past_key_values.* (the encoder's stay as they are)
        cache = {name.replace("present.", "past_key_values.", 1): value for name, value in out.items()}
        if not self.uses_prefix:
            cache["encoder_lengths"] = lengths
        for step in range(1, max_new_tokens):
            if every is not None and step % every == 0:
                yield st.out[:, :step].clone()
            if eos_token_id is not None and bool(st.done.all()):
                break
            cache["input_ids"] = st.tokens.numpy()
            out = self._run("decoder_step", self.step, {name: cache[name] for name in self.step_inputs})
            pick(torch.from_numpy(out.pop("logits")), st)
            cache.update((name.replace("present.", "past_key_values.", 1), value) for name, value in out.items())
        yield st.out[:, :max_new_tokens].clone()
