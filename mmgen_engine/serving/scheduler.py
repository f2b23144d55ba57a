"""The scheduler: one thread per model that owns its device state and decodes a continuous batch.

The thread holds one :class:`~mmgen_engine.runtime.generate.DecodeState` of ``slots`` output rows
(``2 * slots`` decoder rows with guidance), sized for the model's longest sequence, and loops:

1. take prepared jobs from its inbox (blocking only when it has nothing to do);
2. drop the rows of cancelled and expired jobs, freeing their slots;
3. admit waiting rows into free slots, lowest first (while rows decode, once enough slots are
   free or the oldest has waited a few steps): the arrivals are encoded together in one batch,
   then prefilled per prompt length into small caches that are copied into their slots' rows, and
   their first tokens picked (:func:`~mmgen_engine.runtime.generate.pick` on those rows);
4. run one decode step over the occupied rows (on CPU the rows ``0..n-1`` up to the highest
   occupied slot; on CUDA the next power of two, replayed from one CUDA graph per row count and
   sampling mode; with guidance every row), read the new tokens back, stream them and free the
   slots of rows that ended (eos, their ``max_new_tokens``), so the next step can refill them.

Every row carries its own position, step counter (the sampler's Philox offset), sampling
parameters, seed and row of the random stream on the device, so it computes what it computes in a
pipeline call of its request alone, whatever else shares its steps and whenever it joined.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

import torch

from ..errors import DeadlineExceeded, InputError, MMGenError
from ..runtime.beam import Beams
from ..runtime.generate import DecodeState, batch_bucket, check_fits, decode_step, pick
from ..runtime.graphs import capture
from ..runtime.kv_cache import CrossKVCache, KVCache
from .tasks import Job, Row

WAKE, STOP, ABORT = "wake", "stop", "abort"
ADMIT_AFTER_STEPS = 4  # the longest a waiting row waits for more free slots before it is admitted anyway


class Scheduler:
    def __init__(self, name: str, runner, slots: int, on_error, on_start, use_cuda_graphs: bool):
        self.name, self.runner, self.slots = name, runner, slots
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: collections.deque[Row] = collections.deque()
        self.active: dict[int, Row] = {}
        self.free = list(range(slots))
        self.state: DecodeState | None = None
        self.jobs: set[Job] = set()  # jobs this thread holds (waiting or decoding)
        self.draining = False
        self.cuda = runner.device.type == "cuda"
        self.use_cuda_graphs = use_cuda_graphs and self.cuda
        self._views: dict[int, DecodeState] = {}
        self._graphs: dict[tuple, object] = {}
        self._on_error, self._on_start = on_error, on_start
        self.steps = self.busy = 0  # decode steps run, and occupied slots summed over them
        self.thread = threading.Thread(target=self._run, name=f"mmgen-scheduler-{name}", daemon=True)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._take_inbox():
                    self._expire()
                    self._admit()
                    if self.active:
                        self._step()
        except BaseException as e:  # noqa: BLE001 - an internal error: the engine fails every request
            self._on_error(self, e)

    def _take_inbox(self) -> bool:
        """Take what arrived (waiting for something when idle); False when the thread should stop."""
        idle = not self.active and not self.waiting
        if idle and self.draining:
            return False
        try:
            item = self.inbox.get() if idle else self.inbox.get_nowait()
            while True:
                if item == STOP:
                    self.draining = True
                elif item == ABORT:
                    return False
                elif isinstance(item, Job):
                    self._accept(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        return not (self.draining and not self.active and not self.waiting)

    def _accept(self, job: Job) -> None:
        if job.handle.done():
            return
        if job.handle.cancel_requested:
            job.handle._cancel()
            return
        try:
            rows = job.runner.start(job)
            if len(rows) > self.slots and rows[0].beams is not None:
                raise InputError(f"num_beams {len(rows)} needs as many slots; this engine has {self.slots}")
        except InputError as e:
            job.handle._fail(e)
            return
        self.jobs.add(job)
        job.rows.update(rows)
        for row in rows:
            row.queued_step = self.steps
        self.waiting.extend(rows)

    # -- cancellation and deadlines -------------------------------------------------------------
    def _expire(self) -> None:
        clock = time.perf_counter()
        for job in list(self.jobs):
            if job.handle.done():
                self._drop(job)
            elif job.handle.cancel_requested:
                job.handle._cancel()
                self._drop(job)
            elif job.deadline is not None and clock > job.deadline:
                job.handle._fail(DeadlineExceeded(f"request {job.handle.id} did not finish within its timeout of "
                                                  f"{job.request.timeout:g} s"))
                self._drop(job)

    def _drop(self, job: Job) -> None:
        """Forget a resolved job: its waiting rows leave the queue, its decoding rows their slots."""
        self.jobs.discard(job)
        if any(r.slot < 0 for r in job.rows):
            self.waiting = collections.deque(r for r in self.waiting if r.job is not job)
        self._release([r for r in job.rows if r.slot >= 0])
        job.rows.clear()

    def cancel_all(self, error: BaseException | None = None) -> None:
        """Resolve every job still held (cancelled, or failed with ``error``); the thread has stopped."""
        jobs = list(self.jobs)
        self.jobs.clear()
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                jobs.append(item)
        for job in jobs:
            if error is not None:
                job.handle._fail(error)
            else:
                job.handle._cancel()

    # -- slots ----------------------------------------------------------------------------------
    def _rows_of(self, slots) -> torch.Tensor:
        """Decoder rows of output rows ``slots`` (with guidance: the unconditioned, then the conditioned)."""
        slots = torch.as_tensor(slots, dtype=torch.int64)
        groups = 2 if self.runner.guided else 1
        return torch.cat([slots + g * self.slots for g in range(groups)]).to(self.runner.device)

    def _release(self, rows: list[Row]) -> None:
        """Free the slots of ``rows``: marked done and parked at position 0 until they are refilled."""
        if not rows:
            return
        slots = [r.slot for r in rows]
        for row in rows:
            del self.active[row.slot]
            row.slot = -1
        self.free.extend(slots)
        self.free.sort()
        st = self.state
        st.done[torch.tensor(slots, device=st.done.device)] = True
        st.positions[self._rows_of(slots)] = 0

    def _allocate(self, enc_len: int) -> None:
        r = self.runner
        max_positions = r.decoder.cache_geometry()[3]
        self.state = DecodeState.allocate(r.decoder, self.slots, max_positions, enc_len, max_positions, r.dtype,
                                          r.device, r.eos, r.pad, r.guided, r.vocab_limit)
        self.state.done.fill_(True)

    # -- admission: encode and prefill arrivals -------------------------------------------------
    def _admit(self) -> None:
        """Encode and prefill waiting rows into free slots. An admission stalls every decoding row
        for about as long as a decode step or two, whether it brings one row or many, so while rows
        decode it waits until enough slots are free for the rows waiting (up to half the slots) or
        the oldest has waited :data:`ADMIT_AFTER_STEPS` steps."""
        if not self.free or not self.waiting:
            return
        enough = min(len(self.waiting), max(1, self.slots // 2))
        if self.active and len(self.free) < enough and self.steps - self.waiting[0].queued_step < ADMIT_AFTER_STEPS:
            return
        rows: list[Row] = []
        while self.waiting and len(rows) < len(self.free):
            head = self.waiting[0]
            need = len(head.beams.rows) if head.beams is not None else 1  # a request's beams join together
            if len(rows) + need > len(self.free):
                break
            rows.extend(self.waiting.popleft() for _ in range(need))
        if not rows:
            return
        batches: dict = {}
        for row in rows:  # arrivals encoded together, by the runner's key (LLaVA: the text before the image)
            batches.setdefault(self.runner.prefix_key(row), []).append(row)
        for batch in batches.values():
            self._encode_and_prefill(batch)

    def _encode_and_prefill(self, rows: list[Row]) -> None:
        states, lengths = self.runner.encode(rows)
        decoder = self.runner.decoder
        prefix = states.shape[1] if decoder.uses_prefix else 0
        if self.state is None:
            self._allocate(states.shape[1])
        max_positions = decoder.cache_geometry()[3]
        n = len(rows)
        index = {id(r): i for i, r in enumerate(rows)}
        by_length: dict[int, list[Row]] = {}
        for row in rows:
            try:
                check_fits(prefix, len(row.prompt), row.max_new, max_positions)
            except InputError as e:
                row.job.handle._fail(e)
                self._drop(row.job)
            if not row.job.handle.done():
                by_length.setdefault(len(row.prompt), []).append(row)
        groups = 2 if self.runner.guided else 1
        for length, group in by_length.items():
            pick_rows = torch.tensor([index[id(r)] + g * n for g in range(groups) for r in group],
                                     device=states.device)
            self._prefill(group, prefix, states[pick_rows], lengths[pick_rows])

    def _prefill(self, rows: list[Row], prefix: int, states: torch.Tensor, lengths: torch.Tensor) -> None:
        r, st = self.runner, self.state
        layers, heads, head_dim, _ = r.decoder.cache_geometry()
        groups = 2 if r.guided else 1
        width = prefix + len(rows[0].prompt)
        prompt = torch.tensor([row.prompt for row in rows] * groups, dtype=torch.int64, device=r.device)
        cache = KVCache.allocate(layers, prompt.shape[0], heads, width, head_dim, r.dtype, r.device)
        cross = CrossKVCache.allocate(layers, lengths, heads, 0 if prefix else states.shape[1], head_dim, r.dtype,
                                      r.device)
        logits = r.decoder.prefill(prompt, states, cache, cross)
        slots = [self.free.pop(0) for _ in rows]
        index = torch.tensor(slots, device=r.device)
        decoder_rows = self._rows_of(slots)
        st.cache.k[:, decoder_rows, :, :width] = cache.k
        st.cache.v[:, decoder_rows, :, :width] = cache.v
        if not prefix:
            st.cross.k[:, decoder_rows] = cross.k
            st.cross.v[:, decoder_rows] = cross.v
        st.cross.lengths[decoder_rows] = lengths
        for slot, row in zip(slots, rows):  # beams choose their tokens outside the sampler
            st.sampler.load(row.sampling if row.beams is None else None, index=slot, stream_rows=row.stream_row)
        st.positions[decoder_rows] = width
        seen = torch.tensor([row.context + row.prompt for row in rows], dtype=torch.int64, device=r.device)
        st.history[index, :seen.shape[1]] = seen  # rows of one prefill share the context's length
        st.history_len[index] = seen.shape[1]
        st.step[index] = 0
        st.min_new[index] = torch.tensor([row.min_new for row in rows], device=r.device)
        st.done[index] = False
        # the first token: pick() on these rows (gathered copies, written back)
        sub = DecodeState(None, None, st.sampler.view(index), st.tokens[decoder_rows], st.positions[decoder_rows],
                          st.done[index], st.step[index], st.min_new[index], st.out[index], st.eos, st.pad,
                          st.history[index], st.history_len[index])
        self._modes(sub, rows)
        pick(logits, sub)
        st.tokens[decoder_rows] = sub.tokens
        st.done[index] = sub.done
        st.step[index] = sub.step
        st.out[index] = sub.out
        st.history[index] = sub.history
        st.history_len[index] = sub.history_len
        started = time.perf_counter()
        for slot, row in zip(slots, rows):
            row.slot, row.first_position = slot, width
            self.active[slot] = row
            if not row.job.started:
                row.job.handle.times["started"] = started
                self._on_start(row.job)
        for group in {id(row.beams): row.beams for row in rows if row.beams is not None}.values():
            first = group.rows[0]
            group.beams = Beams(torch.tensor([first.context + first.prompt], device=r.device), first.max_new, r.eos,
                                r.pad, first.min_new, first.sampling)
            at = torch.tensor([rows.index(row) for row in group.rows], device=r.device)
            self._beam_step(group, logits[at])
        plain = [(row, token) for row, token in zip(rows, sub.tokens[:len(rows)].tolist()) if row.beams is None]
        self._record([row for row, _ in plain], [token for _, token in plain])

    # -- decoding -------------------------------------------------------------------------------
    def _view(self, n: int) -> DecodeState:
        """The state's first ``n`` rows (the whole state with guidance), kept so graphs see the same tensors."""
        if self.runner.guided or n == self.slots:
            return self.state
        if n not in self._views:
            self._views[n] = self.state.head(n)
        return self._views[n]

    def _step(self) -> None:
        st, rows = self.state, list(self.active.values())
        top = max(self.active) + 1
        n = min(batch_bucket(top), self.slots) if self.cuda else top
        view = self._view(n)
        self._modes(view, rows)
        if self.cuda:
            view.cache.span = view.cache.k.shape[3]  # static shapes; the kernels stop at each row's length
        else:
            view.cache.span = max(row.first_position + len(row.tokens) for row in rows)
        if self.use_cuda_graphs:
            replay, logits = self._graph(n, view)
            replay()
        else:
            logits = decode_step(self.runner.decoder, view)
        self.steps += 1
        self.busy += len(rows)
        tokens = st.tokens[:self.slots].tolist()  # the unconditioned rows carry the same tokens
        for group in {id(row.beams): row.beams for row in rows if row.beams is not None}.values():
            self._beam_step(group, logits[torch.tensor([row.slot for row in group.rows], device=logits.device)])
        plain = [row for row in rows if row.beams is None]
        self._record(plain, [tokens[row.slot] for row in plain])

    def _beam_step(self, group, logits: torch.Tensor) -> None:
        """Advance a beam request by one token from its rows' ``logits [K, V]``: its rows take the
        tokens its beams chose and the caches of the rows they continue (the slots in use); when it
        has stopped, its hypotheses finish the request and free its slots."""
        st, rows = self.state, group.rows
        picked = group.beams.step(logits)
        clock = time.perf_counter()
        handle = rows[0].job.handle
        handle.tokens += len(rows)
        handle.times.setdefault("first_token", clock)
        if picked is None:
            ids = group.beams.result().tolist()
            handle._rows.extend(enumerate(ids))
            self._release(rows)
            rows[0].job.rows.clear()
            self._handle_errors(lambda _: self.runner.beams_finished(rows[0].job, ids), rows)
            self._drop(rows[0].job)
            return
        tokens, source = picked
        slots = torch.tensor([row.slot for row in rows], device=st.tokens.device)
        used = rows[0].first_position + group.beams.new_tokens - 1
        for buffer in (st.cache.k, st.cache.v):
            buffer[:, slots, :, :used] = buffer[:, slots[source], :, :used]
        st.tokens[slots] = tokens
        st.positions[slots] = used
        st.done[slots] = False
        for row, token in zip(rows, tokens.tolist()):
            row.tokens.append(token)  # (its length sets the CPU step's span)

    @staticmethod
    def _modes(st: DecodeState, rows: list[Row]) -> None:
        """The host-known modes of a step over ``rows``: does any row sample, or penalize repetitions?"""
        st.sampler.greedy = not any(row.sampling.do_sample for row in rows)
        st.sampler.penalize = any(row.sampling.repetition_penalty != 1 or row.sampling.no_repeat_ngram_size
                                  for row in rows)

    def _graph(self, n: int, view: DecodeState):
        """``(replay, logits)``: the captured decode step over ``view`` for its sampling mode and
        its static logits (captured on first use; the warm-up runs it for real, so the rows' small
        state is put back after)."""
        key = (n, view.sampler.greedy, view.sampler.penalize)
        if key not in self._graphs:
            st = self.state
            small = (st.tokens, st.positions, st.done, st.step, st.out, st.history, st.history_len)
            saved = [t.clone() for t in small]
            self._graphs[key] = capture(lambda: decode_step(self.runner.decoder, view), self.runner.device)
            for t, value in zip(small, saved):
                t.copy_(value)
        return self._graphs[key]

    def _record(self, rows: list[Row], tokens: list[int]) -> None:
        """Append each row's new token; stream, and finish the rows that ended."""
        eos = self.runner.eos
        clock = time.perf_counter()
        going, ended = [], []
        for row, token in zip(rows, tokens):
            row.tokens.append(token)
            handle = row.job.handle
            handle.tokens += 1
            handle.times.setdefault("first_token", clock)
            (ended if token == eos or len(row.tokens) >= row.max_new else going).append(row)
        self._release(ended)
        for row in ended:
            row.job.rows.discard(row)
            row.job.handle._rows.append((row.stream_row, row.tokens))
        self._handle_errors(self.runner.advanced, going)
        follow = self._handle_errors(self.runner.finished, ended) or []
        for row in follow:
            row.job.rows.add(row)
            row.queued_step = self.steps
        self.waiting.extendleft(reversed(follow))  # a request's next window goes first
        for job in {row.job for row in ended}:
            if job.handle.done():
                self._drop(job)

    def _handle_errors(self, fn, rows: list[Row]):
        """``fn(rows)``; a request error (bad data found late) fails those rows' jobs only."""
        if not rows:
            return None
        try:
            return fn(rows)
        except MMGenError as e:
            for job in {row.job for row in rows}:
                job.handle._fail(e)
                self._drop(job)
            return None
