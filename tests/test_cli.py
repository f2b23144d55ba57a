"""``mmgen convert`` and ``mmgen caption`` end to end as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image
from hf_models import make_model, save

import mmgen_engine as mm


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


def test_blip_caption_with_a_prompt(tmp_path):
    from hf_models import make_blip, save_blip
    src = save_blip(make_blip(seed=3), tmp_path / "hf")
    assert run("convert", src, tmp_path / "engine").returncode == 0
    image = tmp_path / "img.png"
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    proc = run("caption", image, "--model", tmp_path / "engine", "--prompt", "W5 w6", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    expected = mm.load(tmp_path / "engine").caption([image], max_new_tokens=6, prompt="w5 w6")[0]
    assert proc.stdout.strip() == expected and expected.startswith("w5 w6 ")
