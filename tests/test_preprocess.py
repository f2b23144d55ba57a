"""Captioning preprocessing equals transformers' ViTImageProcessor (PIL backend) exactly."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import ViTImageProcessor

from mmgen_engine.config import ImagePreprocessConfig
from mmgen_engine.pipelines.captioning import CaptioningPipeline


class _Stub:
    """Only what ``CaptioningPipeline.preprocess`` reads."""

    def __init__(self, pre):
        self.preprocess = pre


def pipeline_with(pre: ImagePreprocessConfig) -> CaptioningPipeline:
    pipe = CaptioningPipeline.__new__(CaptioningPipeline)
    pipe.config = _Stub(pre)
    pipe._mean = np.array(pre.image_mean, dtype=np.float32)[:, None, None]
    pipe._std = np.array(pre.image_std, dtype=np.float32)[:, None, None]
    return pipe


@pytest.mark.parametrize("size", [(224, 224), (64, 64), (30, 47)])
@pytest.mark.parametrize("resample", [0, 2, 3])
@pytest.mark.parametrize("src_shape", [(50, 70), (224, 224), (3, 301)])
def test_matches_vit_image_processor(size, resample, src_shape):
    rng = np.random.default_rng(sum(size) + resample)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    hf = ViTImageProcessor(size={"height": size[0], "width": size[1]}, resample=resample,
                           image_mean=mean, image_std=std)
    pre = ImagePreprocessConfig(height=size[0], width=size[1], resample=resample, image_mean=mean, image_std=std)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (*src_shape, 3), dtype=np.uint8)) for _ in range(2)]
    ref = hf(images=images, return_tensors="pt")["pixel_values"]
    ours = pipeline_with(pre).preprocess(images)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.equal(ours, ref)


def test_array_path_and_mode_inputs(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 33, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    PIL.Image.fromarray(arr).save(path)
    pipe = pipeline_with(ImagePreprocessConfig(height=16, width=16))
    a, b, c = pipe.preprocess([arr]), pipe.preprocess([str(path)]), pipe.preprocess([PIL.Image.fromarray(arr)])
    assert torch.equal(a, b) and torch.equal(a, c)
    gray = PIL.Image.fromarray(arr[:, :, 0], "L")  # converted to RGB like every other input
    assert pipe.preprocess([gray]).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("size", [384, 40])
@pytest.mark.parametrize("src_shape", [(50, 70), (384, 384), (3, 301)])
def test_matches_blip_image_processor(size, src_shape):
    """BLIP: a fixed square bicubic resize with CLIP's mean and std."""
    from transformers import BlipImageProcessor

    from mmgen_engine.convert.hf_towers import CLIP_MEAN, CLIP_STD
    rng = np.random.default_rng(size)
    hf = BlipImageProcessor(size={"height": size, "width": size})
    pre = ImagePreprocessConfig(height=size, width=size, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (*src_shape, 3), dtype=np.uint8)) for _ in range(2)]
    assert torch.equal(pipeline_with(pre).preprocess(images), hf(images=images, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("edge,crop", [(224, 224), (40, 32), (33, 33)])
@pytest.mark.parametrize("src_shape", [(50, 70), (70, 50), (224, 224), (31, 301), (301, 31), (17, 18)])
def test_matches_clip_image_processor(edge, crop, src_shape):
    """CLIP (GIT, ClipCap): the shorter side resized to ``edge`` (aspect kept, the longer side
    truncated), then a center crop, with odd margins on both axes."""
    from transformers import CLIPImageProcessor
    rng = np.random.default_rng(edge + crop)
    hf = CLIPImageProcessor(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop})
    pre = ImagePreprocessConfig(height=crop, width=crop, shortest_edge=edge, resample=3,
                                image_mean=hf.image_mean, image_std=hf.image_std)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (*src_shape, 3), dtype=np.uint8)) for _ in range(2)]
    ours, ref = pipeline_with(pre).preprocess(images), hf(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (2, 3, crop, crop)
    assert torch.equal(ours, ref)


def test_center_crop_larger_than_the_resize_is_rejected():
    from mmgen_engine.config import from_dict
    from mmgen_engine.errors import CheckpointError
    with pytest.raises(CheckpointError, match="center crop"):
        from_dict(ImagePreprocessConfig, {"height": 64, "width": 64, "shortest_edge": 32})
