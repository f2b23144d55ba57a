"""The benchmarks run end to end in --quick mode, and the timing helpers are right."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mmgen_engine.ops import decoder_step

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import timing  # noqa: E402


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_caption_quick(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "results.json"
    # One thread: with torch's default of one per core, a CPU shared with other work makes every op
    # wait for a descheduled OpenMP thread (the tiny model then ran 100x slower in the test's set-up).
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_caption.py"), "--quick", "--device", "cpu",
         "--batch", "1", "3", "--threads", "1",
         "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the table comes last on stdout: header, rule, engine, HF, ratio rows per batch
    lines = proc.stdout.strip().splitlines()
    assert lines[-8].startswith("| arch") and "engine/HF" in lines[-1]

    data = json.loads(out.read_text())
    assert data["ids_match"] is True
    assert data["settings"]["archs"] == ["vit-gpt2"] and list(data["models"]) == ["vit-gpt2"]
    assert {r["arch"] for r in data["results"] + data["comparisons"]} == {"vit-gpt2"}
    for key in ("cpu", "cpu_count", "torch_threads", "torch"):
        assert key in data["machine"]
    assert data["machine"]["torch_threads"] == data["settings"]["threads"] == 1
    assert data["settings"]["new_tokens"] == 16 and data["settings"]["repeats"] == 3

    results = data["results"]
    assert sorted((r["impl"], r["batch"]) for r in results) == [("HF", 1), ("HF", 3), ("engine", 1), ("engine", 3)]
    for r in results:
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        for key in ("first_token_ms", "first_token_p90_ms", "ms_per_token", "weight_GBps"):
            assert _positive(r[key]), (r["impl"], r["batch"], key, r[key])
        for timed in (r["first_token"], r["n_tokens"]):
            assert timed["repeats"] == 3 and len(timed["times_ms"]) == 3
            assert all(_positive(t) for t in timed["times_ms"])
            assert timed["min_ms"] <= timed["median_ms"] <= timed["p90_ms"]

    assert [c["batch"] for c in data["comparisons"]] == [1, 3]
    for c in data["comparisons"]:
        assert c["ids_match"] is True and c["ids_agree_fraction"] == 1.0
        assert _positive(c["first_token_ms"]) and _positive(c["ms_per_token"])


@pytest.mark.parametrize("arch", ["blip", "git", "llava", "blip2"])
def test_bench_caption_quick_arch(tmp_path, arch):
    """--arch blip / git / llava / blip2: a tiny random model, the engine against transformers' generate."""
    pytest.importorskip("transformers")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_caption.py"), "--quick", "--arch", arch, "--device", "cpu",
         "--batch", "1", "2", "--threads", "1", "--warmup", "2", "--repeats", "2",
         "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stdout, proc.stdout[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-8].startswith("| arch") and lines[-1].startswith(f"| {arch} ") and "engine/HF" in lines[-1]
    assert (tmp_path / "cache" / arch / "hf_quick" / "config.json").is_file()

    data = json.loads(out.read_text())
    assert data["settings"]["archs"] == [arch] and list(data["models"]) == [arch]
    assert data["models"][arch]["arch"] == arch and data["machine"]["torch_threads"] == 1
    assert sorted((r["arch"], r["impl"], r["batch"]) for r in data["results"]) == [
        (arch, i, b) for i in ("HF", "engine") for b in (1, 2)]
    for r in data["results"]:
        assert r["new_tokens"] == 16 and r["n_tokens"]["repeats"] == 2
        for key in ("first_token_ms", "ms_per_token", "weight_GBps"):
            assert _positive(r[key]), (r["impl"], r["batch"], key, r[key])
    # the engine's greedy ids equal transformers' on the timed batches
    assert data["ids_match"] is True
    assert [(c["arch"], c["batch"]) for c in data["comparisons"]] == [(arch, 1), (arch, 2)]
    for c in data["comparisons"]:
        assert c["ids_match"] is True and c["ids_agree_fraction"] == 1.0


def test_bench_linear_quick(tmp_path):
    out = tmp_path / "linear.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_linear.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert _positive(data["read_ceiling_GBps"])
    assert sorted({(r["impl"], r["rows"]) for r in data["results"]}) == [
        ("engine", 1),
        ("engine", 8),
        ("peer", 1),
        ("peer", 8),
    ]
    for r in data["results"]:
        assert _positive(r["us"]) and _positive(r["GBps"]) and r["of_ceiling"] == r["GBps"] / data["read_ceiling_GBps"]


@pytest.mark.skipif(decoder_step._C is None, reason="native library built without the decoder step")
def test_bench_decoder_step_quick(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decoder_step.py"), "--quick", "--threads",
                           "1", "--rows", "1", "3", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(r["decoder"], r["rows"]) for r in data["results"]] == [
        ("gesture demo (128 x 3)", 1), ("gesture demo (128 x 3)", 3), ("256 x 4", 1), ("256 x 4", 3)]
    for r in data["results"]:
        assert all(_positive(r[key]) for key in ("per_op_eager_us", "per_op_recorded_us", "native_us"))
        assert r["max_rel_err"] < 1e-4 and r["native_default"] == (r["weights_mb"] * 2**20 <= data["max_bytes"])


def test_bench_detok_quick(tmp_path):
    pytest.importorskip("dall_e")
    pytest.importorskip("min_dalle")
    out = tmp_path / "detok.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_detok.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--batches", "1", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine/upstream" in proc.stdout.strip().splitlines()[-1]
    data = json.loads(out.read_text())
    assert data["machine"]["torch_threads"] == data["settings"]["threads"] == 1
    assert sorted((r["model"], r["impl"], r["batch"]) for r in data["results"]) == [
        (m, i, b) for m in ("dvae", "vqgan") for i in ("engine", "upstream") for b in (1, 2)]
    for r in data["results"]:
        assert _positive(r["ms"]) and r["timing"]["repeats"] == 1 and r["ms_per_image"] == r["ms"] / r["batch"]
    assert len(data["comparisons"]) == 4
    for c in data["comparisons"]:
        assert _positive(c["ms"]) and c["max_abs_diff"] < 1e-4


def test_bench_txt2img_quick(tmp_path):
    pytest.importorskip("min_dalle")
    out = tmp_path / "t2i.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_txt2img.py"),
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--tokens",
            "4",
            "--grid",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--cache-dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "min-dalle/engine" in proc.stdout.strip().splitlines()[-1]
    data = json.loads(out.read_text())
    assert data["machine"]["torch_threads"] == 1
    rows = data["results"]
    assert sorted((r["impl"], r["images"]) for r in rows) == [
        (i, n) for i in ("engine", "min-dalle", "min-dalle/engine") for n in (1, 4)]
    for r in rows:  # one repeat of a tiny model: the per-token difference is noise, only finite
        assert _positive(r["first_token_s"]) and math.isfinite(r["s_per_token"] + r["s_per_image_256"])


def test_bench_onnx_quick(tmp_path):
    """ONNX Runtime against the engine: the gesture model's stages and the captioner end to end,
    the same outputs on both sides, every figure a time."""
    for mod in ("onnx", "onnxruntime"):
        pytest.importorskip(mod)
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_onnx.py"), "--quick", "--device", "cpu", "--arch",
         "--tasks", "speech-to-gesture", "--e2e-arch", "vit-gpt2", "--batch", "1", "--threads", "1",
         "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["settings"]["repeats"] == 3 and data["machine"]["torch_threads"] == 1
    stages = [r for r in data["results"] if r["part"] != "end to end"]
    e2e = [r for r in data["results"] if r["part"] == "end to end"]
    assert sorted((r["part"], r["impl"]) for r in stages) == [
        (part, impl) for part in ("audio_encoder", "motion_decoder") for impl in ("engine", "onnxruntime")]
    assert all(_positive(r["ms"]) and r["p90_ms"] >= r["ms"] for r in stages)
    assert [r["impl"] for r in e2e] == ["engine", "engine+ort-stages", "ort-loop"]
    for r in e2e:
        assert _positive(r["first_token_ms"]) and math.isfinite(r["ms_per_token"] + r["ms_per_token_p90"])
        assert r["timing"]["first"]["repeats"] == r["timing"]["full"]["repeats"] == 3
    ratios = data["comparisons"]
    assert all(c["max_rel_diff"] < 1e-4 for c in ratios if c["part"] != "end to end")
    assert [c["ids_match"] for c in ratios if c["part"] == "end to end"] == [True, True]


def test_bench_gesture_quick(tmp_path):
    """A tiny a2g-gpt on 6 s of audio: the engine (greedy and default sampling) against the plain
    PyTorch reference, with the greedy poses compared."""
    out = tmp_path / "gesture.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gesture.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--repeats", "1", "--cache-dir", str(tmp_path / "cache"),
                           "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stdout, proc.stdout[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-6].startswith("| device") and "engine/reference" in lines[-1]
    assert (tmp_path / "cache" / "a2g_quick" / "a2g_gpt.json").is_file()
    assert (tmp_path / "cache" / "engine_quick" / "config.json").is_file()

    data = json.loads(out.read_text())
    assert data["machine"]["torch_threads"] == data["settings"]["threads"] == 1
    assert data["settings"]["seconds"] == 6.0 and data["settings"]["repeats"] == 1
    rows = data["results"]
    assert [(r["impl"], r["sampling"]) for r in rows] == [
        ("engine", "greedy"), ("engine", "T 0.5, top-p 0.9"), ("reference", "greedy")]
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["windows"] == 2
        assert r["motion_s"] == pytest.approx(6.0)
        for key in ("rtf", "rtf_p90", "first_chunk_ms", "ms_per_window", "compute_s"):
            assert _positive(r[key]), (r["impl"], r["sampling"], key, r[key])
        assert r["rtf"] == pytest.approx(r["motion_s"] / r["compute_s"])
        assert r["generate"]["repeats"] == r["first_chunk"]["repeats"] == 1
    # the engine's greedy poses are the reference's, token for token
    (c,) = data["comparisons"]
    assert data["poses_match"] is True and c["poses_match"] is True and c["checked"] is True
    assert c["tokens_match"] is True and c["max_rel_diff"] <= 1e-4 and c["distinct_tokens"] > 1


def test_percentile_matches_linear_interpolation():
    assert timing.percentile([5, 1, 3], 50) == 3
    assert timing.percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)
    assert timing.percentile([7.0], 90) == 7.0
    s = timing.summarize([4.0, 1.0, 2.0, 3.0])
    assert (s["median_ms"], s["min_ms"], s["mean_ms"], s["repeats"]) == (2.5, 1.0, 2.5, 4)


def test_measure_counts_calls_and_times_them():
    calls = []
    s = timing.measure(lambda: calls.append(sum(range(1000))), warmup=2, repeats=3, device="cpu")
    assert len(calls) == 5 and s["repeats"] == 3 and all(t > 0 for t in s["times_ms"])


def test_format_table():
    text = timing.format_table([{"a": 1, "b": 0.123456}, {"a": "x", "b": 1234.5}], ["a", "b", "c"])
    lines = text.splitlines()
    assert lines[0].split("|")[1:4] == [" a ", " b      ", " c "]
    assert "0.123" in lines[2] and "1234.5" in lines[3] and len(lines) == 4


def test_write_json_and_machine_info(tmp_path):
    path = timing.write_json(tmp_path / "sub" / "r.json", {"machine": timing.machine_info("cpu"), "p": Path("x")})
    data = json.loads(path.read_text())
    assert data["p"] == "x" and data["machine"]["torch_threads"] >= 1
    assert "gpu" not in data["machine"]


def test_bench_kernels_times_every_backend_of_each_case():
    """bench_kernels needs a GPU to time; its cases build on CPU too: each names the backends it times
    (the reference always; Triton where installed; the CUDA kernels where the library has them), and
    the per-op summary counts each case's winner."""
    import bench_kernels
    import torch

    from mmgen_engine.ops import registry

    seen = {}
    for op, _shape, op_args, _bytes, *_ in bench_kernels.cases(torch.float16, torch.device("cpu"), quick=True):
        backends = set(bench_kernels.implementations(op, op_args))
        assert "reference" in backends, op
        assert ("triton" in backends) == bool(registry.TRITON_DEVICES), op
        seen.setdefault(op, set()).update(backends)
    assert {"decode_attention", "sample", "add_layer_norm", "token_gather", "embedding", "conv2d"} <= set(seen)
    if registry.CUDA_DEVICES:
        assert all("cuda" in seen[op] for op in ("decode_attention", "sample", "add_layer_norm", "token_gather"))
    rows = [{"op": "x", "backend": b, "dtype": "f", "shape": s, "us": us}
            for b, s, us in [("cuda", 1, 1.0), ("triton", 1, 2.0), ("cuda", 2, 3.0), ("triton", 2, 2.0),
                             ("reference", 2, math.nan)]]
    assert bench_kernels.fastest(rows) == [{"op": "x", "backends": "cuda triton", "wins": "cuda 1/2, triton 1/2"}]


def test_bench_engine_quick(tmp_path):
    """Every task and mode of the serving benchmark at one or two rates (a few requests each): the rows
    and the summary are there and the engine's outputs equal one-at-a-time pipeline calls'. No
    figure is checked against a target."""
    out = tmp_path / "engine.json"
    tasks = ["caption", "caption_forced", "txt2img", "gesture"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--tasks", *tasks, "--cache-dir", str(tmp_path / "cache"),
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stdout, proc.stdout[-3000:]
    # the summary table comes last: header, rule, per task its modes and the engine/other ratios
    lines = proc.stdout.strip().splitlines()
    assert lines[-20].startswith("| task") and "sustained_req_s" in lines[-20] and "peak_req_s" in lines[-20]
    assert lines[-1].startswith("| gesture ") and "engine/serial" in lines[-1]
    assert (tmp_path / "cache" / "captioning_forced" / "config.json").is_file()

    data = json.loads(out.read_text())
    for key in ("cpu", "cpu_count", "torch_threads", "torch"):
        assert key in data["machine"]
    assert data["machine"]["torch_threads"] == data["settings"]["threads"] == 1
    assert data["settings"]["tasks"] == tasks and data["settings"]["quick"] is True
    per_task = data["settings"]["per_task"]
    modes = {t: ["engine", "serial"] if t == "gesture" else ["engine", "static", "serial"] for t in tasks}
    expected = [(t, m, r) for t in tasks for m in modes[t] for r in ["unloaded"] + per_task[t]["rates"]]
    rows = data["results"]
    assert [(r["task"], r["mode"], r["rate"]) for r in rows] == expected
    for r in rows:
        assert r["completed"] == r["offered"] >= 1 and r["rejected"] == r["unfinished"] == r["failed"] == 0, r
        for key in ("req_s", "tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_ms", "e2e_p50_ms", "e2e_p99_ms"):
            assert _positive(r[key]), (r["task"], r["mode"], r["rate"], key, r[key])
        assert r["ttft_p50_ms"] <= r["e2e_p50_ms"] and r["e2e_p50_ms"] <= r["e2e_p99_ms"]
        if r["mode"] == "engine":
            assert 0 < r["occupancy"] <= 1 and r["counters"]["steps"] > 0
        if r["task"] == "txt2img":
            assert r["tokens_mean"] == 256
    for t in tasks:
        summary = {s["mode"]: s for s in data["summary"] if s["task"] == t}
        assert set(summary) == set(modes[t]) | {f"engine/{m}" for m in modes[t][1:]}
        for m in modes[t]:
            s = summary[m]
            assert _positive(s["unloaded_p50_ms"]) and s["slo_ms"] == 2 * s["unloaded_p50_ms"]
            assert _positive(s["peak_req_s"]) and s["sustained_req_s"] in [0.0] + per_task[t]["rates"]
        if t != "txt2img":  # greedy captions and seeded gesture poses: the engine's equal the pipeline's
            assert all(c["compared"] > 0 and c["match"] == c["compared"] for c in per_task[t]["outputs_match"].values())
    forced = per_task["caption_forced"]["forced_lengths"]  # every caption ran to its max_new_tokens
    assert forced["forced"] == forced["checked"] > 0


def test_per_token_pairs_the_calls():
    """A burst of load on one pair moves the median of the pairs' differences less than the
    difference of the medians: here every N-token call took 10 ms more than its 1-token call."""
    first = [5.0, 40.0, 6.0, 45.0, 5.5]
    full = [15.0, 50.0, 16.0, 55.0, 15.5]
    assert timing.per_token(first, full, 11) == (1.0, 1.0)
    with pytest.raises(ValueError):
        timing.per_token(first, full[:-1], 11)


def test_measure_paired_alternates_the_lengths():
    """Warm-up and timed calls alternate 1 and N tokens; each side's times and the per-token
    figure come back (0.0 per token when N is 1, where only the 1-token call runs)."""
    calls = []
    t = timing.measure_paired(calls.append, 4, warmup=1, repeats=3)
    assert calls == [1, 4] * 4
    assert t["first"]["repeats"] == t["full"]["repeats"] == 3
    assert math.isfinite(t["ms_per_token"]) and math.isfinite(t["ms_per_token_p90"])
    calls.clear()
    one = timing.measure_paired(calls.append, 1, warmup=0, repeats=2)
    assert calls == [1, 1] and one["first"] == one["full"] and one["ms_per_token"] == 0.0
    with pytest.raises(ValueError):
        timing.measure_paired(calls.append, 0)
