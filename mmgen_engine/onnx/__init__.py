"""ONNX export of a converted checkpoint's one-shot stages, and ONNX Runtime sessions over the export.

:func:`export_onnx` (``mmgen export-onnx``) traces each stage with ``torch.onnx.export`` (the
torch.export-based exporter, which needs ``onnxscript``) on the reference backend, with a symbolic
``batch`` dimension, the weights as external data (``PART.onnx.data``) and every file checked with
``onnx.checker``. ``manifest.json`` describes the export: its format version, the checkpoint's
identity (SHA-256 of its config and weights, so an export is never paired with another checkpoint),
and per part its files (size, SHA-256), the engine stage it replaces and its inputs and outputs
(name, shape with ``"batch"`` for the dynamic dimension, dtype). :func:`load_session` checks a part
against the manifest and opens it as an ``onnxruntime.InferenceSession``.

The parts (:data:`PARTS`) are the stages that run once per request; the autoregressive decoders
(prefill / decode step with explicit caches) are not exported yet.

``onnx``, ``onnxscript`` and ``onnxruntime`` are the ``[onnx]`` extra: this package imports without
them and raises a one-line :class:`MMGenError` naming the extra when a function needs them.
"""
from .export import PARTS, export_onnx, supported_parts
from .manifest import check_export, read_manifest
from .session import load_session

__all__ = ["check_export", "export_onnx", "load_session", "PARTS", "read_manifest", "supported_parts"]
