"""The bundled demo captioner: accuracy on held-out scenes, and ``mmgen demo`` end to end."""
from __future__ import annotations

import subprocess
import sys

import PIL.Image
import pytest

import mmgen_engine as mm
from mmgen_engine import InputError
from mmgen_engine.demo.world import CAPTION_PATTERN, HELD_OUT_SEED, sample

# fixed held-out scenes: seeds >= HELD_OUT_SEED never appear in training
EVAL_SEED, EVAL_COUNT = HELD_OUT_SEED + 50_000, 300


def test_demo_captioner_is_exact_on_at_least_90_percent_of_held_out_scenes():
    pipe = mm.load(mm.demo_model("captioning"))
    items = sample(EVAL_COUNT, EVAL_SEED)
    captions = []
    for start in range(0, EVAL_COUNT, 50):
        captions += pipe.caption([image for image, _ in items[start:start + 50]], max_new_tokens=16)
    exact = sum(c == want for c, (_, want) in zip(captions, items)) / EVAL_COUNT
    assert exact >= 0.90, f"exact-match rate {exact:.3f}"
    assert all(CAPTION_PATTERN.match(c) for c in captions[:50])


def test_demo_model_lookup():
    assert (mm.demo_model("captioning") / "config.json").is_file()
    with pytest.raises(InputError, match="unknown demo task"):
        mm.demo_model("poetry")


def test_mmgen_demo_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmgen_engine.cli", "demo", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(tmp_path.glob("caption_*.png"))
    assert len(pngs) == 4
    lines = [l for l in proc.stdout.splitlines() if ".png:" in l]
    assert len(lines) == 4 and all(CAPTION_PATTERN.match(l.split(": ", 1)[1].split("  [")[0]) for l in lines)
    with PIL.Image.open(tmp_path / "txt2img_grid.png") as grid:  # 6 prompts x 4 images of 64x64
        assert grid.size == (4 * 64, 6 * 64)
    assert "text-to-image demo" in proc.stdout
    with PIL.Image.open(tmp_path / "gesture.gif") as gif:  # 8 s of held-out speech at 15 fps
        assert gif.n_frames > 1
    assert "speech-to-gesture demo" in proc.stdout
