"""Conditions computed at precompute (canny, gray, sketch), their place in the cache identity, the
settings that go with them, and train's soft threshold (train.augment)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from precompute.conditions import ConditionSpec, canny, compute_condition, luma, sketch
from precompute.config import PrecomputeConfig
from precompute.errors import ConfigError
from precompute.settings import resolve
from shards.manifest import identity_diff
from shards.identity import Condition
from train.config import TrainConfig
from train.plan import range_problems
from train.augment import (
    DEFAULT_SOFT_THRESHOLD_RANGE,
    binarize,
    soft_threshold,
    soft_threshold_range_for,
)


def _image(h=48, w=64, seed=0) -> np.ndarray:
    """Blocks of colour plus noise: edges of every orientation and some texture."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[h // 2 :, w // 3 :] = (0, 200, 40)
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (20, 20, 230)
    return np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The methods


@pytest.mark.parametrize("low,high", [(100, 200), (50, 120), (0, 0)])
def test_canny_equals_opencv_on_the_same_input(low, high):
    rgb = _image()
    edges = cv2.Canny(rgb, low, high)
    out = canny(rgb, low, high)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], edges)
    assert set(np.unique(out)) <= {0, 255} and out.any()
    np.testing.assert_array_equal(compute_condition(rgb, ConditionSpec("canny", low, high)), out)


def test_canny_sees_edges_between_colours_of_equal_brightness():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (150, 100, 0)
    rgb[:, 16:] = (0, 150, 140)  # another colour of the same luma (104)
    assert luma(rgb)[0, 0] == luma(rgb)[0, 31] == 104
    assert not cv2.Canny(luma(rgb), 100, 200).any()  # invisible in gray
    assert canny(rgb)[:, 14:18].any()  # OpenCV's multi-channel gradient finds the boundary


def test_gray_is_pils_luma_on_every_channel():
    rgb = _image()
    out = compute_condition(rgb, ConditionSpec("gray"))
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_sketch_is_a_soft_edge_map_peaking_on_edges():
    rgb = np.zeros((32, 64, 3), np.uint8)
    rgb[:, 32:] = 255  # one vertical step edge between columns 31 and 32
    out = sketch(rgb)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    row = out[16, :, 0].astype(int)
    assert row[31] == row[32] == 255 and row[:25].max() == 0 and row[40:].max() == 0
    # Soft: the blur spreads the edge over a few columns with intermediate values.
    assert 0 < row[30] < 255 and 0 < row[33] < 255
    # Scale-free: a fainter edge gives the same map (normalised by its 99th percentile).
    faint = rgb // 4
    np.testing.assert_array_equal(sketch(faint), out)
    # A flat image has no edges.
    assert not sketch(np.full((16, 16, 3), 77, np.uint8)).any()


def test_condition_spec_problems():
    assert ConditionSpec("canny").problems() == []
    assert "must be one of" in ConditionSpec("depth").problems()[0]
    assert "above --canny-high" in ConditionSpec("canny", 200, 100).problems()[0]
    assert "already binary" in ConditionSpec("canny", soft=True).problems()[0]
    assert ConditionSpec("sketch", soft=True).problems() == []
    with pytest.raises(ValueError):
        compute_condition(np.zeros((4, 4), np.uint8), ConditionSpec("gray"))


# --------------------------------------------------------------------------------------------
# Settings and identity


@pytest.fixture
def identity_of(tiny_model, fill_data, tmp_path):
    """The identity the run's settings give for these options (on the tiny model and fill data)."""
    def make(**kw) -> dict:
        cfg = PrecomputeConfig(model=str(tiny_model), data=str(fill_data), cache=str(tmp_path / "c"), resolution=64,
                               **kw)
        return resolve(cfg, cuda_available=False).identity(encoder={"model": "m"}, latent={"channels": 4},
                                                           text={"max_length": 77}, source={"kind": "folder"})
    return make


def test_condition_method_and_parameters_are_part_of_the_identity(identity_of):
    _identity = identity_of
    base = _identity()
    assert base["condition"] == {"method": "dataset", "version": None, "params": {}, "soft": False}
    canny_default = _identity(condition="canny")
    assert canny_default["condition"] == {"method": "canny", "version": 1, "params": {"low": 100, "high": 200},
                                          "soft": False}
    assert identity_diff(base, canny_default) == [
        "condition.method: 'dataset' != 'canny'",
        "condition.params.high: (absent) != 200",
        "condition.params.low: (absent) != 100",
        "condition.version: None != 1",
    ]
    assert identity_diff(canny_default, _identity(condition="canny", canny_low=80)) == ["condition.params.low: 100 != 80"]
    assert identity_diff(_identity(condition="sketch"), _identity(condition="sketch", condition_soft=True)) == [
        "condition.soft: False != True"]
    assert identity_diff(base, _identity(condition="gray"))[0] == "condition.method: 'dataset' != 'gray'"


def test_views_and_buckets_are_part_of_the_identity(identity_of):
    _identity = identity_of
    a, b = _identity(), _identity(flip=True, crops=2)
    assert identity_diff(a, b) == ["seed: None != 0", "views.crops: 1 != 2", "views.flip: False != True"]
    bucketed = _identity(buckets="64x64,64x96")
    assert bucketed["geometry"]["buckets"] == [[64, 64], [64, 96]]


def test_every_bucket_view_and_condition_problem_is_listed(tiny_model, fill_data, tmp_path):
    cfg = PrecomputeConfig(
        model=str(tiny_model), data=str(fill_data), cache=str(tmp_path / "c"), resolution=64, buckets="wide",
        crops=0, condition="gray", canny_low=10, condition_soft=False, conditioning_image_column="source",
    )
    with pytest.raises(ConfigError) as err:
        resolve(cfg, cuda_available=False)
    problems = err.value.problems
    assert any("--buckets must be none, sdxl, sdxl-full or a list" in p for p in problems)
    assert any("--crops must be an integer in [1, 16]" in p for p in problems)
    assert any("--canny-low only applies to --condition canny" in p for p in problems)
    assert any("--conditioning-image-column has no effect with --condition gray" in p for p in problems)
    assert len(problems) == 4, problems
    cfg = PrecomputeConfig(model=str(tiny_model), data=str(fill_data), cache=str(tmp_path / "c"), resolution=64,
                           buckets="sdxl", bucket_step=48, condition="canny", condition_soft=True)
    with pytest.raises(ConfigError) as err:
        resolve(cfg, cuda_available=False)
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert "--bucket-step 48 is not a multiple of 32" in problems[0]  # the tiny UNet: 8 * 2^(3-1)
    assert "already binary" in problems[1]
    fine = resolve(dataclasses.replace(cfg, bucket_step=None, condition_soft=False), cuda_available=False)
    assert fine.granularity == 32


# --------------------------------------------------------------------------------------------
# Train's soft threshold


def test_soft_threshold_is_binary_and_a_pure_function_of_seed_epoch_key():
    soft = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = soft_threshold(seed=0, epoch=0, key="000000-000001", low=0.3, high=0.8)
    assert 0.3 <= t < 0.8
    assert t == soft_threshold(seed=0, epoch=0, key="000000-000001", low=0.3, high=0.8)
    out = binarize(soft, t)
    assert out.dtype == soft.dtype and set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out, (soft >= t).float())
    # Each draw of a sample (a new epoch) gets another threshold, and so does another seed or key.
    draws = {soft_threshold(seed=0, epoch=e, key="000000-000001", low=0.3, high=0.8) for e in range(20)}
    assert len(draws) == 20 and min(draws) >= 0.3 and max(draws) < 0.8
    assert soft_threshold(seed=1, epoch=0, key="000000-000001", low=0.3, high=0.8) != t
    assert soft_threshold(seed=0, epoch=0, key="000000-000002", low=0.3, high=0.8) != t
    # Spread over the range: 2000 draws fill both halves about equally.
    many = np.array([soft_threshold(seed=0, epoch=e, key="k", low=0.3, high=0.8) for e in range(2000)])
    assert 0.45 < (many < 0.55).mean() < 0.55
    # Per-sample thresholds broadcast over a batch.
    ts = torch.tensor([0.2, 0.9]).view(-1, 1, 1, 1)
    assert torch.equal(binarize(soft, ts), torch.stack([(soft[0] >= 0.2).float(), (soft[1] >= 0.9).float()]))


def test_soft_threshold_ranges():
    # As typed, in a config file or from code: two numbers become a pair; the range is checked once.
    for given in ("0.3,0.8", " 0.3  0.8 ", [0.3, 0.8], ("0.3", "0.8")):
        assert TrainConfig(soft_threshold_range=given).soft_threshold_range == (0.3, 0.8)
    assert range_problems((0.3, 0.8)) == [] and range_problems((0.5, 0.5)) == []
    assert TrainConfig(soft_threshold_range="0.8,0.3").soft_threshold_range == (0.8, 0.3)
    for bad, problem in (("0.8,0.3", "0 <= low <= high <= 1, got (0.8, 0.3)"),
                         ("0.1,1.5", "0 <= low <= high <= 1, got (0.1, 1.5)"),
                         ("0.3", "two numbers (low, high), got '0.3'"), ("a,b", "two numbers (low, high), got 'a,b'")):
        assert range_problems(TrainConfig(soft_threshold_range=bad).soft_threshold_range) == [
            f"the soft threshold range must {'satisfy ' if 'low <=' in problem else 'be '}{problem}"]
    soft, hard = Condition(method="sketch", soft=True), Condition(method="canny", soft=False)
    assert soft_threshold_range_for(soft, None) == DEFAULT_SOFT_THRESHOLD_RANGE == (0.3, 0.8)
    assert soft_threshold_range_for(soft, (0.4, 0.6)) == (0.4, 0.6)
    assert soft_threshold_range_for(hard, None) is None and soft_threshold_range_for(Condition(), None) is None
    with pytest.raises(ValueError, match="does not store soft"):
        soft_threshold_range_for(hard, (0.3, 0.8))
