"""ONNX Runtime sessions over an export (see :mod:`mmgen_engine.onnx`)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, InputError, one_line
from .manifest import check_export, require


def load_session(out_dir, part: str, device: str = "cpu", checkpoint_dir=None):
    """An ``onnxruntime.InferenceSession`` of ``part`` of the export ``out_dir`` (checked first, see
    :func:`check_export`; ``checkpoint_dir`` given: against that checkpoint too). ``device`` "cpu":
    the CPU execution provider (the only one so far)."""
    if device != "cpu":
        raise InputError(f"device {device!r}: ONNX Runtime sessions run on 'cpu' so far")
    ort = require("onnxruntime")
    out = Path(out_dir)
    manifest = check_export(out, checkpoint_dir, part)
    file = out / manifest["parts"][part]["file"]
    try:
        return ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / ...
        raise CheckpointError(f"{file}: ONNX Runtime cannot open it ({one_line(e)})") from None
