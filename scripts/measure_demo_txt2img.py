"""Measure how often the bundled text-to-image demo model draws what its prompt says.

For every one-object prompt of the shapes world (``a {color} {shape}``: 18 prompts) and each of
``--seeds`` generator seeds, one image is drawn with the checkpoint's generation defaults (what
``pipe.generate(prompt)`` and ``mmgen txt2img`` use when no sampling is given; only the seed is set,
so the rate is reproducible) and captioned with the bundled demo captioner. Printed per sampling:

* exact: the caption is the prompt (one shape, of the prompt's color and shape, nothing else);
* color+shape: the caption mentions the prompt's colored shape (perhaps with a second shape).

``--seeds N --first-seed S`` chooses the seeds (default 1..8). ``--builtin`` also measures
min-dalle's own defaults (top-k 256, supercondition 16, temperature 1), what the model was sampled
with before its checkpoint carried generation defaults, and ``--sampling T,K,G`` any other temperature,
top-k and supercondition factor (repeatable). CPU, 2 threads: about 10 s per sampling at the default
8 seeds (min-dalle's top-k 256 is slower: about a minute)::

    python scripts/measure_demo_txt2img.py [--seeds 8] [--builtin] [--sampling 1,2,2]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mmgen_engine as mm  # noqa: E402
from mmgen_engine.demo import world  # noqa: E402
from mmgen_engine.pipelines.detokenizer import to_pil  # noqa: E402
from mmgen_engine.pipelines.text_to_image import DEFAULT_SAMPLING  # noqa: E402

PROMPTS = list(itertools.islice(world.all_captions(), len(world.COLORS) * len(world.SHAPES)))


def rates(pipe, captioner, sampling: mm.SamplingParams, seeds: list[int]) -> tuple[float, float]:
    """``(exact, color+shape)`` rates of the images drawn with ``sampling`` (its seed replaced by each
    of ``seeds``) for every one-object prompt."""
    text = pipe.tokenize(PROMPTS)
    exact = found = 0
    for seed in seeds:
        tokens = pipe.generate_tokens(text, dataclasses.replace(sampling, seed=seed))
        captions = captioner.caption(to_pil(pipe.decode_tokens(tokens)))
        for caption, prompt in zip(captions, PROMPTS):
            exact += caption == prompt
            found += prompt in re.findall(r"\ba \w+ \w+", caption)
    n = len(seeds) * len(PROMPTS)
    return exact / n, found / n


def describe(s: mm.SamplingParams) -> str:
    mode = f"top-k {s.top_k}" if s.do_sample else "greedy"
    return f"{mode}, supercondition {s.guidance_scale:g}, temperature {s.temperature:g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="text-to-image checkpoint (default: the bundled demo model)")
    ap.add_argument("--seeds", type=int, default=8, help="images per prompt (generator seeds FIRST..FIRST+N-1)")
    ap.add_argument("--first-seed", type=int, default=1, metavar="FIRST")
    ap.add_argument("--builtin", action="store_true", help="also measure min-dalle's defaults (top-k 256, 16)")
    ap.add_argument("--sampling", action="append", default=[], metavar="T,K,G",
                    help="also measure temperature T, top-k K, supercondition G")
    args = ap.parse_args()
    pipe = mm.load(args.model or mm.demo_model("text-to-image"))
    captioner = mm.load(mm.demo_model("captioning"))
    samplings = [("checkpoint defaults", pipe.default_sampling)]
    if args.builtin:
        samplings.append(("min-dalle's defaults", DEFAULT_SAMPLING))
    for spec in args.sampling:
        t, k, g = spec.split(",")
        samplings.append(("given", mm.SamplingParams(do_sample=True, temperature=float(t), top_k=int(k),
                                                     guidance_scale=float(g))))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"{len(PROMPTS)} one-object prompts x {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), captioned by the "
          f"demo captioner")
    for name, sampling in samplings:
        start = time.time()
        exact, found = rates(pipe, captioner, sampling, seeds)
        print(f"{name} ({describe(sampling)}): exact {exact:.1%}, color+shape {found:.1%} "
              f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
