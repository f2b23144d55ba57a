"""The ``mmgen`` command. User errors print one line on stderr and exit with status 2.

Every option and path a command takes is checked before it loads a model or does other work (the
limits of :mod:`mmgen_engine.runtime.limits`, writable outputs). Long commands draw a tqdm
progress bar on stderr when stderr is a terminal, unless ``--quiet``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import runpy
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from .config import BUILTIN_GENERATION_DEFAULTS, DTYPES
from .errors import InputError, MMGenError, one_line
from .pipelines.stages import BACKENDS

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@contextlib.contextmanager
def _progress_bar(args, desc: str, unit: str):
    """Yields a ``progress(done, total)`` callback (``total`` may be None: unknown) that draws a
    tqdm bar on stderr, or None, no bar, with ``--quiet`` or when stderr is not a terminal (a log
    file or a pipe would fill with carriage returns). The bar is erased when the block ends, so
    only the command's result (or its one-line error) stays on the screen. A ``unit`` of "B" counts
    bytes, shown in KiB, MiB, GiB."""
    if args.quiet or not sys.stderr.isatty():
        yield None
        return
    with tqdm(desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, file=sys.stderr, leave=False,
              dynamic_ncols=True) as bar:
        def progress(done: int, total: int | None) -> None:
            if total != bar.total:
                bar.total = total
                bar.refresh()
            bar.update(done - bar.n)

        yield progress


def _check_output_dir(path: Path) -> None:
    """InputError unless ``path`` is a directory, or can be made one, where this process may write."""
    existing = path
    while not existing.exists() and existing != existing.parent:  # its nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{path}: cannot make the output directory there ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write there: no write permission in {existing}")


def _convert(args) -> None:
    from . import convert

    with _progress_bar(args, "converting", "B") as progress:
        out = convert(args.src, args.out, source_format=args.source_format, dtype=args.dtype,
                      trust_pickle=args.trust_pickle, overwrite=args.overwrite, progress=progress,
                      quantize=args.quantize)
    print(f"converted {args.src} -> {out}")


def _export_onnx(args) -> None:
    from .onnx import export_onnx

    parts = [p for item in args.parts for p in item.split(",") if p] if args.parts else None
    _check_output_dir(Path(args.out))
    out = export_onnx(args.dir, args.out, parts=parts, dtype=args.dtype, opset=args.opset)
    print(f"exported {args.dir} -> {out}")


def _caption(args) -> None:
    from . import load
    from .files import open_regular_file
    from .runtime.limits import MAX_IMAGES_PER_CALL, check_new_tokens, check_prompt
    from .runtime.sampler import MAX_BEAMS, SamplingParams

    if args.max_new_tokens is not None:  # None: the checkpoint's generation defaults
        check_new_tokens(args.max_new_tokens)
    if args.prompt is not None:
        check_prompt(args.prompt)
    given = {name: getattr(args, name) for name in _DECODING_FLAGS if getattr(args, name) is not None}
    probe = dict(given)
    if "num_return_sequences" in probe and "num_beams" not in probe:  # the checkpoint's beams are not known yet
        probe["num_beams"] = MAX_BEAMS
    SamplingParams(**probe)  # bad values fail here, before the model loads
    for image in args.images:  # every file is there and a regular file before the model loads
        open_regular_file(Path(image), "image file").close()
    pipe = load(args.model, device=args.device, dtype=args.dtype, **_backends(args))
    if pipe.task != "captioning":
        raise MMGenError(f"{args.model}: a {pipe.task} checkpoint, not a captioning one")
    sampling = dataclasses.replace(pipe.default_sampling, **given) if given else None  # only the flags given
    per_image = (sampling or pipe.default_sampling).num_return_sequences
    captions = []
    for start in range(0, len(args.images), MAX_IMAGES_PER_CALL):  # any number of images, in calls the API takes
        captions += pipe.caption(args.images[start:start + MAX_IMAGES_PER_CALL], max_new_tokens=args.max_new_tokens,
                                 sampling=sampling, prompt=args.prompt)
    rows = [(image, captions[i * per_image:(i + 1) * per_image]) for i, image in enumerate(args.images)]
    if args.json:
        print(json.dumps([{"image": str(i), "caption": c[0], **({"captions": c} if per_image > 1 else {})}
                          for i, c in rows], indent=2))
    else:
        for image, image_captions in rows:
            for caption in image_captions:
                print(f"{image}: {caption}" if len(args.images) > 1 or per_image > 1 else caption)


def _txt2img(args) -> None:
    from . import load
    from .pipelines.poses import atomic_output, check_output_file
    from .pipelines.text_to_image import image_grid
    from .runtime.limits import MAX_IMAGES_PER_CALL, check_prompt

    max_grid = math.isqrt(MAX_IMAGES_PER_CALL)
    if not 1 <= args.grid <= max_grid:
        raise InputError(f"--grid must be in [1, {max_grid}] (an NxN grid; at most {MAX_IMAGES_PER_CALL} images "
                         f"per call), got {args.grid}")
    out = check_output_file(args.output, (".png",))
    check_prompt(args.prompt)
    given = _given(args, temperature="temperature", top_k="top_k", guidance_scale="guidance", seed="seed")
    pipe = load(args.model, device=args.device, dtype=args.dtype, **_backends(args))
    if pipe.task != "text-to-image":
        raise MMGenError(f"{args.model}: a {pipe.task} checkpoint, not a text-to-image one")
    sampling = dataclasses.replace(pipe.default_sampling, **given)
    with _progress_bar(args, "image tokens", "token") as progress:
        images = pipe.generate(args.prompt, images_per_prompt=args.grid ** 2, sampling=sampling, progress=progress)
    with atomic_output(out) as tmp:
        image_grid(images, args.grid).save(tmp, format="PNG")
    print(f"{out}: {args.grid}x{args.grid} grid of {images[0].size[0]}x{images[0].size[1]} images")


def _gesture(args) -> None:
    from . import load
    from .pipelines.audio import open_audio, read_wav
    from .pipelines.poses import SUFFIXES, check_output_file, save_poses

    out = check_output_file(args.output, SUFFIXES)
    given = _given(args, temperature="temperature", top_p="top_p", seed="seed")
    if args.greedy:
        if {"temperature", "top_p"} & given.keys():
            raise InputError("--greedy takes the most likely token: leave out --temperature and --top-p")
        given = {**given, "do_sample": False}
    audio = open_audio(args.audio)  # the header checked before the model loads; decoded as windows need it
    pipe = load(args.model, device=args.device, dtype=args.dtype, **_backends(args))
    if pipe.task != "speech-to-gesture":
        raise MMGenError(f"{args.model}: a {pipe.task} checkpoint, not a speech-to-gesture one")
    sampling = dataclasses.replace(pipe.default_sampling, **given)
    with _progress_bar(args, "gesture windows", "window") as progress:
        poses = pipe.generate(audio, sampling=sampling, progress=progress)
    # only an MP4 carries the speech: the whole file is read for it, after generation
    speech = read_wav(args.audio, mono=True) if out.suffix.lower() == ".mp4" else (None, None)
    save_poses(out, poses, pipe.fps, audio=speech[0], sample_rate=speech[1])
    print(f"{out}: {poses.shape[0]} frames of {poses.shape[1]} joints at {pipe.fps:g} fps")


def _backends(args) -> dict:
    """``mm.load``'s ONNX Runtime and quantization options from the command line."""
    return {"stage_backend": args.stage_backend, "runtime": args.runtime, "onnx_dir": args.onnx_dir,
            "quantize": args.quantize}


def _add_backend_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--stage-backend", choices=("auto", *BACKENDS), default="auto",
                   help="who runs the one-shot stages (encoders, detokenizer, motion decoder): the engine, or "
                        "ONNX Runtime over an export of the checkpoint made on first use (the [onnx] extra; "
                        "[onnx-gpu] on CUDA); auto (default): ONNX Runtime for the stages measured faster on "
                        "it on CPU (large image encoders) where the [onnx] extra is installed, else the engine")
    c.add_argument("--runtime", choices=BACKENDS, default="engine",
                   help="who runs the decode loop: the engine, or ONNX Runtime over the exported decoder "
                        "(greedy only)")
    c.add_argument("--onnx-dir", default=None, metavar="DIR",
                   help="where the ONNX export is kept (default: CKPT/onnx/DTYPE where writable, else the "
                        "user's cache, $MMGEN_CACHE_DIR or ~/.cache/mmgen_engine)")
    c.add_argument("--quantize", default=None, metavar="int8[-gN]", help=QUANTIZE_HELP + " at load")


QUANTIZE_HELP = ("weight-only int8 for the decoder's linear layers and head: 'int8' (scales per output channel) "
                 "or 'int8-gN' (per group of N input columns, e.g. int8-g128)")


def _given(args, **flags) -> dict:
    """The sampling fields (``field=attribute`` of ``args``) that the command line gives, each checked
    (as ``mm.SamplingParams`` checks it) before the model loads; the fields left out come from the
    checkpoint's generation defaults. A temperature, top-k or top-p given means sampling with it."""
    from . import SamplingParams

    given = {field: getattr(args, attr) for field, attr in flags.items() if getattr(args, attr) is not None}
    if {"temperature", "top_k", "top_p"} & given.keys():
        given["do_sample"] = True
    SamplingParams(**given)  # InputError: one line, exit status 2
    return given


def _demo(args) -> None:
    from .demo import run_demo, run_gesture_demo, run_txt2img_demo

    _check_output_dir(Path(args.out))
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


def _serve(args) -> None:
    try:
        from .serving.http import ServerConfig, parse_model_args, serve, start_engines
    except ImportError as e:
        raise MMGenError(f"mmgen serve needs FastAPI, uvicorn and prometheus-client ({one_line(e)}): "
                         f"pip install 'mmgen_engine[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_mb <= 0:
        raise InputError(f"--max-body-mb must be positive, got {args.max_body_mb:g}")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise InputError(f"--request-timeout must be positive, got {args.request_timeout:g}")
    config = ServerConfig(parse_model_args(args.model), args.device, args.dtype, args.slots, args.max_queued,
                          int(args.max_body_mb * 2**20), args.max_images, args.max_n, args.max_prompt_chars,
                          args.request_timeout, args.grace, not args.no_cuda_graphs, args.quantize)
    if args.ray:
        from .serving.ray import serve_ray

        autoscaling = None
        if args.autoscale is not None:
            low, sep, high = args.autoscale.partition(":")
            if not (sep and low.isdigit() and high.isdigit() and 0 <= int(low) <= int(high) and int(high) >= 1):
                raise InputError(f"--autoscale takes MIN:MAX replicas (0 <= MIN <= MAX, MAX >= 1), "
                                 f"got {args.autoscale!r}")
            autoscaling = {"min_replicas": int(low), "max_replicas": int(high)}
        serve_ray(config, args.replicas, address=args.ray_address, host=args.host, port=args.port,
                  autoscaling=autoscaling, num_gpus=args.gpus_per_replica)
    else:
        if args.replicas != 1 or args.ray_address is not None or args.autoscale or args.gpus_per_replica is not None:
            raise InputError("--replicas, --ray-address, --autoscale and --gpus-per-replica take --ray")
        serve(config, args.host, args.port, args.log_level, start_engines(config))


def _bench(args) -> None:
    script = BENCHMARKS_DIR / f"bench_{args.name}.py"
    if not script.is_file():
        raise MMGenError(f"benchmark {args.name!r} not found (looked for {script}; benchmarks ship with "
                         f"the source repository)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")


_CHECKPOINT = "the checkpoint's generation defaults"
_FROM_CHECKPOINT = ("Options left out take the checkpoint's generation defaults (config.json "
                    "\"generation_defaults\", written by `mmgen convert` from the source model) and, where the "
                    "checkpoint has none, the built-in defaults shown.")
_CAPTION_BUILTIN = BUILTIN_GENERATION_DEFAULTS["captioning"]["max_new_tokens"]


_DECODING_FLAGS = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences", "repetition_penalty",
                   "no_repeat_ngram_size")


def _early_stopping(value: str):
    choices = {"true": True, "false": False, "never": "never"}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")
    return choices[value.lower()]


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
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--quantize", default=None, metavar="int8[-gN]",
                   help=QUANTIZE_HELP + "; recorded in config.json, loaded as stored")
    c.set_defaults(func=_convert)

    c = sub.add_parser("export-onnx", help="export a converted checkpoint's one-shot stages as ONNX models",
                       description="Export the one-shot stages of a converted checkpoint (image, text and audio "
                                   "encoders, the image detokenizer, the motion decoder) as ONNX models with a "
                                   "dynamic batch, plus manifest.json (needs the [onnx] extra).")
    c.add_argument("dir", help="converted checkpoint directory")
    c.add_argument("out", help="new (or empty) output directory")
    c.add_argument("--parts", nargs="+", default=None, metavar="PART",
                   help="parts to export (default: all of the checkpoint's task), e.g. image_encoder; "
                        "text_encoder detokenizer; audio_encoder motion_decoder")
    c.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: the checkpoint's)")
    c.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    c.set_defaults(func=_export_onnx)

    c = sub.add_parser("caption", help="caption images",
                       description="Caption images. They are decoded as the checkpoint's generation defaults say "
                                   "(config.json \"generation_defaults\", written by `mmgen convert` from the source "
                                   "model: greedy or beam search, repetition controls, the token budget) and, where "
                                   "the checkpoint has none, greedily; options given override them.")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--model", required=True, help="converted checkpoint directory")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=DTYPES, default=None)
    _add_backend_options(c)
    c.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"most tokens per caption (default: from the checkpoint's generation defaults; "
                        f"{_CAPTION_BUILTIN} without them)")
    c.add_argument("--prompt", help="text the captions continue (and start with), e.g. BLIP's \"a picture of\"; "
                   "LLaVA: the conversation with one <image> where the image goes, e.g. \"USER: <image>\\nWhat "
                   "is on the table? ASSISTANT:\" (the caption is the answer)")
    c.add_argument("--num-beams", type=int, default=None, metavar="K",
                   help=f"beam search with K beams, as transformers' generate (default: {_CHECKPOINT}; greedy "
                        f"without them)")
    c.add_argument("--length-penalty", type=float, default=None, metavar="X",
                   help=f"beam scores are divided by length ** X (default: {_CHECKPOINT}; 1 without them)")
    c.add_argument("--early-stopping", type=_early_stopping, default=None, metavar="{true,false,never}",
                   help=f"when a beam search stops, as transformers' (default: {_CHECKPOINT}; false without them)")
    c.add_argument("--num-return-sequences", type=int, default=None, metavar="N",
                   help=f"print the N best beams per image (default: {_CHECKPOINT}; 1 without them)")
    c.add_argument("--repetition-penalty", type=float, default=None, metavar="P",
                   help=f"CTRL's penalty on tokens already in the caption (default: {_CHECKPOINT}; 1 = none "
                        f"without them)")
    c.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help=f"no N-gram twice (default: {_CHECKPOINT}; 0 = off without them)")
    c.add_argument("--json", action="store_true", help="print JSON instead of plain text")
    c.set_defaults(func=_caption)

    c = sub.add_parser("txt2img", help="generate images from a prompt (text-to-image checkpoint)",
                       description=f"Generate images from a prompt. {_FROM_CHECKPOINT}")
    c.add_argument("prompt")
    c.add_argument("--model", required=True, help="converted checkpoint directory")
    c.add_argument("-o", "--output", required=True, help="output PNG (a grid of the images)")
    c.add_argument("--grid", type=int, default=1, help="N: generate an NxN grid (default 1)")
    builtin = BUILTIN_GENERATION_DEFAULTS["text-to-image"]["sampling"]
    c.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"sample among the K most likely image tokens (default: {_CHECKPOINT}; min-dalle's "
                        f"{builtin['top_k']} without them)")
    c.add_argument("--guidance", type=float, default=None, metavar="S",
                   help=f"supercondition factor (default: {_CHECKPOINT}; min-dalle's {builtin['guidance_scale']:g} "
                        f"without them)")
    c.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"divides the logits (default: {_CHECKPOINT}; 1 without them)")
    c.add_argument("--seed", type=int, default=None,
                   help=f"makes the images reproducible (default: {_CHECKPOINT}; none without them: new "
                        f"images every run)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=DTYPES, default=None)
    _add_backend_options(c)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_txt2img)

    builtin = BUILTIN_GENERATION_DEFAULTS["speech-to-gesture"]["sampling"]
    c = sub.add_parser("gesture", help="generate gestures for speech (speech-to-gesture checkpoint)",
                       description=f"Generate gestures for speech. {_FROM_CHECKPOINT}")
    c.add_argument("audio", help="speech as a WAV file (any PCM/float format and sample rate)")
    c.add_argument("--model", required=True, help="converted checkpoint directory")
    c.add_argument("-o", "--output", required=True, help="output .npz (poses, fps, skeleton), .gif or .mp4 "
                   "(stick figure; the MP4 carries the speech)")
    c.add_argument("--seed", type=int, default=None,
                   help=f"sampling seed (default: {_CHECKPOINT}; {builtin['seed']} without them)")
    c.add_argument("--top-p", type=float, default=None, metavar="P",
                   help=f"nucleus sampling (default: {_CHECKPOINT}; {builtin['top_p']:g} without them)")
    c.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"divides the logits (default: {_CHECKPOINT}; {builtin['temperature']:g} without them)")
    c.add_argument("--greedy", action="store_true",
                   help="always take the most likely motion token (default: sample as the checkpoint's "
                        "generation defaults say)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=DTYPES, default=None)
    _add_backend_options(c)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_gesture)

    c = sub.add_parser("demo", help="run every bundled demo model")
    c.add_argument("--out", default="out/demo", help="directory for the demo outputs")
    c.set_defaults(func=_demo)

    c = sub.add_parser("serve", help="serve models over HTTP (captions, images, gestures; needs the [serve] extra)",
                       description="Serve converted models over HTTP: POST /v1/captions, /v1/images/generations "
                                   "(the OpenAI Images API), /v1/gestures, with stream=true for Server-Sent Events; "
                                   "GET / (a playground page), /health, /v1/models, /metrics (Prometheus). One "
                                   "engine with continuous batching per model. SIGTERM stops accepting, lets "
                                   "requests in flight finish for --grace seconds, then cancels the rest.")
    c.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                   help="a converted checkpoint to serve, named NAME (default: the directory's name); repeatable")
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    c.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=DTYPES, default=None)
    c.add_argument("--quantize", default=None, metavar="int8[-gN]", help=QUANTIZE_HELP + " at load, every model")
    c.add_argument("--slots", type=int, default=8, help="decoder rows each model decodes at once (default 8)")
    c.add_argument("--max-queued", type=int, default=64, metavar="M",
                   help="requests that may wait for a slot per model; more are answered 429 (default 64)")
    c.add_argument("--max-body-mb", type=float, default=32, metavar="MB",
                   help="largest request body (uploads included), refused with 413 before it is read (default 32)")
    c.add_argument("--max-images", type=int, default=16, metavar="N", help="images per caption request (default 16)")
    c.add_argument("--max-n", type=int, default=16, metavar="N", help="images per image request (default 16)")
    c.add_argument("--max-prompt-chars", type=int, default=4096, metavar="N",
                   help="longest prompt in characters (default 4096)")
    c.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="a request not finished S seconds after it arrived fails with 504 (default: none)")
    c.add_argument("--grace", type=float, default=30, metavar="S",
                   help="on SIGTERM, seconds requests in flight may take to finish (default 30)")
    c.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, decode eagerly")
    c.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    c.add_argument("--ray", action="store_true", help="run on Ray Serve (needs the [ray] extra): --replicas "
                   "engines behind Ray's HTTP proxy, on a local Ray instance or the cluster at --ray-address")
    c.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: replicas (default 1)")
    c.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="with --ray: let Ray Serve's autoscaler run MIN to MAX replicas by load (instead of "
                        "--replicas)")
    c.add_argument("--gpus-per-replica", type=float, default=None, metavar="X",
                   help="with --ray: GPUs each replica reserves (default 1 on CUDA, 0 on CPU; 0.5 puts two on a GPU)")
    c.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray: the Ray cluster to join (e.g. ray://head:10001 or auto; default: start a "
                        "local Ray instance)")
    c.set_defaults(func=_serve)

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
