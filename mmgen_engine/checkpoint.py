"""The engine checkpoint format: a directory with ``config.json`` and ``*.safetensors`` weights.

``config.json`` holds ``{"format": "mmgen", "format_version": 1, "task", "architecture", ...}``;
the weights are read with safetensors (memory-mapped), never unpickled. Tokenizer and
preprocessing files the task needs sit beside them. Writing goes to a temporary sibling directory
that is renamed into place only when complete, so a failed conversion never leaves a half checkpoint
and never destroys an existing one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_CLASSES, DTYPES, FORMAT_NAME, FORMAT_VERSION, TASKS, from_dict
from .errors import CheckpointError, one_line

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"float16"`` (or a torch dtype, or None) to a torch dtype; reject anything else."""
    if name is None or (isinstance(name, torch.dtype) and name in TORCH_DTYPES.values()):
        return name
    if name not in TORCH_DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def read_config(path: str | os.PathLike):
    """Read and validate ``path/config.json``; returns the task's config dataclass."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (does not exist or is a file)")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; is this a converted mmgen checkpoint? "
                              f"(convert it first with `mmgen convert`)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{cfg_file}: unreadable ({one_line(e)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({one_line(e)})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{cfg_file}: not an mmgen checkpoint (\"format\" is not \"{FORMAT_NAME}\"); "
                              f"convert the source model with `mmgen convert` first")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{cfg_file}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format_version {version} is newer than this mmgen_engine "
                              f"supports ({FORMAT_VERSION}); upgrade mmgen_engine")
    task = raw.get("task")
    if task not in TASKS:
        raise CheckpointError(f"{cfg_file}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task not in CONFIG_CLASSES:
        raise CheckpointError(f"{cfg_file}: task {task!r} is not supported by this build")
    return from_dict(CONFIG_CLASSES[task], raw, where=str(cfg_file))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every ``*.safetensors`` file of a checkpoint directory (memory-mapped on CPU)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(f, device=str(device))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({one_line(e)})") from None
        dup = tensors.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: tensor {sorted(dup)[0]!r} appears in more than one weights file")
        tensors.update(part)
    return tensors


def tensor_dtype(module: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype floating tensor ``name`` of ``module`` is stored and run in when the weights are
    ``dtype``: float32 for the few a model lists in its ``fp32_tensors`` (statistics whose rounding
    would show in the output), ``dtype`` for the rest."""
    return torch.float32 if name in getattr(module, "fp32_tensors", ()) else dtype


def check_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str,
                  stored_dtype: torch.dtype) -> None:
    """Check that ``tensors`` are exactly the state of ``module`` (built on the meta device): same
    names, same shapes, floating-point where the module's are, stored as ``stored_dtype`` (see
    :func:`tensor_dtype`).
    Any difference raises :class:`CheckpointError` naming the tensor."""
    expected = module.state_dict()
    for kind, names in (("missing", expected.keys() - tensors.keys()), ("unexpected", tensors.keys() - expected.keys())):
        names = sorted(names)
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise CheckpointError(f"{where}: {kind} tensor(s) {', '.join(names[:5])}{more}")
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, "
                                  f"the config implies {tuple(ref.shape)}")
        want = tensor_dtype(module, name, stored_dtype) if ref.is_floating_point() else ref.dtype
        if t.dtype != want:
            raise CheckpointError(f"{where}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, "
                                  f"expected {str(want).removeprefix('torch.')}")


def assign_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str,
                   stored_dtype: torch.dtype, dtype: torch.dtype | None = None) -> None:
    """:func:`check_tensors`, then put ``tensors`` into ``module``, cast to ``dtype`` when given."""
    check_tensors(module, tensors, where, stored_dtype)
    if dtype is not None:
        tensors = {k: (t.to(tensor_dtype(module, k, dtype)) if t.is_floating_point() else t)
                   for k, t in tensors.items()}
    module.load_state_dict(tensors, assign=True)


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory holding an mmgen ``config.json`` (any version)."""
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def save_checkpoint(out: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                    files: dict[str, Path] | None = None, overwrite: bool = False) -> Path:
    """Write an engine checkpoint directory atomically.

    ``config`` must carry format, format_version and task; ``files`` maps a file name in the
    checkpoint to a source file to copy (tokenizer, preprocessor config). The directory appears
    complete or not at all. An existing non-empty ``out`` is replaced only with ``overwrite`` and
    only if it is an mmgen checkpoint itself; if replacing fails, the old one is put back.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise CheckpointError(f"{out}: already exists and is not empty; choose another output "
                                  f"directory or pass overwrite (--overwrite)")
        if not is_checkpoint(out):
            raise CheckpointError(f"{out}: refusing to replace it: it is not an mmgen checkpoint")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create the output directory ({one_line(e)})") from None
    try:
        contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _default_permissions(tmp)
        if out.exists():
            _replace(out, tmp)
        else:
            tmp.rename(out)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write the checkpoint ({one_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace(out: Path, new: Path) -> None:
    backup = out.with_name(f".{out.name}.old.{os.getpid()}")
    out.rename(backup)
    try:
        new.rename(out)
    except BaseException:
        backup.rename(out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes a private directory; give it and its files the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)
