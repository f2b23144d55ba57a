"""``mm.Engine``: a thread-safe request API with continuous batching over one or several models.

    engine = mm.Engine(mm.demo_model("captioning"), slots=8)
    handle = engine.submit(mm.CaptionRequest("photo.png"))
    handle.result()                             # "a red circle"
    await engine.generate(mm.CaptionRequest(...))  # from an event loop

``submit`` never blocks: it checks the request's type and the queue bound, and hands the request to
a small pool of preprocessing threads (image decoding, tokenizing, opening audio: what the
pipelines check, with the same one-line ``InputError``), which passes it to its model's scheduler
thread (:mod:`.scheduler`). Only the scheduler touches the model's device state.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import time

from ..errors import EngineClosed, EngineFailed, EngineOverloaded, InputError, MMGenError, one_line
from ..onnx.backend import load
from ..runtime.limits import MAX_IMAGES_PER_CALL, check_int
from .requests import CaptionRequest, GestureRequest, ImageRequest, RequestHandle
from .scheduler import ABORT, STOP, WAKE, Scheduler
from .tasks import RUNNERS, Job

REQUEST_TYPES = (CaptionRequest, ImageRequest, GestureRequest)
PREPROCESS_THREADS = 2


class Engine:
    """Serves requests for one or several models with continuous batching.

    ``models``: a checkpoint path or a loaded pipeline, or ``{name: path or pipeline}``; paths are
    loaded with ``device``, ``dtype`` and ``quantize`` as :func:`mmgen_engine.load` loads them (its
    default ``stage_backend="auto"`` included: ONNX Runtime for a large image or text encoder on CPU where
    the ``[onnx]`` extra is installed; pass a loaded pipeline for other backends). Each model gets a
    scheduler thread decoding up to ``slots`` rows at once (a caption, an image, or a window of a
    gesture request each). At most ``max_queued`` requests may wait for a slot; ``submit`` raises
    :class:`~mmgen_engine.EngineOverloaded` beyond that. ``cuda_graphs``: on CUDA, replay the
    decode steps from CUDA graphs (one per row count and sampling mode).
    """

    def __init__(self, models, device="cpu", dtype=None, slots: int = 8, max_queued: int = 64,
                 cuda_graphs: bool = True, quantize=None):
        self.slots = check_int("slots", slots, 1, MAX_IMAGES_PER_CALL)
        self.max_queued = check_int("max_queued", max_queued, 0, 2**31 - 1)
        if not isinstance(models, dict):
            models = {"default": models}
        if not models:
            raise InputError("no models given")
        self.models = {}
        for name, model in models.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"model names must be non-empty strings, got {name!r}")
            pipe = (load(model, device, dtype, cuda_graphs, quantize=quantize)  # stage_backend 'auto'
                    if isinstance(model, (str, os.PathLike)) else model)
            if getattr(pipe, "task", None) not in RUNNERS:
                raise InputError(f"model {name!r}: the engine serves {', '.join(RUNNERS)} pipelines, "
                                 f"got {type(pipe).__name__}")
            if pipe.runtime != "engine":  # the scheduler drives the engine's decoder; its stages may be ORT's
                raise InputError(f"model {name!r}: mm.Engine decodes with the engine's decoder; load it with "
                                 f"runtime='engine' (stage_backend={pipe.stage_backend!r} may stay)")
            self.models[name] = pipe
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._queued = 0
        self._jobs: set[Job] = set()
        self._closed: MMGenError | None = None
        self.counts = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self._preprocess = concurrent.futures.ThreadPoolExecutor(PREPROCESS_THREADS,
                                                                 thread_name_prefix="mmgen-preprocess")
        self.schedulers = {name: Scheduler(name, RUNNERS[pipe.task](pipe), self.slots, self._scheduler_failed,
                                           self._started, cuda_graphs and getattr(pipe, "use_cuda_graphs", False))
                           for name, pipe in self.models.items()}
        for scheduler in self.schedulers.values():
            scheduler.thread.start()

    def __repr__(self) -> str:
        return f"<Engine {', '.join(f'{n}: {p.task}' for n, p in self.models.items())}, {self.slots} slots>"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(drain=exc[0] is None)

    # -- submitting -----------------------------------------------------------------------------
    def _scheduler_for(self, request) -> Scheduler:
        if not isinstance(request, REQUEST_TYPES):
            raise InputError(f"requests are CaptionRequest, ImageRequest or GestureRequest, got "
                             f"{type(request).__name__}")
        if request.model is not None:
            if request.model not in self.models:
                raise InputError(f"no model named {request.model!r}; the engine has {sorted(self.models)}")
            if self.models[request.model].task != request.task:
                raise InputError(f"model {request.model!r} is a {self.models[request.model].task} model, "
                                 f"not {request.task}")
            return self.schedulers[request.model]
        names = [n for n, p in self.models.items() if p.task == request.task]
        if len(names) != 1:
            raise InputError(f"no {request.task} model in this engine" if not names else
                             f"several {request.task} models ({', '.join(names)}): name one in the request's model")
        return self.schedulers[names[0]]

    def submit(self, request) -> RequestHandle:
        """Queue ``request`` (thread-safe, never blocks) and return its :class:`RequestHandle`.
        Raises ``InputError`` for a request of the wrong type or model, ``EngineOverloaded`` when
        ``max_queued`` requests already wait, ``EngineClosed`` after :meth:`shutdown` (or the
        engine's failure, ``EngineFailed``). Errors in the request's content (an unreadable image,
        an out-of-range option) fail its handle, not this call."""
        scheduler = self._scheduler_for(request)
        with self._lock:
            if self._closed is not None:
                raise self._closed
            if self._queued >= self.max_queued:
                self.counts["rejected"] += 1
                raise EngineOverloaded(f"{self._queued} requests already wait for a slot (max_queued "
                                       f"{self.max_queued}); retry later")
            handle = RequestHandle(next(self._ids), request)
            deadline = None if request.timeout is None else handle.times["submitted"] + request.timeout
            job = Job(handle, scheduler.runner, deadline)
            self._queued += 1
            self._jobs.add(job)
            self.counts["submitted"] += 1
        handle._wake = lambda: scheduler.inbox.put(WAKE)
        handle._on_resolve = lambda outcome: self._resolved(job, outcome)
        self._preprocess.submit(self._prepare, job, scheduler)
        return handle

    def _prepare(self, job: Job, scheduler: Scheduler) -> None:
        """A preprocessing thread: check and read the request, then hand it to its scheduler."""
        if job.handle.cancel_requested:
            job.handle._cancel()
            return
        try:
            job.runner.prepare(job)
        except MMGenError as e:
            job.handle._fail(e)
            return
        except Exception as e:  # noqa: BLE001 - an unexpected error reading this request fails it alone
            job.handle._fail(InputError(f"request {job.handle.id}: {type(e).__name__}: {one_line(e)}"))
            return
        scheduler.inbox.put(job)

    def _started(self, job: Job) -> None:
        """The job's first row took a slot: it no longer counts as queued."""
        with self._lock:
            if not job.started:
                job.started = True
                self._queued -= 1

    def _resolved(self, job: Job, outcome: str) -> None:
        """Count a request's outcome (called once, before its future resolves)."""
        with self._lock:
            self._jobs.discard(job)
            if not job.started:
                job.started = True  # counted out of the queue once
                self._queued -= 1
            self.counts[outcome] += 1

    # -- asyncio --------------------------------------------------------------------------------
    async def generate(self, request):
        """``submit(request)`` and await its result without blocking the event loop; cancelling the
        awaiting task cancels the request."""
        handle = self.submit(request)
        try:
            return await asyncio.wrap_future(handle.future)
        except asyncio.CancelledError:
            handle.cancel()
            raise

    async def stream(self, request):
        """``submit(request)`` and iterate over its events (``async for``)."""
        handle = self.submit(request)
        try:
            async for event in handle:
                yield event
        finally:
            if not handle.done():
                handle.cancel()

    # -- state ----------------------------------------------------------------------------------
    @property
    def closed(self) -> MMGenError | None:
        """None while the engine takes requests; then what ``submit`` raises: ``EngineClosed`` after
        :meth:`shutdown`, ``EngineFailed`` after a scheduler thread died."""
        return self._closed

    def metrics(self) -> dict:
        """Counters: requests by outcome, queued now, and per model its decode steps and slot occupancy
        (occupied slots per step over ``slots``)."""
        with self._lock:
            out = {**self.counts, "queued": self._queued, "in_flight": len(self._jobs)}
        out["models"] = {name: {"task": s.runner.pipe.task, "steps": s.steps, "active": len(s.active),
                                "occupancy": s.busy / (s.steps * self.slots) if s.steps else 0.0}
                         for name, s in self.schedulers.items()}
        return out

    def _scheduler_failed(self, scheduler: Scheduler, error: BaseException) -> None:
        """A scheduler thread died: the engine is failed, every request fails with that error."""
        failure = EngineFailed(f"engine failed in model {scheduler.name!r}: {type(error).__name__}: "
                               f"{one_line(error)}")
        failure.__cause__ = error
        with self._lock:
            if self._closed is None or not isinstance(self._closed, EngineFailed):
                self._closed = failure
            jobs = list(self._jobs)
        scheduler.cancel_all(failure)
        for other in self.schedulers.values():
            other.inbox.put(ABORT)
        for job in jobs:
            job.handle._fail(failure)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests (``submit`` then raises ``EngineClosed``). ``drain=True`` finishes
        every request already submitted; ``drain=False`` cancels them. Returns when the scheduler
        threads have stopped (or ``timeout`` seconds passed)."""
        with self._lock:
            if self._closed is None:
                self._closed = EngineClosed("the engine was shut down; it takes no more requests")
        if drain:
            self._preprocess.shutdown(wait=True)  # every accepted request reaches its scheduler
        else:
            with self._lock:
                jobs = list(self._jobs)
            for job in jobs:
                job.handle.cancel()
            self._preprocess.shutdown(wait=True, cancel_futures=True)
        for scheduler in self.schedulers.values():
            scheduler.inbox.put(STOP if drain else ABORT)
        end = None if timeout is None else time.monotonic() + timeout
        for scheduler in self.schedulers.values():
            scheduler.thread.join(None if end is None else max(0.0, end - time.monotonic()))
        stopped = [s for s in self.schedulers.values() if not s.thread.is_alive()]
        for scheduler in stopped:
            scheduler.cancel_all()
        with self._lock:
            jobs = list(self._jobs)
        if len(stopped) == len(self.schedulers):
            for job in jobs:  # e.g. cancelled while still waiting for a preprocessing thread
                job.handle._cancel()
