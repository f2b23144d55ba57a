"""Bundled demo models of the synthetic shapes world (:mod:`mmgen_engine.demo.world`: captioning,
text-to-image) and of the synthetic speech/gesture world (:mod:`mmgen_engine.demo.gesture_world`).

The checkpoints under ``demo/models/<task>/`` are produced by the training scripts in ``scripts/``
and converted with the production converters, which carry the scripts' generation settings into each
checkpoint's generation defaults; ``mmgen demo`` runs them with those defaults.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import InputError

MODELS_DIR = Path(__file__).parent / "models"
DEMO_TASKS = ("captioning", "text-to-image", "speech-to-gesture")
# the prompts `mmgen demo` draws, one row of the grid per color
TXT2IMG_PROMPTS = ("a red circle", "a green square", "a blue triangle", "a yellow circle", "a purple square",
                   "a orange triangle")


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
    from ..pipelines import load
    from ..pipelines.poses import atomic_output
    from .world import HELD_OUT_SEED, sample

    seed = HELD_OUT_SEED + 2026 if seed is None else seed
    out.mkdir(parents=True, exist_ok=True)
    pipe = load(demo_model("captioning"))
    items = sample(count, seed)
    captions = pipe.caption([image for image, _ in items])
    results = []
    for i, ((image, expected), caption) in enumerate(zip(items, captions)):
        path = out / f"caption_{i}.png"
        with atomic_output(path) as tmp:  # whole or not at all, as every file the CLI writes
            image.save(tmp, format="PNG")
        results.append({"image": str(path), "caption": caption, "expected": expected})
    return results


def run_txt2img_demo(out: Path, images_per_prompt: int = 4, seed: int | None = 0) -> tuple[Path, list[dict]]:
    """Generate ``images_per_prompt`` images for each demo prompt with the demo text-to-image model and
    its checkpoint's generation defaults (``seed`` set, so the demo is reproducible; None: the
    defaults as they are, new images every run), save them as one grid PNG in ``out`` (a row per
    prompt), caption every image with the demo captioner and return ``(grid path, [{"prompt",
    "caption"}])``. (Over seeds 0-7, 21-24 of these 24 images are captioned exactly with their
    prompt; ``scripts/measure_demo_txt2img.py`` measures the defaults over all one-object prompts.)"""
    from ..pipelines import load
    from ..pipelines.poses import atomic_output
    from ..pipelines.text_to_image import image_grid

    out.mkdir(parents=True, exist_ok=True)
    pipe = load(demo_model("text-to-image"))
    sampling = None if seed is None else dataclasses.replace(pipe.default_sampling, seed=seed)
    images = pipe.generate(list(TXT2IMG_PROMPTS), images_per_prompt, sampling)
    path = out / "txt2img_grid.png"
    with atomic_output(path) as tmp:
        image_grid(images, images_per_prompt).save(tmp, format="PNG")
    captions = load(demo_model("captioning")).caption(images)
    prompts = [p for p in TXT2IMG_PROMPTS for _ in range(images_per_prompt)]
    return path, [{"prompt": p, "caption": c} for p, c in zip(prompts, captions)]


def run_gesture_demo(out: Path, seconds: float = 8.0, seed: int = 0) -> dict:
    """Gestures of the demo speech-to-gesture model for a held-out synthetic speech clip (and for
    near-silence of the same length): writes ``gesture.gif`` (the stick figure) and ``gesture.npz``
    to ``out`` and returns ``{"gif", "npz", "seconds", "speech_motion", "silence_motion"}`` (mean
    wrist displacement per frame)."""
    from ..pipelines import load
    from ..pipelines.poses import save_gif, save_npz
    from . import gesture_world as world

    out.mkdir(parents=True, exist_ok=True)
    pipe = load(demo_model("speech-to-gesture"))
    audio, _ = world.clip(world.HELD_OUT_SEED + seed, seconds)
    poses = pipe.generate(audio, world.SAMPLE_RATE)
    still = pipe.generate(world.near_silence(world.HELD_OUT_SEED + seed, seconds), world.SAMPLE_RATE)
    gif, npz = out / "gesture.gif", out / "gesture.npz"
    save_gif(gif, poses, pipe.fps)
    save_npz(npz, poses, pipe.fps)
    return {"gif": str(gif), "npz": str(npz), "seconds": seconds, "speech_motion": world.wrist_speed(poses),
            "silence_motion": world.wrist_speed(still)}
