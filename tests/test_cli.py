"""``mmgen convert`` and ``mmgen caption`` end to end as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image

import mmgen_engine as mm

from hf_models import make_model, save


def run(*args):
    return subprocess.run([sys.executable, "-m", "mmgen_engine.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_convert_then_caption(tmp_path):
    src = save(make_model(seed=21), tmp_path / "hf")
    proc = run("convert", src, tmp_path / "engine", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    rng = np.random.default_rng(0)
    images = []
    for i, shape in enumerate([(32, 32), (60, 45)]):
        path = tmp_path / f"img{i}.{'png' if i == 0 else 'jpg'}"
        PIL.Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
        images.append(path)
    proc = run("caption", *images, "--model", tmp_path / "engine", "--json", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected = mm.load(tmp_path / "engine").caption(images, max_new_tokens=8)
    assert [r["caption"] for r in result] == expected and [r["image"] for r in result] == list(map(str, images))
    proc = run("caption", images[0], "--model", tmp_path / "engine", "--max-new-tokens", "8")
    assert proc.returncode == 0 and proc.stdout.strip() == expected[0]
