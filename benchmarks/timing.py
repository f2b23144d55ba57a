"""Shared timing helpers for the benchmarks: one way to time a call, describe the machine, and
write the results (JSON for the record, a markdown table for the eye).

On CUDA a call is timed with CUDA events after a synchronize, so the time covers everything the
call queued on the GPU, host gaps included; optionally L2 is flushed before each repeat by writing a
256 MB buffer (llm.c does the same) so that a repeat does not find the previous one's weights
cached. On CPU ``time.perf_counter`` is used.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


def add_device_arguments(ap) -> None:
    """``--device`` (default cuda when available; normalize with :func:`checked_device`) and
    ``--threads`` (``torch.set_num_threads``), which every pipeline benchmark takes."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, help=f"cpu | cuda | cuda:N (default {default})")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's choice)")


def checked_device(ap, device: str) -> str:
    """``--device`` normalized ("cuda" -> "cuda", "cuda:1" ...), or ``ap.error`` for a bad name or a
    CUDA device on a machine without CUDA."""
    try:
        device = str(torch.device(device))
    except RuntimeError:
        ap.error(f"invalid --device {device!r}; use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available")
    return device


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between order statistics (numpy's
    default): ``v[floor(k)] + (k - floor(k)) * (v[ceil(k)] - v[floor(k)])``, ``k = q/100 * (n-1)``."""
    v = sorted(values)
    if not v:
        raise ValueError("percentile of no values")
    k = q / 100 * (len(v) - 1)
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (k - lo) * (v[hi] - v[lo])


def summarize(times_ms) -> dict:
    """``{median_ms, p90_ms, min_ms, mean_ms, repeats, times_ms}`` of a list of times in ms."""
    times_ms = [float(t) for t in times_ms]
    return {"median_ms": percentile(times_ms, 50), "p90_ms": percentile(times_ms, 90),
            "min_ms": min(times_ms), "mean_ms": sum(times_ms) / len(times_ms),
            "repeats": len(times_ms), "times_ms": times_ms}


def per_token(first_ms, full_ms, new_tokens: int) -> tuple[float, float]:
    """``(median, p90)`` ms per generated token after the first, from paired times of a 1-token and
    an N-token call (pair i taken close together, so a burst of load from elsewhere lands on both
    sides of a pair): the pairs' differences over N - 1. Differences of medians would not do for a
    small model, whose per-token time is a small difference of two larger, noisy times."""
    diffs = [(full - first) / (new_tokens - 1) for first, full in zip(first_ms, full_ms, strict=True)]
    return percentile(diffs, 50), percentile(diffs, 90)


def measure_paired(run, new_tokens: int, warmup: int = 2, repeats: int = 5, device="cpu",
                   flush_l2: bool = False) -> dict:
    """Times ``run(1)`` and ``run(new_tokens)`` (a call generating exactly that many tokens) in
    alternation, ``warmup`` untimed pairs, then ``repeats`` timed pairs: ``{"first": ..., "full": ...}``
    (:func:`summarize` of each side) with ``ms_per_token`` and ``ms_per_token_p90`` from
    :func:`per_token` (0.0 when ``new_tokens`` is 1, where only the 1-token call is timed)."""
    if new_tokens < 1:
        raise ValueError(f"need new_tokens >= 1, got {new_tokens}")
    lengths = (1,) if new_tokens == 1 else (1, new_tokens)
    for _ in range(warmup):
        for n in lengths:
            run(n)
    times = {n: [] for n in lengths}
    for _ in range(repeats):
        for n in lengths:
            times[n] += measure(lambda n=n: run(n), warmup=0, repeats=1, device=device, flush_l2=flush_l2)["times_ms"]
    first, full = summarize(times[1]), summarize(times[new_tokens])
    per = per_token(times[1], times[new_tokens], new_tokens) if new_tokens > 1 else (0.0, 0.0)
    return {"first": first, "full": full, "ms_per_token": per[0], "ms_per_token_p90": per[1]}


def measure(fn, warmup: int = 2, repeats: int = 5, device="cpu", flush_l2: bool = False) -> dict:
    """Call ``fn()`` ``warmup`` times untimed, then time ``repeats`` calls one by one.

    Returns :func:`summarize` of the per-call times in milliseconds. ``device`` is where ``fn``
    runs ("cpu", "cuda", "cuda:N" or a ``torch.device``); on CUDA, ``flush_l2`` writes a 256 MB
    buffer before each timed call, outside the timed span. The garbage collector is paused while
    timing (as ``timeit`` does), so that a collection does not land in one call's time.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = _time_calls(fn, repeats, device, flush_l2)
    finally:
        if gc_was_enabled:
            gc.enable()
    return summarize(times)


def _time_calls(fn, repeats: int, device: torch.device, flush_l2: bool) -> list[float]:
    times = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if flush_l2 else None
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def engine_info() -> dict:
    """The engine build a result came from: version, CUDA kernels compiled in, Triton available."""
    import mmgen_engine as mm
    info = mm.build_info()
    return {"version": info["version"], "cuda": info["cuda"], "triton": info["triton"]}


def machine_info(device=None) -> dict:
    """What the numbers were taken on, without the host name: CPU model, cores, torch threads,
    versions, and the GPU name when ``device`` (default: CUDA if available) is a CUDA device."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_usable": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        info.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                     "gpu_capability": list(torch.cuda.get_device_capability(device))})
    return info


def write_json(path, payload) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (parents created, replaced atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return "" if value is None else str(value)


def format_table(rows, columns) -> str:
    """A markdown table of ``rows`` (dicts) over ``columns`` (keys); a missing key is an empty cell."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)
