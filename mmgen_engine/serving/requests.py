"""What callers hand an :class:`~mmgen_engine.serving.Engine` and what they get back.

A request is a frozen dataclass per task; :meth:`Engine.submit` returns a :class:`RequestHandle`,
which is a :class:`concurrent.futures.Future`-like result plus a stream of events (sync and
``async for``). The scheduler thread resolves the handle; any thread or event loop may wait on it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..runtime.limits import MAX_NEW_TOKENS, check_float32, check_int


@dataclass(frozen=True)
class _Common:
    def _check_common(self):
        if self.timeout is not None:
            check_float32("timeout", self.timeout, 1e-3, 1e9)
        if self.model is not None and not isinstance(self.model, str):
            raise InputError(f"model must be a model name (str) or None, got {type(self.model).__name__}")


@dataclass(frozen=True)
class CaptionRequest(_Common):
    """One image to caption (a path, ``PIL.Image`` or ``HxWx3`` uint8 array), as
    :meth:`CaptioningPipeline.caption` of ``[image]`` with the same arguments (``max_new_tokens``
    and ``sampling`` left out: the checkpoint's generation defaults). Streams :class:`TextDelta`
    events; the result is the caption ``str`` (with beams and ``num_return_sequences > 1``, the
    list of captions, best first)."""

    image: Any
    prompt: str | None = None
    max_new_tokens: int | None = None
    sampling: Any = None
    timeout: float | None = None  # seconds from submit; then the request fails with DeadlineExceeded
    model: str | None = None      # which of the engine's models (None: its only one of this task)

    task = "captioning"

    def __post_init__(self):
        self._check_common()


@dataclass(frozen=True)
class ImageRequest(_Common):
    """``n`` images of one prompt, as :meth:`TextToImagePipeline.generate` ``(prompt,
    images_per_prompt=n)``. With ``every``, streams a :class:`PartialImage` of each image every
    ``every`` tokens; the result is the list of ``n`` PIL images."""

    prompt: str
    n: int = 1
    sampling: Any = None
    every: int | None = None
    timeout: float | None = None
    model: str | None = None

    task = "text-to-image"

    def __post_init__(self):
        self._check_common()
        if self.every is not None:
            check_int("every", self.every, 1, MAX_NEW_TOKENS)


@dataclass(frozen=True)
class GestureRequest(_Common):
    """Speech audio (a file path, or a float array with its ``sample_rate``), as
    :meth:`SpeechToGesturePipeline.generate`. Streams a :class:`PoseChunk` per decoded window; the
    result is the poses ``[T, joints, 2]``."""

    audio: Any
    sample_rate: int | None = None
    sampling: Any = None
    timeout: float | None = None
    model: str | None = None

    task = "speech-to-gesture"

    def __post_init__(self):
        self._check_common()


@dataclass(frozen=True)
class TextDelta:
    """Caption text that follows what was streamed before (the deltas join to the caption)."""

    text: str


@dataclass(frozen=True)
class PartialImage:
    """Image ``index`` of the request after ``tokens`` of its ``total`` tokens (the rest of the grid
    filled as min-dalle fills it)."""

    index: int
    image: Any
    tokens: int
    total: int


@dataclass(frozen=True)
class PoseChunk:
    """The next frames of the poses ``[n, joints, 2]``, completed by window ``window``."""

    poses: np.ndarray
    window: int


_END = object()


class RequestHandle:
    """A submitted request: its result, its events and its cancellation.

    ``result(timeout=None)`` and ``exception(timeout=None)`` behave as a
    :class:`concurrent.futures.Future`'s (a cancelled request raises ``CancelledError``);
    ``future`` is that future (``asyncio.wrap_future`` it, or ``await engine.generate(...)``).
    Iterating (``for`` or ``async for``) yields the request's events from the first one, then ends
    when the request finishes or raises what failed it; several iterators may read at once.
    ``times`` holds ``submitted``, ``started`` (in a slot), ``first_token`` and ``finished``
    (``time.perf_counter()`` values) and ``tokens`` the tokens generated, for metrics;
    :attr:`token_ids` the generated ids.
    """

    def __init__(self, request_id: int, request):
        self.id = request_id
        self.request = request
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.times = {"submitted": time.perf_counter()}
        self.tokens = 0
        self._events: list = []
        self._cond = threading.Condition()
        self._waiters: list = []  # (loop, asyncio.Event) of async iterators waiting for events
        self._cancel_requested = threading.Event()
        self._wake = None  # set by the engine: called on cancel so the scheduler notices at once
        self._on_resolve = None  # set by the engine: counts the outcome before the future resolves
        self._outcome: str | None = None
        self._rows: list = []  # (row index in the request, token ids) of every finished decoder row
        self.future.add_done_callback(self._done)

    def __repr__(self) -> str:
        state = "done" if self.future.done() else "pending"
        return f"<RequestHandle {self.id} {self.request.task} {state}>"

    def result(self, timeout: float | None = None):
        return self.future.result(timeout)

    def exception(self, timeout: float | None = None):
        return self.future.exception(timeout)

    def done(self) -> bool:
        return self.future.done()

    def cancelled(self) -> bool:
        return self.future.cancelled()

    @property
    def token_ids(self) -> list[list[int]]:
        """The generated token ids of the request's decoder rows so far finished: one list for a
        caption, one per image (in image order) of an image request, one per window (in order) of
        a gesture request (the window's new tokens, its context excluded)."""
        return [tokens for _, tokens in sorted(self._rows, key=lambda r: r[0])]

    def cancel(self) -> bool:
        """Ask the engine to drop this request; its slots are freed at the next step and the handle
        ends cancelled. False if it had already finished."""
        if self.future.done():
            return False
        self._cancel_requested.set()
        if self._wake is not None:
            self._wake()
        return True

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    # -- the scheduler's side -----------------------------------------------------------------
    def _emit(self, event) -> None:
        self._push(event)

    def _push(self, item) -> None:
        with self._cond:
            self._events.append(item)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: its iterator is gone
                pass

    def _resolve(self, outcome: str, value=None) -> None:
        """Resolve the future once (``outcome`` "completed", "failed" or "cancelled"); the engine's
        hook counts it before any waiter wakes."""
        with self._cond:
            if self.future.done() or self._outcome is not None:
                return
            self._outcome = outcome
        self.times["finished"] = time.perf_counter()
        if self._on_resolve is not None:
            self._on_resolve(outcome)
        if outcome == "cancelled":
            self.future.cancel()
        elif self.future.set_running_or_notify_cancel():
            if outcome == "failed":
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

    def _done(self, future) -> None:
        """Every resolution ends the event stream (also a ``handle.future.cancel()`` by the caller)."""
        with self._cond:
            outcome, self._outcome = self._outcome, self._outcome or "cancelled"
        if outcome is None:  # cancelled through the future itself
            self.times["finished"] = time.perf_counter()
            if self._on_resolve is not None:
                self._on_resolve("cancelled")
        self._push(_END)

    def _finish(self, result) -> None:
        self._resolve("completed", result)

    def _fail(self, error: BaseException) -> None:
        self._resolve("failed", error)

    def _cancel(self) -> None:
        self._resolve("cancelled")

    def _end(self):
        """Raise what ended the stream, if it did not succeed."""
        if self.future.cancelled():
            raise concurrent.futures.CancelledError()
        error = self.future.exception()
        if error is not None:
            raise error

    # -- the caller's side ----------------------------------------------------------------------
    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._events) > i)
                item = self._events[i]
            i += 1
            if item is _END:
                self._end()
                return
            yield item

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            wake = asyncio.Event()
            with self._cond:
                available = self._events[i:]
                if not available:
                    self._waiters.append((loop, wake))
            if not available:
                try:
                    await wake.wait()
                finally:
                    with self._cond:  # an abandoned iterator leaves no waiter behind
                        if (loop, wake) in self._waiters:
                            self._waiters.remove((loop, wake))
                continue
            for item in available:
                i += 1
                if item is _END:
                    self._end()
                    return
                yield item
