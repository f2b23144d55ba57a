"""ONNX Runtime inside the engine: ``mm.load(path, stage_backend="onnxruntime", runtime="onnxruntime")``.

``stage_backend="onnxruntime"`` runs the pipeline's one-shot stages (its ``stages``, see
:mod:`mmgen_engine.pipelines.stages`: image / text / audio encoder, image detokenizer, motion
decoder) through ONNX Runtime sessions over an export of the checkpoint (:func:`export_onnx`, in
the load's dtype); their outputs are torch tensors on the pipeline's device that the engine's decode
loop takes as they are. ``runtime="onnxruntime"`` decodes with
:class:`~mmgen_engine.onnx.generate.OrtGenerator` over the exported decoder parts instead of the
engine's loop (greedy only; no beam search). The two are independent.

The export is made on first use and kept (:func:`cached_export`): in ``onnx_dir`` when given, else
beside the checkpoint (``CKPT/onnx/DTYPE/``) where that can be written (or already holds a good
export), else in the user's cache (``$MMGEN_CACHE_DIR``, by default ``~/.cache/mmgen_engine``, then
``onnx/SHA-DTYPE/``, SHA naming the checkpoint's config and weights). A kept export is used when
:func:`check_export` passes for every part needed, it was made from this checkpoint and in this
dtype; otherwise it is made again (a tampered or stale export is replaced, with a warning) in a
temporary sibling directory and renamed into place, so concurrent loaders never see a partial one
(the first rename wins; a later loader keeps the winner's). A directory that is not an export (files
other than ``manifest.json``, ``*.onnx``, ``*.onnx.*``) is never replaced: a given ``onnx_dir``
like that is a one-line InputError, a default one is passed over for the cache.

Sessions use I/O binding on the torch tensors' memory: ONNX Runtime reads the inputs where torch
holds them and writes the output into a torch tensor allocated for it (its shape from the
manifest), on CPU (the CPU execution provider) as on CUDA (the CUDA execution provider of
``onnxruntime-gpu``, the ``[onnx-gpu]`` extra): no copies through the host. On CUDA, ORT runs on a
torch-made stream handed to it as ``user_compute_stream``, ordered after torch's current stream and
before its next work by stream waits (no host synchronization: runs are made with
``disable_synchronize_execution_providers``). With ``cuda_graphs`` (the default) the session is
asked for ORT's CUDA graphs (``enable_cuda_graph``): one graph per input shape (``gpu_graph_id``),
over static input and output buffers that each call copies in and out; ORT accepts it only where
every node runs on the CUDA provider, and where it refuses the session runs without graphs. A
dedicated stream, not torch's default one, because a graph cannot be captured on the legacy default
stream. ORT's CUDA memory is its own arena, beside torch's caching allocator.
"""
from __future__ import annotations

import ast
import errno
import hashlib
import importlib.util
import json
import operator
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

from ..checkpoint import read_config, read_json
from ..errors import CheckpointError, InputError, MMGenError, one_line
from ..pipelines import load as load_pipeline
from ..pipelines.stages import BACKENDS
from .export import export_onnx, supported_parts
from .generate import OrtGenerator
from .manifest import CACHE_ENV, MANIFEST_FILE, cache_root, check_export, checkpoint_identity, read_manifest, require

STALE_TEMP_SECONDS = 24 * 3600  # a temporary export directory older than this was left by a killed loader
INSTALL_TRIES = 3
# manifest dtype -> (torch dtype, ONNX TensorProto element type)
ELEMENT_TYPES = {"float32": (torch.float32, 1), "float16": (torch.float16, 10), "bfloat16": (torch.bfloat16, 16),
                 "int64": (torch.int64, 7), "int32": (torch.int32, 6), "bool": (torch.bool, 9)}
_DIM_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def load(path, device="cpu", dtype=None, cuda_graphs=True, stage_backend="auto", runtime="engine", onnx_dir=None,
         quantize=None):
    """Load a converted checkpoint directory as its task's pipeline (``mm.load``).

    ``device`` "cpu" | "cuda" | "cuda:N"; ``dtype`` "float32" | "float16" | "bfloat16" casts the
    weights (None keeps the checkpoint's); ``cuda_graphs`` replays decode steps (and, with ONNX
    Runtime on CUDA, its sessions where it can) from CUDA graphs on a CUDA device.
    ``stage_backend`` "auto" | "engine" | "onnxruntime": who runs the one-shot stages (encoders,
    detokenizer, motion decoder); "auto" (the default): ONNX Runtime for the stages it was measured to
    run faster on CPU (:data:`AUTO_CPU_STAGES`) when the ``[onnx]`` extra is installed, the engine
    for the rest and on GPU (see :func:`auto_stages`). ``runtime`` "engine" | "onnxruntime": who runs
    the decode loop (ONNX Runtime: greedy only). ``onnx_dir``: where the ONNX export is kept (None:
    beside the checkpoint or in the user's cache; see :mod:`mmgen_engine.onnx.backend`). ``quantize``
    None | "int8" | "int8-g128": weight-only int8 decoder weights (see
    :func:`mmgen_engine.pipelines.load`; the engine's backends only). Returns e.g. a
    :class:`~mmgen_engine.pipelines.CaptioningPipeline`."""
    for name, value, allowed in (("stage_backend", stage_backend, ("auto", *BACKENDS)),
                                 ("runtime", runtime, BACKENDS)):
        if value not in allowed:
            raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if onnx_dir is not None and not isinstance(onnx_dir, (str, os.PathLike)):
        raise InputError(f"onnx_dir must be a directory path (str or os.PathLike), got {type(onnx_dir).__name__}")
    ort = stage_backend == "onnxruntime" or runtime == "onnxruntime"
    if onnx_dir is not None and not ort:
        raise InputError("onnx_dir is used with stage_backend='onnxruntime' or runtime='onnxruntime' only")
    if ort and quantize is not None:
        raise InputError("quantize is not supported with ONNX Runtime (stage_backend or runtime 'onnxruntime'); "
                         "use the engine's backends")
    pipe = load_pipeline(path, device, dtype, cuda_graphs, quantize)
    auto = auto_stages(pipe) if stage_backend == "auto" else []
    if not ort:
        _auto(pipe, Path(path), auto)
        return pipe
    if getattr(pipe.config, "quantization", None) is not None:
        raise InputError(f"{path}: a quantized checkpoint runs on the engine's backends only, not ONNX Runtime")
    parts = list(pipe.stages) if stage_backend == "onnxruntime" else list(auto)
    if runtime == "onnxruntime":
        decoders = [p for p in supported_parts(pipe.config) if p not in pipe.stages]
        if not decoders:
            raise InputError(f"runtime='onnxruntime': a {pipe.task} checkpoint has no exported decoder to run "
                             f"(use runtime='engine')")
        if pipe.device.type != "cpu":
            raise InputError("runtime='onnxruntime' decodes on the CPU so far; use runtime='engine' on "
                             f"{pipe.device} (stage_backend='onnxruntime' runs there)")
        parts += decoders
    dtypes = {p.dtype for p in pipe.model.parameters() if p.is_floating_point()}
    weights = torch.bfloat16 if torch.bfloat16 in dtypes else next(pipe.model.parameters()).dtype
    dtype_name = str(weights).removeprefix("torch.")
    if pipe.device.type == "cpu" and weights == torch.bfloat16:
        raise InputError("ONNX Runtime's CPU provider has no bfloat16 MatMul; load with dtype='float32' or "
                         "'float16' to run stages or the decoder on ONNX Runtime on CPU")
    require_provider(pipe.device)  # a missing onnxruntime or CUDA provider fails before the export
    out = cached_export(Path(path), dtype_name, parts, onnx_dir)
    stages = [name for name in parts if name in pipe.stages]
    if stages:
        stream = torch.cuda.Stream(pipe.device) if pipe.device.type == "cuda" else None
        pipe.use_stages({name: OrtStage(out, name, pipe.device, stream, pipe.use_cuda_graphs) for name in stages},
                        "onnxruntime")
    if runtime == "onnxruntime":
        pipe.use_runtime(OrtGenerator(out, None, str(pipe.device)).generate_stream, "onnxruntime")
    pipe.onnx_dir = out
    return pipe


# -- stage_backend="auto" ------------------------------------------------------------------------

# The one-shot stages that ONNX Runtime's CPU provider ran faster than the engine at every batch size
# measured on an idle box, with the stage's parameter count from which that was measured
# (benchmarks/RESULTS.md, "ONNX Runtime as a peer"; the rule of "Backend defaults": the measured
# faster one wins): the ViT-B/16-size image encoders (ViT, BLIP's vision tower, GIT's CLIP tower;
# 86M parameters) and DALL-E Mini's BART text encoder (203M). Not the VQGAN detokenizer (as fast as
# the engine at batch 1), nor stages below these sizes (the demo models' ~0.5M-parameter encoders:
# an export on first load is not worth a stage that takes a millisecond). The value: which
# parameters of the model make the stage, and the fewest there for "auto" to pick ONNX Runtime.
AUTO_CPU_STAGES = {"image_encoder": (lambda name: not name.startswith("decoder."), 20_000_000),
                   "text_encoder": (lambda name: name.startswith("encoder."), 20_000_000)}
AUTO_MODULES = ("onnxruntime", "onnx", "onnxscript")  # what running and making an export needs


def auto_stages(pipe) -> list[str]:
    """The stages ``stage_backend="auto"`` runs on ONNX Runtime: those of :data:`AUTO_CPU_STAGES` that
    ``pipe`` has, when it runs on CPU in float32, its one-shot stages hold at least the parameters
    named there, and the ``[onnx]`` extra is installed; none otherwise."""
    if pipe.device.type != "cpu" or any(importlib.util.find_spec(m) is None for m in AUTO_MODULES):
        return []
    picked = []
    for stage in pipe.stages:
        if stage not in AUTO_CPU_STAGES:
            continue
        belongs, fewest = AUTO_CPU_STAGES[stage]
        params = [p for name, p in pipe.model.named_parameters() if belongs(name)]
        if params and all(p.dtype == torch.float32 for p in params) and sum(p.numel() for p in params) >= fewest:
            picked.append(stage)
    return picked


def _auto(pipe, path: Path, parts: list[str]) -> None:
    """Put ONNX Runtime stages of ``parts`` in ``pipe``, exporting them first if no kept export has
    them (in the default place: beside the checkpoint or in the user's cache). Any failure leaves
    the engine's stages, with a warning: a default never fails a load."""
    if not parts:
        return
    try:
        out = cached_export(path, "float32", parts)
        pipe.use_stages({name: OrtStage(out, name, pipe.device) for name in parts}, "onnxruntime")
    except MMGenError as e:
        warnings.warn(f"{path}: stage_backend='auto' keeps the engine's {', '.join(parts)} ({one_line(e)}); "
                      f"pass stage_backend='engine' to silence this", stacklevel=3)
        return
    pipe.onnx_dir = out


# -- the kept export -----------------------------------------------------------------------------

def _is_export_dir(path: Path) -> bool:
    """Whether ``path`` holds only what an export writes (``manifest.json`` among its files): a
    directory this module may replace."""
    entries = list(path.iterdir())
    return any(e.name == MANIFEST_FILE for e in entries) and all(
        e.is_file() and not e.is_symlink()
        and (e.name == MANIFEST_FILE or e.name.endswith(".onnx") or ".onnx." in e.name) for e in entries)


def _state(out: Path, identity: dict, dtype: str, parts: list[str]) -> tuple[str, str]:
    """``(state, why)`` of directory ``out``: "missing" (absent or empty), "foreign" (not an export),
    "partial" (a good export without some of ``parts``), "stale" (an export that does not serve: why)
    or "good"."""
    if not out.exists():
        return "missing", ""
    if not out.is_dir():
        return "foreign", "not a directory"
    if not any(out.iterdir()):
        return "missing", ""
    if not _is_export_dir(out):
        return "foreign", "holds files that are not an ONNX export's"
    try:
        manifest = read_manifest(out)  # its format and version
        held = [p for p in parts if p in manifest["parts"]]
        for part in held:  # the part's files: sizes and SHA-256
            check_export(out, None, part, known=True)
    except CheckpointError as e:
        return "stale", one_line(e)
    if manifest["checkpoint"] != identity:
        return "stale", "it was made from another checkpoint"
    if manifest.get("dtype") != dtype:
        return "stale", f"it is in {manifest.get('dtype')}, not {dtype}"
    return ("good", "") if len(held) == len(parts) else ("partial", "")


def _writable(out: Path) -> bool:
    """Whether this process can make ``out`` (or replace it): its nearest existing ancestor is a
    directory it may write in."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK) and (
        not out.exists() or os.access(out, os.W_OK | os.X_OK))


def cached_export(checkpoint_dir: Path, dtype: str, parts: list[str], onnx_dir=None) -> Path:
    """The directory of an export of ``parts`` of ``checkpoint_dir`` in ``dtype`` that passes
    :func:`check_export` and was made from this checkpoint, made first if there is none (see the
    module docstring for where)."""
    identity = checkpoint_identity(checkpoint_dir, known=True)
    if onnx_dir is not None:
        out = Path(onnx_dir)
        state, why = _state(out, identity, dtype, parts)
        if state == "foreign":
            raise InputError(f"onnx_dir {out}: {why}; give a new or empty directory, or an export's")
    else:
        out = checkpoint_dir / "onnx" / dtype
        state, why = _state(out, identity, dtype, parts)
        if state != "good" and (state == "foreign" or not _writable(out)):
            key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
            out = cache_root() / "onnx" / f"{key}-{dtype}"
            state, why = _state(out, identity, dtype, parts)
            if state == "foreign":
                raise CheckpointError(f"{out}: the ONNX cache directory {why}; remove it or set {CACHE_ENV}")
    if state == "good":
        return out
    if state == "stale":
        warnings.warn(f"{out}: exporting the ONNX parts again ({why})", stacklevel=3)
    _export_into(checkpoint_dir, out, dtype, _parts_to_export(checkpoint_dir, out, parts), identity)
    return out


def _parts_to_export(checkpoint_dir: Path, out: Path, parts: list[str]) -> list[str]:
    """``parts`` and the parts of the task that an export already in ``out`` holds (so that loads with
    other options do not export in turn)."""
    try:
        held = read_json(out / MANIFEST_FILE).get("parts", {})
    except (CheckpointError, AttributeError):  # no manifest, or not an object
        held = {}
    supported = supported_parts(read_config(checkpoint_dir))
    return list(dict.fromkeys([*parts, *(p for p in supported if p in held)]))


def _remove_old_temporaries(out: Path) -> None:
    """Temporary siblings of ``out`` left by loaders killed while exporting (older than a day)."""
    prefixes = (f".{out.name}.export.", f".{out.name}.stale.")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.startswith(prefixes) and time.time() - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _export_into(checkpoint_dir: Path, out: Path, dtype: str, parts: list[str], identity: dict) -> None:
    """Export into a new temporary sibling of ``out``, then rename it to ``out``: atomic, and the
    rename fails where another loader's export got there first (then that one is kept if good)."""
    made = not out.parent.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export.", dir=out.parent))
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write the ONNX export there ({one_line(e)})") from None
    _remove_old_temporaries(out)
    ok = False
    try:
        export_onnx(checkpoint_dir, tmp, parts=parts, dtype=dtype)
        for _ in range(INSTALL_TRIES):
            try:
                os.rename(tmp, out)  # onto a missing or empty directory only
                ok = True
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise CheckpointError(f"{out}: cannot write the ONNX export there ({one_line(e)})") from None
            state, why = _state(out, identity, dtype, parts)
            if state == "good":  # another loader's, complete
                ok = True
                return
            if state == "foreign":
                raise CheckpointError(f"{out}: {why}; not replaced")
            stale = out.parent / f".{out.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                os.rename(out, stale)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise CheckpointError(f"{out}: cannot replace the stale ONNX export ({one_line(e)})") from None
            shutil.rmtree(stale, ignore_errors=True)
        raise CheckpointError(f"{out}: other loaders kept replacing the ONNX export; try again")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made and not ok:  # a failed export leaves no empty CKPT/onnx/ behind
            try:
                out.parent.rmdir()
            except OSError:  # not empty: another loader's export is there
                pass


# -- sessions ------------------------------------------------------------------------------------

def require_provider(device: torch.device) -> None:
    """A one-line MMGenError unless onnxruntime is installed with the execution provider of ``device``
    (CPU; CUDA: onnxruntime-gpu, the ``[onnx-gpu]`` extra)."""
    have = require("onnxruntime").get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" not in have:
        raise MMGenError(f"ONNX Runtime on CUDA needs onnxruntime-gpu, the [onnx-gpu] extra (pip install "
                         f"'mmgen-engine[onnx-gpu]'); this onnxruntime has {', '.join(have)}")


def _session(file: Path, device: torch.device, stream, cuda_graph: bool):
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every node it places on the CPU
    if device.type == "cpu":
        # ORT's pool threads spin for a while after each run by default: the engine's own torch ops
        # that follow (the decode loop) then share the cores with them and ran 1.6x slower (demo
        # captioner, 2-core box: 58 against 36 ms for 20 tokens at batch 4)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
    else:
        cuda = {"device_id": str(device.index),
                "user_compute_stream": str(stream.cuda_stream), "has_user_compute_stream": "1"}
        if cuda_graph:
            cuda["enable_cuda_graph"] = "1"
        providers = [("CUDAExecutionProvider", cuda)]
    try:
        session = ort.InferenceSession(str(file), options, providers=providers)
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / ...; with graphs: nodes left on the CPU
        raise CheckpointError(f"{file}: ONNX Runtime cannot open it ({one_line(e)})") from None
    if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise MMGenError(f"{file}: ONNX Runtime could not start its CUDA provider (onnxruntime-gpu needs the "
                         f"CUDA and cuDNN libraries of its build); it offers {', '.join(session.get_providers())}")
    return session


def output_dim(dim, sizes: dict[str, int]) -> int:
    """An output dimension of a manifest: an int, or an expression of input dimension names
    (``"batch"``, ``"8*grid_height"``) evaluated with ``sizes``."""
    if isinstance(dim, int):
        return dim

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name) and node.id in sizes:
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _DIM_OPS:
            return _DIM_OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(dim)

    try:
        return value(ast.parse(str(dim), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        raise CheckpointError(f"output dimension {dim!r} is not an expression of the input dimensions "
                              f"{', '.join(sizes)}") from None


class OrtStage:
    """Part ``part`` of the export ``out_dir`` as a stage: ``stage(*inputs) -> output``, torch tensors
    on ``device`` in and out (inputs in the part's order; each cast to the part's dtype), run by an
    ONNX Runtime session through I/O binding. ``stream``: the CUDA stream ORT runs on (CUDA only);
    ``cuda_graph``: ask ORT for CUDA graphs (one per input shape), see the module docstring. The
    export is taken as checked (:func:`cached_export` checks it; :func:`check_export` otherwise):
    its files are not hashed again here."""

    def __init__(self, out_dir: Path, part: str, device: torch.device, stream=None, cuda_graph: bool = False):
        ort = require("onnxruntime")
        entry = read_manifest(out_dir)["parts"][part]
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.part, self.device, self.stream = part, device, stream
        try:
            self.inputs = [(io["name"], *ELEMENT_TYPES[io["dtype"]], io["shape"]) for io in entry["inputs"]]
            self.outputs = [(io["name"], *ELEMENT_TYPES[io["dtype"]], io["shape"]) for io in entry["outputs"]]
        except (KeyError, TypeError):
            raise CheckpointError(f"{out_dir}: part {part!r} has inputs or outputs of a dtype ONNX Runtime "
                                  f"stages do not take") from None
        names = {d: 1 for _, _, _, shape in self.inputs for d in shape if isinstance(d, str)}
        for _, _, _, shape in self.outputs:  # every output dimension follows from the inputs'
            [output_dim(d, names) for d in shape]
        file = out_dir / entry["file"]
        self.cuda_graph = cuda_graph and device.type == "cuda"
        try:
            self.session = _session(file, device, stream, self.cuda_graph)
        except CheckpointError:
            if not self.cuda_graph:
                raise
            self.cuda_graph = False  # ORT refuses graphs where nodes run on the CPU provider
            self.session = _session(file, device, stream, False)
        self._run = ort.RunOptions()
        self._run.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._graphs: dict = {}  # input shapes -> (binding, static inputs, static outputs, run options)

    def __repr__(self) -> str:
        graphs = ", ORT CUDA graphs" if self.cuda_graph else ""
        return f"<OrtStage {self.part} on {self.device}{graphs}>"

    def _bind(self, inputs: list[torch.Tensor]):
        """An I/O binding of ``inputs`` and of new output tensors; returns ``(binding, outputs)``."""
        sizes = {}
        for (name, _, _, shape), x in zip(self.inputs, inputs):
            if x.dim() != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, x.shape)):
                raise InputError(f"{self.part}: input {name} must be of shape {shape}, got {list(x.shape)}")
            sizes.update((d, s) for d, s in zip(shape, x.shape) if isinstance(d, str))
        kind, index = self.device.type, self.device.index or 0  # CUDA: always an index (__init__)
        binding = self.session.io_binding()
        for (name, _, element, _), x in zip(self.inputs, inputs):
            binding.bind_input(name, kind, index, element, list(x.shape), x.data_ptr())
        outputs = []
        for name, dtype, element, shape in self.outputs:
            y = torch.empty([output_dim(d, sizes) for d in shape], dtype=dtype, device=self.device)
            binding.bind_output(name, kind, index, element, list(y.shape), y.data_ptr())
            outputs.append(y)
        return binding, outputs

    def _graph(self, xs: list[torch.Tensor]):
        """``(binding, static inputs, static outputs, run options)`` of the CUDA graph of ``xs``'s shapes."""
        key = tuple(tuple(x.shape) for x in xs)
        if key not in self._graphs:
            static = [torch.empty_like(x) for x in xs]
            binding, outputs = self._bind(static)
            run = require("onnxruntime").RunOptions()
            run.add_run_config_entry("disable_synchronize_execution_providers", "1")
            run.add_run_config_entry("gpu_graph_id", str(len(self._graphs)))  # one graph per shape
            self._graphs[key] = (binding, static, outputs, run)
        return self._graphs[key]

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.inputs):
            raise InputError(f"{self.part} takes {len(self.inputs)} inputs, got {len(inputs)}")
        xs = [x.to(self.device, dtype).contiguous() for x, (_, dtype, _, _) in zip(inputs, self.inputs)]
        if self.cuda_graph:
            binding, static, outputs, run = self._graph(xs)
            for buffer, x in zip(static, xs):
                buffer.copy_(x)
        else:
            (binding, outputs), run = self._bind(xs), self._run
        current = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if current is not None:
            self.stream.wait_stream(current)  # the inputs are written on torch's current stream
        self.session.run_with_iobinding(binding, run)
        if current is not None:
            current.wait_stream(self.stream)  # torch's next work there reads the outputs
        if self.cuda_graph:
            outputs = [y.clone() for y in outputs]  # the graph's buffers are overwritten by the next call
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
