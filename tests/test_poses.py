"""Speech-to-gesture output (mmgen_engine.pipelines.poses): the PATS skeleton, stick-figure rendering,
NPZ / GIF / MP4 files (checked with the ffmpeg binary of imageio-ffmpeg)."""
import os
import re
import subprocess

import imageio_ffmpeg
import numpy as np
import PIL.Image
import pytest

from mmgen_engine.errors import InputError, MMGenError
from mmgen_engine.pipelines import poses as P

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def rest_pose() -> np.ndarray:
    """A PATS-like pose [52, 2]: shoulder length ~167, arms down, fingers fanned out below the wrists."""
    p = np.zeros((52, 2), np.float32)
    body = {1: (-167, -10), 2: (-200, -250), 3: (-150, -450), 4: (167, -10), 5: (200, -250),
            6: (150, -450), 7: (0, 150), 8: (-30, 190), 9: (30, 190)}
    for j, xy in body.items():
        p[j] = xy
    for root, wrist, side in ((10, 6, 1), (31, 3, -1)):
        p[root] = p[wrist]
        for finger in range(5):
            angle = np.deg2rad(-90 + side * (finger - 2) * 18)
            for k in range(4):
                p[root + 1 + 4 * finger + k] = p[root] + (k + 1) * 22 * np.array([np.cos(angle), np.sin(angle)])
    return p


def moving_clip(T: int) -> np.ndarray:
    """[T, 52, 2]: the left forearm and hand swing up and sideways."""
    t = np.arange(T, dtype=np.float32)[:, None]
    clip = np.repeat(rest_pose()[None], T, axis=0)
    clip[:, 6:7] += np.stack([40 * np.sin(t / 3), 250 * np.sin(t / 5) ** 2], axis=-1)
    clip[:, 10:31] = clip[:, 6:7] + (clip[:, 10:31] - clip[:, 10:11])
    return clip


def ink(im: PIL.Image.Image) -> np.ndarray:
    """[H, W] bool: the non-white pixels."""
    return (np.asarray(im) < 250).any(axis=-1)


def to_pixels(xy, limits, size):
    """Image (column, row) of a pose point under ``limits``."""
    (xmin, xmax), (ymin, ymax) = limits
    return (xy[0] - xmin) / (xmax - xmin) * size, (ymax - xy[1]) / (ymax - ymin) * size


# skeleton

def test_parents_form_a_tree_rooted_at_the_neck():
    assert len(P.JOINT_NAMES) == len(set(P.JOINT_NAMES)) == len(P.PARENTS) == P.NUM_JOINTS == 52
    assert P.ROOT == 0 and P.JOINT_NAMES[0] == "Neck" and P.PARENTS[0] == -1
    for j in range(1, 52):
        assert 0 <= P.PARENTS[j] < j
        k, steps = j, 0
        while k != P.ROOT:
            k, steps = P.PARENTS[k], steps + 1
            assert steps < 52
    name = dict(enumerate(P.JOINT_NAMES))
    assert name[P.PARENTS[P.JOINT_NAMES.index("LHandRoot")]] == "LWrist"
    assert name[P.PARENTS[P.JOINT_NAMES.index("RHandRoot")]] == "RWrist"
    for side in "LR":
        for finger in ("Thumb", "Index", "Middle", "Ring", "Little"):
            chain = [f"{side}HandRoot"] + [f"{side}Hand{finger}{k}" for k in range(1, 5)]
            for parent, child in zip(chain, chain[1:]):
                assert name[P.PARENTS[P.JOINT_NAMES.index(child)]] == parent


def test_check_poses():
    out = P.check_poses(rest_pose()[None].astype(np.float64))
    assert out.dtype == np.float32 and out.shape == (1, 52, 2)
    assert P.check_poses(np.zeros((2, 52, 2), np.int64)).dtype == np.float32
    nan = moving_clip(3)
    nan[1, 5, 0] = np.nan
    for bad in (np.zeros((3, 52)), np.zeros((3, 51, 2)), np.zeros((0, 52, 2)), nan,
                np.full((1, 52, 2), 1e39), np.full((1, 52, 2), "a"), None):
        with pytest.raises(InputError):
            P.check_poses(bad)


# rendering

def test_render_frames_count_size_and_mode():
    frames = P.render_frames(moving_clip(5), size=64)
    assert len(frames) == 5
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in frames)


def test_axes_are_fixed_for_the_clip():
    clip = np.repeat(rest_pose()[None], 4, axis=0) + np.array([[[0.0, 0.0]], [[100, 0]], [[200, 0]], [[300, 0]]])
    limits = P.pose_limits(clip)
    frames = P.render_frames(clip, size=128)
    for k in range(4):  # each frame is drawn on the clip's axes, not on its own
        alone = P.render_frames(clip[k:k + 1], size=128, limits=limits)[0]
        assert np.array_equal(np.asarray(frames[k]), np.asarray(alone))
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(P.render_frames(clip[:1], size=128)[0]))
    # the figure moves by 100 units a frame and keeps its size
    step = 100 / (limits[0][1] - limits[0][0]) * 128
    cols = [np.nonzero(ink(im).any(axis=0))[0] for im in frames]
    for k in range(1, 4):
        assert abs(cols[k].mean() - cols[0].mean() - k * step) < 1.5
        assert abs(np.ptp(cols[k]) - np.ptp(cols[0])) <= 1
    still = P.render_frames(np.repeat(rest_pose()[None], 3, axis=0), size=64)
    assert all(np.array_equal(np.asarray(still[0]), np.asarray(im)) for im in still)


def test_y_is_up():
    pose = rest_pose()
    pose[5], pose[6] = (250, 150), (250, 400)  # left arm raised above the head
    pose[10:31] += pose[6] - pose[10]
    size, limits = 128, P.pose_limits(pose[None])
    pixels = np.asarray(P.render_frames(pose[None], size=size)[0]).astype(int)
    red = (pixels[..., 0] - pixels[..., 2]) > 80  # the left hand
    blue = (pixels[..., 2] - pixels[..., 0]) > 80  # the right hand, still down
    neck_row = to_pixels(pose[0], limits, size)[1]
    assert np.nonzero(red)[0].max() < min(neck_row, size / 2)
    assert np.nonzero(blue)[0].min() > max(neck_row, size / 2)


def test_every_limb_is_drawn_in_its_color():
    pose, size = rest_pose(), 256
    limits = P.pose_limits(pose[None])
    pixels = np.asarray(P.render_frames(pose[None], size=size)[0]).astype(int)
    for j in range(1, 52):
        a, b = np.array(to_pixels(pose[j], limits, size)), np.array(to_pixels(pose[P.PARENTS[j]], limits, size))
        for t in (0.25, 0.5, 0.75):
            col, row = (a + t * (b - a)).astype(int)
            r, g, bl = pixels[row, col]
            if j < 10:
                assert max(r, g, bl) < 150, (P.JOINT_NAMES[j], t)  # dark body
            elif j < 31:
                assert r > bl + 40, (P.JOINT_NAMES[j], t)  # red left hand
            else:
                assert bl > r + 40, (P.JOINT_NAMES[j], t)  # blue right hand
    assert not ink(PIL.Image.fromarray(pixels[:20, :20].astype(np.uint8))).any()  # a corner stays white


def test_render_bad_options():
    clip = moving_clip(2)
    for kwargs in ({"size": 8}, {"size": 64.0}, {"size": True}, {"limits": ((1, 0), (0, 1))},
                   {"limits": ((0, 1), (0, np.nan))}, {"limits": (0, 1)}, {"limits": "abc"}):
        with pytest.raises(InputError):
            P.render_frames(clip, **kwargs)


# files

def test_npz_round_trip(tmp_path):
    clip = moving_clip(6)
    P.save_poses(tmp_path / "clip.NPZ", clip, 15)
    with np.load(tmp_path / "clip.NPZ", allow_pickle=False) as f:
        assert sorted(f.files) == ["fps", "joint_names", "poses", "skeleton"]
        assert f["poses"].dtype == np.float32 and np.array_equal(f["poses"], clip)
        assert f["fps"].dtype == np.float64 and f["fps"] == 15.0
        assert f["skeleton"].dtype == np.int64 and f["skeleton"].tolist() == P.PARENTS
        assert f["joint_names"].dtype.kind == "U" and f["joint_names"].tolist() == P.JOINT_NAMES
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "clip.NPZ").stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["clip.NPZ"]


def test_gif_frames_delays_and_loop(tmp_path):
    clip = moving_clip(30)
    P.save_poses(tmp_path / "clip.gif", clip, 15)
    with PIL.Image.open(tmp_path / "clip.gif") as im:
        assert im.n_frames == 30 and im.size == (256, 256) and im.info["loop"] == 0
        delays = []
        for k in range(im.n_frames):
            im.seek(k)
            delays.append(im.info["duration"])
    assert set(delays) <= {60, 70} and 66 <= np.mean(delays) <= 67
    assert all(abs(end - (k + 1) * 1000 / 15) <= 5 for k, end in enumerate(np.cumsum(delays)))
    P.save_gif(tmp_path / "still.gif", np.repeat(rest_pose()[None], 4, axis=0), 10, size=64)
    with PIL.Image.open(tmp_path / "still.gif") as im:  # identical frames merge; the clip keeps its length
        assert im.n_frames == 1 and im.info["duration"] == 400


def streams(path) -> str:
    """The ``Stream #...`` lines ffmpeg prints for ``path``."""
    err = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return "\n".join(line for line in err.splitlines() if "Stream #" in line)


def decoded_seconds(path, stream: str) -> float:
    """Duration of the decoded ``stream`` ("a" or "v") of ``path`` (10 ms resolution)."""
    err = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path), "-map", f"0:{stream}", "-f", "null", "-"],
                         capture_output=True, text=True, check=True).stderr
    h, m, s = re.findall(r"time=(\d+):(\d+):([\d.]+)", err)[-1]
    return 3600 * int(h) + 60 * int(m) + float(s)


def test_mp4_without_audio(tmp_path):
    P.save_poses(tmp_path / "clip.mp4", moving_clip(30), 15)
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "clip.mp4"))
    assert frames == 30 and abs(seconds - 2.0) < 0.02
    info = streams(tmp_path / "clip.mp4")
    assert re.search(r"Video: h264.*yuv420p.*256x256", info) and "Audio:" not in info
    P.save_mp4(tmp_path / "odd.mp4", moving_clip(3), 15, size=63)
    assert "64x64" in streams(tmp_path / "odd.mp4")
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "odd.mp4"]


@pytest.mark.parametrize("audio_seconds", [1.0, 5.0])  # padded, trimmed
def test_mp4_with_audio_has_the_video_length(tmp_path, audio_seconds):
    T, fps, sr = 37, 15, 16000
    audio = (1.5 * np.sin(2 * np.pi * 440 * np.arange(int(audio_seconds * sr)) / sr)).astype(np.float32)  # clipped
    path = tmp_path / "talk.mp4"
    P.save_poses(path, moving_clip(T), fps, audio, sr)
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    assert frames == T and abs(seconds - T / fps) < 0.02
    assert re.search(r"Audio: aac.*16000 Hz, mono", streams(path))
    assert abs(decoded_seconds(path, "a") - T / fps) < 0.03
    pcm = np.frombuffer(subprocess.run([FFMPEG, "-i", str(path), "-map", "0:a", "-f", "s16le", "-ac", "1", "-"],
                                       capture_output=True, check=True).stdout, dtype="<i2") / 32768
    assert abs(len(pcm) / sr - T / fps) < 0.03
    assert np.sqrt(np.mean(pcm[2000:14000] ** 2)) > 0.6  # the (clipped) tone, not silence
    if audio_seconds == 1.0:
        assert np.abs(pcm[int(1.1 * sr):]).max() < 0.02  # padded with silence


def test_bad_input_is_rejected_before_writing(tmp_path):
    clip, audio = moving_clip(4), np.zeros(16000, np.float32)
    path = tmp_path / "out.mp4"
    cases = [dict(poses=clip[:, :51]), dict(fps=0), dict(fps=float("nan")), dict(fps="15"),
             dict(audio=audio), dict(sample_rate=16000), dict(audio=audio, sample_rate=0),
             dict(audio=audio, sample_rate=16000.0), dict(audio=audio[None], sample_rate=16000),
             dict(audio=np.zeros(100, np.int16), sample_rate=16000),
             dict(audio=np.full(100, np.nan, np.float32), sample_rate=16000)]
    for case in cases:
        kwargs = {"poses": clip, "fps": 15, **case}
        with pytest.raises(InputError):
            P.save_mp4(path, **kwargs)
    for name in ("out.avi", "out", "out.npz.txt"):
        with pytest.raises(InputError, match=r"\.npz, \.gif, \.mp4"):
            P.save_poses(tmp_path / name, clip, 15)
    with pytest.raises(InputError, match="does not exist"):
        P.save_poses(tmp_path / "missing" / "out.gif", clip, 15)
    with pytest.raises(InputError):
        P.save_npz(tmp_path / "out.npz", clip, 15, skeleton=P.PARENTS[:-1])
    assert os.listdir(tmp_path) == []


def test_failed_writes_leave_nothing_behind(tmp_path, monkeypatch):
    clip = moving_clip(8)
    (tmp_path / "old.mp4").write_bytes(b"old")
    run = P._run_ffmpeg
    monkeypatch.setattr(
        P, "_run_ffmpeg", lambda cmd, chunks, path: run(cmd[:-1] + ["-bogus", "1", cmd[-1]], chunks, path)
    )
    with pytest.raises(MMGenError, match=r"ffmpeg failed: \S") as e:
        P.save_mp4(tmp_path / "old.mp4", clip, 15)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(P, "_run_ffmpeg", run)

    draw = P._draw

    def fails_midway(pixels, big):
        frames = draw(pixels, big)
        yield next(frames)
        yield next(frames)
        raise RuntimeError("boom")

    monkeypatch.setattr(P, "_draw", fails_midway)
    with pytest.raises(RuntimeError, match="boom"):
        P.save_mp4(tmp_path / "old.mp4", clip, 15)
    monkeypatch.setattr(P, "_draw", draw)

    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))
    with pytest.raises(MMGenError, match="imageio-ffmpeg"):
        P.save_mp4(tmp_path / "new.mp4", clip, 15)
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE")

    def savez_fails(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(P.np, "savez", savez_fails)
    with pytest.raises(OSError, match="disk full"):
        P.save_npz(tmp_path / "new.npz", clip, 15)
    assert os.listdir(tmp_path) == ["old.mp4"] and (tmp_path / "old.mp4").read_bytes() == b"old"
