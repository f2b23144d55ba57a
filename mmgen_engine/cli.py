"""The ``mmgen`` command. User errors print one line on stderr and exit with status 2."""
from __future__ import annotations

import argparse
import json
import runpy
import sys
import warnings
from pathlib import Path

from .config import DTYPES
from .errors import MMGenError, one_line

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _convert(args) -> None:
    from . import convert

    out = convert(args.src, args.out, source_format=args.source_format, dtype=args.dtype,
                  trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    print(f"converted {args.src} -> {out}")


def _caption(args) -> None:
    from . import load

    pipe = load(args.model, device=args.device, dtype=args.dtype)
    if pipe.task != "captioning":
        raise MMGenError(f"{args.model}: a {pipe.task} checkpoint, not a captioning one")
    captions = pipe.caption(args.images, max_new_tokens=args.max_new_tokens, prompt=args.prompt)
    if args.json:
        print(json.dumps([{"image": str(i), "caption": c} for i, c in zip(args.images, captions)], indent=2))
    else:
        for image, caption in zip(args.images, captions):
            print(f"{image}: {caption}" if len(args.images) > 1 else caption)


def _txt2img(args) -> None:
    from . import SamplingParams, load
    from .pipelines.text_to_image import image_grid

    if args.grid < 1:
        raise MMGenError(f"--grid must be a positive integer, got {args.grid}")
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise MMGenError(f"{out}: the output must be a .png file")
    pipe = load(args.model, device=args.device, dtype=args.dtype)
    if pipe.task != "text-to-image":
        raise MMGenError(f"{args.model}: a {pipe.task} checkpoint, not a text-to-image one")
    sampling = SamplingParams(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                              guidance_scale=args.guidance, seed=args.seed)
    images = pipe.generate(args.prompt, images_per_prompt=args.grid ** 2, sampling=sampling)
    image_grid(images, args.grid).save(out)
    print(f"{out}: {args.grid}x{args.grid} grid of {images[0].size[0]}x{images[0].size[1]} images")


def _gesture(args) -> None:
    from . import SamplingParams, load
    from .pipelines.audio import read_wav
    from .pipelines.poses import SUFFIXES, save_poses

    out = Path(args.output)
    if out.suffix.lower() not in SUFFIXES:
        raise MMGenError(f"{out}: the output must be one of {', '.join(SUFFIXES)}")
    if not out.parent.is_dir() or out.is_dir():
        raise MMGenError(f"{out}: cannot write there (no such directory, or a directory of that name)")
    pipe = load(args.model, device=args.device, dtype=args.dtype)
    if pipe.task != "speech-to-gesture":
        raise MMGenError(f"{args.model}: a {pipe.task} checkpoint, not a speech-to-gesture one")
    sampling = SamplingParams() if args.greedy else SamplingParams(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    audio, rate = read_wav(args.audio, mono=True)  # read once: the MP4 carries it too
    poses = pipe.generate(audio, rate, sampling=sampling)
    save_poses(out, poses, pipe.fps, audio=audio, sample_rate=rate)
    print(f"{out}: {poses.shape[0]} frames of {poses.shape[1]} joints at {pipe.fps:g} fps")


def _demo(args) -> None:
    from .demo import run_demo, run_gesture_demo, run_txt2img_demo

    print("captioning demo (shapes world, bundled demo model):")
    for r in run_demo(Path(args.out)):
        mark = "ok" if r["caption"] == r["expected"] else f"expected: {r['expected']}"
        print(f"  {r['image']}: {r['caption']}  [{mark}]")
    grid, results = run_txt2img_demo(Path(args.out))
    print(f"text-to-image demo: {grid} (a row per prompt), each image captioned by the demo captioner:")
    for r in results:
        print(f"  {r['prompt']}: {r['caption']}  [{'ok' if r['caption'] == r['prompt'] else 'differs'}]")
    g = run_gesture_demo(Path(args.out))
    print(f"speech-to-gesture demo: {g['gif']} ({g['seconds']:g} s of held-out synthetic speech; poses in "
          f"{g['npz']}): wrist motion {g['speech_motion']:.2f} per frame for speech, "
          f"{g['silence_motion']:.2f} for near-silence")


def _bench(args) -> None:
    script = BENCHMARKS_DIR / f"bench_{args.name}.py"
    if not script.is_file():
        raise MMGenError(f"benchmark {args.name!r} not found (looked for {script}; benchmarks ship with "
                         f"the source repository)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (``mmgen -h`` still prints the full help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmgen", description="mmgen_engine: fast multimodal generation")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="convert an upstream checkpoint to the engine format")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--from", dest="source_format", default=None, help="source format (default: detect)")
    c.add_argument("--dtype", choices=DTYPES, default=None)
    c.add_argument("--trust-pickle", action="store_true", help="allow sources that need full unpickling")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    c.set_defaults(func=_convert)

    c = sub.add_parser("caption", help="caption images")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--model", required=True, help="converted checkpoint directory")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=DTYPES, default=None)
    c.add_argument("--max-new-tokens", type=int, default=20)
    c.add_argument("--prompt", help="text the captions continue (and start with), e.g. BLIP's \"a picture of\"")
    c.add_argument("--json", action="store_true", help="print JSON instead of plain text")
    c.set_defaults(func=_caption)

    from .pipelines.text_to_image import DEFAULT_SAMPLING

    c = sub.add_parser("txt2img", help="generate images from a prompt (text-to-image checkpoint)")
    c.add_argument("prompt")
    c.add_argument("--model", required=True, help="converted checkpoint directory")
    c.add_argument("-o", "--output", required=True, help="output PNG (a grid of the images)")
    c.add_argument("--grid", type=int, default=1, help="N: generate an NxN grid (default 1)")
    c.add_argument("--top-k", type=int, default=DEFAULT_SAMPLING.top_k)
    c.add_argument("--guidance", type=float, default=DEFAULT_SAMPLING.guidance_scale,
                   help="supercondition factor (min-dalle's default 16)")
    c.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING.temperature)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=DTYPES, default=None)
    c.set_defaults(func=_txt2img)

    from .pipelines.speech_to_gesture import DEFAULT_SAMPLING as GESTURE_SAMPLING

    c = sub.add_parser("gesture", help="generate gestures for speech (speech-to-gesture checkpoint)")
    c.add_argument("audio", help="speech as a WAV file (any PCM/float format and sample rate)")
    c.add_argument("--model", required=True, help="converted checkpoint directory")
    c.add_argument("-o", "--output", required=True, help="output .npz (poses, fps, skeleton), .gif or .mp4 "
                   "(stick figure; the MP4 carries the speech)")
    c.add_argument("--seed", type=int, default=GESTURE_SAMPLING.seed)
    c.add_argument("--top-p", type=float, default=GESTURE_SAMPLING.top_p)
    c.add_argument("--temperature", type=float, default=GESTURE_SAMPLING.temperature)
    c.add_argument("--greedy", action="store_true", help="always take the most likely motion token")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=DTYPES, default=None)
    c.set_defaults(func=_gesture)

    c = sub.add_parser("demo", help="run every bundled demo model")
    c.add_argument("--out", default="out/demo", help="directory for the demo outputs")
    c.set_defaults(func=_demo)

    c = sub.add_parser("bench", help="run a benchmark from benchmarks/ (e.g. `mmgen bench caption`)")
    c.add_argument("name")
    c.add_argument("rest", nargs=argparse.REMAINDER)
    c.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"mmgen: warning: {message}\n"
    try:
        args.func(args)
    except (MMGenError, OSError) as e:  # OSError: an unwritable output, a full disk, ...
        print(f"mmgen: error: {one_line(e, limit=1000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmgen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
