"""Bundled demo models of the synthetic shapes world (see :mod:`mmgen_engine.demo.world`).

The checkpoints under ``demo/models/<task>/`` are produced by the training scripts in ``scripts/``
and converted with the production converters; ``mmgen demo`` runs them.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

MODELS_DIR = Path(__file__).parent / "models"
DEMO_TASKS = ("captioning", "text-to-image", "speech-to-gesture")


def demo_model(task: str) -> Path:
    """Path of the bundled demo checkpoint of ``task`` ("captioning" | "text-to-image" |
    "speech-to-gesture")."""
    if task not in DEMO_TASKS:
        raise InputError(f"unknown demo task {task!r}; choose one of {', '.join(DEMO_TASKS)}")
    path = MODELS_DIR / task
    if not (path / "config.json").is_file():
        raise InputError(f"the demo model for {task!r} is not bundled with this build of mmgen_engine")
    return path


def run_demo(out: Path, count: int = 4, seed: int | None = None) -> list[dict]:
    """Render ``count`` held-out shapes-world scenes (never seen in training) into ``out``, caption
    them with the demo captioner and return ``[{"image", "caption", "expected"}]``."""
    from .. import load
    from .world import HELD_OUT_SEED, sample

    seed = HELD_OUT_SEED + 2026 if seed is None else seed
    out.mkdir(parents=True, exist_ok=True)
    pipe = load(demo_model("captioning"))
    items = sample(count, seed)
    captions = pipe.caption([image for image, _ in items])
    results = []
    for i, ((image, expected), caption) in enumerate(zip(items, captions)):
        path = out / f"caption_{i}.png"
        image.save(path)
        results.append({"image": str(path), "caption": caption, "expected": expected})
    return results
