"""Tests for the synthetic speech-and-gesture world (mmgen_engine.demo.gesture_world)."""

import numpy as np
import pytest

from mmgen_engine.demo import gesture_world as gw
from mmgen_engine.pipelines.poses import PARENTS

SR, FPS = 16000, 15
N_CLIPS = 8
SEEDS = range(gw.HELD_OUT_SEED, gw.HELD_OUT_SEED + N_CLIPS)
WRISTS = [3, 6]
# (parent, child) bones whose length the world keeps fixed: upper arms, forearms and all hand bones
ARM_BONES = [(1, 2), (2, 3), (4, 5), (5, 6)]
HAND_BONES = [(PARENTS[j], j) for j in range(10, 52)]


@pytest.fixture(scope="module")
def clips():
    return [gw.clip(s) for s in SEEDS]


@pytest.fixture(scope="module")
def onsets():
    return [gw.speech(np.random.default_rng(s), 8.0)[1] for s in SEEDS]


@pytest.fixture(scope="module")
def silent_poses():
    out = []
    for s in SEEDS:
        audio = gw.near_silence(s, 8.0)
        out.append(gw.gestures(np.random.default_rng(s), audio, np.zeros(0)))
    return out


def _bone_lengths(poses, bones):
    p, c = np.array(bones).T
    return np.linalg.norm(poses[..., c, :].astype(np.float64) - poses[..., p, :], axis=-1)


def _frame_speed(poses):
    return np.linalg.norm(np.diff(poses[:, WRISTS].astype(np.float64), axis=0), axis=-1).mean(-1)


def test_constants():
    assert gw.SAMPLE_RATE == SR and gw.FPS == FPS
    assert gw.HELD_OUT_SEED >= gw.TRAIN_SEEDS.stop and gw.TRAIN_SEEDS.start == 0
    assert len(PARENTS) == gw.NUM_JOINTS == 52
    assert PARENTS[0] == -1 and all(0 <= p < j for j, p in enumerate(PARENTS) if j)
    # the skeleton of the brief, written out independently
    assert list(PARENTS[:11]) == [-1, 0, 1, 2, 0, 4, 5, 0, 7, 7, 6]
    assert PARENTS[31] == 3
    for root in (10, 31):
        for f in range(5):
            first = root + 1 + 4 * f
            assert PARENTS[first] == root
            assert [PARENTS[first + k] for k in (1, 2, 3)] == [first, first + 1, first + 2]


def test_rest_pose():
    r = gw.rest_pose()
    assert r.shape == (52, 2) and r.dtype == np.float32 and np.isfinite(r).all()
    assert np.array_equal(r[0], [0, 0])
    assert r[7, 1] > 40 and r[8, 1] > r[7, 1] and r[9, 1] > r[7, 1]  # nose above neck, eyes above nose
    assert r[8, 0] < 0 < r[9, 0]  # the person's right side is on the image left
    assert r[1, 0] < 0 < r[4, 0] and 150 <= r[4, 0] - r[1, 0] <= 180 and -30 < r[1, 1] < 0
    for sh, el, wr in ((1, 2, 3), (4, 5, 6)):
        assert 230 <= r[sh, 1] - r[wr, 1] <= 270  # arms hang ~250 below the shoulders
        assert r[wr, 1] < r[el, 1] < r[sh, 1]
        assert abs(r[el, 0]) >= abs(r[sh, 0])  # elbows slightly out
    for root, wrist in ((10, 6), (31, 3)):
        assert np.linalg.norm(r[root] - r[wrist]) <= 10
        tips = r[root + 4: root + 21: 4]
        assert (tips[:, 1] < r[root, 1]).all()  # fingers hang down
        assert 50 <= r[root, 1] - tips[:, 1].min() <= 75  # hands ~60 long
        assert np.ptp(tips[:, 0]) > 15  # fanned
    mirrored = r * np.array([-1, 1], dtype=np.float32)
    swap = [0, 4, 5, 6, 1, 2, 3, 7, 9, 8] + list(range(31, 52)) + list(range(10, 31))
    np.testing.assert_allclose(mirrored[swap], r, atol=1e-4)


def test_deterministic():
    a1, p1 = gw.clip(123)
    a2, p2 = gw.clip(123)
    assert a1.tobytes() == a2.tobytes() and p1.tobytes() == p2.tobytes()
    a3, p3 = gw.clip(124)
    assert not np.array_equal(a1, a3) and not np.array_equal(p1, p3)
    s1 = gw.speech(np.random.default_rng(5), 3.0)
    s2 = gw.speech(np.random.default_rng(5), 3.0)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(s1, s2))
    assert gw.near_silence(9, 2.0).tobytes() == gw.near_silence(9, 2.0).tobytes()
    assert not np.array_equal(gw.near_silence(9, 2.0), gw.near_silence(10, 2.0))
    g1 = gw.gestures(np.random.default_rng(1), a1, s1[1])
    g2 = gw.gestures(np.random.default_rng(1), a1, s1[1])
    assert g1.tobytes() == g2.tobytes()


@pytest.mark.parametrize("seconds", [8.0, 5.3, 2.05])
def test_shapes_and_lengths(seconds):
    audio, poses = gw.clip(gw.HELD_OUT_SEED + 77, seconds)
    n = round(seconds * SR)
    frames = round(n / SR * FPS)
    assert audio.shape == (n,) and audio.dtype == np.float32
    assert poses.shape == (frames, 52, 2) and poses.dtype == np.float32
    e = gw.energy(audio)
    assert e.shape == (frames,) and e.dtype == np.float32
    assert gw.near_silence(3, seconds).shape == (n,)
    _, on = gw.speech(np.random.default_rng(0), seconds)
    assert on.dtype == np.float32


def test_speech_statistics(onsets):
    for s, on in zip(SEEDS, onsets):
        audio, on2 = gw.speech(np.random.default_rng(s), 8.0)
        assert np.array_equal(on, on2)
        assert 0.45 <= np.abs(audio).max() <= 0.55  # peak about 0.5
        assert len(on) >= 8 and on[0] >= 0.1 and on[-1] < 8.0 - 0.1
        ioi = np.diff(on.astype(np.float64))
        # within a word >= 1/6 s (<= 6 syllables / s); across words >= 0.1 s syllable + 0.05 s gap
        assert ioi.min() >= 0.15 - 1e-4
        assert (ioi <= 1 / 3 + 1e-4).mean() > 0.5  # most onsets are within words (>= 3 syllables / s)
        # the lead-in (>= 0.1 s; consonant bursts <= 0.06 s) is only the noise floor (-60 dBFS)
        lead = audio[: int(0.04 * SR)]
        assert 0.5e-3 < np.sqrt(np.mean(lead.astype(np.float64) ** 2)) < 2e-3


def test_energy_follows_syllables(clips, onsets):
    syllable, pause = [], []
    for (audio, _), on in zip(clips, onsets):
        e = gw.energy(audio)
        start = np.arange(len(e)) / FPS
        end = start + 1 / FPS
        for o in on:  # the loudest frame of the first 0.1 s of each syllable (syllables last >= 0.1 s)
            syllable.append(e[(end > o) & (start < o + 0.1)].max())
        # frames at least 0.32 s after the last onset (syllables last <= 0.3 s) and 0.07 s before the next
        far = ((on[None, :] < start[:, None] - 0.32) | (on[None, :] > end[:, None] + 0.07)).all(axis=1)
        pause.extend(e[far])
    syllable, pause = np.array(syllable), np.array(pause)
    assert len(pause) > 50
    assert syllable.min() > 0.15 and np.median(syllable) > 0.4
    assert pause.max() < 0.03
    assert np.median(syllable) > 30 * np.median(pause)


def test_energy_fixed_reference():
    audio, _ = gw.clip(gw.HELD_OUT_SEED)
    e = gw.energy(audio)
    assert 0.0 <= e.min() and e.max() <= 1.0
    e_half = gw.energy(audio * 0.5)  # not normalized per clip: half the amplitude, half the energy
    np.testing.assert_allclose(e_half[e < 0.9], 0.5 * e[e < 0.9], rtol=1e-4, atol=1e-6)
    assert gw.energy(gw.near_silence(1, 8.0)).max() < 0.02
    assert gw.energy(np.full(SR, gw.ENERGY_REF, dtype=np.float32)) == pytest.approx(np.ones(FPS))


def test_bone_lengths_constant(clips, silent_poses):
    rest = gw.rest_pose()
    for poses in [p for _, p in clips] + silent_poses:
        for bones in (ARM_BONES, HAND_BONES):
            lengths = _bone_lengths(poses, bones)  # [T, bones]
            np.testing.assert_allclose(lengths, np.broadcast_to(lengths[0], lengths.shape), rtol=1e-3)
            ratio = lengths[0] / _bone_lengths(rest, bones)
            assert (0.919 <= ratio).all() and (ratio <= 1.081).all()  # body proportions vary by <= 8 %


def test_poses_finite_and_in_box(clips, silent_poses):
    for poses in [p for _, p in clips] + silent_poses:
        assert np.isfinite(poses).all()
        assert np.abs(poses[..., 0]).max() < 350
        assert -400 < poses[..., 1].min() and poses[..., 1].max() < 150
        assert np.abs(poses[:, 0]).max() == 0  # neck-relative
        assert (poses[:, WRISTS, 1] < poses[:, [1, 4], 1]).all()  # hands stay below the shoulders


def test_speech_moves_more_than_silence(clips, silent_poses):
    speech = np.array([gw.wrist_speed(p) for _, p in clips])
    silence = np.array([gw.wrist_speed(p) for p in silent_poses])
    assert silence.max() < 0.5  # tiny sway and breathing
    assert speech.min() >= 4 * silence.max()
    assert speech.mean() >= 10 * silence.mean()


def test_silence_is_rest_plus_sway(silent_poses):
    for poses in silent_poses:
        p = poses.astype(np.float64)
        assert np.abs(p - p.mean(axis=0)).max() < 8  # a sway of a few units, no gesture
        assert np.ptp(p[:, [1, 4], 1]) < 5  # breathing (and sway) of the shoulders


def test_energy_speed_correlation(clips):
    def smooth(x):
        return np.convolve(x, np.ones(5) / 5, mode="same")

    e = np.concatenate([smooth(gw.energy(a)[1:]) for a, _ in clips])
    v = np.concatenate([smooth(_frame_speed(p)) for _, p in clips])
    assert np.corrcoef(e, v)[0, 1] > 0.3


def test_no_sudden_jumps(clips, silent_poses):
    # 80 units per frame = 1200 units/s; with shoulder joints ~0.36 m apart (164 units), 1 unit ~ 2.2 mm,
    # so ~2.6 m/s: the top of natural fingertip speeds in fast gestures. A jump (a teleporting hand or a
    # flipping elbow) moves a joint by about a bone length (forearm 128, reach ~250).
    for _, poses in clips:
        step = np.linalg.norm(np.diff(poses.astype(np.float64), axis=0), axis=-1)  # [T-1, 52]
        assert step.max() < 80
        assert step[:, WRISTS].max() < gw.WRIST_MAX_STEP + 5  # slew-limited, plus the slow sway
    for poses in silent_poses:
        assert np.linalg.norm(np.diff(poses.astype(np.float64), axis=0), axis=-1).max() < 1.0


def test_wrist_speed():
    poses = np.zeros((5, 52, 2), dtype=np.float32)
    poses[:, 3, 0] = np.arange(5) * 2.0  # right wrist: 2 per frame
    poses[:, 6, 1] = np.arange(5) * 4.0  # left wrist: 4 per frame
    poses[:, 20] = np.random.default_rng(0).normal(size=(5, 2)) * 100  # other joints do not count
    assert gw.wrist_speed(poses) == pytest.approx(3.0)
    assert gw.wrist_speed(poses[:1]) == 0.0
