"""Condition adherence (train.adherence): edge F1 of a generated image against its conditioning
image, with the cache's own detector, on the fill dataset's images (circles, 64 px)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from precompute import conditions
from shards.identity import Condition
from train.adherence import TOLERANCE_PX, EdgeDetector, edge_f1


def _rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("method, params", [("canny", {"low": 100, "high": 200}), ("sketch", {})])
def test_the_image_a_condition_was_computed_from_scores_one_and_another_scores_low(fill_data, method, params):
    detector = EdgeDetector.for_condition(Condition(method=method, version=1, params=params))
    source = _rgb(fill_data / "target/0.png")  # a filled circle; its condition: the circle's edge
    cond = conditions.canny(source, 100, 200) if method == "canny" else conditions.sketch(source)
    assert detector.score(source, cond) == 1.0
    other = _rgb(fill_data / "target/1.png")  # another circle, elsewhere, other colours
    expected = {"canny": 0.1126, "sketch": 0.1530}[method]
    assert detector.score(other, cond) == pytest.approx(expected, abs=5e-4)
    assert detector.score(np.zeros_like(source), cond) == 0.0  # no edge at all
    # The fill dataset's own conditioning image (a 2 px outline) is the same circle: within the tolerance.
    assert detector.score(source, _rgb(fill_data / "source/0.png")) == 1.0


def test_edge_f1_counts_edges_within_the_tolerance():
    reference = np.zeros((32, 32), bool)
    reference[10, 4:28] = True
    shifted = np.roll(reference, TOLERANCE_PX, axis=0)
    assert edge_f1(shifted, reference) == 1.0
    assert edge_f1(np.roll(reference, TOLERANCE_PX + 1, axis=0), reference) == 0.0
    assert edge_f1(shifted, reference, tolerance=0) == 0.0
    half = reference.copy()
    half[10, 16:28] = False  # the left half found, nothing wrong drawn: P = 1; of the 24 reference
    recall = 14 / 24  # pixels, columns 4..17 lie within 2 px of a found one
    assert edge_f1(half, reference) == pytest.approx(2 * recall / (1 + recall))
    assert edge_f1(np.zeros_like(reference), np.zeros_like(reference)) == 1.0
    assert edge_f1(reference, np.zeros_like(reference)) == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        edge_f1(reference, reference[:16])


def test_only_computed_edge_conditions_have_a_detector():
    assert EdgeDetector.for_condition(Condition()) is None  # dataset-provided
    assert EdgeDetector.for_condition(Condition(method="gray", version=1)) is None
    canny = EdgeDetector.for_condition(Condition(method="canny", version=1, params={"low": 50, "high": 150}))
    assert canny.params == {"low": 50, "high": 150}
    assert canny.describe() == "canny (low 50, high 150), 2 px tolerance"
    # The cache's thresholds are the ones rerun: a faint edge that 50/150 finds and 100/200 does not.
    ramp = np.zeros((32, 32, 3), np.uint8)
    ramp[:, 16:] = 45  # a Sobel (L1) gradient of 4 x 45 = 180: between 150 and 200
    strong = EdgeDetector("canny", {"low": 100, "high": 200})
    assert canny.detect(ramp).any() and not strong.detect(ramp).any()
