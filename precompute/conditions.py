"""Conditioning images computed at precompute, from the training image after its geometry step.

For datasets without conditioning images, `--condition METHOD` derives one from each view's
cropped (and, for a flipped view, mirrored) RGB pixels, so the condition always matches the
latent pixel for pixel:

- `canny`: OpenCV's Canny edge detector on the RGB crop (OpenCV takes the strongest gradient over
  the three channels, so edges between colours of equal brightness survive, as in the annotators
  the published canny adapters were trained with); thresholds `--canny-low/--canny-high`
  (default 100/200). Binary, white edges on black.
- `gray`: ITU-R 601 luma (PIL's "L" conversion) repeated over RGB.
- `sketch`: a soft edge map for sketch / line-art adapters. Luma, Gaussian blur (sigma 1 px) to
  suppress pixel noise, Sobel gradient magnitude, divided by its 99th percentile (so the map's scale
  is comparable between images and a few extreme pixels do not darken the rest), clipped to
  [0, 1]. White edges on black, like the PiDiNet/HED maps the authors' sketch adapter was trained
  on. With `--condition-soft`, train binarises it with a random threshold every time the sample is
  drawn (the authors' sketch augmentation; see `train.augment`).

A `ConditionSpec` is part of the cache identity (`identity()`), method, parameters and algorithm
version included, so a cache is never extended with conditions computed another way. OpenCV
(opencv-python-headless) is imported only by the methods that need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

METHODS = ("canny", "gray", "sketch")
DEFAULT_CANNY_LOW = 100
DEFAULT_CANNY_HIGH = 200
SKETCH_BLUR_SIGMA = 1.0
SKETCH_PERCENTILE = 99.0
# Bumped when a method's output changes for the same parameters; recorded in the identity.
METHOD_VERSION = {"canny": 1, "gray": 1, "sketch": 1}
NEEDS_OPENCV = ("canny", "sketch")


@dataclass(frozen=True)
class ConditionSpec:
    """How conditioning images are computed. `soft`: train thresholds them per draw."""

    method: str
    canny_low: int = DEFAULT_CANNY_LOW
    canny_high: int = DEFAULT_CANNY_HIGH
    soft: bool = False

    def problems(self) -> list[str]:
        p = []
        if self.method not in METHODS:
            p.append(f"--condition must be one of {list(METHODS)}, got {self.method!r}")
        if self.method == "canny":
            for flag, v in (("--canny-low", self.canny_low), ("--canny-high", self.canny_high)):
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1000:
                    p.append(f"{flag} must be an integer in [0, 1000], got {v!r}")
            if isinstance(self.canny_low, int) and isinstance(self.canny_high, int) and self.canny_low > self.canny_high:
                p.append(f"--canny-low {self.canny_low} is above --canny-high {self.canny_high}")
        if self.soft and self.method == "canny":
            p.append("--condition-soft needs a soft map (--condition sketch or gray, or the dataset's own soft "
                     "conditioning images): canny edges are already binary")
        if self.method in NEEDS_OPENCV and not opencv_available():
            p.append(f"--condition {self.method} needs OpenCV: pip install opencv-python-headless")
        return p

    def identity(self) -> dict:
        """The settings that decide the stored conditioning bytes (and how train reads them)."""
        params: dict = {}
        if self.method == "canny":
            params = {"low": self.canny_low, "high": self.canny_high}
        elif self.method == "sketch":
            params = {"blur_sigma": SKETCH_BLUR_SIGMA, "percentile": SKETCH_PERCENTILE}
        return {"method": self.method, "version": METHOD_VERSION.get(self.method), "params": params,
                "soft": self.soft}


def dataset_identity(soft: bool) -> dict:
    """The identity of a cache whose conditioning images come from the dataset."""
    return {"method": "dataset", "version": None, "params": {}, "soft": soft}


def opencv_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {getattr(rgb, 'dtype', type(rgb))} "
                         f"{getattr(rgb, 'shape', '')}")


def _to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W): ITU-R 601 luma, exactly as PIL's convert("L")."""
    _check_rgb(rgb)
    return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"))


def canny(rgb: np.ndarray, low: int = DEFAULT_CANNY_LOW, high: int = DEFAULT_CANNY_HIGH) -> np.ndarray:
    """uint8 (H, W, 3) in {0, 255}: cv2.Canny on the RGB pixels, repeated over the channels."""
    import cv2

    _check_rgb(rgb)
    return _to_rgb(cv2.Canny(np.ascontiguousarray(rgb), low, high))


def sketch(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): a soft edge map in [0, 255] (see the module docstring)."""
    import cv2

    gray = luma(rgb).astype(np.float32)
    blurred = cv2.GaussianBlur(gray, (0, 0), SKETCH_BLUR_SIGMA, borderType=cv2.BORDER_REFLECT_101)
    gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    magnitude = np.hypot(gx, gy)
    scale = float(np.percentile(magnitude, SKETCH_PERCENTILE))
    if scale <= 0.0:  # mostly flat: fall back to the maximum (or leave a flat image black)
        scale = float(magnitude.max())
    if scale <= 0.0:
        return np.zeros_like(rgb)
    soft = np.clip(magnitude / scale, 0.0, 1.0)
    return _to_rgb(np.rint(soft * 255.0).astype(np.uint8))


def compute_condition(rgb: np.ndarray, spec: ConditionSpec) -> np.ndarray:
    """The conditioning image of one view: uint8 (H, W, 3) of the same size as `rgb`."""
    if spec.method == "canny":
        return canny(rgb, spec.canny_low, spec.canny_high)
    if spec.method == "gray":
        return _to_rgb(luma(rgb))
    if spec.method == "sketch":
        return sketch(rgb)
    raise ValueError(f"unknown condition method {spec.method!r}; expected one of {list(METHODS)}")
