"""Conversion hardening: argument types, the progress callback, decompression limits in format
detection, and temporary directories of interrupted conversions (SIGTERM removes them at once; what a
SIGKILL leaves, the next conversion into the same directory removes)."""
from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from hf_models import make_model, save
from safetensors.torch import load_file

import mmgen_engine as mm
from mmgen_engine import ConversionError, InputError
from mmgen_engine.checkpoint import read_header, remove_stale_writes, write_safetensors
from mmgen_engine.convert.hf import MAX_INFLATION


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save(make_model(seed=3), tmp_path_factory.mktemp("hf") / "model")


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kwargs,match", [
    ((None, "out"), {}, "src must be a path .* got NoneType"),
    (("src", 3), {}, "out must be a path .* got int"),
    (("src", "out"), {"source_format": 1}, "source_format must be a string or None, got int"),
    (("src", "out"), {"dtype": torch.float16}, "dtype must be a string or None, got dtype"),
    (("src", "out"), {"trust_pickle": "yes"}, "trust_pickle must be True or False, got str"),
    (("src", "out"), {"overwrite": 1}, "overwrite must be True or False, got int"),
    (("src", "out"), {"progress": 5}, "progress must be a callable"),
])
def test_wrong_argument_types_are_input_errors(args, kwargs, match):
    with pytest.raises(InputError, match=match) as e:
        mm.convert(*args, **kwargs)
    assert "\n" not in str(e.value)


# --- progress ------------------------------------------------------------------------------------

def test_progress_reports_the_bytes_written(hf_dir, tmp_path):
    calls = []
    out = mm.convert(hf_dir, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    header = read_header(out / "model.safetensors")
    total = sum(t.nbytes for t in header.values())
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert len(calls) == len(header) + 1
    assert all(a[0] <= b[0] and a[1] == total for a, b in zip(calls, calls[1:]))
    mm.load(out)


def test_written_safetensors_read_back_exactly(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "half": torch.randn(2, 1, 3).half(),
               "ids": torch.arange(5), "flags": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6).t()}
    write_safetensors(tmp_path / "w.safetensors", tensors, {"format": "mmgen"})
    back = load_file(str(tmp_path / "w.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


# --- format detection ----------------------------------------------------------------------------

def zip_with_pickle(path: Path, size: int) -> Path:
    """A torch.save-style zip whose ``archive/data.pkl`` is ``size`` zero bytes, deflated (a few
    hundred kB for 100 MB), written in chunks so that the test itself stays small."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            chunk = bytes(2 ** 20)
            for _ in range(size // len(chunk)):
                f.write(chunk)
    return path


def test_a_decompression_bomb_is_refused_before_unpacking(tmp_path, capsys):
    """A small compressed file whose pickle unpacks to a huge size used to be unpacked in memory
    during format detection; the central directory's sizes now refuse it first."""
    bomb = zip_with_pickle(tmp_path / "bomb.pt", MAX_INFLATION + 32 * 2 ** 20)
    assert bomb.stat().st_size < 2 ** 20
    with pytest.raises(ConversionError, match="refused: zip member 'archive/data.pkl' would unpack from"):
        mm.convert(bomb, tmp_path / "out")
    with pytest.raises(ConversionError, match="would unpack"):
        mm.convert(bomb, tmp_path / "out", source_format="taming-vqgan")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_compressed_pickle_is_an_unrecognized_source(tmp_path):
    """Format detection of a corrupt compressed member used to raise zlib.error."""
    path = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({f"layer.{i}.weight": list(range(i)) for i in range(300)}))
    data = bytearray(path.read_bytes())
    data[60:140] = bytes(range(80))  # inside the deflate stream
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z, pytest.raises(zlib.error):
        z.read("archive/data.pkl")
    with pytest.raises(ConversionError, match="unrecognized or unsupported source model"):
        mm.convert(path, tmp_path / "out")


# --- interrupted conversions ---------------------------------------------------------------------

CONVERT_AND_WAIT = """
import sys, time
from pathlib import Path
import mmgen_engine as mm

src, out, marker, overwrite = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"

def progress(done, total):
    if done == total:  # the new model.safetensors is complete: wait there to be killed
        marker.write_text("written")
        time.sleep(120)

mm.convert(src, out, progress=progress, overwrite=overwrite)
"""


def convert_until_killed(src: Path, out: Path, sig: int, overwrite: bool = False) -> subprocess.Popen:
    """Run a conversion of ``src`` into ``out`` in a subprocess and send it ``sig`` once its
    temporary directory holds the complete weights."""
    marker = out.parent / "marker"
    proc = subprocess.Popen([sys.executable, "-c", CONVERT_AND_WAIT, str(src), str(out), str(marker),
                             "1" if overwrite else "0"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the conversion did not reach its write"
        time.sleep(0.05)
    marker.unlink()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def test_sigterm_removes_the_temporary_directories(hf_dir, tmp_path):
    parent = tmp_path / "models"
    parent.mkdir()
    proc = convert_until_killed(hf_dir, parent / "ckpt", signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM
    assert hidden(parent) == [] and not (parent / "ckpt").exists()
    # replacing an existing checkpoint: it stays as it was
    existing = mm.convert(hf_dir, parent / "ckpt")
    before = (existing / "model.safetensors").read_bytes()
    proc = convert_until_killed(hf_dir, existing, signal.SIGTERM, overwrite=True)
    assert proc.returncode == -signal.SIGTERM
    assert hidden(parent) == [] and (existing / "model.safetensors").read_bytes() == before


def test_the_next_conversion_removes_what_sigkill_left(hf_dir, tmp_path):
    parent = tmp_path / "models"
    parent.mkdir()
    proc = convert_until_killed(hf_dir, parent / "ckpt", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    (left,) = hidden(parent)
    assert left.startswith(f".ckpt.new.{proc.pid}.") and (parent / left / "model.safetensors").is_file()
    mm.convert(hf_dir, parent / "other")
    assert hidden(parent) == [] and sorted(p.name for p in parent.iterdir()) == ["other"]


def test_a_sigterm_handler_of_the_caller_is_kept(hf_dir, tmp_path):
    """In-process: SIGTERM during the write removes the temporary directory, then reaches the handler
    that was installed before, which is in place again afterwards."""
    received = []

    def handler(signum, frame):
        received.append(signum)

    def progress(done, total):
        if done == total:
            signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(ConversionError, match="interrupted by SIGTERM"):
            mm.convert(hf_dir, tmp_path / "ckpt", progress=progress)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]
    assert hidden(tmp_path) == [] and not (tmp_path / "ckpt").exists()


def test_the_sweep_removes_only_dead_writers_temporaries(tmp_path):
    """Only the writers' temporary names are touched (a replaced checkpoint's only for ``out``), only
    for writers that are gone (or this process, not using them), a new checkpoint's only with the
    marker naming this host: a user's directory of a similar name survives, and so does a live
    writer's."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, me, live = int(finished.stdout), os.getpid(), os.getppid()
    marked = {f".ckpt.new.{dead}.abcdefgh": False, f".ckpt.new.{me}.bcdefghi": False,
              f".ckpt.new.{live}.cdefghij": True, f".other.new.{dead}.defghijk": False}
    unmarked = {f".ckpt.new.{dead}.efghijkl": True, f".ckpt.old.{dead}": True, f".ckpt.old.{dead}.v2": True,
                f".photos.old.{dead}": True, f".other.old.{dead}": True, "plain": True}
    for name in marked:
        (tmp_path / name).mkdir()
        (tmp_path / name / ".mmgen-write").write_text(socket.gethostname() + "\n")
    for name in unmarked:
        (tmp_path / name).mkdir()
    (tmp_path / ".ckpt.new.1.zzzzzzzz").mkdir()
    (tmp_path / ".ckpt.new.1.zzzzzzzz" / ".mmgen-write").write_text("another-host\n")  # pid 1 never is ours
    remove_stale_writes(tmp_path / "ckpt")
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {n for n, keep in {**marked, **unmarked}.items() if keep} | {".ckpt.new.1.zzzzzzzz"}


def test_the_sweep_puts_back_a_checkpoint_its_writer_died_replacing(tmp_path):
    """Killed between its two renames, a writer leaves the old checkpoint only as ``.out.old.PID``:
    the next conversion puts it back instead of removing it."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    backup = tmp_path / f".ckpt.old.{int(finished.stdout)}"
    backup.mkdir()
    (backup / "config.json").write_text('{"format": "mmgen"}')
    remove_stale_writes(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").is_file() and not backup.exists()
