"""The synthetic "speech and gesture world" of the bundled speech-to-gesture demo model.

A clip is a few seconds of speech-like audio (16 kHz mono) and the 2D upper-body poses of the
speaker at 15 fps, on the PATS dataset's 52-joint skeleton (neck, shoulders, elbows, wrists, nose,
eyes and two 21-joint hands). The audio is not real speech and the poses are not captured motion:
both are drawn by the pure, deterministic numpy functions below so that a small model can learn the
one relation that matters for the demo -- *gestures follow the energy of the speech*: the arms rise
and move while someone speaks, beat on the syllables, and rest (with only a tiny sway and breathing)
in silence.

Everything is deterministic given an integer seed: ``clip(seed)`` draws one clip from
``numpy.random.default_rng(seed)``. Train / held-out splits are disjoint seed ranges: the demo model
is trained on seeds in ``TRAIN_SEEDS`` and evaluated on seeds ``>= HELD_OUT_SEED``. This module
depends on numpy only.

Coordinates
-----------
A pose is a float32 ``[52, 2]`` array in the joint order of
:data:`mmgen_engine.pipelines.poses.PARENTS` (PATS order, root 0 = Neck; 'R' / 'L' are the person's
sides, so the person's right side is at negative x). Coordinates are neck-relative, x to the image
right and y UP, in PATS-like pixel units: shoulder to shoulder 164, upper arm 135, forearm 128,
wrists 254 below the shoulders at rest, hands ~60 long (hand root 4 beyond the wrist, middle finger
28 + 14 + 10 + 8). Per clip the body proportions vary (a global scale in [0.95, 1.05] times per-part
factors in [0.97, 1.03] for shoulder width, upper arm, forearm, hand and head, clipped to [0.92,
1.08]). Pose frame ``k`` is the time ``(k + 0.5) / FPS``, the centre of the audio window of energy
frame ``k``; a clip of ``n`` samples has ``T = round(n / SAMPLE_RATE * FPS)`` frames.

Audio (``speech``)
------------------
Per speaker: base pitch ``f0`` uniform in [100, 210] Hz, mean syllable rate in [3.5, 5.5] /s,
vocal-tract scale of the formants in [0.9, 1.15], pause probability in [0.08, 0.25]. Speech starts
after a lead-in of 0.1-0.6 s and is a sequence of words of 1-4 syllables (probabilities
``WORD_LENGTH_PROBS``). Within a word the syllable onsets are ``1 / rate`` apart, the rate in
``SYLLABLE_RATE_RANGE`` = [3, 6] /s (the word's rate is the speaker's times [0.85, 1.15], each
interval jittered by +-10 %); a syllable lasts 0.6-0.95 of its interval, clipped to
``SYLLABLE_SECONDS`` = [0.1, 0.3] s (so syllables of a word never overlap). After a word comes a gap
of ``WORD_GAP_SECONDS`` = [0.05, 0.3] s or, with the pause probability, a pause of
``PAUSE_SECONDS`` = [0.5, 1.5] s. Only syllables that end 20 ms before the clip's end are kept.

Each syllable is a voiced harmonic complex: a sawtooth (all harmonics, amplitude 1/k) whose f0
glides linearly from ``f0_start`` (speaker f0 times [0.88, 1.15]) to ``f0_start`` times [0.8, 1.15],
both clipped to ``F0_RANGE`` = [90, 250] Hz; its spectrum is weighted by the three formant
resonances of a random vowel of ``VOWEL_FORMANTS`` (times the speaker's vocal-tract scale and a
per-formant jitter of +-5 %, Lorentzian magnitudes with bandwidths ``FORMANT_BANDWIDTHS`` and gains
``FORMANT_GAINS``). A raised-cosine attack of 20-50 ms and decay of 40-100 ms shape it; its RMS is a
random level in [0.5, 1] (relative). With probability 0.4 a consonant precedes it: a Hann-shaped
burst of high-passed white noise, 20-60 ms long, ending at the onset, at 0.1-0.3 of the syllable's
level. The speech is then scaled to a peak of ``PEAK`` = 0.5 and a white noise floor of RMS
``NOISE_RMS`` = 1e-3 (-60 dBFS) is added everywhere. ``near_silence`` is that noise floor alone,
plus with probability 1/2 a faint 50 or 60 Hz hum (and its second harmonic) of about the same
level.

Energy (``energy``)
-------------------
The RMS of each 1/15 s audio window (window ``k`` = samples ``round(k * SAMPLE_RATE / FPS)`` up to
``round((k + 1) * SAMPLE_RATE / FPS)``) divided by the fixed ``ENERGY_REF`` = 0.2 (not per clip) and
clipped to [0, 1]: the noise floor gives ~0.005, the loudest frame of a syllable 0.3-1.

Gestures (``gestures``)
-----------------------
* Amplitude: an envelope follower of the energy (attack ``ATTACK_SECONDS`` = 0.15 s, release
  ``RELEASE_SECONDS`` = 0.5 s, then two one-pole smoothers of ``AMP_SMOOTH_SECONDS`` = 0.08 s),
  gated: ``A = clip((a - GATE) / (FULL - GATE), 0, 1)`` with ``GATE`` = 0.03, ``FULL`` = 0.6 -- so
  the noise floor (a ~0.005) gives A = 0 exactly; in frames with speech (energy > 0.1) A has
  quartiles 0.6 / 0.74 / 0.87.
* Gesture targets: a new target is drawn at the first syllable onset, and at later onsets with
  probability 0.6 after a gap > 0.4 s (a new word or phrase) or 0.15 otherwise; it takes effect
  0.1 s before the onset. A target is a mode (right hand / left hand / both: 0.35 / 0.25 / 0.4)
  and, per hand, a wrist displacement up by [70, 170] and outward by [-50, 60] (negative = toward
  the body's midline) at full amplitude; an inactive hand moves 0.2 as much. The wrist goes to the
  rest wrist + ``gain * A * displacement`` (``gain`` per clip in [0.85, 1.15]); the displacement and
  the hands' activity (1 or 0.25) are smoothed by two cascaded one-pole filters of
  ``TARGET_SMOOTH_SECONDS`` = 0.12 s.
* Beats: at each syllable onset ``o`` a downward stroke of the wrists: a Hann pulse of
  ``BEAT_SECONDS`` = 0.3 s starting at ``o - 0.05`` (the dip is ~0.2 s wide at a quarter depth),
  of depth ``min(BEAT_GAIN * e, BEAT_MAX)`` = ``min(45 e, 40)`` (~15-40 for real syllables, whose
  ``e``, the peak energy of the 4 frames from the onset's, is 0.3-1), times the hand's activity; the
  head nods ``3 e`` units with the beats. Onsets in silence (e ~ 0) give no beat.
* Arms: a 2-link inverse kinematics from shoulder to wrist with the upper-arm and forearm lengths
  fixed, the elbow on the outer / lower side; the reach is softly limited to 0.999 of the arm's
  length (tanh above 0.975), the rest pose uses ``REST_REACH`` = 0.97 of it.
* Speed limit: the wrists' offset from their rest position (gesture + beats) moves by at most
  ``WRIST_MAX_STEP`` = 40 units per frame (a slew limiter; ~1.3 m/s at PATS scale, where the
  shoulder joints' 164 units are ~0.36 m). It only trims the fastest rises at loud speech onsets.
* Hands: rigid with the wrist, rotated with the forearm direction (bent 8 degrees toward the
  midline); the fingers fan out more (spread times 1 + 0.4 A) and curl less (times 1 - 0.5 A) with
  the amplitude. All arm and hand bones keep their lengths exactly.
* Idle motion, always: the shoulders and arms tilt about the neck by two slow sinusoids (0.07-0.2
  Hz, 0.6 and 0.4 degrees: a sway of ~4 units at the wrists), the head by 1.5 + 2 A degrees, and
  the shoulders (with the arms) rise and fall by 1 unit with the breathing (0.2-0.33 Hz).

Statistics (1000 training clips of 8 s, seeds 0..999; ``near_silence`` with the same seeds)
--------------------------------------------------------------------------------------------
* Syllables per clip: mean 22, range 10-34. Audio peak 0.497-0.504.
* Energy over all frames: 25 % at the noise floor (~0.005), median 0.14, 75th percentile 0.51,
  99th 0.94, 0.4 % clipped at 1; 52 % of the frames above 0.1. The loudest frame of a syllable:
  1st / 50th / 99th percentile 0.37 / 0.65 / 1.0; frames in pauses (>= 0.32 s after an onset and
  0.07 s before the next, 19 % of the frames): at most 0.0054. ``near_silence``: at most 0.008.
* ``wrist_speed`` (units per frame): speech clips mean 7.9 (min 3.9, 5th percentile 5.3, max 14);
  gestures of ``near_silence`` (no onsets) mean 0.145 (max 0.27): a ratio of ~55 on average and
  >= 14 between the slowest speech clip and the fastest silent one (held-out seeds 1_000_000 ..
  1_000_999: 8.0 vs 0.145).
* Wrist distance from the rest pose: median 41, 90th percentile 102, 99th 141; the wrists stay
  >= 70 below the neck. All joints lie within |x| < 230, -355 < y < 90.
* Largest per-frame displacement of any joint (a fingertip): 67 (99th percentile of the clips'
  maxima 63); of a wrist 40.2. In silence, under 1.
* Correlation of the per-frame energy with the per-frame wrist speed (both smoothed over 5 frames),
  pooled over clips: 0.55 (per clip: mean 0.5).
* Cost: ~12 ms per 8 s clip on one CPU core (~10 ms audio, ~2 ms poses), i.e. ~12 s per 1000 clips.

The motion measure of the demo is ``wrist_speed``: the mean per-frame displacement of both wrists.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000  # audio samples per second
FPS = 15  # pose frames per second (PATS)
# Clip seeds for training; seeds >= HELD_OUT_SEED are held out for evaluation.
TRAIN_SEEDS = range(0, 100_000)
HELD_OUT_SEED = 1_000_000

NUM_JOINTS = 52
_NOSE, _R_EYE, _L_EYE = 7, 8, 9
# per arm (index 0 = right, 1 = left): shoulder, elbow, wrist, hand root
_SHOULDER, _ELBOW, _WRIST, _HAND_ROOT = (1, 4), (2, 5), (3, 6), (31, 10)
_OUTWARD = np.array([-1.0, 1.0])  # x sign pointing away from the body's midline, per arm
_BEND = (-1.0, 1.0)  # elbow rotation sign (from the shoulder->wrist line) that bends it outward/down

# ---- audio ------------------------------------------------------------------------------------
PEAK = 0.5  # peak amplitude of the speech
NOISE_RMS = 1e-3  # white noise floor (-60 dBFS), present in every clip
ENERGY_REF = 0.2  # RMS that energy() maps to 1 (fixed, not per clip)
F0_RANGE = (90.0, 250.0)  # Hz
SYLLABLE_RATE_RANGE = (3.0, 6.0)  # syllables per second within a word
SYLLABLE_SECONDS = (0.1, 0.3)
WORD_GAP_SECONDS = (0.05, 0.3)
PAUSE_SECONDS = (0.5, 1.5)
WORD_LENGTH_PROBS = (0.35, 0.35, 0.2, 0.1)  # words of 1, 2, 3, 4 syllables
CONSONANT_PROB = 0.4
# (F1, F2, F3) in Hz of /a/, /i/, /u/, /e/, /o/, /ae/ (adult averages)
VOWEL_FORMANTS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480],
                           [570, 840, 2410], [660, 1720, 2410]], dtype=np.float64)
FORMANT_BANDWIDTHS = np.array([80.0, 100.0, 140.0])  # Hz
FORMANT_GAINS = np.array([1.0, 0.6, 0.3])
_SYL_SAMPLES = int(SYLLABLE_SECONDS[1] * SAMPLE_RATE)  # longest syllable
_NFFT = 8192  # >= _SYL_SAMPLES plus the (short) formant ringing, so the filtering does not wrap
_BURST_SAMPLES = int(0.06 * SAMPLE_RATE)  # longest consonant burst

# ---- gestures ---------------------------------------------------------------------------------
ATTACK_SECONDS = 0.15  # envelope follower of the energy
RELEASE_SECONDS = 0.5
GATE, FULL = 0.03, 0.6  # follower level of amplitude 0 and 1
AMP_SMOOTH_SECONDS = 0.08  # each of the two one-pole filters after the follower
BEAT_SECONDS = 0.3  # length of the Hann pulse of a beat
BEAT_GAIN, BEAT_MAX = 45.0, 40.0  # beat depth = min(BEAT_GAIN * local energy, BEAT_MAX)
WRIST_MAX_STEP = 40.0  # most the wrists move per frame relative to the body (slew limit)
TARGET_SMOOTH_SECONDS = 0.12  # each of the two one-pole filters smoothing targets / hand activity
REST_REACH = 0.97  # shoulder-wrist distance at rest / (upper arm + forearm)
_SOFT_REACH, _MAX_REACH = 0.975, 0.999  # soft limit of the reach (fractions of the arm's length)

# rest geometry at body scale 1 (the person's right side; the left mirrors it)
_SHOULDER_XY = np.array([82.0, -12.0])  # |x| and y of the shoulders
_UPPER_ARM, _FOREARM = 135.0, 128.0
_REST_WRIST_INWARD = 20.0  # the rest wrist is this much closer to the midline than the shoulder
_NOSE_XY = np.array([0.0, 70.0])
_EYE_XY = np.array([16.0, 82.0])  # |x| and y of the eyes
_HAND_ROOT_OFFSET = 4.0  # hand root beyond the wrist along the forearm
_HAND_FLEX = np.deg2rad(8.0)  # hand bent toward the midline
# fingers thumb, index, middle, ring, little: fan angle (degrees toward the midline from the hand
# axis), curl per joint (degrees, same sign convention), segment lengths (root->1, 1->2, 2->3, 3->4)
_FINGER_ANGLES = np.deg2rad([40.0, 12.0, 0.0, -10.0, -20.0])
_FINGER_CURL = np.deg2rad([-10.0, 6.0, 6.0, 6.0, 6.0])
_FINGER_LENGTHS = np.array([[12, 14, 11, 9], [27, 13, 9, 7], [28, 14, 10, 8], [26, 12, 9, 7], [23, 10, 8, 6]],
                           dtype=np.float64)


# ---- helpers ----------------------------------------------------------------------------------
def _rot(v: np.ndarray, angle: np.ndarray | float) -> np.ndarray:
    """Rotate 2-vectors ``v [..., 2]`` counter-clockwise by ``angle`` (radians, broadcast)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([v[..., 0] * c - v[..., 1] * s, v[..., 0] * s + v[..., 1] * c], axis=-1)


def _one_pole(x: np.ndarray, seconds: float) -> np.ndarray:
    """Causal one-pole low-pass along axis 0 (time at ``FPS``), started at ``x[0]``."""
    k = 1.0 - np.exp(-1.0 / (FPS * seconds))
    y = np.empty_like(x)
    acc = x[0].copy() if x.ndim > 1 else x[0]
    for t in range(len(x)):
        acc = acc + k * (x[t] - acc)
        y[t] = acc
    return y


def _follow(e: np.ndarray) -> np.ndarray:
    """Envelope follower: one-pole toward ``e`` with the attack time constant when rising and the
    release one when falling."""
    ka = 1.0 - np.exp(-1.0 / (FPS * ATTACK_SECONDS))
    kr = 1.0 - np.exp(-1.0 / (FPS * RELEASE_SECONDS))
    out = np.empty(len(e))
    acc = 0.0
    for t, v in enumerate(e.tolist()):
        acc += (ka if v > acc else kr) * (v - acc)
        out[t] = acc
    return out


def _slew_limit(x: np.ndarray, step: float) -> np.ndarray:
    """Follow ``x [T, P, 2]`` (P 2-vectors over time) moving each vector by at most ``step`` per
    frame, starting at ``x[0]``."""
    out = x.copy()
    cur = [list(map(float, v)) for v in x[0]] if len(x) else []
    for t in range(1, len(x)):
        for i, (tx, ty) in enumerate(x[t].tolist()):
            dx, dy = tx - cur[i][0], ty - cur[i][1]
            k = min(1.0, step / max((dx * dx + dy * dy) ** 0.5, 1e-12))
            cur[i][0] += k * dx
            cur[i][1] += k * dy
            out[t, i] = cur[i]
    return out


def _frame_edges(n: int) -> np.ndarray:
    """Sample boundaries ``[T + 1]`` of the 1/FPS windows of ``n`` samples (the last clipped to n)."""
    frames = int(round(n / SAMPLE_RATE * FPS))
    return np.minimum(np.round(np.arange(frames + 1) * (SAMPLE_RATE / FPS)).astype(np.int64), n)


# ---- audio ------------------------------------------------------------------------------------
def _syllable_timing(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Onsets and durations (seconds) of the syllables of one clip, and the speaker's base f0."""
    f0_base = rng.uniform(100.0, 210.0)
    rate_mean = rng.uniform(3.5, 5.5)
    p_pause = rng.uniform(0.08, 0.25)
    n_words = int(np.ceil(seconds / (SYLLABLE_SECONDS[0] + WORD_GAP_SECONDS[0]))) + 2  # enough to fill
    n_syl = rng.choice(len(WORD_LENGTH_PROBS), size=n_words, p=WORD_LENGTH_PROBS) + 1
    word_rate = rate_mean * rng.uniform(0.85, 1.15, n_words)
    gap = np.where(rng.random(n_words) < p_pause, rng.uniform(*PAUSE_SECONDS, n_words),
                   rng.uniform(*WORD_GAP_SECONDS, n_words))
    lead = rng.uniform(0.1, 0.6)
    word_id = np.repeat(np.arange(n_words), n_syl)
    first = np.cumsum(n_syl) - n_syl
    last = first + n_syl - 1
    rate = np.clip(word_rate[word_id] * rng.uniform(0.9, 1.1, len(word_id)), *SYLLABLE_RATE_RANGE)
    interval = 1.0 / rate
    dur = np.clip(interval * rng.uniform(0.6, 0.95, len(word_id)), *SYLLABLE_SECONDS)
    start_in_run = np.cumsum(interval) - interval
    offset = start_in_run - start_in_run[first[word_id]]  # onset within its word
    span = offset[last] + dur[last]
    word_start = lead + np.concatenate([[0.0], np.cumsum(span + gap)[:-1]])
    onset = word_start[word_id] + offset
    keep = onset + dur <= seconds - 0.02  # onsets increase, so this is a prefix
    return onset[keep], dur[keep], f0_base


def speech(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like audio of ``round(seconds * SAMPLE_RATE)`` samples (float32, peak ``PEAK`` plus the
    noise floor) and its syllable onset times in seconds (float32, increasing). See the module
    docstring for the model; all syllables are synthesized at once (one FFT per syllable)."""
    n = int(round(seconds * SAMPLE_RATE))
    onset, dur, f0_base = _syllable_timing(rng, seconds)
    vtl = rng.uniform(0.9, 1.15)
    s = len(onset)
    audio = np.zeros(n)
    if s:
        # voiced part: sawtooth with a linear f0 glide, formant-weighted in the frequency domain
        f0s = np.clip(f0_base * rng.uniform(0.88, 1.15, s), *F0_RANGE)
        f0e = np.clip(f0s * rng.uniform(0.8, 1.15, s), *F0_RANGE)
        t = np.arange(_SYL_SAMPLES) / SAMPLE_RATE
        tt = np.minimum(t[None, :], dur[:, None])
        cycles = f0s[:, None] * tt + (f0e - f0s)[:, None] * tt**2 / (2.0 * dur[:, None])
        src = 2.0 * (cycles % 1.0) - 1.0
        formants = VOWEL_FORMANTS[rng.integers(0, len(VOWEL_FORMANTS), s)] * vtl * rng.uniform(0.95, 1.05, (s, 3))
        freqs = np.fft.rfftfreq(_NFFT, 1.0 / SAMPLE_RATE)
        detune = (freqs[None, None, :] - formants[:, :, None]) / (FORMANT_BANDWIDTHS[None, :, None] / 2.0)
        gain = (FORMANT_GAINS[None, :, None] / np.sqrt(1.0 + detune**2)).sum(axis=1)
        voiced = np.fft.irfft(np.fft.rfft(src, _NFFT) * gain, _NFFT)[:, :_SYL_SAMPLES]
        attack = rng.uniform(0.02, 0.05, s)[:, None]
        decay = rng.uniform(0.04, 0.1, s)[:, None]
        rise = 0.5 - 0.5 * np.cos(np.pi * np.clip(t[None, :] / attack, 0.0, 1.0))
        fall = 0.5 - 0.5 * np.cos(np.pi * np.clip((dur[:, None] - t[None, :]) / decay, 0.0, 1.0))
        voiced *= rise * fall
        level = rng.uniform(0.5, 1.0, s)
        rms = np.sqrt((voiced**2).sum(axis=1) / (dur * SAMPLE_RATE))
        voiced *= (level / np.maximum(rms, 1e-12))[:, None]
        # consonants: Hann-shaped high-passed noise bursts ending at the onset
        has_burst = rng.random(s) < CONSONANT_PROB
        blen = np.round(rng.uniform(0.02, 0.06, s) * SAMPLE_RATE).astype(np.int64)
        bamp = level * rng.uniform(0.1, 0.3, s) * has_burst
        noise = np.diff(rng.standard_normal((s, _BURST_SAMPLES + 1)), axis=1) / np.sqrt(2.0)
        i = np.arange(_BURST_SAMPLES)
        bwin = np.sin(np.pi * np.minimum(i[None, :] / blen[:, None], 1.0)) ** 2
        burst = noise * bwin * bamp[:, None]
        # overlap-add
        start = np.round(onset * SAMPLE_RATE).astype(np.int64)
        vmask = t[None, :] < dur[:, None]
        vidx = (start[:, None] + np.arange(_SYL_SAMPLES)[None, :])[vmask]
        bmask = i[None, :] < blen[:, None]
        bidx = (start[:, None] - blen[:, None] + i[None, :])[bmask]
        audio = np.bincount(np.concatenate([vidx, bidx]), np.concatenate([voiced[vmask], burst[bmask]]),
                            minlength=n)[:n]
        audio *= PEAK / max(np.abs(audio).max(), 1e-12)
    audio += rng.standard_normal(n) * NOISE_RMS
    return audio.astype(np.float32), onset.astype(np.float32)


def near_silence(seed: int, seconds: float) -> np.ndarray:
    """``round(seconds * SAMPLE_RATE)`` samples (float32) of only the noise floor (RMS ``NOISE_RMS``)
    and, with probability 1/2, a faint 50 or 60 Hz hum with its second harmonic."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    audio = rng.standard_normal(n) * NOISE_RMS
    if rng.random() < 0.5:
        f = 50.0 if rng.random() < 0.5 else 60.0
        t = np.arange(n) / SAMPLE_RATE
        amp = rng.uniform(0.5, 1.5) * NOISE_RMS
        phase = rng.uniform(0.0, 2 * np.pi, 2)
        audio += amp * (np.sin(2 * np.pi * f * t + phase[0]) + 0.3 * np.sin(4 * np.pi * f * t + phase[1]))
    return audio.astype(np.float32)


def energy(audio: np.ndarray) -> np.ndarray:
    """Per-motion-frame energy ``[T]`` (float32), ``T = round(len(audio) / SAMPLE_RATE * FPS)``: the
    RMS of each 1/FPS window divided by ``ENERGY_REF`` and clipped to [0, 1]."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    edges = _frame_edges(len(x))
    c = np.concatenate([[0.0], np.cumsum(x * x)])
    sums = c[edges[1:]] - c[edges[:-1]]
    rms = np.sqrt(np.maximum(sums, 0.0) / np.maximum(edges[1:] - edges[:-1], 1))
    return np.clip(rms / ENERGY_REF, 0.0, 1.0).astype(np.float32)


# ---- poses ------------------------------------------------------------------------------------
def _default_body() -> dict[str, float]:
    return {"shoulder": 1.0, "upper_arm": 1.0, "forearm": 1.0, "hand": 1.0, "head": 1.0}


def _sample_body(rng: np.random.Generator) -> dict[str, float]:
    """Per-clip body proportions: a global scale times per-part factors, each within +-8 %."""
    scale = rng.uniform(0.95, 1.05)
    parts = np.clip(scale * rng.uniform(0.97, 1.03, 5), 0.92, 1.08)
    return dict(zip(_default_body(), parts.tolist()))


def _arm_lengths(body: dict[str, float]) -> tuple[float, float]:
    return _UPPER_ARM * body["upper_arm"], _FOREARM * body["forearm"]


def _rest_joints(body: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Rest shoulders and wrists ``[2 arms, 2]`` (right, left) of ``body``."""
    l1, l2 = _arm_lengths(body)
    sx, sy = _SHOULDER_XY * body["shoulder"]
    shoulders = np.array([[-sx, sy], [sx, sy]])
    inward = _REST_WRIST_INWARD * body["shoulder"]
    drop = np.sqrt((REST_REACH * (l1 + l2)) ** 2 - inward**2)
    wrists = shoulders + np.array([[inward, -drop], [-inward, -drop]])
    return shoulders, wrists


def _ik(shoulder: np.ndarray, wrist: np.ndarray, l1: float, l2: float, bend: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-link inverse kinematics: ``(elbow, wrist)`` ``[T, 2]`` with ``|elbow - shoulder| = l1``
    and ``|wrist - elbow| = l2``; the reach toward the target ``wrist`` is softly limited (tanh) to
    ``_MAX_REACH`` of ``l1 + l2``; ``bend`` (+-1) picks the side of the elbow."""
    v = wrist - shoulder
    d = np.maximum(np.linalg.norm(v, axis=-1), 1e-9)
    u = v / d[:, None]
    lo, d0, hi = abs(l1 - l2) + 0.05 * (l1 + l2), _SOFT_REACH * (l1 + l2), _MAX_REACH * (l1 + l2)
    d = np.where(d > d0, d0 + (hi - d0) * np.tanh((d - d0) / (hi - d0)), d)
    d = np.maximum(d, lo)
    cos_a = np.clip((l1 * l1 + d * d - l2 * l2) / (2.0 * l1 * d), -1.0, 1.0)
    elbow = shoulder + l1 * _rot(u, bend * np.arccos(cos_a))
    return elbow, shoulder + u * d[:, None]


def _hand(wrist: np.ndarray, elbow: np.ndarray, arm: int, size: float, opening: np.ndarray) -> np.ndarray:
    """The 21 hand joints ``[T, 21, 2]`` (root, then 4 joints each of thumb, index, middle, ring,
    little) of arm ``arm`` (0 right, 1 left), rigid with the forearm; ``opening`` [T] in [0, 1]."""
    fore = wrist - elbow
    fore = fore / np.linalg.norm(fore, axis=-1, keepdims=True)
    medial = -_OUTWARD[arm]  # counter-clockwise (+) turns a downward forearm of the right arm inward
    base = np.arctan2(fore[:, 1], fore[:, 0]) + medial * _HAND_FLEX  # [T]
    root = wrist + _HAND_ROOT_OFFSET * size * fore
    spread = (1.0 + 0.4 * opening)[:, None, None] * _FINGER_ANGLES[None, :, None]
    curl = (1.0 - 0.5 * opening)[:, None, None] * _FINGER_CURL[None, :, None] * np.arange(4)[None, None, :]
    ang = base[:, None, None] + medial * (spread + curl)  # [T, 5, 4]
    seg = size * _FINGER_LENGTHS[None, :, :, None] * np.stack([np.cos(ang), np.sin(ang)], axis=-1)
    fingers = root[:, None, None, :] + np.cumsum(seg, axis=2)  # [T, 5, 4, 2]
    return np.concatenate([root[:, None, :], fingers.reshape(len(wrist), 20, 2)], axis=1)


def _render(body: dict[str, float], tilt: np.ndarray, breath: np.ndarray, head_tilt: np.ndarray,
            nod: np.ndarray, wrist_offset: np.ndarray, opening: np.ndarray) -> np.ndarray:
    """Poses ``[T, 52, 2]`` (float64): the rest pose of ``body`` with the shoulders and arms tilted
    by ``tilt`` [T] (radians) about the neck and lifted by ``breath`` [T], the head tilted by
    ``head_tilt`` and lowered by ``nod``, the wrists moved by ``wrist_offset`` [T, 2 arms, 2]."""
    frames = len(tilt)
    pose = np.zeros((frames, NUM_JOINTS, 2))
    rest_sh, rest_wr = _rest_joints(body)
    lift = np.stack([np.zeros(frames), breath], axis=-1)[:, None, :]
    shoulders = _rot(rest_sh[None], tilt[:, None]) + lift
    wrists = _rot(rest_wr[None], tilt[:, None]) + lift + wrist_offset
    l1, l2 = _arm_lengths(body)
    for arm in range(2):
        elbow, wrist = _ik(shoulders[:, arm], wrists[:, arm], l1, l2, _BEND[arm])
        pose[:, _SHOULDER[arm]] = shoulders[:, arm]
        pose[:, _ELBOW[arm]] = elbow
        pose[:, _WRIST[arm]] = wrist
        root = _HAND_ROOT[arm]
        pose[:, root:root + 21] = _hand(wrist, elbow, arm, body["hand"], opening)
    head = np.array([_NOSE_XY, _EYE_XY * [-1, 1], _EYE_XY]) * body["head"]
    drop = np.stack([np.zeros(frames), -nod], axis=-1)[:, None, :]
    pose[:, [_NOSE, _R_EYE, _L_EYE]] = _rot(head[None], head_tilt[:, None]) + drop
    return pose


def rest_pose() -> np.ndarray:
    """The relaxed rest pose ``[52, 2]`` (float32) of the average body: arms hanging with the elbows
    slightly out, hands fanning down from the wrists."""
    z = np.zeros(1)
    return _render(_default_body(), z, z, z, z, np.zeros((1, 2, 2)), z)[0].astype(np.float32)


def gestures(rng: np.random.Generator, audio: np.ndarray, onsets: np.ndarray) -> np.ndarray:
    """Poses ``[T, 52, 2]`` (float32) at ``FPS`` that follow ``audio`` (its energy drives the gesture
    amplitude) and its syllable ``onsets`` (seconds; one beat each, may be empty). Draws the body
    proportions and the gesture style from ``rng``. See the module docstring."""
    e = energy(audio).astype(np.float64)
    frames = len(e)
    t = (np.arange(frames) + 0.5) / FPS
    body = _sample_body(rng)
    gain = rng.uniform(0.85, 1.15)
    a = _one_pole(_one_pole(_follow(e), AMP_SMOOTH_SECONDS), AMP_SMOOTH_SECONDS) if frames else e
    amp = np.clip((a - GATE) / (FULL - GATE), 0.0, 1.0)

    # gesture targets, switched at (some) onsets
    on = np.sort(np.asarray(onsets, dtype=np.float64).reshape(-1))
    on = on[(on >= 0.0) & (on < frames / FPS)]
    gaps = np.diff(np.concatenate([[-np.inf], on]))
    u = rng.random(len(on))
    new = ((gaps > 0.4) & (u < 0.6)) | (u < 0.15)
    new[:1] = True
    switch = on[new] - 0.1
    k = len(switch) + 1
    mode = rng.choice(3, size=k, p=[0.35, 0.25, 0.4])  # right, left, both
    active = np.stack([mode != 1, mode != 0], axis=-1)  # [K, 2 arms]
    disp = np.stack([rng.uniform(-50.0, 60.0, (k, 2)) * _OUTWARD, rng.uniform(70.0, 170.0, (k, 2))], axis=-1)
    disp *= np.where(active, 1.0, 0.2)[..., None]
    weight = np.where(active, 1.0, 0.25)
    seg = np.searchsorted(switch, t, side="right")
    track = np.concatenate([disp[seg].reshape(frames, 4), weight[seg]], axis=1)
    if frames:
        track = _one_pole(_one_pole(track, TARGET_SMOOTH_SECONDS), TARGET_SMOOTH_SECONDS)
    disp_t, weight_t = track[:, :4].reshape(frames, 2, 2), track[:, 4:]

    # beats
    if len(on):
        idx = np.minimum((on * FPS).astype(np.int64), frames - 1)
        e_loc = np.max(np.stack([e[np.minimum(idx + j, frames - 1)] for j in range(4)]), axis=0)
        depth = np.minimum(BEAT_GAIN * e_loc, BEAT_MAX)
        phase = np.clip((t[:, None] - on[None, :] + 0.05) / BEAT_SECONDS, 0.0, 1.0)
        pulse = np.sin(np.pi * phase) ** 2
        beat = pulse @ depth
        nod = 3.0 * pulse @ e_loc
    else:
        beat = nod = np.zeros(frames)
    offset = gain * amp[:, None, None] * disp_t
    offset[..., 1] -= beat[:, None] * weight_t
    offset = _slew_limit(offset, WRIST_MAX_STEP)

    # idle motion
    f = rng.uniform(0.07, 0.2, 3)
    ph = rng.uniform(0.0, 2 * np.pi, 4)
    tilt = np.deg2rad(0.6 * np.sin(2 * np.pi * f[0] * t + ph[0]) + 0.4 * np.sin(2 * np.pi * f[1] * t + ph[1]))
    head_tilt = np.deg2rad((1.5 + 2.0 * amp) * np.sin(2 * np.pi * f[2] * t + ph[2]))
    breath = np.sin(2 * np.pi * rng.uniform(0.2, 0.33) * t + ph[3])
    return _render(body, tilt, breath, head_tilt, nod, offset, amp).astype(np.float32)


def clip(seed: int, seconds: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """One speaker clip: ``(audio [n] float32, poses [T, 52, 2] float32)``, from
    ``numpy.random.default_rng(seed)`` (speech, then the gestures of that speech)."""
    rng = np.random.default_rng(seed)
    audio, onsets = speech(rng, seconds)
    return audio, gestures(rng, audio, onsets)


def wrist_speed(poses: np.ndarray) -> float:
    """Mean per-frame displacement of both wrists (joints 3 and 6) over ``poses [T, 52, 2]``."""
    p = np.asarray(poses, dtype=np.float64)[:, list(_WRIST)]
    if len(p) < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(p, axis=0), axis=-1).mean())
