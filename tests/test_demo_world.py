"""Tests for the synthetic shapes world (mmgen_engine.demo.world)."""

import re
from collections import Counter

import numpy as np
import pytest

from mmgen_engine.demo import world

# The grammar, written out independently of world.CAPTION_PATTERN.
_OBJ = r"a (red|green|blue|yellow|purple|orange) (circle|square|triangle)"
GRAMMAR = re.compile(rf"^{_OBJ}(?: (above|below|left of|right of) {_OBJ})?$")

N = 400


@pytest.fixture(scope="module")
def scenes():
    return [world.scene_for_seed(s) for s in range(N)]


def test_constants():
    assert world.COLORS == ("red", "green", "blue", "yellow", "purple", "orange")
    assert world.SHAPES == ("circle", "square", "triangle")
    assert world.RELATIONS == ("above", "below", "left of", "right of")
    assert world.IMAGE_SIZE == 64
    rgbs = [np.array(world.COLOR_RGB[c], dtype=int) for c in world.COLORS] + [np.array(world.BACKGROUND_RGB)]
    for i in range(len(rgbs)):
        for j in range(i + 1, len(rgbs)):
            assert np.abs(rgbs[i] - rgbs[j]).sum() >= 90, (i, j)


def test_deterministic():
    a = world.sample(20, seed=123)
    b = world.sample(20, seed=123)
    assert [c for _, c in a] == [c for _, c in b]
    for (ia, _), (ib, _) in zip(a, b):
        assert ia.tobytes() == ib.tobytes()
    assert world.sample_scene(np.random.default_rng(7)) == world.sample_scene(np.random.default_rng(7))
    # sample(n, seed) covers scene seeds seed .. seed + n - 1
    assert world.caption(world.scene_for_seed(125)) == a[2][1]
    assert [c for _, c in world.sample(20, seed=124)] != [c for _, c in a]


def test_captions_match_grammar(scenes):
    for scene in scenes:
        text = world.caption(scene)
        assert GRAMMAR.match(text), text
        assert world.CAPTION_PATTERN.match(text), text
        assert text == text.lower()


def test_all_captions():
    every = list(world.all_captions())
    canon = list(world.all_captions(canonical_only=True))
    assert len(every) == len(set(every)) == 18 + 18 * 17 * 4
    assert len(canon) == len(set(canon)) == 18 + 18 * 17 // 2 * 4
    assert set(canon) <= set(every)
    assert all(GRAMMAR.match(t) for t in every)
    assert not any(world.CAPTION_PATTERN.match(t) is None for t in every)
    assert not world.CAPTION_PATTERN.match("a red circle above")
    assert not world.CAPTION_PATTERN.match("a pink circle")
    sampled = {world.caption(world.scene_for_seed(s)) for s in range(N)}
    assert sampled <= set(canon)


def test_bounds_and_no_overlap(scenes):
    for scene in scenes:
        for s in scene.shapes:
            assert world.MIN_SIZE <= s.size <= world.MAX_SIZE
            x0, y0, x1, y1 = s.bbox
            assert 0 <= x0 and 0 <= y0 and x1 < world.IMAGE_SIZE and y1 < world.IMAGE_SIZE
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            ax0, ay0, ax1, ay1 = a.bbox
            bx0, by0, bx1, by1 = b.bbox
            disjoint = ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
            assert disjoint, scene
            assert (a.color, a.shape) != (b.color, b.shape)


def test_relation_is_clear_and_canonical(scenes):
    for scene in scenes:
        if len(scene.shapes) == 1:
            assert scene.relation is None
            continue
        first, second = scene.shapes
        assert (world.COLORS.index(first.color), world.SHAPES.index(first.shape)) < (
            world.COLORS.index(second.color),
            world.SHAPES.index(second.shape),
        )
        dx, dy = second.cx - first.cx, second.cy - first.cy
        expected = {
            "above": dy >= first.size + second.size + world.GAP and abs(dx) <= 2 * world.JITTER,
            "below": -dy >= first.size + second.size + world.GAP and abs(dx) <= 2 * world.JITTER,
            "left of": dx >= first.size + second.size + world.GAP and abs(dy) <= 2 * world.JITTER,
            "right of": -dx >= first.size + second.size + world.GAP and abs(dy) <= 2 * world.JITTER,
        }
        assert [r for r, holds in expected.items() if holds] == [scene.relation], scene


def test_coverage(scenes):
    n_shapes = Counter(len(s.shapes) for s in scenes)
    assert 0.4 * N < n_shapes[1] < 0.6 * N
    rels = Counter(s.relation for s in scenes if s.relation)
    assert set(rels) == set(world.RELATIONS)
    assert min(rels.values()) > 0.08 * N
    assert {c for s in scenes for c in (x.color for x in s.shapes)} == set(world.COLORS)
    assert {k for s in scenes for k in (x.shape for x in s.shapes)} == set(world.SHAPES)
    assert len({x.size for s in scenes for x in s.shapes}) == world.MAX_SIZE - world.MIN_SIZE + 1


def test_render_colors(scenes):
    for scene in scenes[:100]:
        img = world.render(scene)
        assert img.mode == "RGB" and img.size == (64, 64)
        px = np.asarray(img)
        for s in scene.shapes:
            assert tuple(px[s.cy, s.cx]) == world.COLOR_RGB[s.color]
            # circle and triangle leave the top-left corner of their box empty, a square fills it
            corner = tuple(px[s.cy - s.size, s.cx - s.size])
            if s.shape == "square":
                assert corner == world.COLOR_RGB[s.color]
            else:
                assert corner == world.BACKGROUND_RGB
        assert tuple(px[0, 0]) == world.BACKGROUND_RGB  # MARGIN keeps the border free
        colors = {tuple(c) for c in px.reshape(-1, 3)}
        assert colors == {world.BACKGROUND_RGB} | {world.COLOR_RGB[s.color] for s in scene.shapes}


def test_render_scaled():
    scene = world.scene_for_seed(3)
    big = np.asarray(world.render(scene, size=128))
    assert big.shape == (128, 128, 3)
    for s in scene.shapes:
        assert tuple(big[2 * s.cy, 2 * s.cx]) == world.COLOR_RGB[s.color]
