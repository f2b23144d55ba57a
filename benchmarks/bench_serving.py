#!/usr/bin/env python3
"""Serving over HTTP: ``mmgen serve`` (one ``mm.Engine`` per model behind FastAPI) against the
ten-line FastAPI app a user writes without it, under open-loop Poisson arrivals over loopback.

Both servers are real subprocesses on 127.0.0.1, with the same models (the bundled demo models, or
``--model`` paths) on ``--device``:

- ``mmgen serve --model NAME=DIR ... --port 0`` (its ready line ``mmgen serve: listening on
  http://HOST:PORT (models: ...)`` gives the port), ``--slots`` and ``--max-queued`` passed on;
- the baseline, :func:`baseline_app` served by uvicorn (``bench_serving.py baseline-server``, which
  prints the same ready line): the pipelines loaded with ``mm.load``, sync routes (FastAPI runs them in
  its thread pool) that call the pipeline once per request behind one ``threading.Lock``; the same
  routes and non-streaming JSON as the server. It never answers 429: its backlog is the thread pool's.

The load generator is this process: one ``httpx.AsyncClient`` per server (keep-alive connections,
no connection limit), request bodies encoded before each run. Tasks (``--tasks``, each in turn):

- ``captions``: ``POST /v1/captions``, one 64x64 shapes-world image (base64 PNG) per request,
  ``max_new_tokens`` drawn from ``--max-new`` (the demo captioner ends its captions at eos after
  4 to 9 tokens);
- ``images``: ``POST /v1/images/generations``, one image (256 tokens) per prompt;
- ``gestures``: ``POST /v1/gestures``, a 2, 4 or 8 s WAV clip (16 kHz, 16-bit) as multipart.

Modes (``--modes``): ``server`` (non-streaming), ``stream`` (the same server with ``stream``: SSE;
the time to first event is measured from sending the request to the end of its first event) and
``baseline`` (non-streaming). For each task each mode first runs an unloaded pass (requests one
after another); then at each rate of the sweep the same seeded Poisson schedule as bench_engine.py's
(``k = min(--requests, rate x --duration)`` arrivals at sorted uniform times in ``[0, k / rate)``) is
played against each mode in turn, so that a change in the machine's load hits the modes alike. What
has not answered ``--drain`` s after the last arrival is cancelled (the connection closed) and counts
as unfinished; before the next run the benchmark waits (at most 60 s) for the server process to go
idle (under a tenth of a core), since the baseline finishes the requests of closed connections. A
mode skips the rest of the sweep after ``--stop-after`` saturated rates in a row (bench_engine's
rule: over a tenth rejected, failed or unfinished, or under 0.9x the offered rate with p50 over 6x
the unloaded p50).

Per (task, mode, rate): completed requests/s (over first send to last answer), end-to-end latency
p50/p90/p99, time to first event p50/p90/p99 (``stream``), 429s (``rejected``), other errors
(``failed``), unfinished, the largest lateness of an arrival (the client falling behind its
schedule), and the CPU cores the server process and the client used during the run (``/proc``).

Summary per (task, mode): unloaded p50 / p99 end-to-end, unloaded time to the first output (the
first event with ``stream``, the answer otherwise), the highest rate sustained with nothing
rejected, failed or unfinished and p99 within ``--slo`` x the unloaded p50 (and x the unloaded p99),
the peak achieved rate; then ``server/baseline`` and ``stream/baseline`` ratios (above 1 for rates:
the server does better; below 1 for latencies). Captions (greedy) and gesture poses (the demo
model's seeded sampling) of the server are compared with the baseline's request by request (a
difference prints a WARNING). The markdown tables are printed last; every row, the machine and the
settings go to ``--json``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fastapi
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import GESTURE_SECONDS, POOL, _best_rate, _ratio, poisson, saturated, warm_up_sizes  # noqa: E402
from timing import add_device_arguments, checked_device, engine_info, format_table, machine_info, percentile, write_json  # noqa: E402

import mmgen_engine as mm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("captions", "images", "gestures")
MODES = ("server", "stream", "baseline")
PIPELINE_TASK = {"captions": "captioning", "images": "text-to-image", "gestures": "speech-to-gesture"}
ROUTES = {"captions": "/v1/captions", "images": "/v1/images/generations", "gestures": "/v1/gestures"}
READY = re.compile(r"listening on (http://\S+:\d+)")
IDLE_CORES = 0.1  # a server using less than this (CPU seconds per second) counts as idle between runs

# Per task: the CPU sweep (requests/s), arrivals per rate at most, seconds of arrivals at most,
# unloaded requests, seconds to wait after the last arrival; the --quick values; the CUDA sweep (a
# guess, not yet run on a GPU).
DEFAULTS = {
    "captions": {"rates": [10, 25, 50, 100, 150, 200, 300, 400], "requests": 400, "duration": 3.0, "unloaded": 30,
                 "drain": 10.0, "cuda_rates": [50, 100, 200, 400, 800],
                 "quick": {"rates": [20], "requests": 8, "duration": 1.0, "unloaded": 3, "drain": 10.0}},
    "images": {"rates": [0.5, 1, 2, 4, 6, 8], "requests": 24, "duration": 6.0, "unloaded": 3, "drain": 20.0,
               "cuda_rates": [2, 5, 10, 20, 40],
               "quick": {"rates": [1], "requests": 2, "duration": 2.0, "unloaded": 1, "drain": 30.0}},
    "gestures": {"rates": [2, 5, 10, 20, 30], "requests": 100, "duration": 4.0, "unloaded": 10, "drain": 10.0,
                 "cuda_rates": [10, 20, 40, 80, 160],
                 "quick": {"rates": [5], "requests": 3, "duration": 1.0, "unloaded": 2, "drain": 10.0}},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the baseline: what a user writes in ten lines -------------------------------------------------
def baseline_app(models: dict[str, str], device: str = "cpu", dtype: str | None = None):
    """A FastAPI app serving ``models`` ({name: checkpoint dir}; the first of each task) as a user
    writes it without ``mmgen serve``: sync routes, so FastAPI runs each in its thread pool, and one
    lock around every pipeline call (a pipeline is not meant to be called from two threads at once).
    Routes and non-streaming answers as ``mmgen serve``'s; no limits, no streaming, no 429."""
    from PIL import Image
    from soundfile import read

    from mmgen_engine.gesture_format import JOINT_NAMES

    app, lock, pipes = fastapi.FastAPI(), threading.Lock(), {}
    for name, path in models.items():
        pipe = mm.load(path, device=device, dtype=dtype)
        pipes.setdefault(pipe.task, (name, pipe))

    @app.get("/health")
    def health():
        return {"status": "ok", "models": {name: task for task, (name, _) in pipes.items()}}

    @app.post("/v1/captions")
    def captions(body: dict = fastapi.Body()):
        name, pipe = pipes["captioning"]
        images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in body["images"]]
        with lock:
            return {"model": name, "captions": pipe.caption(images, max_new_tokens=body.get("max_new_tokens"))}

    @app.post("/v1/images/generations")
    def images(body: dict = fastapi.Body()):
        with lock:
            out = pipes["text-to-image"][1].generate(body["prompt"], images_per_prompt=body.get("n", 1))
        return {"created": int(time.time()), "data": [{"b64_json": _png_b64(image)} for image in out]}

    @app.post("/v1/gestures")
    def gestures(audio: fastapi.UploadFile):
        name, pipe = pipes["speech-to-gesture"]
        samples, rate = read(audio.file, dtype="float32")
        with lock:
            poses = pipe.generate(samples, sample_rate=rate)
        return {"model": name, "fps": pipe.fps, "frames": len(poses), "joints": poses.shape[1],
                "joint_names": list(JOINT_NAMES), "skeleton": pipe.skeleton, "poses": poses.tolist()}

    return app


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def baseline_main(argv) -> int:
    """``bench_serving.py baseline-server --model NAME=DIR ... [--device] [--dtype] [--host]``: serve
    :func:`baseline_app` with uvicorn on a free port and print ``mmgen baseline: listening on
    http://HOST:PORT (models: ...)`` once it is up."""
    import uvicorn

    ap = argparse.ArgumentParser(prog="bench_serving.py baseline-server")
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model)
    app = baseline_app(models, args.device, args.dtype)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, 0))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    host, port = sock.getsockname()[:2]
    print(f"mmgen baseline: listening on http://{host}:{port} (models: {', '.join(models)})", flush=True)
    # uvicorn's defaults, as `mmgen serve` uses them (access log on, log level info)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0


# -- server processes ------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies (Linux), so that a killed benchmark
    leaves no server behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """A server subprocess: its stdout and stderr go to ``log_path``; ``url`` once its ready line came."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, threads: int | None):
        self.name, self.url = name, None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path, self._log = log_path, open(log_path, "w")
        self._log.write(" ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     cwd=ROOT, preexec_fn=_die_with_parent)
        self._ready = threading.Event()
        threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # drained to the end, so that the server never blocks on a full pipe
            self._log.write(line)
            self._log.flush()
            if self.url is None and (m := READY.search(line)):
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> str:
        self._ready.wait(timeout)
        if self.url is None:
            self.stop()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"{self.name} did not print its ready line within {timeout:g} s; log:\n{tail}")
        return self.url

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the process so far (every thread), from /proc; None elsewhere."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_servers(models: dict[str, str], args) -> dict[str, ServerProcess]:
    """The servers ``--modes`` needs, started together (each loads while the other does), each
    printed its ready line."""
    spec = [f"{name}={path}" for name, path in models.items()]
    common = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    cmds = {"server": [sys.executable, "-m", "mmgen_engine.cli", "serve", *sum((["--model", m] for m in spec), []),
                       "--host", "127.0.0.1", "--port", "0", "--slots", str(args.slots),
                       "--max-queued", str(args.max_queued), *common],
            "baseline": [sys.executable, str(Path(__file__).resolve()), "baseline-server",
                         *sum((["--model", m] for m in spec), []), "--host", "127.0.0.1", *common]}
    needed = {"baseline" if m == "baseline" else "server" for m in args.modes}
    procs = {}
    try:
        for name, cmd in cmds.items():
            if name not in needed:
                continue
            procs[name] = ServerProcess(name, cmd, args.log_dir / f"{name}.log", args.threads)
        for p in procs.values():
            p.wait_ready(args.start_timeout)
            log(f"{p.name}: {p.url} (log {p.log_path})")
    except BaseException:
        for p in procs.values():
            p.stop()
        raise
    return procs


async def wait_healthy(client, url: str, timeout: float) -> dict:
    deadline = time.perf_counter() + timeout
    while True:
        try:
            r = await client.get(url + "/health")
            if r.status_code == 200:
                return r.json()
        except Exception:  # noqa: BLE001 - not accepting yet
            if time.perf_counter() > deadline:
                raise
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{url}/health did not answer 200 within {timeout:g} s")
        await asyncio.sleep(0.1)


async def wait_idle(proc: ServerProcess, timeout: float = 60.0, window: float = 0.3) -> float:
    """Wait until ``proc`` uses under ``IDLE_CORES`` over ``window`` s (at most ``timeout`` s);
    returns the seconds waited."""
    t0 = time.perf_counter()
    if proc.cpu_seconds() is None:
        return 0.0
    while time.perf_counter() - t0 < timeout:
        c0 = proc.cpu_seconds()
        await asyncio.sleep(window)
        if (proc.cpu_seconds() or 0.0) - c0 < IDLE_CORES * window:
            return time.perf_counter() - t0
    log(f"{proc.name} still busy after {timeout:g} s")
    return time.perf_counter() - t0


# -- workloads --------------------------------------------------------------------------------------
def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class Workload:
    """One task's route, request bodies (encoded once, from a pool of ``POOL`` inputs) and answers."""

    def __init__(self, name: str, model: str, args):
        self.name, self.model, self.route, self.max_new = name, model, ROUTES[name], args.max_new
        if name == "captions":
            from mmgen_engine.demo.world import HELD_OUT_SEED, sample
            self.pool = [_png_b64(image) for image, _ in sample(POOL, HELD_OUT_SEED + args.seed)]
        elif name == "images":
            from mmgen_engine.demo.world import all_captions
            captions = list(all_captions(canonical_only=True))
            picks = np.random.default_rng(args.seed).choice(len(captions), POOL, replace=False)
            self.pool = [captions[i] for i in picks]
        else:
            from mmgen_engine.demo.gesture_world import HELD_OUT_SEED, SAMPLE_RATE, clip
            self.pool = [_wav_bytes(clip(HELD_OUT_SEED + args.seed + i, GESTURE_SECONDS[i % len(GESTURE_SECONDS)])[0],
                                    SAMPLE_RATE) for i in range(POOL)]

    def items(self, n: int, seed: int) -> list[tuple[int, int | None]]:
        """``n`` requests drawn from the pool (seeded): (pool index, max_new_tokens or None)."""
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(self.pool), n).tolist()
        lengths = rng.choice(self.max_new, n).tolist() if self.name == "captions" else [None] * n
        return list(zip(picks, lengths))

    def body(self, item, stream: bool) -> dict:
        """``httpx`` keyword arguments of one request."""
        i, max_new = item
        if self.name == "gestures":
            return {"files": {"audio": ("clip.wav", self.pool[i], "audio/wav")},
                    "data": {"model": self.model, **({"stream": "true"} if stream else {})}}
        if self.name == "captions":
            body = {"model": self.model, "images": [self.pool[i]], "max_new_tokens": max_new}
        else:
            body = {"model": self.model, "prompt": self.pool[i], "n": 1, "response_format": "b64_json"}
        if stream:
            body["stream"] = True
        return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}

    def output(self, answer: dict):
        """What is compared across modes: the caption, the poses; nothing for images (sampled)."""
        if self.name == "captions":
            return answer["captions"][0]
        if self.name == "gestures":
            return np.asarray(answer["poses"], dtype=np.float32)
        return None


# -- one request, one run ---------------------------------------------------------------------------
async def send(client, url: str, kwargs: dict, stream: bool, work: Workload, rec: dict) -> None:
    """One request; fills ``rec`` (times in perf_counter seconds, status, output or error). A
    cancelled request leaves ``finished`` unset."""
    rec["submitted"] = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", url, **kwargs) as r:
                rec["status"] = r.status_code
                if r.status_code != 200:
                    rec["error"] = (await r.aread()).decode(errors="replace")[:300]
                else:
                    await _read_events(r, rec)
        else:
            r = await client.post(url, **kwargs)
            rec["status"] = r.status_code
            if r.status_code == 200:
                rec["answer"] = r.json()
            else:
                rec["error"] = r.text[:300]
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a transport error is recorded, the run goes on
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    rec["finished"] = time.perf_counter()
    if "answer" in rec:
        rec["output"] = work.output(rec.pop("answer"))


async def _read_events(r, rec: dict) -> None:
    """Server-Sent Events: the end of the first event, the count, and the ``done`` event's answer
    (only the last event's data is parsed)."""
    event = data = last = None
    rec["events"] = 0
    async for line in r.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:]
        elif not line and event is not None:
            rec.setdefault("first_event", time.perf_counter())
            rec["events"] += 1
            last, event = (event, data), None
    if last is not None and last[0] == "done":
        rec["answer"] = json.loads(last[1])
    else:
        rec["error"] = f"stream ended with {last[0] + ': ' + last[1][:200] if last else 'no event'}"


async def play(client, url: str, work: Workload, stream: bool, items: list, arrivals: list[float] | None,
               drain: float) -> dict:
    """Send ``items`` at ``arrivals`` (seconds from now; None: each once the previous answered, at
    most ``drain`` s each) and return every request's record."""
    records = [{"index": k, "item": item} for k, item in enumerate(items)]
    bodies = [work.body(item, stream) for item in items]
    cpu0, start, lag = time.process_time(), time.perf_counter(), 0.0
    if arrivals is None:
        for rec, kwargs in zip(records, bodies):
            try:
                await asyncio.wait_for(send(client, url, kwargs, stream, work, rec), drain)
            except asyncio.TimeoutError:
                pass
    else:
        tasks = []
        for rec, kwargs, at in zip(records, bodies, arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, time.perf_counter() - start - at)
            tasks.append(asyncio.create_task(send(client, url, kwargs, stream, work, rec)))
        _, pending = await asyncio.wait(tasks, timeout=drain)
        for t in pending:  # closes the connection: the server cancels the request
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {"records": records, "max_lag_s": lag, "wall_s": time.perf_counter() - start,
            "client_cpu_s": time.process_time() - cpu0}


def summarize(task: str, mode: str, rate, run: dict) -> dict:
    """The row of one run (latencies in ms)."""
    recs = run["records"]
    ok = [r for r in recs if "finished" in r and "error" not in r]
    row = {"task": task, "mode": mode, "rate": rate, "offered": len(recs), "completed": len(ok),
           "rejected": sum(r.get("status") == 429 for r in recs),
           "failed": sum("finished" in r and "error" in r and r.get("status") != 429 for r in recs),
           "unfinished": sum("finished" not in r for r in recs), "max_lag_ms": run["max_lag_s"] * 1e3,
           "cli_cores": run["client_cpu_s"] / run["wall_s"],
           "srv_cores": run["server_cpu_s"] / run["wall_s"] if run.get("server_cpu_s") is not None else None}
    errors = sorted({r["error"] for r in recs if "error" in r and r.get("status") != 429})
    if errors:
        row["errors"] = errors[:5]
    if not ok:
        return row
    e2e = [(r["finished"] - r["submitted"]) * 1e3 for r in ok]
    ttfe = [(r["first_event"] - r["submitted"]) * 1e3 for r in ok if "first_event" in r]
    span = max(r["finished"] for r in ok) - min(r["submitted"] for r in ok)
    row.update({"req_s": len(ok) / span if span > 0 else None,
                **{f"e2e_p{q}_ms": percentile(e2e, q) for q in (50, 90, 99)},
                **({f"ttfe_p{q}_ms": percentile(ttfe, q) for q in (50, 90, 99)} if ttfe else {}),
                **({"events_mean": sum(r["events"] for r in ok) / len(ok)} if ttfe else {})})
    return row


# -- a task: every mode, unloaded then the sweep -----------------------------------------------------
class Target:
    """A mode's server: its process, client and base URL."""

    def __init__(self, proc: ServerProcess, client):
        self.proc, self.client, self.url = proc, client, proc.url


async def run_mode(target: Target, work: Workload, mode: str, rate, items, arrivals, drain: float) -> tuple:
    c0 = target.proc.cpu_seconds()
    run = await play(target.client, target.url + work.route, work, mode == "stream", items, arrivals, drain)
    c1 = target.proc.cpu_seconds()
    run["server_cpu_s"] = c1 - c0 if c0 is not None and c1 is not None else None
    row = summarize(work.name, mode, rate, run)
    row["settle_s"] = await wait_idle(target.proc)  # after the run: the server finishing what was left
    return run, row


async def warm_up(target: Target, work: Workload, stream_too: bool, args) -> None:
    """Untimed: groups of concurrent requests (each group size the engine batches: first-call
    allocations and, on CUDA, graph captures happen here), and one streamed request."""
    sizes = [1] if args.quick and work.name == "images" else warm_up_sizes("engine", args.slots, args.quick)
    url = target.url + work.route
    for k, n in enumerate(sizes):
        items = [(i, max(args.max_new)) for i, _ in work.items(n, args.seed + 7 + k)]
        recs = [{} for _ in items]
        await asyncio.gather(*(send(target.client, url, work.body(it, False), False, work, r)
                               for it, r in zip(items, recs)))
        if any("error" in r for r in recs):
            log(f"[{work.name}] warm-up error on {target.proc.name}: {next(r['error'] for r in recs if 'error' in r)}")
    if stream_too:
        await send(target.client, url, work.body(work.items(1, args.seed + 6)[0], True), True, work, {})
    await wait_idle(target.proc)


async def run_task(name: str, model: str, targets: dict[str, Target], args) -> tuple[list, dict]:
    d = DEFAULTS[name]
    q = d["quick"] if args.quick else d
    rates = args.rates or (d["cuda_rates"] if args.device.startswith("cuda") and not args.quick else q["rates"])
    n_max, duration = args.requests or q["requests"], args.duration or q["duration"]
    drain, unloaded_n = args.drain or q["drain"], args.unloaded or q["unloaded"]
    work = Workload(name, model, args)
    modes = args.modes
    target_of = {m: targets["baseline" if m == "baseline" else "server"] for m in modes}
    for t in {id(t): t for t in target_of.values()}.values():
        await warm_up(t, work, t.proc.name == "server" and "stream" in modes, args)
    rows, runs = [], {m: {} for m in modes}
    unloaded = {}
    for mode in modes:
        run, row = await run_mode(target_of[mode], work, mode, "unloaded", work.items(unloaded_n, args.seed + 1),
                                  None, drain)
        runs[mode]["unloaded"] = run
        unloaded[mode] = row
        rows.append(row)
        log(f"[{name}] {mode} unloaded: e2e p50 {row.get('e2e_p50_ms') or float('nan'):.1f} ms"
            + (f", first event p50 {row['ttfe_p50_ms']:.1f} ms" if "ttfe_p50_ms" in row else ""))
    over, skipped = dict.fromkeys(modes, 0), {}
    for i, rate in enumerate(rates):
        arrivals = poisson(rate, n_max, duration, args.seed + 1000 + i)
        items = work.items(len(arrivals), args.seed + 2000 + i)
        for mode in modes:
            if over[mode] >= args.stop_after:  # saturated at the last rates: the higher ones only queue longer
                skipped.setdefault(mode, []).append(rate)
                continue
            run, row = await run_mode(target_of[mode], work, mode, rate, items, arrivals, drain)
            runs[mode][rate] = run
            rows.append(row)
            over[mode] = over[mode] + 1 if saturated(row, unloaded[mode].get("e2e_p50_ms")) else 0
            log(f"[{name}] {mode} {rate:g}/s: {row['completed']}/{row['offered']} done, {row['rejected']} 429, "
                f"{row['failed']} failed, {row['unfinished']} unfinished, {row.get('req_s') or 0:.1f} req/s, "
                f"e2e p50/p99 {row.get('e2e_p50_ms') or float('nan'):.1f}/{row.get('e2e_p99_ms') or float('nan'):.1f}"
                f" ms, server {row['srv_cores'] or 0:.2f} cores, client {row['cli_cores']:.2f}")
    if skipped:
        log(f"[{name}] skipped (saturated below): {skipped}")
    return rows, {"rates": rates, "skipped": skipped, "requests": n_max, "duration": duration, "drain": drain,
                  "unloaded_requests": unloaded_n, "model": model, "outputs_match": compare_outputs(work, runs)}


def compare_outputs(work: Workload, runs: dict) -> dict | None:
    """Per server mode: its captions / poses equal to the baseline's for the same input, over every
    request both answered (the captioner is greedy, the gesture model's sampling is seeded)."""
    if work.name == "images" or "baseline" not in runs:
        return None
    ref = {r["item"]: r["output"] for run in runs["baseline"].values() for r in run["records"] if "output" in r}
    out = {}
    for mode in (m for m in runs if m != "baseline"):
        same = total = 0
        for run in runs[mode].values():
            for r in run["records"]:
                if "output" not in r or r["item"] not in ref:
                    continue
                a, b = r["output"], ref[r["item"]]
                total += 1
                if work.name == "captions":
                    same += a == b
                else:
                    same += a.shape == b.shape and bool(np.allclose(a, b, atol=1e-4))
        out[mode] = {"compared": total, "match": same}
    return out


def summary_rows(task: str, rows: list[dict], modes: list[str], slo: float) -> list[dict]:
    """Per mode: unloaded latency and time to first output, sustained and peak rates; then each
    server mode's ratios to the baseline."""
    out = {}
    for mode in modes:
        mine = [r for r in rows if r["task"] == task and r["mode"] == mode]
        unloaded = next(r for r in mine if r["rate"] == "unloaded")
        swept = [r for r in mine if r["rate"] != "unloaded"]
        p50, p99 = unloaded.get("e2e_p50_ms"), unloaded.get("e2e_p99_ms")
        out[mode] = {"task": task, "mode": mode, "unloaded_p50_ms": p50, "unloaded_p99_ms": p99,
                     "first_out_p50_ms": unloaded.get("ttfe_p50_ms", p50),
                     "slo_ms": slo * p50 if p50 else None,
                     "sustained_req_s": _best_rate(swept, slo * p50 if p50 else None),
                     "slo_p99_ms": slo * p99 if p99 else None,
                     "sustained_p99_req_s": _best_rate(swept, slo * p99 if p99 else None),
                     "peak_req_s": max((r.get("req_s") or 0.0 for r in swept), default=0.0)}
    ratios = []
    if "baseline" in out:
        b = out["baseline"]
        for mode in (m for m in modes if m != "baseline"):
            s = out[mode]
            ratios.append({"task": task, "mode": f"{mode}/baseline",
                           **{k: _ratio(s[k], b[k]) for k in ("unloaded_p50_ms", "unloaded_p99_ms", "first_out_p50_ms",
                                                              "sustained_req_s", "sustained_p99_req_s", "peak_req_s")
                              if s[k] is not None and b[k] is not None}})
    return list(out.values()) + ratios


# -- main -------------------------------------------------------------------------------------------
def demo_models(tasks) -> dict[str, str]:
    return {PIPELINE_TASK[t]: str(mm.demo_model(PIPELINE_TASK[t])) for t in tasks}


def given_models(values: list[str]) -> dict[str, str]:
    """``--model`` values (``DIR`` or ``NAME=DIR``) as ``mmgen serve`` reads them."""
    from mmgen_engine.serving.http import parse_model_args
    return parse_model_args(values)


async def run_all(args, procs: dict[str, ServerProcess]) -> tuple[list, list, dict]:
    import httpx

    # idle connections are dropped before a server's keep-alive timeout closes them (the baseline has
    # uvicorn's default 5 s): reusing one the server is closing at that moment fails with ReadError
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=2.0)
    timeout = httpx.Timeout(None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as c_server, \
            httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as c_base:
        clients = {"server": c_server, "baseline": c_base}
        targets = {name: Target(p, clients[name]) for name, p in procs.items()}
        by_task = {}
        for t in targets.values():  # both answer {"status": "ok", "models": {name: task}}
            health = await wait_healthy(t.client, t.url, 60)
            for model, task in health["models"].items():
                by_task.setdefault(task, model)
        rows, summary, settings = [], [], {}
        for name in args.tasks:
            model = by_task.get(PIPELINE_TASK[name])
            if model is None:
                raise SystemExit(f"no {PIPELINE_TASK[name]} model among --model for task {name}")
            r, st = await run_task(name, model, targets, args)
            rows += r
            summary += summary_rows(name, r, args.modes, args.slo)
            settings[name] = st
    return rows, summary, settings


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="default all three, in turn")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default all three")
    ap.add_argument("--model", action="append", default=[],
                    help="DIR or NAME=DIR, as mmgen serve takes it (repeatable; default the demo models)")
    add_device_arguments(ap)
    ap.add_argument("--dtype", help="load the models in this dtype (default theirs)")
    ap.add_argument("--slots", type=int, default=8, help="mmgen serve --slots (default 8)")
    ap.add_argument("--max-queued", type=int, default=64, help="mmgen serve --max-queued (default 64)")
    ap.add_argument("--rates", nargs="+", type=float, help="requests/s to sweep, every task (default per task)")
    ap.add_argument("--requests", type=int, help="arrivals per rate at most (default per task)")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per rate at most (default per task)")
    ap.add_argument("--drain", type=float, help="seconds after the last arrival before the rest is cancelled "
                                                "and counts unfinished (default per task)")
    ap.add_argument("--unloaded", type=int, help="requests of the unloaded pass (default per task)")
    ap.add_argument("--max-new", nargs="+", type=int, default=[4, 8, 16, 24],
                    help="captions: max_new_tokens drawn per request from these (default 4 8 16 24)")
    ap.add_argument("--stop-after", type=int, default=2,
                    help="a mode skips the higher rates after this many saturated ones in a row (default 2)")
    ap.add_argument("--slo", type=float, default=2.0, help="SLO: p99 end-to-end <= this x unloaded p50 (default 2)")
    ap.add_argument("--start-timeout", type=float, default=300.0,
                    help="seconds a server may take to print its ready line (default 300)")
    ap.add_argument("--log-dir", type=Path, default=Path("build/bench_serving"),
                    help="where the servers' logs go (default build/bench_serving)")
    ap.add_argument("--quick", action="store_true", help="a few requests at one rate per task, for smoke tests")
    ap.add_argument("--seed", type=int, default=0, help="inputs and arrivals seed (default 0)")
    ap.add_argument("--json", type=Path, help="results file (default <log-dir>/results.json; results_quick.json "
                                              "with --quick)")
    args = ap.parse_args(argv)
    args.tasks = [t for t in TASKS if t in args.tasks]
    args.modes = [m for m in MODES if m in args.modes]
    args.device = checked_device(ap, args.device)
    args.log_dir = args.log_dir.resolve()
    args.json = args.json or args.log_dir / ("results_quick.json" if args.quick else "results.json")
    if args.slots < 1 or args.max_queued < 1 or args.slo <= 0 or args.stop_after < 1:
        ap.error("need --slots >= 1, --max-queued >= 1, --slo > 0 and --stop-after >= 1")
    if args.rates and min(args.rates) <= 0:
        ap.error("rates must be > 0")
    for flag in ("requests", "duration", "drain", "unloaded"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            ap.error(f"--{flag} must be > 0")
    if not all(1 <= m <= 31 for m in args.max_new):
        ap.error("--max-new values must lie in [1, 31] (the demo captioner has 32 positions)")
    return args


COLUMNS = ["task", "mode", "rate", "completed", "rejected", "failed", "unfinished", "req_s", "e2e_p50_ms",
           "e2e_p90_ms", "e2e_p99_ms", "ttfe_p50_ms", "ttfe_p90_ms", "ttfe_p99_ms", "max_lag_ms", "srv_cores",
           "cli_cores"]
SUMMARY_COLUMNS = ["task", "mode", "unloaded_p50_ms", "unloaded_p99_ms", "first_out_p50_ms", "slo_ms",
                   "sustained_req_s", "slo_p99_ms", "sustained_p99_req_s", "peak_req_s"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["baseline-server"]:
        return baseline_main(argv[1:])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # this process's: the servers get OMP_NUM_THREADS
    models = given_models(args.model) if args.model else demo_models(args.tasks)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # the machine's at the end: machine_info
    t0 = time.perf_counter()
    procs = start_servers(models, args)
    log(f"servers up in {time.perf_counter() - t0:.1f} s")
    try:
        rows, summary, settings = asyncio.run(run_all(args, procs))
    finally:
        for p in procs.values():
            p.stop()
    payload = {"benchmark": "serving", "machine": machine_info(args.device), "engine": engine_info(),
               "settings": {"tasks": args.tasks, "modes": args.modes, "models": models, "device": args.device,
                            "dtype": args.dtype, "slots": args.slots, "max_queued": args.max_queued,
                            "max_new": args.max_new, "slo": args.slo, "seed": args.seed, "quick": args.quick,
                            "threads": args.threads, "load_avg_1m_start": load_start, "per_task": settings},
               "results": rows, "summary": summary}
    write_json(args.json, payload)
    log(f"wrote {args.json} ({time.perf_counter() - t0:.0f} s)")

    for name in args.tasks:
        match = settings[name]["outputs_match"]
        if match:
            print(f"{name}: outputs equal to the baseline's: "
                  + ", ".join(f"{mode} {c['match']}/{c['compared']}" for mode, c in match.items()))
            for mode, c in match.items():
                if c["match"] != c["compared"]:
                    print(f"WARNING: {name} {mode}: {c['compared'] - c['match']} of {c['compared']} outputs differ "
                          f"from the baseline's", flush=True)
    for r in rows:
        if r["failed"]:
            print(f"WARNING: {r['task']} {r['mode']} {r['rate']}: {r['failed']} failed: {r['errors']}", flush=True)
    m = payload["machine"]
    where = f"{m['gpu']} (CPU {m['cpu']})" if "gpu" in m else m["cpu"]
    threads = f"torch threads {args.threads}" if args.threads else "torch threads: torch's default"
    print(f"\nserving benchmark ({'quick; ' if args.quick else ''}HTTP over loopback; mmgen serve --slots "
          f"{args.slots} --max-queued {args.max_queued} vs a FastAPI app calling the pipeline behind a lock; "
          f"latencies in ms; ttfe = time to first SSE event; cores = CPU seconds per second of the run) on "
          f"{where}, {m['cpu_usable']} cores, {threads}")
    print(format_table(rows, COLUMNS))
    print(f"\nsustained: the highest rate of the sweep with nothing rejected, failed or unfinished and p99 "
          f"end-to-end <= slo_ms ({args.slo:g} x the mode's unloaded p50; sustained_p99: <= slo_p99_ms, "
          f"{args.slo:g} x its unloaded p99); peak: the highest achieved req/s; first_out: time to the first "
          f"event (stream) or the answer; X/baseline: ratios (rates above 1 and latencies below 1 favour X)")
    print(format_table(summary, SUMMARY_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
