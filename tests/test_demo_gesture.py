"""The bundled demo speech-to-gesture model (a2g-gpt trained by ``scripts/train_demo_gesture.py`` on
``mmgen_engine.demo.gesture_world``, converted with the production ``a2g-gpt`` converter): on
held-out clips speech produces clearly more motion than near-silence, and ``mmgen demo`` writes the
GIF."""
from __future__ import annotations

import numpy as np
import PIL.Image

import mmgen_engine as mm
from mmgen_engine.demo import gesture_world as world
from mmgen_engine.demo import run_gesture_demo

SECONDS = 6.0
CLIPS = 6  # held-out seeds HELD_OUT_SEED + 100 .. + 105, never seen in training
MIN_RATIO = 4.0  # observed 19.5 with the shipped model (greedy: 22; the data itself: ~55)


def test_speech_moves_the_demo_model_clearly_more_than_near_silence():
    pipe = mm.load(mm.demo_model("speech-to-gesture"))
    assert pipe.fps == world.FPS and len(pipe.skeleton) == 52
    speech, silence = [], []
    for i in range(CLIPS):
        seed = world.HELD_OUT_SEED + 100 + i
        audio, _ = world.clip(seed, SECONDS)
        poses = pipe.generate(audio, world.SAMPLE_RATE)
        assert poses.shape == (round(SECONDS * world.FPS), 52, 2) and np.isfinite(poses).all()
        speech.append(world.wrist_speed(poses))
        silence.append(world.wrist_speed(pipe.generate(world.near_silence(seed, SECONDS), world.SAMPLE_RATE)))
    ratio = np.mean(speech) / np.mean(silence)
    assert ratio >= MIN_RATIO, f"speech {np.mean(speech):.3f} vs near-silence {np.mean(silence):.3f} per frame"
    # the poses stay a plausible upper body: wrists below the shoulders' height band, near the rest pose's scale
    rest = world.rest_pose()
    assert np.abs(poses).max() < 3 * np.abs(rest).max()


def test_gesture_demo_writes_a_gif(tmp_path):
    result = run_gesture_demo(tmp_path, seconds=4.0)
    with PIL.Image.open(result["gif"]) as gif:
        assert gif.n_frames > 1
    data = np.load(result["npz"], allow_pickle=False)
    assert data["poses"].shape == (60, 52, 2)
    assert result["speech_motion"] > result["silence_motion"]
