"""bench_serving.py runs end to end in --quick mode: real `mmgen serve` and baseline FastAPI processes
on loopback, every task and mode at one rate (a few requests each), the rows, the summary and the
server/baseline ratios come out, and the server's captions and poses equal the baseline's. No figure
is checked against a target."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["captions", "images", "gestures"]
MODES = ["server", "stream", "baseline"]


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_serving_quick(tmp_path):
    for module in ("fastapi", "uvicorn", "httpx", "prometheus_client"):
        pytest.importorskip(module)
    out = tmp_path / "serving.json"
    # One torch thread per server: on a 2-core CPU shared with the client (and other work), torch's
    # default of one per core makes every op wait for a descheduled OpenMP thread.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--log-dir", str(tmp_path / "logs"), "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stdout, proc.stdout[-3000:]
    # the summary table comes last: header, rule, per task its three modes and two ratio rows
    lines = proc.stdout.strip().splitlines()
    assert lines[-17].startswith("| task") and "sustained_req_s" in lines[-17] and "first_out_p50_ms" in lines[-17]
    assert lines[-1].startswith("| gestures ") and "stream/baseline" in lines[-1]
    for name in ("server", "baseline"):  # both servers printed their ready line and were stopped
        assert "listening on http://127.0.0.1:" in (tmp_path / "logs" / f"{name}.log").read_text()

    data = json.loads(out.read_text())
    for key in ("cpu", "cpu_count", "cpu_usable", "torch"):
        assert key in data["machine"]
    assert f"on {data['machine']['cpu']}, " in proc.stdout  # the table's title names the CPU model
    settings = data["settings"]
    assert settings["tasks"] == TASKS and settings["modes"] == MODES and settings["quick"] is True
    assert settings["threads"] == 1
    per_task = settings["per_task"]
    expected = [(t, m, r) for t in TASKS for r in ["unloaded"] + per_task[t]["rates"] for m in MODES]
    rows = data["results"]
    assert [(r["task"], r["mode"], r["rate"]) for r in rows] == expected
    for r in rows:
        assert r["completed"] == r["offered"] >= 1 and r["rejected"] == r["failed"] == r["unfinished"] == 0, r
        for key in ("req_s", "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms", "cli_cores"):
            assert _positive(r[key]), (r["task"], r["mode"], r["rate"], key, r[key])
        assert r["e2e_p50_ms"] <= r["e2e_p90_ms"] <= r["e2e_p99_ms"]
        if r["mode"] == "stream":  # the first event comes before the last
            assert _positive(r["ttfe_p50_ms"]) and r["ttfe_p50_ms"] <= r["e2e_p50_ms"] and r["events_mean"] >= 2
        else:
            assert "ttfe_p50_ms" not in r
    for t in TASKS:
        summary = {s["mode"]: s for s in data["summary"] if s["task"] == t}
        assert set(summary) == {*MODES, "server/baseline", "stream/baseline"}
        for m in MODES:
            s = summary[m]
            assert _positive(s["unloaded_p50_ms"]) and s["slo_ms"] == 2 * s["unloaded_p50_ms"]
            assert _positive(s["peak_req_s"]) and s["sustained_req_s"] in [0.0] + per_task[t]["rates"]
        assert summary["stream"]["first_out_p50_ms"] <= summary["stream"]["unloaded_p50_ms"]
        assert summary["server/baseline"]["peak_req_s"] == summary["server"]["peak_req_s"] / summary["baseline"][
            "peak_req_s"]
        if t != "images":  # greedy captions and seeded poses: the server's equal the baseline's
            match = per_task[t]["outputs_match"]
            assert set(match) == {"server", "stream"}
            assert all(c["compared"] > 0 and c["match"] == c["compared"] for c in match.values()), match
