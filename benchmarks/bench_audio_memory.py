#!/usr/bin/env python3
"""Peak memory of the speech-to-gesture audio path over long audio: it must not grow with the
audio's length (the audio is decoded, mixed to mono, resampled and cut into windows block by block).

A WAV file of ``--minutes`` of ``--rate`` Hz, ``--channels`` channels (16-bit PCM; noise bursts at a
syllable rate, a random loudness per 7.3 s stretch) is written block by block into a temporary
directory (in ``--dir`` if given), removed afterwards. Each stage then runs in a fresh Python process that
reports its own peak resident set size (Linux's VmHWM) after its imports and
setup (**setup_mb**: torch, the engine and the bundled demo gesture model) and at the end
(**peak_mb**); **audio_mb** = peak - setup is what the audio cost:

- ``front-end``: ``open_audio(path).resampled(16000)`` cut into the demo model's windows by
  ``WindowPlan.stream_windows`` and the ``log_mel_400`` of each: everything the model is fed.
- ``gestures``: ``SpeechToGesturePipeline.generate_stream(path)`` of the demo model (its default
  sampling), the chunks kept and joined at the end as ``generate`` does; also **first_chunk_mb**
  (the peak when the first chunk arrives) and **poses_mb** (the poses ``[T, 52, 2]`` float32, which
  grow with the audio by design: 0.37 MB per minute at 15 fps).

The gestures stage uses only the public pipeline API, so the same command measures an older
checkout (``PYTHONPATH=that/checkout``). A markdown table is printed last; ``--json`` writes the
rows with the machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import engine_info, format_table, machine_info, write_json  # noqa: E402

STAGES = ("front-end", "gestures")
STRETCH_SECONDS = 7.3  # the written signal repeats with a new loudness every stretch
SYLLABLE_HZ = 4.0


def write_speech_wav(path: Path, minutes: float, rate: int, channels: int) -> int:
    """Writes the test WAV block by block (one stretch at a time) -> its number of frames."""
    import soundfile

    rng = np.random.default_rng(0)
    n = int(STRETCH_SECONDS * rate)
    t = np.arange(n) / rate
    envelope = np.maximum(0, np.sin(2 * np.pi * SYLLABLE_HZ * t)) ** 2
    stretch = (rng.standard_normal((n, channels)) * envelope[:, None]).astype(np.float32)
    frames = int(minutes * 60 * rate)
    with soundfile.SoundFile(path, "w", rate, channels, "PCM_16") as f:
        for start in range(0, frames, n):
            gain = rng.uniform(0.02, 0.3)
            f.write((stretch[:min(n, frames - start)] * gain * 32767).astype(np.int16))
    return frames


def peak_mb() -> float:
    """This process's peak resident set size so far, in MB: Linux's VmHWM, the high-water mark of this
    process image. (``ru_maxrss`` would not do: the kernel carries it over from the parent through
    fork and exec, so a child of a large process, such as a test run, reports the parent's peak.)"""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run_stage(stage: str, path: str, threads: int | None) -> dict:
    """One stage in this process (a fresh one, see :func:`main`)."""
    import torch

    import mmgen_engine as mm

    if threads:
        torch.set_num_threads(threads)
    pipe = mm.load(mm.demo_model("speech-to-gesture"))
    row = {"setup_mb": peak_mb()}
    start = time.perf_counter()
    if stage == "front-end":
        from mmgen_engine.pipelines.audio import log_mel_400, open_audio

        audio = open_audio(path).resampled(pipe.config.gesture.sample_rate)
        row["windows"] = 0
        for window in pipe.plan.stream_windows(audio, audio.frames):
            log_mel_400(window)
            row["windows"] += 1
    else:
        chunks = []
        for chunk in pipe.generate_stream(path):
            if not chunks:
                row["first_chunk_mb"] = peak_mb()
            chunks.append(chunk)
        poses = np.concatenate(chunks)
        row["poses_mb"] = poses.nbytes / 2**20
    row["seconds"] = time.perf_counter() - start
    row["peak_mb"] = peak_mb()
    row["audio_mb"] = row["peak_mb"] - row["setup_mb"]
    return row


def measure(stage: str, path: Path, threads: int | None) -> dict:
    """:func:`run_stage` in a fresh Python process (its peak is its own)."""
    command = [sys.executable, __file__, "--child", stage, str(path)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=90.0)
    ap.add_argument("--rate", type=int, default=48000)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    ap.add_argument("--dir", type=Path, help="where to make the temporary directory for the WAV")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in the stages")
    ap.add_argument("--json", type=Path, help="write the rows and the machine here")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_stage(*args.child, args.threads)))
        return 0
    stages = args.stages.split(",")
    if not set(stages) <= set(STAGES):
        ap.error(f"--stages must be of {', '.join(STAGES)}, got {args.stages!r}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "speech.wav"
        frames = write_speech_wav(path, args.minutes, args.rate, args.channels)
        audio = f"{args.minutes:g} min, {args.rate / 1000:g} kHz, {args.channels} ch"
        rows = [{"stage": stage, "audio": audio, "frames": frames, **measure(stage, path, args.threads)}
                for stage in stages]
    print(format_table(rows, ["stage", "audio", "setup_mb", "peak_mb", "audio_mb", "first_chunk_mb", "poses_mb",
                              "seconds"]))
    if args.json:
        write_json(args.json, {"rows": rows, "machine": machine_info("cpu"), "engine": engine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
