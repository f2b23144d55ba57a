"""Speech-to-gesture output: 2D upper-body pose sequences -> stick-figure frames, NPZ, GIF, MP4.

Poses use the skeleton of the PATS dataset (Ahuja et al. 2020, OpenPose's body and hand joints):
``JOINT_NAMES[i]`` is joint ``i``, ``PARENTS[i]`` its parent (``-1`` for the root, joint 0 = Neck);
'R' and 'L' are the person's right and left, as in OpenPose. A pose sequence is a float32 array
``[T, 52, 2]`` of ``(x, y)`` in a neck-relative frame: x as image x (to the person's left), y UP
(positive = above the neck), in arbitrary units (PATS: pixels normalized to a shoulder length of
about 167). Nothing here assumes a scale: the drawing extent is computed from the poses.

Outputs (:func:`save_poses` picks one by the file suffix):

* ``.npz`` (:func:`save_npz`): ``poses`` float32 ``[T, 52, 2]``, ``fps`` float64 scalar, ``skeleton``
  int64 ``[52]`` (the parents), ``joint_names`` unicode ``[52]``; no pickled objects, so
  ``np.load(path, allow_pickle=False)`` reads it.
* ``.gif`` (:func:`save_gif`): the stick-figure frames of :func:`render_frames`, looping forever.
* ``.mp4`` (:func:`save_mp4`): the same frames as H.264 (yuv420p), optionally with the speech as
  AAC, encoded by the ffmpeg binary of ``imageio-ffmpeg``.

Every file is written under a temporary name in the destination directory and renamed when
complete, so a failed write leaves no partial file.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import subprocess
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ..errors import InputError, MMGenError, one_line
from ..gesture_format import JOINT_NAMES, NUM_JOINTS, PARENTS, ROOT  # noqa: F401  (the skeleton, re-exported)

# Drawing: joints 0-9 are the body, 10-30 the left hand (hanging off LWrist), 31-51 the right hand
# (off RWrist). A limb is drawn from each joint to its parent, in the color of the joint's group.
_BODY, _LEFT_HAND, _RIGHT_HAND = range(1, 10), range(10, 31), range(31, 52)
_BODY_COLOR, _LEFT_COLOR, _RIGHT_COLOR = (40, 40, 40), (214, 39, 40), (31, 119, 180)
_MARGIN = 0.1  # pose_limits: the joints' bounding square widened by 10% of its side on each side
_CLAMP = 1e6  # PIL draws lines exactly to ~1e7 px; farther joints (a diverged model) are clamped
_GIF_PALETTE = None  # built on first use: white blended toward each of the three colors


def check_poses(poses) -> np.ndarray:
    """``poses`` (anything ``np.asarray`` takes) as a float32 ``[T, 52, 2]`` array with ``T >= 1``
    and finite values; InputError otherwise."""
    try:
        arr = np.asarray(poses)
    except (TypeError, ValueError) as e:
        raise InputError(f"poses must be a numeric [T, {NUM_JOINTS}, 2] array ({one_line(e)})") from None
    if arr.dtype.kind not in "fiu":
        raise InputError(f"poses must be a numeric [T, {NUM_JOINTS}, 2] array, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[1:] != (NUM_JOINTS, 2):
        raise InputError(f"poses must be [T, {NUM_JOINTS}, 2], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InputError("poses have no frames (T = 0)")
    with np.errstate(over="ignore"):  # too large for float32 -> inf, reported below
        arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr).all(axis=(1, 2))
    if bad.any():
        raise InputError(f"poses hold NaN or infinite values (in float32) in {int(bad.sum())} frames, "
                         f"the first at frame {int(np.argmax(bad))}")
    return arr


def pose_limits(poses) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((xmin, xmax), (ymin, ymax))``: the square around every joint of every frame, widened by
    10% of its side on each side (side 1 if all joints coincide). :func:`render_frames` uses it by
    default; pass it explicitly to draw several clips on the same axes."""
    poses = check_poses(poses).astype(np.float64)
    lo, hi = poses.min(axis=(0, 1)), poses.max(axis=(0, 1))
    center, side = (lo + hi) / 2, float((hi - lo).max()) or 1.0
    half = side * (0.5 + _MARGIN)
    return ((center[0] - half, center[0] + half), (center[1] - half, center[1] + half))


def render_frames(poses, size: int = 256, limits=None) -> list[PIL.Image.Image]:
    """One ``size`` x ``size`` RGB stick figure per frame of ``poses`` ``[T, 52, 2]``.

    White background; every joint is joined to its parent: the body (joints 0-9) thick, dark gray,
    with dots at its joints; the left hand red, the right hand blue, thinner. The axes are fixed for
    the whole clip: ``limits`` ``((xmin, xmax), (ymin, ymax))`` map onto the image's full width and
    height (y up: ymax is the top row), by default :func:`pose_limits` of all frames, so the figure
    neither jumps nor rescales between frames. Drawn at twice the size and averaged down 2x2 for
    anti-aliasing.
    """
    return list(_frames(check_poses(poses), size, limits))


def save_npz(path, poses, fps: float, skeleton=PARENTS, joint_names=JOINT_NAMES) -> None:
    """Write ``poses``, ``fps``, ``skeleton`` (parents) and ``joint_names`` to ``path`` with
    ``np.savez`` (format in the module docstring); ``path`` is used as given (no suffix added)."""
    poses, fps = check_poses(poses), _check_fps(fps)
    skeleton, joint_names = np.asarray(skeleton), np.asarray(joint_names)
    if skeleton.shape != (NUM_JOINTS,) or skeleton.dtype.kind not in "iu":
        raise InputError(f"skeleton must be {NUM_JOINTS} integer parent indices, got {skeleton.dtype} "
                         f"of shape {skeleton.shape}")
    if joint_names.shape != (NUM_JOINTS,) or joint_names.dtype.kind != "U":
        raise InputError(f"joint_names must be {NUM_JOINTS} strings, got {joint_names.dtype} "
                         f"of shape {joint_names.shape}")
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, poses=poses, fps=np.float64(fps), skeleton=skeleton.astype(np.int64),
                 joint_names=joint_names)


def save_gif(path, poses, fps: float, size: int = 256) -> None:
    """An animated GIF of :func:`render_frames` at ``fps``, looping forever.

    GIF delays are whole centiseconds: frame ``k`` is shown until ``round(100 * (k + 1) / fps)``
    cs, so single delays are off by at most 5 ms but the clip never drifts (fps 15: 70, 60, 70 ms,
    ...). Identical consecutive frames are merged into one with their delays added (Pillow's
    writer). Most viewers play delays under 20 ms (fps above 50) as 100 ms. All frames share one
    256-color palette (white blended toward the three drawing colors).
    """
    poses, fps = check_poses(poses), _check_fps(fps)
    palette = _gif_palette()
    frames = [im.quantize(palette=palette, dither=PIL.Image.Dither.NONE) for im in _frames(poses, size, None)]
    ends = [round(100 * (k + 1) / fps) for k in range(len(frames))]
    delays = [10 * (end - start) for start, end in zip([0] + ends, ends)]
    with atomic_output(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=delays, loop=0)


def save_mp4(path, poses, fps: float, audio=None, sample_rate: int | None = None, size: int = 256) -> None:
    """An H.264 MP4 (yuv420p, ``size`` rounded up to even) of :func:`render_frames` at ``fps``.

    With ``audio`` (a float 1-D array in [-1, 1]) and ``sample_rate``, the speech is muxed in as
    AAC (from a 16-bit PCM WAV, values clipped to [-1, 1]), trimmed or padded with silence to the
    video's duration ``T / fps``. Raw RGB frames are piped to the ffmpeg binary of
    ``imageio-ffmpeg``; a failure raises MMGenError with ffmpeg's last error line.
    """
    poses, fps = check_poses(poses), _check_fps(fps)
    if (audio is None) != (sample_rate is None):
        raise InputError("audio and sample_rate must be given together")
    if audio is not None:
        audio, sample_rate = _check_audio(audio, sample_rate)
    size = _check_size(size) + size % 2  # yuv420p needs even sides
    frames = _frames(poses, size, None)
    rate = Fraction(fps).limit_denominator(1001)  # 30000/1001 stays exact
    cmd = [_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}",
           "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0"]
    with tempfile.TemporaryDirectory(prefix="mmgen-") as scratch:
        if audio is not None:
            wav = Path(scratch) / "speech.wav"
            # exactly as long as the video: ffmpeg then needs no -t (AAC keeps the length, edit list)
            _write_wav(wav, audio, sample_rate, round(len(poses) * sample_rate / fps))
            cmd += ["-i", str(wav), "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "128k"]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
                "-movflags", "+faststart", "-f", "mp4"]
        with atomic_output(path) as tmp:
            _run_ffmpeg(cmd + [str(tmp)], (im.tobytes() for im in frames), path)


SUFFIXES = (".npz", ".gif", ".mp4")


def save_poses(path, poses, fps: float, audio=None, sample_rate: int | None = None) -> None:
    """Write ``poses`` ``[T, 52, 2]`` at ``fps`` to ``path`` in the format of its suffix (any
    case): ``.npz`` (:func:`save_npz`), ``.gif`` (:func:`save_gif`) or ``.mp4`` (:func:`save_mp4`,
    with the speech when ``audio`` and ``sample_rate`` are given; the other formats ignore them)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        save_npz(path, poses, fps)
    elif suffix == ".gif":
        save_gif(path, poses, fps)
    elif suffix == ".mp4":
        save_mp4(path, poses, fps, audio, sample_rate)
    else:
        raise InputError(f"{path}: unsupported pose output {suffix or '(no suffix)'}; use {', '.join(SUFFIXES)}")


def _frames(poses: np.ndarray, size: int, limits):
    """The frames of :func:`render_frames` for checked ``poses``, drawn lazily; ``size`` and
    ``limits`` are checked at the call."""
    _check_size(size)
    (xmin, xmax), (ymin, ymax) = _check_limits(pose_limits(poses) if limits is None else limits)
    big = 2 * size
    pixels = np.empty(poses.shape, dtype=np.float64)
    pixels[..., 0] = (poses[..., 0] - xmin) * (big / (xmax - xmin))
    pixels[..., 1] = (ymax - poses[..., 1]) * (big / (ymax - ymin))
    np.clip(pixels, -_CLAMP, _CLAMP, out=pixels)
    return _draw(pixels.tolist(), big)


def _draw(pixels: list, big: int):
    """Yields one RGB image of side ``big / 2`` per frame of joint pixel coordinates at side ``big``."""
    body_w, hand_w = max(2, round(big / 64)), max(2, round(big / 160))
    r = 0.8 * body_w
    for frame in pixels:
        im = PIL.Image.new("RGB", (big, big), "white")
        draw = PIL.ImageDraw.Draw(im)
        for j in _BODY:
            draw.line([tuple(frame[j]), tuple(frame[PARENTS[j]])], fill=_BODY_COLOR, width=body_w)
        for x, y in frame[:_BODY.stop]:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_BODY_COLOR)
        for joints, color in ((_LEFT_HAND, _LEFT_COLOR), (_RIGHT_HAND, _RIGHT_COLOR)):
            for j in joints:
                draw.line([tuple(frame[j]), tuple(frame[PARENTS[j]])], fill=color, width=hand_w)
        yield im.reduce(2)


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 16:
        raise InputError(f"size must be an integer >= 16, got {size!r}")
    return int(size)


def _check_limits(limits) -> tuple[tuple[float, float], tuple[float, float]]:
    try:
        arr = np.asarray(limits, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (2, 2) or not np.isfinite(arr).all() or not (arr[:, 0] < arr[:, 1]).all():
        raise InputError(f"limits must be ((xmin, xmax), (ymin, ymax)) with finite min < max, got {limits!r}")
    return tuple(map(tuple, arr.tolist()))


def _check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (math.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number, got {fps!r}")
    return float(fps)


def _gif_palette() -> PIL.Image.Image:
    """A "P" image holding the GIF palette: white, then 85 steps from white to each drawing color."""
    global _GIF_PALETTE
    if _GIF_PALETTE is None:
        t = np.arange(1, 86)[:, None] / 85
        white = np.full(3, 255.0)
        colors = [white[None]] + [white + t * (np.array(c) - white) for c in (_BODY_COLOR, _LEFT_COLOR, _RIGHT_COLOR)]
        _GIF_PALETTE = PIL.Image.new("P", (1, 1))
        _GIF_PALETTE.putpalette(np.round(np.concatenate(colors)).astype(np.uint8).tobytes())
    return _GIF_PALETTE


def _check_audio(audio, sample_rate) -> tuple[np.ndarray, int]:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
        raise InputError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.dtype.kind != "f":
        raise InputError(f"audio must be a 1-D float array, got {audio.dtype} of shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise InputError("audio holds NaN or infinite values")
    return audio, int(sample_rate)


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int, num_samples: int) -> None:
    """``audio`` clipped to [-1, 1], trimmed or zero-padded to ``num_samples``, as 16-bit mono PCM."""
    pcm = np.zeros(num_samples, dtype="<i2")
    n = min(num_samples, len(audio))
    pcm[:n] = np.round(np.clip(audio[:n], -1.0, 1.0) * 32767)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def _ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise MMGenError(f"MP4 output needs the ffmpeg binary of imageio-ffmpeg "
                         f"(pip install imageio-ffmpeg): {one_line(e)}") from None


def _run_ffmpeg(cmd: list[str], chunks, path) -> None:
    """Runs ``cmd`` with ``chunks`` (bytes) on its stdin; MMGenError with its last error line."""
    with tempfile.TemporaryFile() as log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        except OSError as e:
            raise MMGenError(f"cannot run ffmpeg {cmd[0]} (from imageio-ffmpeg; set IMAGEIO_FFMPEG_EXE "
                             f"or reinstall imageio-ffmpeg): {one_line(e)}") from None
        try:
            for chunk in chunks:
                proc.stdin.write(chunk)
        except BrokenPipeError:  # ffmpeg exited early; its log says why
            pass
        except BaseException:
            proc.kill()
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.wait()
        if proc.returncode:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            raise MMGenError(f"{path}: ffmpeg failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")


def check_output_file(path, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` as a Path if a file can be written there: its directory exists and is writable, it
    is not a directory, and its suffix (any case) is one of ``suffixes`` (when given); InputError
    otherwise. Commands call it before any work, so a bad output path never costs a generation."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{path}: the output must be one of {', '.join(suffixes)}")
    if not path.parent.is_dir():
        raise InputError(f"{path}: cannot write there: the output directory {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: cannot write there: is a directory")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{path}: cannot write there: no write permission in {path.parent}")
    return path


@contextlib.contextmanager
def atomic_output(path):
    """Yields a temporary path next to ``path`` (checked by :func:`check_output_file`) that replaces
    ``path`` when the block succeeds and is removed when it fails."""
    path = check_output_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes the file private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
