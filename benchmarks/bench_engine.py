#!/usr/bin/env python3
"""Serving benchmark: ``mm.Engine`` (continuous batching) against static batching and one request at
a time, under open-loop Poisson arrivals, on the bundled demo models, in one process.

Tasks (``--tasks``, each in turn; default ``caption``, the main one):

- ``caption``: the demo captioner (ViT + GPT-2, 64x64 shapes-world images); each request draws its
  ``max_new_tokens`` from ``--max-new`` (default 4 8 16 24) and its caption ends at eos after 3 to 8
  words (4 to 9 tokens with the eos) or at its limit, so lengths vary;
- ``caption_forced``: the same model with its eos id moved to a token it never picks, so every
  caption runs to its ``max_new_tokens`` (4 to 24 tokens: the forced lengths of bench_caption.py);
- ``txt2img``: the demo text-to-image model, one image (256 tokens, guidance) per prompt;
- ``gesture``: the demo speech-to-gesture model on 2, 4 or 8 s clips (1, 1 or 3 windows).

Modes (``--modes``), each in its own run of the same requests:

- ``engine``: ``mm.Engine(pipe, slots=N, max_queued=Q)``; requests go in with ``engine.submit``;
- ``static``: static batching as a user writes it without the engine: one dispatcher thread takes
  up to N waiting requests, or fewer once W ms (``--wait-ms``) have passed since the oldest of them
  arrived, and makes one pipeline call for the batch (captions: ``generate_ids`` up to the batch's
  largest ``max_new_tokens``, which stops early once every row has emitted eos, then each row cut
  to its own limit and decoded as ``pipe.caption`` does: the same captions, more decode steps;
  images: ``pipe.generate(prompts)``). The gesture pipeline has no call taking several clips, so
  gesture has no static mode;
- ``serial``: one worker thread, FIFO, one pipeline call per request.

Static and serial hold at most Q requests waiting (not yet in a call), as the engine does; an
arrival beyond that is rejected. Each mode first runs an unloaded pass (requests one after another,
each submitted once the previous finished): its p50 end-to-end latency is the mode's unloaded
latency. Then, at each rate of the sweep (requests/s), the same seeded Poisson arrival schedule
(``k = min(--requests, rate x --duration)`` arrivals in ``k / rate`` s, at sorted uniform times:
a Poisson process given its count) is played against each mode's warmed-up server, left idle
between runs; what has not finished ``--drain`` s after the last arrival counts as unfinished. A
mode skips the rest of the sweep after ``--stop-after`` saturated rates in a row (over a tenth
rejected or unfinished, or under 0.9x the offered rate achieved with p50 end-to-end over 6x the
unloaded p50).

Per (task, mode, rate): achieved requests/s and tokens/s (completed, over first arrival to last
completion), time to first token p50/p90/p99 (engine: ``handle.times``; static and serial return
nothing before the call ends, so there TTFT is the end-to-end time), time per output token (engine:
first token to last over tokens - 1; static and serial: the call's time over the request's tokens),
end-to-end p50/p99, queue wait p50 (submit to start; for the engine ``times["started"]``, set once
the request's slot is prefilled), occupancy (engine: occupied slots per decode step / N; static:
requests per call / N), rejected and unfinished counts.

Summary per (task, mode): the unloaded p50 and p99; the highest rate of the sweep sustained with
nothing rejected or unfinished and p99 end-to-end within ``--slo`` (2) x the unloaded p50 (the
SLO), and within 2x the unloaded p99 (with varied lengths the unloaded p99 is itself well over the
p50); the peak achieved rate; and the engine/static and engine/serial ratios of each. Greedy
captions (and the seeded gesture poses) of the engine and of static batching are compared with the
serial ones request by request (a difference prints a WARNING). The markdown tables are printed
last; every row and the machine go to ``--json``.
"""
from __future__ import annotations

import argparse
import collections
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import add_device_arguments, checked_device, engine_info, format_table, machine_info, percentile, write_json  # noqa: E402

import mmgen_engine as mm  # noqa: E402

TASKS = ("caption", "caption_forced", "txt2img", "gesture")
MODES = ("engine", "static", "serial")
DEMO = {"caption": "captioning", "caption_forced": "captioning", "txt2img": "text-to-image",
        "gesture": "speech-to-gesture"}
# caption_forced: the demo captioner with its eos id moved to a byte token it never picks ("!"), so
# that every caption runs to its max_new_tokens (the forced lengths of bench_caption.py)
FORCED_EOS = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Per task: the rate sweep (requests/s), arrivals per rate at most, seconds of arrivals at most,
# unloaded requests, the static batcher's wait (ms), and the --quick values. The CPU sweeps bracket
# the saturation of each mode on a 2-core CPU at one torch thread (see benchmarks/RESULTS.md).
DEFAULTS = {
    "caption": {"rates": [25, 50, 100, 150, 200, 300, 400], "requests": 400, "duration": 4.0, "unloaded": 40,
                "wait_ms": 10.0, "drain": 10.0,
                "quick": {"rates": [20, 80], "requests": 12, "duration": 1.0, "unloaded": 4, "drain": 10.0}},
    "caption_forced": {"rates": [25, 50, 75, 100, 150, 200, 300], "requests": 400, "duration": 4.0,
                       "unloaded": 40, "wait_ms": 10.0, "drain": 10.0,
                       "quick": {"rates": [20], "requests": 8, "duration": 1.0, "unloaded": 2, "drain": 10.0}},
    "txt2img": {"rates": [1, 2, 4, 6, 8], "requests": 48, "duration": 8.0, "unloaded": 4, "wait_ms": 100.0,
                "drain": 10.0,
                "quick": {"rates": [2], "requests": 3, "duration": 1.5, "unloaded": 1, "drain": 30.0}},
    "gesture": {"rates": [5, 10, 20, 30, 40, 60], "requests": 200, "duration": 4.0, "unloaded": 20,
                "wait_ms": 0.0, "drain": 10.0,
                "quick": {"rates": [10], "requests": 4, "duration": 1.0, "unloaded": 2, "drain": 10.0}},
}
GESTURE_SECONDS = (2.0, 4.0, 8.0)  # clip lengths drawn per request: 1, 1 and 3 windows
POOL = 32  # distinct inputs per task the requests draw from
SATURATED_P50 = 6.0  # a rate whose p50 end-to-end exceeds this x the unloaded p50 counts as saturated


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- workloads --------------------------------------------------------------------------------------
class Task:
    """One task's pipeline, its request inputs and how each mode serves them."""

    def __init__(self, name: str, pipe, args):
        self.name, self.pipe, self.args = name, pipe, args
        self.kind = "caption" if name.startswith("caption") else name
        rng = np.random.default_rng(args.seed)
        if self.kind == "caption":
            from mmgen_engine.demo.world import HELD_OUT_SEED, sample
            self.pool = [image for image, _ in sample(POOL, HELD_OUT_SEED + args.seed)]
            gen = pipe.config.generation
            self.eos, self.keep_eos = gen.eos_token_id, int(gen.include_eos)
        elif name == "txt2img":
            from mmgen_engine.demo.world import all_captions
            captions = list(all_captions(canonical_only=True))
            self.pool = [captions[i] for i in rng.choice(len(captions), POOL, replace=False)]
        else:
            from mmgen_engine.demo.gesture_world import clip
            self.pool = [(clip(args.seed + i, GESTURE_SECONDS[i % len(GESTURE_SECONDS)])[0])
                         for i in range(POOL)]
            cfg = pipe.config
            self.window_tokens, self.seed_tokens = cfg.window_tokens, cfg.gesture.seed_tokens

    def items(self, n: int, seed: int) -> list[tuple]:
        """``n`` request inputs drawn from the pool (seeded): (pool index, max_new_tokens or None)."""
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(self.pool), n).tolist()
        if self.kind == "caption":
            return [(i, int(m)) for i, m in zip(idx, rng.choice(self.args.max_new, n))]
        return [(i, None) for i in idx]

    def request(self, item):
        i, max_new = item
        if self.kind == "caption":
            return mm.CaptionRequest(self.pool[i], max_new_tokens=max_new)
        if self.name == "txt2img":
            return mm.ImageRequest(self.pool[i])
        return mm.GestureRequest(self.pool[i], sample_rate=16000)

    def call(self, items) -> list[tuple]:
        """One pipeline call for ``items``: [(output, tokens generated)] in order."""
        pipe = self.pipe
        if self.kind == "caption":
            max_new = max(m for _, m in items)
            ids = pipe.generate_ids(pipe.preprocess([self.pool[i] for i, _ in items]), max_new).tolist()
            rows, counts = [], []
            for row, (_, m) in zip(ids, items):
                row = row[:m]
                if self.eos in row:
                    end = row.index(self.eos)
                    counts.append(end + 1)  # the engine counts the eos it picked
                    row = row[:end + self.keep_eos]
                else:
                    counts.append(len(row))
                rows.append(row)
            texts = [t.strip() for t in pipe.tokenizer.decode_batch(rows, skip_special_tokens=True)]
            return list(zip(texts, counts))
        if self.name == "txt2img":
            images = pipe.generate([self.pool[i] for i, _ in items], images_per_prompt=1)
            return [(im, pipe.num_tokens) for im in images]
        assert len(items) == 1, "the gesture pipeline takes one clip per call"
        audio = self.pool[items[0][0]]
        windows = pipe.plan.windows(audio.shape[0])
        tokens = self.window_tokens + (windows - 1) * (self.window_tokens - self.seed_tokens)
        return [(pipe.generate(audio, sample_rate=16000), tokens)]

    @property
    def modes(self) -> list[str]:
        return [m for m in self.args.modes if not (m == "static" and self.name == "gesture")]


# -- static batching and one at a time ---------------------------------------------------------------
class Pending:
    """A request of the static or serial server: its times, tokens, output or error."""

    __slots__ = ("item", "times", "tokens", "output", "error", "done")

    def __init__(self, item):
        self.item, self.times, self.tokens = item, {"submitted": time.perf_counter()}, 0
        self.output = self.error = None
        self.done = threading.Event()


class Overloaded(Exception):
    pass


class BatchServer:
    """One dispatcher thread: takes up to ``max_batch`` waiting requests, or fewer once ``wait_s``
    passed since the oldest arrived, and serves them with one ``task.call``. ``max_batch=1``,
    ``wait_s=0``: one request at a time, FIFO."""

    def __init__(self, task: Task, max_batch: int, wait_s: float, max_queued: int):
        self.task, self.max_batch, self.wait_s, self.max_queued = task, max_batch, wait_s, max_queued
        self.queue: collections.deque[Pending] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = self.busy = False
        self.calls = self.rows = 0
        self.thread = threading.Thread(target=self._run, name="bench-dispatcher", daemon=True)
        self.thread.start()

    def submit(self, item) -> Pending:
        with self.cond:
            if len(self.queue) >= self.max_queued:
                raise Overloaded
            p = Pending(item)
            self.queue.append(p)
            self.cond.notify()
        return p

    def _take(self) -> list[Pending] | None:
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            deadline = self.queue[0].times["submitted"] + self.wait_s
            while len(self.queue) < self.max_batch and not self.stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.cond.wait(left)
            if self.stopping:
                return None
            self.busy = True
            return [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]

    def _run(self) -> None:
        with torch.inference_mode():
            while (batch := self._take()) is not None:
                started = time.perf_counter()
                for p in batch:
                    p.times["started"] = started
                try:
                    out = self.task.call([p.item for p in batch])
                except Exception as e:  # noqa: BLE001 - recorded per request, the run goes on
                    out = [(None, 0)] * len(batch)
                    for p in batch:
                        p.error = e
                finished = time.perf_counter()
                self.calls += 1
                self.rows += len(batch)
                for p, (output, tokens) in zip(batch, out):
                    p.output, p.tokens = output, tokens
                    p.times["finished"] = finished
                    p.done.set()
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def clear(self) -> None:
        """Drop the waiting requests and wait for the call in progress to end."""
        with self.cond:
            self.queue.clear()
            self.cond.wait_for(lambda: not self.busy)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()


# -- one run: a mode at a rate (or unloaded) ---------------------------------------------------------
def _wait(handle, mode: str, timeout: float) -> tuple[bool, object]:
    """(finished, output or error) of a request, waiting at most ``timeout`` s."""
    if mode == "engine":
        try:
            return True, handle.result(timeout=max(timeout, 0.0))
        except TimeoutError:
            return False, None
        except Exception as e:  # noqa: BLE001 - a failed request is recorded, the run goes on
            return True, e
    if not handle.done.wait(max(timeout, 0.0)):
        return False, None
    return True, handle.error if handle.error is not None else handle.output


class Server:
    """A mode behind one submit call: the engine, static batching or serial."""

    def __init__(self, task: Task, mode: str, args):
        self.task, self.mode, self.args = task, mode, args
        if mode == "engine":
            self.engine = mm.Engine(task.pipe, slots=args.slots, max_queued=args.max_queued)
        else:
            n, wait = (args.slots, task.wait_ms / 1e3) if mode == "static" else (1, 0.0)
            self.server = BatchServer(task, n, wait, args.max_queued)

    def submit(self, item):
        if self.mode == "engine":
            return self.engine.submit(self.task.request(item))
        return self.server.submit(item)

    def counters(self) -> dict:
        if self.mode == "engine":
            (m,) = self.engine.metrics()["models"].values()
            return {"steps": m["steps"], "busy": round(m["occupancy"] * m["steps"] * self.args.slots)}
        return {"calls": self.server.calls, "rows": self.server.rows}

    def close(self) -> None:
        if self.mode == "engine":
            self.engine.shutdown(drain=False, timeout=30)
        else:
            self.server.stop()

    def warm_up(self, groups) -> None:
        """Serve each group of items all at once and wait (untimed): first-call allocations and, on
        CUDA, the graph captures of each batch size happen here."""
        for items in groups:
            handles = [self.submit(item) for item in items]
            for h in handles:
                _wait(h, self.mode, 600)

    def settle(self, handles) -> None:
        """After a run: drop what is left of it (cancel, or drop from the queue) so that the next run
        starts from an idle server."""
        if self.mode == "engine":
            for h in handles:
                h.cancel()
            for h in handles:
                _wait(h, self.mode, 60)
        else:
            self.server.clear()


def play(server: Server, items: list, arrivals: list[float] | None, drain: float) -> dict:
    """Submit ``items`` at ``arrivals`` (seconds from now; None: each once the previous finished)
    and collect every request's record."""
    mode = server.mode
    before = server.counters()
    handles, rejected = [], 0
    start = time.perf_counter()
    lag = 0.0
    for k, item in enumerate(items):
        if arrivals is not None:
            delay = start + arrivals[k] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            lag = max(lag, time.perf_counter() - start - arrivals[k])
        try:
            h = server.submit(item)
        except (mm.EngineOverloaded, Overloaded):
            rejected += 1
            continue
        handles.append((k, h))
        if arrivals is None:
            _wait(h, mode, 600)
    end = time.perf_counter() + drain
    records = []
    for k, h in handles:
        finished, out = _wait(h, mode, end - time.perf_counter())
        ok = finished and not isinstance(out, BaseException)
        rec = {"index": k, "max_new": items[k][1], "finished": finished,
               "error": repr(out) if isinstance(out, BaseException) else None,
               "times": dict(h.times), "tokens": h.tokens}
        rec["output"] = out if ok else None
        records.append(rec)
    after = server.counters()
    server.settle([h for _, h in handles])
    return {"records": records, "rejected": rejected, "start": start, "max_lag_s": lag,
            "counters": {k: after[k] - before[k] for k in after}}


def summarize(task: Task, mode: str, rate, run: dict, args) -> dict:
    """The row of one run (latencies in ms)."""
    ok = [r for r in run["records"] if r["finished"] and r["error"] is None]
    row = {"task": task.name, "mode": mode, "rate": rate, "offered": len(run["records"]) + run["rejected"],
           "completed": len(ok), "rejected": run["rejected"],
           "unfinished": sum(not r["finished"] for r in run["records"]),
           "failed": sum(r["finished"] and r["error"] is not None for r in run["records"]),
           "max_arrival_lag_ms": run["max_lag_s"] * 1e3}
    if not ok:
        return row
    ms = 1e3

    def pct(values, q):
        return percentile(values, q) if values else None

    e2e = [(r["times"]["finished"] - r["times"]["submitted"]) * ms for r in ok]
    wait = [(r["times"]["started"] - r["times"]["submitted"]) * ms for r in ok if "started" in r["times"]]
    if mode == "engine":
        ttft = [(r["times"]["first_token"] - r["times"]["submitted"]) * ms for r in ok if "first_token" in r["times"]]
        tpot = [(r["times"]["finished"] - r["times"]["first_token"]) * ms / (r["tokens"] - 1)
                for r in ok if r["tokens"] > 1 and "first_token" in r["times"]]
    else:  # nothing comes out before the call returns
        ttft = e2e
        tpot = [(r["times"]["finished"] - r["times"]["started"]) * ms / r["tokens"] for r in ok if r["tokens"] > 0]
    span = max(r["times"]["finished"] for r in ok) - min(r["times"]["submitted"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    c = run["counters"]
    if mode == "engine":
        fill = c["busy"] / (c["steps"] * args.slots) if c["steps"] else None
    elif mode == "static":
        fill = c["rows"] / (c["calls"] * args.slots) if c["calls"] else None
    else:
        fill = None
    row.update({"req_s": len(ok) / span if span > 0 else None, "tok_s": tokens / span if span > 0 else None,
                "tokens_mean": tokens / len(ok),
                "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90), "ttft_p99_ms": pct(ttft, 99),
                "tpot_ms": pct(tpot, 50), "e2e_p50_ms": pct(e2e, 50), "e2e_p90_ms": pct(e2e, 90),
                "e2e_p99_ms": pct(e2e, 99), "wait_p50_ms": pct(wait, 50), "wait_p99_ms": pct(wait, 99),
                "occupancy": fill, "counters": c})
    return row


def poisson(rate: float, n: int, duration: float, seed: int) -> list[float]:
    """Arrival times (s) of a Poisson process at ``rate``/s given that ``k = min(n, round(rate *
    duration))`` (at least 1) arrivals fall in ``[0, k / rate)``: ``k`` sorted uniform times there
    (the process's law given its count), so every rate is offered exactly, with Poisson bursts."""
    k = max(1, min(n, round(rate * duration)))
    return np.sort(np.random.default_rng(seed).uniform(0.0, k / rate, k)).tolist()


def compare_outputs(task: Task, runs: dict) -> dict | None:
    """Greedy captions (and gesture poses, whose default sampling is seeded) of the engine and of
    static batching against serial's, request by request where both finished."""
    if task.name == "txt2img" or "serial" not in runs:
        return None
    out = {}
    for mode in ("engine", "static"):
        if mode not in runs:
            continue
        same = total = 0
        for rate, run in runs[mode].items():
            if rate not in runs["serial"]:
                continue
            ref = {r["index"]: r["output"] for r in runs["serial"][rate]["records"] if r["output"] is not None}
            for r in run["records"]:
                if r["output"] is None or r["index"] not in ref:
                    continue
                total += 1
                a, b = r["output"], ref[r["index"]]
                if task.kind == "caption":
                    same += a == b
                else:
                    same += a.shape == b.shape and bool(np.allclose(a, b, atol=1e-4))
        out[mode] = {"compared": total, "match": same, "fraction": same / total if total else None}
    return out


def forced_checkpoint(cache: Path) -> Path:
    """A copy of the demo captioner whose eos id is ``FORCED_EOS``, a token it never picks."""
    import json
    import shutil

    src, out = mm.demo_model("captioning"), cache / "captioning_forced"
    config = json.loads((src / "config.json").read_text())
    config["generation"]["eos_token_id"] = FORCED_EOS
    if not ((out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == config
            and all((out / f.name).is_file() and (out / f.name).stat().st_size == f.stat().st_size
                    for f in src.iterdir())):
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name != "config.json":
                shutil.copyfile(f, out / f.name)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def warm_up_sizes(mode: str, slots: int, quick: bool) -> list[int]:
    """Group sizes of a mode's warm-up: every power of two up to the slots and the slots (the CUDA
    graphs' batch buckets) for the engine and static batching, two single requests for serial."""
    if mode == "serial":
        return [1, 1]
    sizes = [1, 2] if quick else [2**k for k in range(slots.bit_length()) if 2**k <= slots] + [slots]
    return sorted({min(n, slots) for n in sizes})


def warm_groups(task: Task, mode: str, args) -> list[list]:
    """The warm-up's groups of items; captions at the longest ``max_new_tokens`` (a group's rows
    then decode together, at its size)."""
    groups = []
    for k, n in enumerate(warm_up_sizes(mode, args.slots, args.quick)):
        items = task.items(n, args.seed + 7 + k)
        if task.kind == "caption":
            items = [(i, max(args.max_new)) for i, _ in items]
        groups.append(items)
    return groups


def saturated(row: dict, unloaded_p50: float | None) -> bool:
    """More than a tenth of the arrivals rejected, unfinished or failed, or the queue growing: the
    achieved rate under 0.9x the offered one with the p50 end-to-end over ``SATURATED_P50`` x the
    unloaded p50."""
    if row["rejected"] + row["unfinished"] + row["failed"] > 0.1 * row["offered"]:
        return True
    slow = bool(unloaded_p50 and row.get("e2e_p50_ms") and row["e2e_p50_ms"] > SATURATED_P50 * unloaded_p50)
    return slow and (row.get("req_s") or 0.0) < 0.9 * row["rate"]


def run_task(name: str, args) -> tuple[list[dict], list[dict], dict]:
    d = DEFAULTS[name]
    q = d["quick"] if args.quick else d
    rates = args.rates or q["rates"]
    n_max = args.requests or q["requests"]
    duration = args.duration or q["duration"]
    drain = args.drain or q["drain"]
    unloaded_n = args.unloaded or q["unloaded"]
    dtype = DTYPES[args.dtype] if args.dtype else None
    t0 = time.perf_counter()
    path = forced_checkpoint(args.cache_dir) if name == "caption_forced" else mm.demo_model(DEMO[name])
    pipe = mm.load(path, device=args.device, dtype=dtype)
    task = Task(name, pipe, args)
    task.wait_ms = args.wait_ms if args.wait_ms is not None else d["wait_ms"]
    log(f"[{name}] loaded {DEMO[name]} demo model and {POOL} inputs in {time.perf_counter() - t0:.1f} s")
    rows, runs, skipped = [], {m: {} for m in task.modes}, {}
    schedules = {rate: poisson(rate, n_max, duration, args.seed + 1000 + i) for i, rate in enumerate(rates)}
    for mode in task.modes:
        server = Server(task, mode, args)  # one per mode, left idle between runs
        server.warm_up(warm_groups(task, mode, args))
        # unloaded: one request after another through the mode's own path
        run = play(server, task.items(unloaded_n, args.seed + 1), None, drain)
        first = len(rows)
        rows.append(summarize(task, mode, "unloaded", run, args))
        log(f"[{name}] {mode} unloaded: e2e p50 {rows[-1].get('e2e_p50_ms', float('nan')):.1f} ms")
        over = 0
        for i, rate in enumerate(rates):
            if over >= args.stop_after:  # saturated at the last rates: the higher ones only queue longer
                skipped.setdefault(mode, []).append(rate)
                continue
            arrivals = schedules[rate]
            run = play(server, task.items(len(arrivals), args.seed + 2000 + i), arrivals, drain)
            runs[mode][rate] = run
            row = summarize(task, mode, rate, run, args)
            rows.append(row)
            over = over + 1 if saturated(row, rows[first].get("e2e_p50_ms")) else 0
            log(f"[{name}] {mode} {rate:g}/s: {row['completed']}/{row['offered']} done, {row['rejected']} rejected, "
                f"{row.get('req_s') or 0:.1f} req/s, e2e p99 {row.get('e2e_p99_ms') or float('nan'):.1f} ms")
        server.close()
    summary = sustained(task, rows, rates)
    lengths = None
    if name == "caption_forced":  # every caption ran to its max_new_tokens
        done = [r for mode_runs in runs.values() for run in mode_runs.values() for r in run["records"]
                if r["output"] is not None]
        lengths = {"checked": len(done), "forced": sum(r["tokens"] == r["max_new"] for r in done)}
    if skipped:
        log(f"[{name}] skipped (saturated below): {skipped}")
    return rows, summary, {"rates": rates, "skipped": skipped, "requests": n_max, "duration": duration, "drain": drain,
                           "unloaded_requests": unloaded_n, "wait_ms": task.wait_ms,
                           "outputs_match": compare_outputs(task, runs), "forced_lengths": lengths}


def _best_rate(rows: list[dict], slo: float | None) -> float:
    """The highest rate of ``rows`` with nothing rejected, unfinished or failed and p99 end-to-end
    within ``slo`` ms (0.0 if none)."""
    ok = [r["rate"] for r in rows if slo is not None and r.get("e2e_p99_ms") is not None and r["rejected"] == 0
          and r["unfinished"] == 0 and r["failed"] == 0 and r["e2e_p99_ms"] <= slo]
    return max(ok, default=0.0)


def sustained(task: Task, rows: list[dict], rates: list[float]) -> list[dict]:
    """Per mode: the unloaded latency (p50 and p99 end-to-end of the unloaded pass), the highest rate
    sustained with p99 end-to-end within ``--slo`` x the unloaded p50 (the SLO) and within ``--slo`` x
    the unloaded p99 (a bar that allows for the spread of request lengths), the peak achieved rate;
    then the engine's ratios to the other modes."""
    out = []
    for mode in task.modes:
        mine = [r for r in rows if r["mode"] == mode]
        unloaded = next(r for r in mine if r["rate"] == "unloaded")
        swept = [r for r in mine if r["rate"] != "unloaded"]
        p50, p99 = unloaded.get("e2e_p50_ms"), unloaded.get("e2e_p99_ms")
        slo = task.args.slo * p50 if p50 else None
        slo99 = task.args.slo * p99 if p99 else None
        best = _best_rate(swept, slo)
        out.append({"task": task.name, "mode": mode, "unloaded_p50_ms": p50, "unloaded_p99_ms": p99, "slo_ms": slo,
                    "sustained_req_s": best, "slo_p99_ms": slo99, "sustained_p99_req_s": _best_rate(swept, slo99),
                    "peak_req_s": max((r.get("req_s") or 0.0 for r in swept), default=0.0),
                    "at_top_of_sweep": bool(best) and best == max(rates)})
    by = {s["mode"]: s for s in out}
    for other in ("static", "serial"):
        if "engine" in by and other in by:
            e, o = by["engine"], by[other]
            out.append({"task": task.name, "mode": f"engine/{other}",
                        **{k: _ratio(e[k], o[k]) for k in ("sustained_req_s", "sustained_p99_req_s", "peak_req_s")}})
    return out


def _ratio(a: float, b: float) -> float | None:
    if b:
        return a / b
    return None if not a else math.inf


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=["caption"],
                    help="tasks to serve, each in turn (default caption)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default all three")
    add_device_arguments(ap)
    ap.add_argument("--dtype", choices=list(DTYPES), help="load the demo models in this dtype (default theirs)")
    ap.add_argument("--slots", type=int, default=8, help="engine slots = static batch size N (default 8)")
    ap.add_argument("--max-queued", type=int, default=64,
                    help="requests that may wait before arrivals are rejected, every mode (default 64)")
    ap.add_argument("--wait-ms", type=float,
                    help="static batching: longest wait for a full batch after its oldest request arrived "
                         "(default caption 10, txt2img 100)")
    ap.add_argument("--rates", nargs="+", type=float, help="requests/s to sweep (default per task)")
    ap.add_argument("--requests", type=int, help="arrivals per rate at most (default per task)")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per rate at most (default per task)")
    ap.add_argument("--drain", type=float, help="seconds after the last arrival before the rest counts unfinished")
    ap.add_argument("--unloaded", type=int, help="requests of the unloaded pass (default per task)")
    ap.add_argument("--max-new", nargs="+", type=int, default=[4, 8, 16, 24],
                    help="captions: max_new_tokens drawn per request from these (default 4 8 16 24)")
    ap.add_argument("--stop-after", type=int, default=2,
                    help="a mode skips the higher rates after this many saturated ones in a row (more than a "
                         "tenth rejected or unfinished; default 2)")
    ap.add_argument("--cache-dir", type=Path, default=Path("build/bench_engine"),
                    help="where caption_forced's checkpoint is written (default build/bench_engine)")
    ap.add_argument("--slo", type=float, default=2.0, help="SLO: p99 end-to-end <= this x unloaded p50 (default 2)")
    ap.add_argument("--quick", action="store_true", help="a few requests at one or two rates, for smoke tests")
    ap.add_argument("--seed", type=int, default=0, help="inputs and arrivals seed (default 0)")
    ap.add_argument("--json", type=Path, help="results file (default build/bench_engine/results.json; "
                                              "results_quick.json with --quick)")
    args = ap.parse_args(argv)
    args.tasks = list(dict.fromkeys(args.tasks))
    args.modes = [m for m in MODES if m in args.modes]
    args.device = checked_device(ap, args.device)
    args.json = args.json or args.cache_dir / ("results_quick.json" if args.quick else "results.json")
    if args.slots < 1 or args.max_queued < 1 or args.slo <= 0:
        ap.error("need --slots >= 1, --max-queued >= 1 and --slo > 0")
    if args.rates and min(args.rates) <= 0:
        ap.error("rates must be > 0")
    if not all(1 <= m <= 31 for m in args.max_new):
        ap.error("--max-new values must lie in [1, 31] (the demo captioner has 32 positions)")
    return args


COLUMNS = ["task", "mode", "rate", "completed", "rejected", "unfinished", "req_s", "tok_s", "ttft_p50_ms",
           "ttft_p90_ms", "ttft_p99_ms", "tpot_ms", "e2e_p50_ms", "e2e_p99_ms", "wait_p50_ms", "occupancy"]
SUMMARY_COLUMNS = ["task", "mode", "unloaded_p50_ms", "unloaded_p99_ms", "slo_ms", "sustained_req_s", "slo_p99_ms",
                   "sustained_p99_req_s", "peak_req_s"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, summary, settings = [], [], {}
    for name in args.tasks:
        r, s, st = run_task(name, args)
        rows += r
        summary += s
        settings[name] = st
    payload = {"benchmark": "engine", "machine": machine_info(args.device), "engine": engine_info(),
               "settings": {"tasks": args.tasks, "modes": args.modes, "device": args.device, "dtype": args.dtype,
                            "slots": args.slots, "max_queued": args.max_queued, "max_new": args.max_new,
                            "slo": args.slo, "seed": args.seed, "quick": args.quick,
                            "threads": torch.get_num_threads(), "per_task": settings},
               "results": rows, "summary": summary}
    write_json(args.json, payload)
    log(f"wrote {args.json}")

    m = payload["machine"]
    for name in args.tasks:
        forced = settings[name]["forced_lengths"]
        if forced and forced["forced"] != forced["checked"]:
            print(f"WARNING: {name}: {forced['checked'] - forced['forced']} of {forced['checked']} captions stopped "
                  f"before their max_new_tokens", flush=True)
        match = settings[name]["outputs_match"]
        if match:
            print(f"{name}: outputs equal to serial's: "
                  + ", ".join(f"{mode} {c['match']}/{c['compared']}" for mode, c in match.items()))
            for mode, c in match.items():
                if c["compared"] and c["match"] != c["compared"]:
                    print(f"WARNING: {name} {mode}: {c['compared'] - c['match']} of {c['compared']} outputs differ "
                          f"from serial's", flush=True)
    print(f"\nengine benchmark ({'quick; ' if args.quick else ''}slots/batch {args.slots}, max_queued "
          f"{args.max_queued}, caption max_new_tokens from {args.max_new}; latencies in ms; static/serial TTFT = "
          f"end-to-end) on {m.get('gpu', m['cpu'])}, {m['cpu_usable']} cores, torch threads {m['torch_threads']}")
    print(format_table(rows, COLUMNS))
    print(f"\nsustained: the highest rate of the sweep with nothing rejected or unfinished and p99 end-to-end "
          f"<= slo_ms ({args.slo:g} x the mode's unloaded p50; sustained_p99: <= slo_p99_ms, {args.slo:g} x its "
          f"unloaded p99); peak: the highest achieved req/s")
    print(format_table(summary, SUMMARY_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
