"""The synthetic "shapes world" shared by every bundled demo model.

A scene is one or two colored shapes on a plain background, drawn on a 64x64 RGB canvas. Its
caption follows a tiny grammar (lower case, see ``CAPTION_PATTERN``)::

    a {color} {shape}
    a {color} {shape} {relation} a {color} {shape}

The caption is a deterministic function of the image:

* two shapes never share the same (color, shape) pair and never overlap;
* they are placed so that exactly one relation clearly holds: either vertically stacked
  (``|dy| >= r1 + r2 + 3``, ``|dx| <= 6``) or side by side (the same with x and y swapped);
* the first-mentioned shape is the one with the smaller ``(COLORS index, SHAPES index)``; the
  relation is whatever holds of the first relative to the second, so all four relations occur.

Everything is deterministic given a seed. Scenes are addressed by an integer *scene seed*:
``scene_for_seed(s)`` is ``sample_scene(numpy.random.default_rng(s))`` and ``sample(n, seed)``
returns the scenes with seeds ``seed .. seed + n - 1``, so train / test splits are simply disjoint
seed ranges (see ``HELD_OUT_SEED``).

This module depends on numpy and Pillow only (no torch), so any demo (captioning, text-to-image,
...) and any test can use it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

# Saturated, well separated in RGB (the closest pair, red/orange, differs by ~100 in G).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
BACKGROUND_RGB: tuple[int, int, int] = (235, 235, 235)

IMAGE_SIZE = 64
MIN_SIZE, MAX_SIZE = 8, 13  # shape half-extent ("radius") in pixels, inclusive
MARGIN = 1  # pixels kept free at the image border
GAP = 3  # minimum free pixels between two shapes along the relation axis
JITTER = 3  # max offset (px) of each shape from the shared cross-axis line, so |cross delta| <= 6

# Seeds below this are free for training; scene seeds >= HELD_OUT_SEED are reserved for
# evaluation (the demo captioning model is trained on seeds < 1_000_000 only).
HELD_OUT_SEED = 1_000_000

_COLOR_ALT = "|".join(COLORS)
_SHAPE_ALT = "|".join(SHAPES)
_REL_ALT = "|".join(RELATIONS)
_OBJECT = rf"a (?:{_COLOR_ALT}) (?:{_SHAPE_ALT})"
# Any sentence of the grammar (either order of the two shapes).
CAPTION_PATTERN = re.compile(rf"^{_OBJECT}(?: (?:{_REL_ALT}) {_OBJECT})?$")


@dataclass(frozen=True)
class Shape:
    """One shape. ``(cx, cy)`` is its center in pixels (y grows downwards) and ``size`` its
    half-extent: it covers the box ``[cx - size, cx + size] x [cy - size, cy + size]``."""

    color: str
    shape: str
    cx: int
    cy: int
    size: int

    @property
    def key(self) -> tuple[int, int]:
        """Canonical ordering key: ``(COLORS index, SHAPES index)``."""
        return (COLORS.index(self.color), SHAPES.index(self.shape))

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box ``(x0, y0, x1, y1)``."""
        return (self.cx - self.size, self.cy - self.size, self.cx + self.size, self.cy + self.size)


@dataclass(frozen=True)
class Scene:
    """One or two shapes in caption order, and the relation of the first to the second
    (``None`` for a single shape)."""

    shapes: tuple[Shape, ...]
    relation: str | None


def relation_between(first: Shape, second: Shape) -> str:
    """The relation that holds of ``first`` relative to ``second``: along the axis with the larger
    center distance, ``above``/``below`` (image y grows downwards) or ``left of``/``right of``."""
    dx, dy = second.cx - first.cx, second.cy - first.cy
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def _uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` inclusive."""
    return int(rng.integers(lo, hi + 1))


def _place_pair(rng: np.random.Generator, r_a: int, r_b: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Centers ``(along, across)`` for two shapes of radii ``r_a`` (placed first along the axis)
    and ``r_b``, separated by at least ``r_a + r_b + GAP`` along the axis and at most
    ``2 * JITTER`` across it, both fully inside the image."""
    hi = IMAGE_SIZE - 1 - MARGIN
    min_sep = r_a + r_b + GAP
    a_along = _uniform_int(rng, r_a + MARGIN, hi - r_b - min_sep)
    b_along = _uniform_int(rng, a_along + min_sep, hi - r_b)
    r_max = max(r_a, r_b)
    line = _uniform_int(rng, r_max + MARGIN, hi - r_max)
    a_across = line + _uniform_int(rng, -JITTER, JITTER)
    b_across = line + _uniform_int(rng, -JITTER, JITTER)
    a_across = min(max(a_across, r_a + MARGIN), hi - r_a)
    b_across = min(max(b_across, r_b + MARGIN), hi - r_b)
    return (a_along, a_across), (b_along, b_across)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: one shape or two (probability 1/2 each).

    One shape: uniform color, kind, size in ``[MIN_SIZE, MAX_SIZE]`` and position inside the image.
    Two shapes: two distinct (color, shape) pairs; an axis (vertical / horizontal, 1/2 each); which
    shape comes first along it (1/2 each); then positions via ``_place_pair``. The shapes are
    returned in canonical caption order with the relation that holds between them.
    """
    n_pairs = len(COLORS) * len(SHAPES)
    if rng.random() < 0.5:
        idx = _uniform_int(rng, 0, n_pairs - 1)
        size = _uniform_int(rng, MIN_SIZE, MAX_SIZE)
        hi = IMAGE_SIZE - 1 - MARGIN - size
        cx = _uniform_int(rng, MARGIN + size, hi)
        cy = _uniform_int(rng, MARGIN + size, hi)
        color, kind = COLORS[idx // len(SHAPES)], SHAPES[idx % len(SHAPES)]
        return Scene((Shape(color, kind, cx, cy, size),), None)

    pair_ids = rng.choice(n_pairs, size=2, replace=False)
    vertical = bool(rng.random() < 0.5)
    sizes = [_uniform_int(rng, MIN_SIZE, MAX_SIZE) for _ in range(2)]
    (a_along, a_across), (b_along, b_across) = _place_pair(rng, sizes[0], sizes[1])
    centers = [(a_across, a_along), (b_across, b_along)] if vertical else [(a_along, a_across), (b_along, b_across)]
    shapes = [
        Shape(COLORS[int(p) // len(SHAPES)], SHAPES[int(p) % len(SHAPES)], cx, cy, s)
        for p, (cx, cy), s in zip(pair_ids, centers, sizes)
    ]
    first, second = sorted(shapes, key=lambda s: s.key)
    return Scene((first, second), relation_between(first, second))


def scene_for_seed(seed: int) -> Scene:
    """The scene with scene seed ``seed``: ``sample_scene(numpy.random.default_rng(seed))``."""
    return sample_scene(np.random.default_rng(seed))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size x size`` pixels (no anti-aliasing, so every pixel is
    either the background or exactly one shape color). Scene coordinates are in the 64x64 frame and
    are scaled by ``size / IMAGE_SIZE``. Circle = ellipse in the shape box, square = the box,
    triangle = apex at top-center, base along the bottom edge of the box."""
    img = Image.new("RGB", (size, size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    k = size / IMAGE_SIZE
    for s in scene.shapes:
        x0, y0, x1, y1 = (round(v * k) for v in s.bbox)
        fill = COLOR_RGB[s.color]
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(round(s.cx * k), y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s.shape!r}")
    return img


def caption(scene: Scene) -> str:
    """``a {color} {shape}`` or ``a {color} {shape} {relation} a {color} {shape}``."""
    parts = [f"a {s.color} {s.shape}" for s in scene.shapes]
    if len(parts) == 1:
        return parts[0]
    return f"{parts[0]} {scene.relation} {parts[1]}"


def all_captions(canonical_only: bool = False) -> Iterator[str]:
    """Every caption of the grammar, in a fixed order: the 18 one-shape captions, then the
    two-shape ones (two distinct (color, shape) pairs, any relation). With ``canonical_only`` only
    those that ``caption(sample_scene(...))`` can produce (first pair < second pair): 18 + 612;
    otherwise both orders: 18 + 1224."""
    objects = [f"a {c} {s}" for c, s in itertools.product(COLORS, SHAPES)]
    yield from objects
    for i, j in itertools.permutations(range(len(objects)), 2):
        if canonical_only and i > j:
            continue
        for rel in RELATIONS:
            yield f"{objects[i]} {rel} {objects[j]}"


def sample(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs for scene seeds ``seed, seed + 1, ..., seed + n - 1``."""
    out = []
    for s in range(seed, seed + n):
        scene = scene_for_seed(s)
        out.append((render(scene), caption(scene)))
    return out
