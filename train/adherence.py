"""Condition adherence: does a generated image follow its conditioning image?

For a cache whose conditioning images precompute computed with an edge detector (the cache
identity's `condition.method` is canny or sketch, `shards.identity.Condition.edge_like`), the
question has a measurable answer: run the very same detector, with the cache's parameters
(`precompute.conditions`), on the generated image and compare its edges with the conditioning
image's. The score is the edge F1:

- edges: canny gives binary maps; a sketch (soft) map is an edge where it is >= 0.5. The
  conditioning image is binarised the same way (>= 128 of 255 for canny, >= 0.5 for sketch).
- tolerance: an edge pixel counts as matched when the other map has an edge within
  `TOLERANCE_PX` = 2 pixels (Chebyshev distance: the other map dilated by a 5 x 5 square), which
  forgives the pixel or two an edge moves through resizing and VAE decoding.
- precision = matched generated edge pixels / generated edge pixels, recall = matched condition
  edge pixels / condition edge pixels, F1 = 2PR / (P + R); 1.0 when neither image has an edge,
  0.0 when only one has.

So an image equal to the one the condition was computed from scores exactly 1.0, and an image
whose edges are elsewhere scores near 0. Conditions the dataset supplied (method "dataset") or
that are not edges (gray) have no detector to rerun, so no score (`EdgeDetector.for_condition`
returns None and validation says so once). There is no lineart method in precompute yet; a new
edge-like method needs its detector added here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOLERANCE_PX = 2
SKETCH_EDGE_LEVEL = 0.5  # a soft edge map's edges: >= half of full strength


@dataclass(frozen=True)
class EdgeDetector:
    """The cache's condition detector and how its output becomes binary edges."""

    method: str  # "canny" | "sketch"
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def for_condition(cls, condition: Any) -> "EdgeDetector | None":
        """The detector of a cache's `shards.identity.Condition`, or None when it has none to rerun."""
        if not condition.edge_like:
            return None
        return cls(condition.method, dict(condition.params or {}))

    def describe(self) -> str:
        if self.method == "canny":
            return (f"canny (low {self.params.get('low', '?')}, high {self.params.get('high', '?')}), "
                    f"{TOLERANCE_PX} px tolerance")
        return f"{self.method} (edges >= {SKETCH_EDGE_LEVEL:g}), {TOLERANCE_PX} px tolerance"

    def _level(self) -> int:
        return 128 if self.method == "canny" else int(np.ceil(SKETCH_EDGE_LEVEL * 255))

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """bool (H, W): the edges the detector finds in a uint8 (H, W, 3) image."""
        from precompute import conditions

        if self.method == "canny":
            low = int(self.params.get("low", conditions.DEFAULT_CANNY_LOW))
            high = int(self.params.get("high", conditions.DEFAULT_CANNY_HIGH))
            edge_map = conditions.canny(np.ascontiguousarray(rgb), low, high)
        elif self.method == "sketch":
            edge_map = conditions.sketch(np.ascontiguousarray(rgb))
        else:
            raise ValueError(f"no edge detector for condition method {self.method!r}")
        return self.binarize(edge_map)

    def binarize(self, edge_map: np.ndarray) -> np.ndarray:
        """bool (H, W) from an edge map, uint8 (H, W) or (H, W, 3) (a conditioning image)."""
        gray = edge_map if edge_map.ndim == 2 else edge_map.max(axis=2)
        return gray >= self._level()

    def score(self, generated: np.ndarray, condition: np.ndarray) -> float:
        """Edge F1 of a generated uint8 (H, W, 3) image against its conditioning image (same size)."""
        if generated.shape[:2] != condition.shape[:2]:
            raise ValueError(f"generated image {generated.shape[:2]} and conditioning image {condition.shape[:2]} "
                             "differ in size")
        return edge_f1(self.detect(generated), self.binarize(condition))


def _dilate(edges: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    if radius <= 0:
        return edges
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(edges.astype(np.uint8), kernel).astype(bool)


def edge_f1(predicted: np.ndarray, reference: np.ndarray, tolerance: int = TOLERANCE_PX) -> float:
    """F1 of two bool edge maps of one size, a pixel matching within `tolerance` pixels (see the
    module docstring)."""
    if predicted.shape != reference.shape:
        raise ValueError(f"edge maps differ in size: {predicted.shape} vs {reference.shape}")
    n_pred, n_ref = int(predicted.sum()), int(reference.sum())
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if n_pred == 0 or n_ref == 0:
        return 0.0
    precision = float((predicted & _dilate(reference, tolerance)).sum()) / n_pred
    recall = float((reference & _dilate(predicted, tolerance)).sum()) / n_ref
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


__all__ = ["SKETCH_EDGE_LEVEL", "TOLERANCE_PX", "EdgeDetector", "edge_f1"]
