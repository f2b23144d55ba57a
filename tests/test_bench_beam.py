"""bench_beam.py runs end to end in --quick mode: the engine's beam search against transformers' and
against its own greedy batch of K rows. No figure is checked against a target."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_beam_quick(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "beam.json"
    # One thread: on a CPU shared with other work, torch's default of one per core makes every op
    # wait for a descheduled OpenMP thread.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_beam.py"), "--quick", "--device", "cpu",
         "--beams", "2", "3", "--threads", "1", "--warmup", "2", "--repeats", "2",
         "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stdout, proc.stdout[-3000:]
    # the table comes last: header, rule, then per K four timed rows and four ratio rows
    lines = proc.stdout.strip().splitlines()
    assert lines[-18].startswith("| arch") and "ms_per_step" in lines[-18] and "target" in lines[-18]
    assert lines[-1].startswith("| vit-gpt2 ") and "| HF " in lines[-1] and "beam/greedy" in lines[-1]
    assert "beam/greedy" in lines[-2] and "<=1.5" in lines[-2]
    assert (tmp_path / "cache" / "vit-gpt2" / "hf_quick" / "config.json").is_file()

    data = json.loads(out.read_text())
    for key in ("cpu", "cpu_count", "torch_threads", "torch"):
        assert key in data["machine"]
    assert data["machine"]["torch_threads"] == data["settings"]["threads"] == 1
    assert data["settings"]["beams"] == [2, 3] and data["settings"]["quick"] is True
    assert data["settings"]["new_tokens"] == 16 and data["target_beam_over_greedy"] == 1.5
    assert sorted((r["K"], r["impl"], r["decoding"]) for r in data["results"]) == sorted(
        (k, i, d) for k in (2, 3) for i in ("engine", "HF") for d in (f"beam {k}", f"greedy x{k}"))
    for r in data["results"]:
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["n_tokens"]["repeats"] == 2
        for key in ("first_token_ms", "ms_per_step"):
            assert _positive(r[key]), (r["impl"], r["decoding"], key, r[key])

    # the engine's K hypotheses and greedy rows equal transformers'
    assert data["ids_match"] is True
    comparisons = {(c["K"], c["impl"], c["decoding"]): c for c in data["comparisons"]}
    assert sorted(comparisons) == sorted(
        (k, i, d) for k in (2, 3) for i, d in [("engine/HF", f"beam {k}"), ("engine/HF", f"greedy x{k}"),
                                              ("engine", "beam/greedy"), ("HF", "beam/greedy")])
    for (k, impl, decoding), c in comparisons.items():
        assert _positive(c["first_token_ms"]) and math.isfinite(c["ms_per_step"])
        if impl == "engine/HF":
            assert c["ids_match"] is True and c["ids_agree_fraction"] == 1.0
        if impl == "engine":  # the target is reported, never asserted
            assert c["meets_target"] == (c["ms_per_step"] <= 1.5)
    assert comparisons[2, "engine/HF", "beam 2"]["greedy_rows_equal"] is True
    assert data["meets_target"] == all(c["meets_target"] for c in comparisons.values() if c["impl"] == "engine")
