"""precompute.buckets and bucketed geometry: the bucket sets, scaling, choice, resize-to-cover, crops,
the max_aspect rule with buckets, and the views (crops, flips) an image gets.

Expected values in the tables are derived by hand in the comments (exact integer arithmetic, the
torchvision truncation of the free side, half-to-even centre offsets), not read back from the code.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from precompute.buckets import (
    SDXL_BUCKETS,
    SDXL_FULL_BUCKETS,
    aspect_mismatch,
    auto_step,
    bucket_problems,
    model_granularity,
    nearest_bucket,
    resize_to_cover,
    resolve_buckets,
)
from precompute.preprocess import (
    Geometry,
    Skip,
    ViewSpec,
    apply_geometry,
    crop_offsets,
    item_rng,
    plan_geometry,
    plan_views,
    prepare_views,
)
from precompute.sources import RawItem


def resize_shortest_side(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(h, w) after torchvision's Resize(resolution), as its `_compute_resized_output_size` does:
    the short side becomes `resolution`, the long side int(resolution * long / short)."""
    h, w = size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    return (new_long, resolution) if w <= h else (resolution, new_long)


def prepare(item: RawItem, **kwargs):
    """The primary view alone (what a one-view cache stores)."""
    return prepare_views(item, **kwargs)[0]

def encode(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


SDXL_1024 = resolve_buckets("sdxl", 1024, granularity=32)


# --------------------------------------------------------------------------------------------
# Bucket sets


def test_sdxl_preset_at_1024_is_the_standard_set_tallest_first():
    assert SDXL_1024 == [(1536, 640), (1344, 768), (1216, 832), (1152, 896), (1024, 1024),
                         (896, 1152), (832, 1216), (768, 1344), (640, 1536)]
    assert set(SDXL_1024) == set(SDXL_BUCKETS)


def test_sdxl_full_preset_is_symmetric_64_aligned_and_about_a_megapixel():
    full = resolve_buckets("sdxl-full", 1024, granularity=32)
    assert len(full) == len(SDXL_FULL_BUCKETS) == 41
    assert set(SDXL_BUCKETS) <= set(full)
    for h, w in full:
        assert h % 64 == 0 and w % 64 == 0
        assert (w, h) in full  # every size has its transpose
        assert 0.9 <= h * w / 1024**2 <= 1.0
    assert full[0] == (2048, 512) and full[-1] == (512, 2048)  # 4:1 both ways


@pytest.mark.parametrize("resolution,granularity,step", [
    (1024, 32, 64),  # SDXL: 64 * 1024 / 1024
    (512, 32, 32),   # 32: every SDXL bucket halves exactly
    (768, 32, 64),   # 48 rounded up to the next multiple of 32
    (2048, 32, 128),
    (64, 32, 32),    # 4 px rounded up to the tiny model's granularity
    (1024, 16, 64),
])
def test_auto_step(resolution, granularity, step):
    assert auto_step(resolution, granularity) == step


def test_presets_scale_exactly_when_the_step_allows_and_round_otherwise():
    half = resolve_buckets("sdxl", 512, granularity=32)
    assert half == [(h // 2, w // 2) for h, w in SDXL_1024]
    double = resolve_buckets("sdxl-full", 2048, granularity=32)
    assert double == [(2 * h, 2 * w) for h, w in resolve_buckets("sdxl-full", 1024, granularity=32)]
    # 768 px, step 64: 1216x832 * 0.75 = 912x624 -> 896x640 (14.25 -> 14, 9.75 -> 10 steps), etc.
    at768 = resolve_buckets("sdxl", 768, granularity=32)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in at768)
    assert (896, 640) in at768 and (768, 768) in at768
    # The tiny model at 64 px (granularity 32): sizes / 16 rounded half up to 32 px; 1152x896
    # (72x56 -> 64x64) and 1216x832 (76x52 -> 64x64) collapse onto the square and are kept once;
    # 1344x768 -> 84x48 -> 96x64, 1536x640 -> 96x40 -> 96x32.
    assert resolve_buckets("sdxl", 64, granularity=32) == [(96, 32), (96, 64), (64, 64), (64, 96), (32, 96)]


def test_explicit_bucket_lists_are_used_as_given():
    assert resolve_buckets("64x96, 64x64,96x64", 64, granularity=32) == [(96, 64), (64, 64), (64, 96)]
    assert resolve_buckets(None, 64) is None and resolve_buckets("none", 64) is None


def test_model_granularity_follows_the_unet_depth():
    assert model_granularity(8, 3) == 32  # SDXL (and the tiny model): 3 down blocks
    assert model_granularity(8, 4) == 64
    assert model_granularity(8) == 32  # unknown UNet: SDXL's layout


def test_bucket_problems_list_everything():
    assert bucket_problems("sdxl", 1024, None, 32) == []
    p = bucket_problems("sdxl", 1024, 48, 32)
    assert len(p) == 1 and "--bucket-step 48 is not a multiple of 32" in p[0]
    p = bucket_problems("1024x1000,wide", 1024, None, 32)
    assert len(p) == 1 and "HEIGHTxWIDTH" in p[0]
    p = bucket_problems("1024x1000,640x1536", 1024, None, 32)
    assert len(p) == 1 and "['1024x1000']" in p[0]
    assert bucket_problems(None, 1024, 64, 32) == ["--bucket-step only applies with --buckets"]
    with pytest.raises(ValueError, match="invalid bucket settings"):
        resolve_buckets("sdxl", 1024, step=100, granularity=32)


# --------------------------------------------------------------------------------------------
# Choice and geometry

# (h, w) of the image -> bucket, resize (h, w), crop_top_left, at 1024 px with the sdxl set.
BUCKET_TABLE = [
    # square: no resize needed beyond scale, no offset
    ((1024, 1024), (1024, 1024), (1024, 1024), (0, 0)),
    ((2048, 2048), (1024, 1024), (1024, 1024), (0, 0)),
    # 4:3 landscape (1.333): 896x1152 (1.286, off by 1.037) beats 832x1216 (1.462, 1.096). Height
    # limits (1152*768 < 896*1024): w = int(896*1024/768) = 1194; left = (1194-1152)/2 = 21
    ((768, 1024), (896, 1152), (896, 1194), (0, 21)),
    # 16:9 (1.778): 768x1344 (1.75, off by 1.016). Height limits: w = int(768*1920/1080) = 1365;
    # left = round(10.5) = 10 (half to even, as torchvision)
    ((1080, 1920), (768, 1344), (768, 1365), (0, 10)),
    # 2:3 portrait (0.667): 1216x832 (0.684, 1.026) beats 1344x768 (0.571, 1.167). Width limits
    # (832*1536 >= 1216*1024): h = int(832*1536/1024) = 1248; top = 16
    ((1536, 1024), (1216, 832), (1248, 832), (16, 0)),
    # 1.1 is below the log-midpoint sqrt(1.286) = 1.134 of square and 896x1152: square.
    # w = int(1024*1100/1000) = 1126; left = 51
    ((1000, 1100), (1024, 1024), (1024, 1126), (0, 51)),
    # 1.15 is above it: 896x1152 (off by 1.118 < 1.15). Width limits: h = int(1152*1000/1150) =
    # 1001; top = round(52.5) = 52
    ((1000, 1150), (896, 1152), (1001, 1152), (52, 0)),
    # 8:1 goes to the most extreme bucket, 1536x640 (2.4:1), off by 3.33 <= max_aspect 4: kept.
    # w = 640*2400/300 = 5120; left = (5120-1536)/2 = 1792
    ((300, 2400), (640, 1536), (640, 5120), (0, 1792)),
]


@pytest.mark.parametrize("size,bucket,resize,top_left", BUCKET_TABLE)
def test_bucket_choice_and_geometry(size, bucket, resize, top_left):
    g = plan_geometry(size, 1024, buckets=SDXL_1024)
    assert nearest_bucket(size, SDXL_1024) == bucket
    assert (g.original_size, g.target_size, g.resize_size, g.crop_top_left) == (size, bucket, resize, top_left)
    assert g.add_time_ids == (*size, *top_left, *bucket)
    # The resize covers the bucket with one side exactly equal: nothing but the crop is lost.
    assert resize[0] >= bucket[0] and resize[1] >= bucket[1] and (resize[0] == bucket[0] or resize[1] == bucket[1])


@pytest.mark.parametrize("size,flip", [((300, 3000), False), ((3000, 300), True)])
def test_ten_to_one_goes_to_the_extreme_bucket_then_max_aspect_decides(size, flip):
    bucket = (1536, 640) if flip else (640, 1536)
    assert nearest_bucket(size, SDXL_1024) == bucket
    assert float(aspect_mismatch(size, bucket)) == pytest.approx(10 / 2.4)  # 4.17
    with pytest.raises(Skip) as err:
        plan_geometry(size, 1024, buckets=SDXL_1024, name="pano.jpg")
    detail = err.value.detail
    assert err.value.reason == "aspect_extreme"
    assert "pano.jpg" in detail and "4.17x" in detail and f"{bucket[0]}x{bucket[1]}" in detail and "10.00:1" in detail
    # max_aspect None keeps it: 640 x 6400 (or 6400 x 640), centre crop at (6400 - 1536) / 2 = 2432.
    g = plan_geometry(size, 1024, buckets=SDXL_1024, max_aspect=None)
    assert g.target_size == bucket
    assert g.resize_size == ((6400, 640) if flip else (640, 6400))
    assert g.crop_top_left == ((2432, 0) if flip else (0, 2432))
    # A looser bound keeps it too; without buckets the square target is off by 10 and still refused.
    assert plan_geometry(size, 1024, buckets=SDXL_1024, max_aspect=4.2).target_size == bucket
    with pytest.raises(Skip):
        plan_geometry(size, 1024, max_aspect=4.2)


def test_ties_go_to_the_earlier_bucket_exactly():
    # aspect 2 is exactly between 1 and 4 in log space: both are off by a factor of 2
    assert aspect_mismatch((64, 128), (64, 64)) == aspect_mismatch((64, 128), (64, 256)) == 2
    assert nearest_bucket((64, 128), [(64, 64), (64, 256)]) == (64, 64)
    assert nearest_bucket((64, 128), [(64, 256), (64, 64)]) == (64, 256)


def test_resize_to_cover_equals_the_reference_resize_for_square_targets():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(16, 4000, size=(500, 2)).tolist():
        for res in (64, 512, 1024):
            assert resize_to_cover((h, w), (res, res)) == resize_shortest_side((h, w), res)


def test_a_single_square_bucket_is_the_reference_geometry():
    for size in [(64, 64), (100, 200), (333, 100), (48, 50), (64, 255)]:
        for crop in ("center", "random"):
            a = plan_geometry(size, 64, crop=crop, rng=item_rng(3, 1, 2))
            b = plan_geometry(size, 64, crop=crop, rng=item_rng(3, 1, 2), buckets=[(64, 64)])
            assert a == b


def test_random_crops_in_a_bucket_are_seeded_and_in_range():
    g = plan_geometry((1080, 1920), 1024, crop="random", rng=item_rng(7, 0, 5), buckets=SDXL_1024)
    assert g.resize_size == (768, 1365) and g.crop_top_left[0] == 0 and 0 <= g.crop_top_left[1] <= 1365 - 1344
    assert g.crop_top_left == crop_offsets((768, 1365), (768, 1344), "random", item_rng(7, 0, 5))
    assert g == plan_geometry((1080, 1920), 1024, crop="random", rng=item_rng(7, 0, 5), buckets=SDXL_1024)


def test_mixed_fill_sizes_at_64_px_with_the_tiny_models_buckets():
    buckets = resolve_buckets("sdxl", 64, granularity=32)
    # (h, w) -> bucket, resize, crop: the sizes precompute.fill --aspect mixed emits
    table = [((64, 64), (64, 64), (64, 64), (0, 0)), ((64, 96), (64, 96), (64, 96), (0, 0)),
             ((96, 64), (96, 64), (96, 64), (0, 0)),
             # 2:1: 64x96 (off by 1.33) beats 32x96 (off by 1.5); height limits, w = 128, left 16
             ((64, 128), (64, 96), (64, 128), (0, 16))]
    for size, bucket, resize, top_left in table:
        g = plan_geometry(size, 64, buckets=buckets)
        assert (g.target_size, g.resize_size, g.crop_top_left) == (bucket, resize, top_left)


# --------------------------------------------------------------------------------------------
# Views


def test_views_order_flip_rule_and_time_ids():
    base = plan_geometry((300, 2400), 1024, buckets=SDXL_1024)  # 640 x 5120, crop at left 1792
    views = plan_views(base, ViewSpec(crops=3, flip=True), item_rng(0, 2, 9))
    assert [info for _, info in views] == [{"crop": c, "flip": f} for c in range(3) for f in (False, True)]
    for (g, info), (prev, _) in zip(views, [(None, None)] + views[:-1]):
        assert g.target_size == (640, 1536) and g.resize_size == (640, 5120) and g.original_size == (300, 2400)
        if info["flip"]:
            # SDXL's flip handling: the crop's left edge is measured in the mirrored image.
            assert g.crop_top_left == (prev.crop_top_left[0], 5120 - prev.crop_top_left[1] - 1536)
            assert g.add_time_ids == (300, 2400, 0, 5120 - prev.crop_top_left[1] - 1536, 640, 1536)
    assert views[0][0] == base and views[1][0] == base.mirrored()
    # Crops 1 and 2 are the next draws of the same generator, after the (centre) base drew none.
    rng = item_rng(0, 2, 9)
    expected = [crop_offsets((640, 5120), (640, 1536), "random", rng) for _ in range(2)]
    assert [views[2][0].crop_top_left, views[4][0].crop_top_left] == expected
    assert plan_views(base, ViewSpec(crops=3, flip=True), item_rng(0, 2, 9)) == views  # seeded


def test_an_image_with_its_buckets_exact_aspect_has_one_crop():
    base = plan_geometry((64, 96), 64, buckets=[(64, 64), (64, 96)])
    views = plan_views(base, ViewSpec(crops=4, flip=True), item_rng(0, 0, 0))
    assert [g for g, _ in views] == [base, base.mirrored()]  # no room to move: repeats are dropped
    assert base.mirrored() == Geometry((64, 96), (64, 96), (0, 0), (64, 96), flip=True)


def test_views_need_a_generator_and_valid_counts():
    base = plan_geometry((64, 64), 64)
    assert plan_views(base, ViewSpec(), None) == [(base, {"crop": 0, "flip": False})]
    with pytest.raises(ValueError, match="rng"):
        plan_views(base, ViewSpec(crops=2), None)
    assert ViewSpec(crops=0).problems() and ViewSpec(crops=17).problems() and not ViewSpec(crops=16).problems()


def test_prepare_views_pixels_and_conditions_follow_each_views_geometry():
    image, cond = noise(128, 64, seed=1), noise(128, 64, seed=2)  # w=128, h=64: 2:1
    item = RawItem("img.png", encode(image), encode(cond), ["a caption"])
    views = prepare_views(item, resolution=64, rng=item_rng(0, 0, 0), buckets=[(64, 64), (64, 96)],
                          views=ViewSpec(crops=2, flip=True))
    assert len(views) == 4 and [v.view for v in views] == [0, 1, 2, 3]
    for v in views:
        g = v.geometry
        assert v.captions == ["a caption"] and g.target_size == (64, 96) and g.resize_size == (64, 128)
        rgb = apply_geometry(image, g)
        np.testing.assert_array_equal(((v.pixels + 1) * 127.5).round().permute(1, 2, 0).numpy(), rgb)
        np.testing.assert_array_equal(v.cond, apply_geometry(cond, g))
    # A flipped view is the mirror image of its crop, pixel for pixel, and so is its condition.
    for a, b in ((views[0], views[1]), (views[2], views[3])):
        np.testing.assert_array_equal(b.pixels.numpy(), a.pixels.flip(-1).numpy())
        np.testing.assert_array_equal(b.cond, a.cond[:, ::-1])
    # The primary view is what prepare() alone returns.
    single = prepare(item, resolution=64, rng=item_rng(0, 0, 0), buckets=[(64, 64), (64, 96)])
    assert single.geometry == views[0].geometry
    np.testing.assert_array_equal(single.cond, views[0].cond)
