"""What the scheduler needs to know of each task: how a request becomes decoder rows, how rows are
encoded together, and what finished rows turn into.

A :class:`Job` is one request inside the engine; a :class:`Row` is one decoder row of it (a pair
of rows with guidance) that occupies one slot while it decodes: a caption, one image of an image
request, one window of a gesture request. A runner wraps one pipeline and reuses its checks and its
pre- and post-processing, so a request gives what the pipeline gives for the same arguments:

- ``prepare(job)`` (a preprocessing thread): check and read the request, or raise ``InputError``;
- ``start(job)``, ``encode(rows)``, ``advanced(rows)``, ``finished(rows)`` (the scheduler thread):
  the first rows; encoder states of rows arriving together; stream events after a step; results,
  and the rows that follow (a gesture's next window).

The one-shot stages (encoders, detokenizer, motion decoder) run through the pipeline's ``stages``,
the engine's own or ONNX Runtime's (``mm.load(..., stage_backend="onnxruntime")``).
"""
from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from ..pipelines.audio import log_mel_400
from ..pipelines.captioning import LLAVA_PROMPT
from ..pipelines.detokenizer import to_pil
from ..pipelines.gesture_windows import Stitcher
from ..pipelines.speech_to_gesture import window_seed
from ..runtime import SamplingParams
from ..runtime.beam import Beams
from ..runtime.limits import check_new_tokens
from ..runtime.sampler import check_sampling
from .requests import PartialImage, PoseChunk, RequestHandle, TextDelta


@dataclass(eq=False)
class Job:
    """A request inside the engine: its handle, its runner and the task's per-request state."""

    handle: RequestHandle
    runner: TaskRunner
    deadline: float | None
    state: dict = field(default_factory=dict)
    rows: set = field(default_factory=set)  # rows waiting for or holding a slot
    started: bool = False

    @property
    def request(self):
        return self.handle.request


@dataclass(eq=False)
class Row:
    """One decoder row of a job: its prompt ids, its encoder input and its sampling; ``stream_row``
    is its index in the request's own batch (its row of the random stream, as in the pipeline)."""

    job: Job
    stream_row: int
    prompt: list[int]
    features: torch.Tensor
    max_new: int
    sampling: SamplingParams
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    first_position: int = 0  # the cache slot of the first generated token once prefilled
    queued_step: int = 0  # the scheduler's step count when the row began to wait for a slot
    min_new: int = 0  # eos is suppressed until the row has this many tokens
    beams: BeamGroup | None = None  # the request's beam search, when its rows are beams
    context: list[int] = field(default_factory=list)  # ids before the prompt the repetition controls see


@dataclass(eq=False)
class BeamGroup:
    """The K rows of a beam-search request: they take K slots together, and after each step the
    request's :class:`~mmgen_engine.runtime.beam.Beams` chooses their next tokens and the rows they
    continue (their caches are gathered among the K slots)."""

    rows: list[Row]
    beams: Beams | None = None  # made at prefill, on the device


def seeded(params: SamplingParams, beams: bool = False) -> SamplingParams:
    """``params`` with a fresh seed if it has none: all rows of one request share its seed, as in
    the pipeline's one call. Checked here, in the request's preprocessing, so that the scheduler
    never meets a request it cannot decode."""
    if params.num_beams > 1 and not beams:
        raise InputError("beam search is not supported by this task")
    return params if params.seed is not None else dataclasses.replace(params, seed=secrets.randbits(63))


class TaskRunner:
    """Base of the three runners: the decoder and the token ids every row of the task shares."""

    guided = False
    vocab_limit: int | None = None

    def __init__(self, pipe):
        self.pipe = pipe
        self.decoder = pipe.model.decoder
        self.device, self.dtype = pipe.device, pipe.dtype

    def fail(self, job: Job, error: BaseException) -> None:
        job.handle._fail(error)

    def prefix_key(self, row: Row):
        """Rows with different keys are encoded (and prefilled) apart; one key by default."""
        return None

    def emit(self, job: Job, event) -> None:
        job.handle._emit(event)


class CaptionRunner(TaskRunner):
    def __init__(self, pipe):
        super().__init__(pipe)
        gen = pipe.config.generation
        self.eos, self.pad, self.keep_eos = gen.eos_token_id, gen.pad_token_id, gen.include_eos

    def prepare(self, job: Job) -> None:
        req = job.request
        if req.max_new_tokens is not None:
            check_new_tokens(req.max_new_tokens)
        params = seeded(check_sampling(req.sampling) or self.pipe.default_sampling, beams=True)
        if params.guidance_scale is not None:
            raise InputError("guidance_scale is not supported by this task")
        prompt = LLAVA_PROMPT if req.prompt is None and self.pipe.image_token is not None else req.prompt
        prompt_ids = self.pipe.tokenize_prompt(prompt) if prompt is not None else []
        # LLaVA: the text before the <image> placeholder goes into the prefix with the image, the rest
        # is the decoder prompt, and the caption is the answer alone (as in the pipeline)
        text_before, decoder_prompt, length = self.pipe.split_prompt(self.pipe._prompt(1, prompt_ids))
        pixels = self.pipe.preprocess([req.image])[0]
        job.state.update(prompt_ids=prompt_ids if text_before is None else [], pixels=pixels, params=params,
                         sent="", decoder_prompt=decoder_prompt[0].tolist(), length=length,
                         text_before=None if text_before is None else text_before[0].tolist(),
                         seen=[] if text_before is None else self.pipe.image_context(text_before)[0].tolist())

    def prefix_key(self, row: Row):
        """Rows that can be encoded together have the same key: LLaVA's text before the image is part
        of the prefix, so only rows with the same text share an encoder batch."""
        text = row.job.state["text_before"]
        return None if text is None else tuple(text)

    def start(self, job: Job) -> list[Row]:
        s, req = job.state, job.request
        prompt = s["decoder_prompt"]
        max_new, min_new = self.pipe._budget(s["length"], req.max_new_tokens, None)  # the checkpoint's if left out
        params, pixels = s["params"], s.pop("pixels")
        if params.num_beams == 1:
            return [Row(job, 0, prompt, pixels, max_new, params, min_new=min_new, context=s["seen"])]
        group = BeamGroup([])
        group.rows = [Row(job, j, prompt, pixels, max_new, params, min_new=min_new, beams=group, context=s["seen"])
                      for j in range(params.num_beams)]
        return group.rows

    def encode(self, rows: list[Row]):
        # the beams of a request share their image: each distinct one is encoded once
        unique = {id(r.features): r.features for r in rows}
        where = {key: i for i, key in enumerate(unique)}
        states = self.pipe.stages["image_encoder"](torch.stack(list(unique.values())).to(self.device, self.dtype))
        states = states[torch.tensor([where[id(r.features)] for r in rows], device=self.device)]
        text = rows[0].job.state["text_before"]  # the same for all rows (prefix_key)
        if text is not None:
            states = self.pipe.model.prefix(states, torch.tensor([text] * len(rows), device=self.device))
        return states, torch.full((len(rows),), states.shape[1], dtype=torch.int64, device=self.device)

    def _text(self, job: Job, tokens: list[int]) -> str:
        if self.eos in tokens:
            tokens = tokens[:tokens.index(self.eos) + int(self.keep_eos)]
        ids = job.state["prompt_ids"] + tokens
        return self.pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _send(self, job: Job, text: str, final: bool = False) -> None:
        """Stream what ``text`` adds to what was sent (held while it ends in a partial character,
        unless it is the caption, or rewrites what was sent)."""
        sent = job.state["sent"]
        if text.startswith(sent) and len(text) > len(sent) and (final or not text.endswith("\ufffd")):
            self.emit(job, TextDelta(text[len(sent):]))
            job.state["sent"] = text

    def advanced(self, rows: list[Row]) -> None:
        for row in rows:
            self._send(row.job, self._text(row.job, row.tokens))

    def finished(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            caption = self._text(row.job, row.tokens)
            self._send(row.job, caption, final=True)
            row.job.handle._finish(caption)
        return []

    def beams_finished(self, job: Job, ids: list[list[int]]) -> None:
        """A beam request's best hypotheses: its caption (its captions, best first, with
        ``num_return_sequences > 1``), sent whole."""
        captions = [self._text(job, tokens) for tokens in ids]
        self._send(job, captions[0], final=True)
        job.handle._finish(captions[0] if len(captions) == 1 else captions)


class ImageRunner(TaskRunner):
    guided = True

    def __init__(self, pipe):
        super().__init__(pipe)
        gen = pipe.config.generation
        self.eos, self.pad, self.vocab_limit = None, gen.bos_token_id, gen.image_vocab_size
        self.total = pipe.num_tokens

    def prepare(self, job: Job) -> None:
        req = job.request
        text, params = self.pipe._request(req.prompt, req.n, req.sampling)  # n copies of the prompt's row
        if params.repetition_penalty != 1 or params.no_repeat_ngram_size:
            raise InputError("repetition_penalty and no_repeat_ngram_size are not supported by this task")
        length = int(self.pipe._check_text(text[:1])[0])
        uncond = torch.full_like(text[0], self.pipe.config.generation.text_pad_token_id)
        uncond[0], uncond[1] = text[0, 0], text[0, length - 1]  # min-dalle's unconditioned row
        job.state.update(text=torch.stack([uncond, text[0]]), lengths=[2, length], params=seeded(params),
                         n=text.shape[0], images={})

    def start(self, job: Job) -> list[Row]:
        s = job.state
        bos = self.pipe.config.generation.bos_token_id
        return [Row(job, j, [bos], s["text"], self.total, s["params"]) for j in range(s["n"])]

    def encode(self, rows: list[Row]):
        text = torch.cat([torch.stack([r.features[0] for r in rows]), torch.stack([r.features[1] for r in rows])])
        lengths = [r.job.state["lengths"][0] for r in rows] + [r.job.state["lengths"][1] for r in rows]
        unique, inverse = torch.unique(text, dim=0, return_inverse=True)  # the encoder runs once per distinct row
        unique = unique.to(self.device)
        states = self.pipe.stages["text_encoder"](unique)[inverse.to(self.device)]
        return states, torch.tensor(lengths, dtype=torch.int64, device=self.device)

    def _images(self, tokens: list[list[int]]) -> list:
        grids = self.pipe._partial(torch.tensor(tokens, dtype=torch.int64, device=self.device))
        return to_pil(self.pipe.decode_tokens(grids))  # one batch for rows of every request

    def advanced(self, rows: list[Row]) -> None:
        due: dict[int, list[Row]] = {}  # rows that joined at different steps are due with different lengths
        for r in rows:
            if r.job.request.every and len(r.tokens) % r.job.request.every == 0:
                due.setdefault(len(r.tokens), []).append(r)
        for length, group in due.items():  # one batch per length
            for row, image in zip(group, self._images([r.tokens for r in group])):
                self.emit(row.job, PartialImage(row.stream_row, image, length, self.total))

    def finished(self, rows: list[Row]) -> list[Row]:
        for row, image in zip(rows, self._images([r.tokens for r in rows])):
            images = row.job.state["images"]
            images[row.stream_row] = image
            if len(images) == row.job.state["n"]:
                row.job.handle._finish([images[j] for j in range(len(images))])
        return []


class GestureRunner(TaskRunner):
    def __init__(self, pipe):
        super().__init__(pipe)
        cfg = pipe.config
        self.eos, self.pad, self.vocab_limit = None, cfg.gesture.eos_token_id, cfg.motion.codebook_size

    def prepare(self, job: Job) -> None:
        req = job.request
        samples, params = self.pipe._inputs(req.audio, req.sample_rate, req.sampling)
        plan = self.pipe.plan
        job.state.update(windows=plan.stream_windows(samples, samples.frames), total=plan.windows(samples.frames),
                         stitch=Stitcher(plan, plan.frames(samples.frames)), params=seeded(params), context=[],
                         chunks=[], next=0)

    def _window(self, job: Job) -> Row:
        """The job's next window as a row (its audio read now)."""
        s = job.state
        w = s["next"]
        s["next"] += 1
        mel = log_mel_400(next(s["windows"]))
        cfg = self.pipe.config
        params = dataclasses.replace(s["params"], seed=window_seed(s["params"].seed, w))
        return Row(job, 0, [cfg.gesture.bos_token_id, *s["context"]], mel, cfg.window_tokens - len(s["context"]),
                   params)

    def start(self, job: Job) -> list[Row]:
        return [self._window(job)]

    def encode(self, rows: list[Row]):
        states = self.pipe.stages["audio_encoder"](torch.stack([r.features for r in rows]).to(self.device, self.dtype))
        return states, torch.full((len(rows),), states.shape[1], dtype=torch.int64, device=self.device)

    def advanced(self, rows: list[Row]) -> None:
        pass

    def finished(self, rows: list[Row]) -> list[Row]:
        windows = [r.job.state["context"] + r.tokens for r in rows]
        poses = self.pipe.stages["motion_decoder"](torch.tensor(windows, device=self.device)).cpu().numpy()  # one batch
        follow = []
        for row, tokens, window_poses in zip(rows, windows, poses):
            job, s = row.job, row.job.state
            window = s["next"] - 1
            self._chunk(job, s["stitch"].add(window_poses), window)
            s["context"] = tokens[-self.pipe.config.gesture.seed_tokens:]
            if s["next"] < s["total"]:
                try:
                    follow.append(self._window(job))
                except InputError as e:  # the audio turned out unreadable further on
                    self.fail(job, e)
                continue
            self._chunk(job, s["stitch"].finish(), window)
            job.handle._finish(np.concatenate(s["chunks"]))
        return follow

    def _chunk(self, job: Job, poses: np.ndarray, window: int) -> None:
        if poses.shape[0]:
            job.state["chunks"].append(poses)
            self.emit(job, PoseChunk(poses, window))


RUNNERS = {"captioning": CaptionRunner, "text-to-image": ImageRunner, "speech-to-gesture": GestureRunner}

