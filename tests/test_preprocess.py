"""precompute.preprocess: decoding, the reference geometry, captions, and every bad-input skip."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from precompute.preprocess import (
    SKIP_REASONS,
    Geometry,
    Skip,
    _cond_aspect_matches,
    apply_geometry,
    clean_captions,
    crop_offsets,
    geometry_problems,
    item_rng,
    load_rgb,
    plan_geometry,
    prepare_views,
    to_model_input,
    to_rgb,
)
from precompute.sources import RawItem

RES = 64



def prepare(item: RawItem, **kwargs):
    """The primary view alone (what a one-view cache stores)."""
    return prepare_views(item, **kwargs)[0]

def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def skip_of(fn, *args, **kw) -> Skip:
    with pytest.raises(Skip) as ei:
        fn(*args, **kw)
    assert ei.value.reason in SKIP_REASONS, ei.value.reason
    return ei.value


# ----------------------------------------------------------------------------------- geometry

# (h, w) -> resize (h, w), crop_top_left. Derivations follow torchvision: the long side is
# int(res * long / short) (truncated), offsets int(round((r - t) / 2)) with half-to-even.
GEOMETRY_TABLE = [
    # square, downscaled
    ((128, 128), 64, (64, 64), (0, 0)),
    # exact size: no resize, no offset
    ((64, 64), 64, (64, 64), (0, 0)),
    # landscape 1:2: long 64*200/100 = 128, left (128-64)/2 = 32
    ((100, 200), 64, (64, 128), (0, 32)),
    # portrait 3:2: long 64*300/200 = 96, top 16
    ((300, 200), 64, (96, 64), (16, 0)),
    # odd: 64*517/333 = 99.36 -> 99 (truncated); (99-64)/2 = 17.5 -> 18 (half to even)
    ((333, 517), 64, (64, 99), (0, 18)),
    ((517, 333), 64, (99, 64), (18, 0)),
    # truncation, not rounding: 64*201/100 = 128.64 -> 128
    ((100, 201), 64, (64, 128), (0, 32)),
    # half to even where half-up differs: (65-64)/2 = 0.5 -> 0; (67-64)/2 = 1.5 -> 2
    ((64, 65), 64, (64, 65), (0, 0)),
    ((64, 67), 64, (64, 67), (0, 2)),
    # upscaled (min_size 0 below): 64*30/20 = 96, left 16
    ((20, 30), 64, (64, 96), (0, 16)),
    # SDXL size: 1024*1500/1000 = 1536, left 256
    ((1000, 1500), 1024, (1024, 1536), (0, 256)),
]


@pytest.mark.parametrize("size,res,resize,top_left", GEOMETRY_TABLE)
def test_center_geometry_table(size, res, resize, top_left):
    g = plan_geometry(size, res, min_size=0)
    assert g.original_size == size
    assert g.resize_size == resize
    assert g.crop_top_left == top_left
    assert g.target_size == (res, res)
    assert g.flip is False
    assert g.add_time_ids == (*size, *top_left, res, res)


def test_apply_geometry_is_pil_bilinear_resize_then_crop():
    img = noise(517, 333)
    g = plan_geometry((333, 517), RES)
    out = apply_geometry(img, g)
    # The reference on a PIL image: torchvision's Resize calls img.resize((w, h), BILINEAR).
    expected = np.asarray(img.resize((99, 64), Image.Resampling.BILINEAR))[:, 18 : 18 + RES]
    assert out.dtype == np.uint8 and out.shape == (RES, RES, 3)
    np.testing.assert_array_equal(out, expected)


def test_apply_geometry_exact_size_is_a_plain_crop():
    img = noise(67, 64)
    out = apply_geometry(img, plan_geometry((64, 67), RES))
    np.testing.assert_array_equal(out, np.asarray(img)[:, 2 : 2 + RES])


def test_random_crop_is_seeded_and_covers_every_offset():
    size = (64, 70)  # 7 possible left offsets, 1 top
    a = plan_geometry(size, RES, crop="random", rng=item_rng(3, 1, 2))
    b = plan_geometry(size, RES, crop="random", rng=item_rng(3, 1, 2))
    assert a == b
    lefts = set()
    for pos in range(300):
        g = plan_geometry(size, RES, crop="random", rng=item_rng(0, 0, pos))
        assert g.crop_top_left[0] == 0 and 0 <= g.crop_top_left[1] <= 6
        lefts.add(g.crop_top_left[1])
    assert lefts == set(range(7))
    tops = {plan_geometry((90, 64), RES, crop="random", rng=item_rng(0, 1, p)).crop_top_left[0] for p in range(400)}
    assert min(tops) == 0 and max(tops) == 26 and tops <= set(range(27))


def test_random_crop_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        plan_geometry((64, 80), RES, crop="random")


def test_mirrored_geometry_flips_pixels_and_crop():
    img = noise(100, 64)
    g = Geometry(original_size=(64, 100), resize_size=(64, 100), crop_top_left=(0, 10), target_size=(64, 64))
    m = g.mirrored()
    assert m.flip and m.crop_top_left == (0, 100 - 10 - 64)
    np.testing.assert_array_equal(apply_geometry(img, m), apply_geometry(img, g)[:, ::-1])
    assert m.mirrored() == g


def test_geometry_rejects_a_crop_outside_the_image():
    with pytest.raises(ValueError, match="does not fit"):
        Geometry(original_size=(64, 64), resize_size=(64, 64), crop_top_left=(0, 1), target_size=(64, 64))
    with pytest.raises(ValueError, match="larger"):
        crop_offsets((64, 60), (64, 64), "center", None)


def test_invalid_settings_list_every_problem():
    problems = geometry_problems(resolution=60, crop="middle", min_size=-1, max_aspect=0.5)
    assert len(problems) == 4
    assert "not divisible by the VAE scale factor 8" in problems[0] and "try 56" in problems[0]
    with pytest.raises(ValueError, match="divisible"):
        plan_geometry((64, 64), 60)
    assert geometry_problems(resolution=1024) == []


def test_tiny_image_is_skipped_unless_min_size_allows():
    s = skip_of(plan_geometry, (10, 12), RES, name="tiny.png")  # default min: 64 // 4 = 16
    assert s.reason == "image_too_small" and "tiny.png" in s.detail and "12x10" in s.detail
    assert plan_geometry((16, 16), RES).resize_size == (64, 64)
    assert plan_geometry((10, 12), RES, min_size=0).resize_size == (64, 76)
    assert skip_of(plan_geometry, (40, 40), RES, min_size=48).reason == "image_too_small"


def test_panorama_is_skipped_as_extreme_aspect():
    s = skip_of(plan_geometry, (64, 640), RES, name="pano.jpg")
    assert s.reason == "aspect_extreme"
    assert "pano.jpg" in s.detail and "10.00:1" in s.detail and "640x64" in s.detail
    assert skip_of(plan_geometry, (640, 64), RES).reason == "aspect_extreme"  # 1:10 too
    assert plan_geometry((64, 256), RES).resize_size == (64, 256)  # exactly 4:1 is allowed
    assert plan_geometry((64, 640), RES, max_aspect=None).resize_size == (64, 640)


# ----------------------------------------------------------------------------------- decoding


def test_to_model_input_matches_totensor_normalize_bitwise():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x[..., 1] = 255 - x[..., 1]
    got = to_model_input(x)
    reference = torch.from_numpy(x).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    assert got.dtype == torch.float32 and got.shape == (3, 16, 16)
    assert torch.equal(got, reference)
    assert got.min().item() == -1.0 and got.max().item() == 1.0
    assert got[1, 0, 0].item() == 1.0  # channel 1 of pixel (0, 0) is 255


@pytest.mark.parametrize(
    "orientation,top_color,bottom_color,size",
    [
        (6, "red", "blue", (20, 40)),  # rotate 90 clockwise: the left half goes on top
        (8, "blue", "red", (20, 40)),  # rotate 90 counter-clockwise: the right half goes on top
        (3, None, None, (40, 20)),  # 180 degrees: size unchanged, halves swapped left-right
    ],
)
def test_exif_orientation_is_applied(orientation, top_color, bottom_color, size):
    stored = Image.new("RGB", (40, 20), "red")
    stored.paste(Image.new("RGB", (20, 20), "blue"), (20, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = load_rgb(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), "image", "rot.jpg")
    assert img.size == size
    a = np.asarray(img).astype(int)
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    if orientation == 3:
        assert np.abs(a[10, 5] - colors["blue"]).max() < 12 and np.abs(a[10, 35] - colors["red"]).max() < 12
    else:
        assert np.abs(a[5, 10] - colors[top_color]).max() < 12
        assert np.abs(a[35, 10] - colors[bottom_color]).max() < 12
    g = plan_geometry((img.height, img.width), 16)
    assert g.original_size == (size[1], size[0])


def test_an_image_and_condition_turned_by_different_exif_orientations_are_noted_or_explained():
    """Each image is turned upright by its own EXIF orientation (as viewers and `datasets` show
    it). A conditioning image made from the photo's stored pixels carries none: square, the pair is
    kept and noted; non-square, the aspect no longer matches and the skip says why."""
    exif = Image.Exif()
    exif[0x0112] = 6
    square = encode(Image.new("RGB", (32, 32), "red"), "JPEG", exif=exif.tobytes(), quality=95)
    got = prepare(make_item(image=square, cond=encode(Image.new("RGB", (32, 32), "white"))), resolution=16,
                  min_size=0)
    assert got.orientation_differs and not got.cond_resized
    upright = prepare(make_item(image=encode(Image.new("RGB", (32, 32), "red")),
                                cond=encode(Image.new("RGB", (32, 32), "white"))), resolution=16, min_size=0)
    assert not upright.orientation_differs
    wide = encode(Image.new("RGB", (48, 32), "red"), "JPEG", exif=exif.tobytes(), quality=95)
    with pytest.raises(Skip) as e:
        prepare(make_item(image=wide, cond=encode(Image.new("RGB", (48, 32), "white"))), resolution=16, min_size=0)
    assert e.value.reason == "cond_size_mismatch"
    assert "the image is turned upright by its EXIF orientation 6, the conditioning image by none" in e.value.detail


def _over_white(c: float, a: float) -> float:
    return c * a / 255 + 255 * (1 - a / 255)


def test_alpha_modes_composite_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (200, 100, 0, 128)])
    out = np.asarray(load_rgb(encode(rgba), "image", "a.png")).astype(float)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert np.abs(out[0, 2] - [_over_white(200, 128), _over_white(100, 128), _over_white(0, 128)]).max() <= 0.5

    la = Image.new("LA", (3, 1))
    la.putdata([(100, 0), (100, 255), (100, 128)])
    out = np.asarray(load_rgb(encode(la), "image", "la.png")).astype(float)
    assert out[0, 0].tolist() == [255] * 3 and out[0, 1].tolist() == [100] * 3
    assert np.abs(out[0, 2] - _over_white(100, 128)).max() <= 0.5

    # premultiplied modes exist only in memory; they go through the same path
    assert np.asarray(to_rgb(rgba.convert("RGBa")))[0, 1].tolist() == [10, 20, 30]
    assert np.asarray(to_rgb(la.convert("La")))[0, 0].tolist() == [255] * 3


def test_a_transparency_key_in_an_rgb_or_gray_png_composites_on_white():
    for mode, key, other in (("RGB", (10, 20, 30), (200, 100, 0)), ("L", 40, 90)):
        im = Image.new(mode, (2, 1))
        im.putdata([key, other])
        data = encode(im, transparency=key)
        assert Image.open(io.BytesIO(data)).info.get("transparency") == key
        out = np.asarray(load_rgb(data, "image", f"{mode}.png"))
        assert out[0, 0].tolist() == [255, 255, 255], mode  # the keyed colour is transparent
        assert out[0, 1].tolist() == (list(other) if mode == "RGB" else [other] * 3)


def test_palette_with_transparency_composites_on_white():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putdata([0, 1])
    data = encode(p, transparency=1)  # palette index 1 (green) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = np.asarray(load_rgb(data, "image", "p.png"))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    opaque = np.asarray(load_rgb(encode(p), "image", "p2.png"))
    assert opaque[0, 1].tolist() == [0, 255, 0]


def test_plain_modes_convert_to_rgb():
    one = Image.new("1", (2, 1))
    one.putpixel((0, 0), 1)
    assert np.asarray(load_rgb(encode(one), "image", "1.png")).tolist() == [[[255] * 3, [0] * 3]]
    gray = Image.new("L", (1, 1), 77)
    assert np.asarray(load_rgb(encode(gray), "image", "l.png")).tolist() == [[[77] * 3]]
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])  # white, cyan, black
    out = np.asarray(load_rgb(encode(cmyk, "TIFF"), "image", "c.tif"))
    assert out.tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]
    ycc = load_rgb(encode(Image.new("RGB", (8, 8), (0, 128, 255)), "JPEG", quality=100), "image", "y.jpg")
    assert ycc.mode == "RGB" and np.abs(np.asarray(ycc).astype(int) - [0, 128, 255]).max() < 4


def test_16_bit_is_scaled_not_clipped():
    a = np.array([[0, 65535, 32768, 257, 1000]], dtype=np.uint16)
    im = Image.fromarray(a)
    data = encode(im)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(load_rgb(data, "image", "16.png"))
    expected = np.rint(a.astype(float) * 255 / 65535)  # 0, 255, 128, 1, 4
    np.testing.assert_array_equal(out[..., 0], expected)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    # PIL's own convert("L") would clip 1000 to 255: the reason this path exists
    assert np.asarray(im.convert("L"))[0, 4] == 255 and out[0, 4, 0] == 4


def test_32_bit_int_and_float_modes():
    i32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32), "I")
    out = np.asarray(load_rgb(encode(i32, "TIFF"), "image", "i.tif"))[..., 0]
    assert out.tolist() == [[0, 255, 255, 0]]
    # 8-bit data in a 32-bit file: read as 8-bit, not as a nearly black 16-bit image
    i8 = Image.fromarray(np.array([[0, 100, 255, -5]], dtype=np.int32), "I")
    assert np.asarray(load_rgb(encode(i8, "TIFF"), "image", "i8.tif"))[..., 0].tolist() == [[0, 100, 255, 0]]
    unit = Image.fromarray(np.array([[0.0, 1.0, 0.5, 0.25]], dtype=np.float32), "F")
    out = np.asarray(load_rgb(encode(unit, "TIFF"), "image", "f.tif"))[..., 0]
    assert out.tolist() == [[0, 255, 128, 64]]  # [0, 1] floats
    byte_range = Image.fromarray(np.array([[0.0, 200.0, 10.0, 300.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(byte_range))[..., 0].tolist() == [[0, 200, 10, 255]]  # PIL's 0..255 floats


@pytest.mark.parametrize("what", ["image", "cond"])
def test_bad_bytes_skip_with_reason_and_name(what):
    good = encode(noise(32, 32))
    jpeg = encode(noise(32, 32), "JPEG")
    cases = [
        (None, f"{what}_missing"),
        (b"", f"{what}_empty"),
        (b"definitely not an image", f"{what}_corrupt"),
        (good[: len(good) // 2], f"{what}_corrupt"),  # truncated PNG
        (jpeg[: len(jpeg) // 2], f"{what}_corrupt"),  # truncated JPEG
        (good[:40], f"{what}_corrupt"),  # header only
    ]
    for data, reason in cases:
        s = skip_of(load_rgb, data, what, "dir/file-17.png")
        assert s.reason == reason, (data and data[:10], s)
        assert "dir/file-17.png" in s.detail
    assert load_rgb(good, what, "ok").size == (32, 32)


def test_decompression_bomb_is_image_too_large(monkeypatch):
    data = encode(noise(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 * 100: PIL refuses
    s = skip_of(load_rgb, data, "image", "big.png")
    assert s.reason == "image_too_large" and "big.png" in s.detail


# ----------------------------------------------------------------------------------- captions


def test_captions():
    for bad in (None, [], [""], ["  ", "\n\t"]):
        s = skip_of(clean_captions, bad, name="img-3.png")
        assert s.reason == "caption_missing" and "img-3.png" in s.detail
        assert clean_captions(bad, allow_empty=True) == [""]
    assert clean_captions(["a cat", "", "  ", "a dog"]) == ["a cat", "a dog"]
    long = " ".join(["word"] * 500) + "  "
    assert clean_captions([long]) == [long]  # untouched: the tokenizer truncates
    assert skip_of(clean_captions, ["ok", 3]).reason == "caption_invalid"


# ----------------------------------------------------------------------------------- prepare


def make_item(image=None, cond=None, captions=("a red circle",), **kw) -> RawItem:
    return RawItem(
        source_id=kw.pop("source_id", "target/0.png"),
        image=image,
        cond=cond,
        captions=list(captions) if captions is not None else None,
        cond_id=kw.pop("cond_id", "source/0.png"),
        **kw,
    )


def test_prepare_applies_one_geometry_to_image_and_cond():
    img, cond = noise(96, 64, seed=1), noise(96, 64, seed=2)
    p = prepare(make_item(encode(img), encode(cond)), resolution=RES)
    g = p.geometry
    assert g.original_size == (64, 96) and g.resize_size == (64, 96) and g.crop_top_left == (0, 16)
    assert p.pixels.shape == (3, RES, RES) and p.pixels.dtype == torch.float32
    assert torch.equal(p.pixels, to_model_input(np.asarray(img)[:, 16:80]))
    np.testing.assert_array_equal(p.cond, np.asarray(cond)[:, 16:80])
    assert p.cond_resized is False and p.captions == ["a red circle"] and p.source_id == "target/0.png"


def test_prepare_random_crop_moves_image_and_cond_together():
    base = noise(90, 64, seed=3)
    p = prepare(make_item(encode(base), encode(base)), resolution=RES, crop="random", rng=item_rng(1, 0, 5))
    left = p.geometry.crop_top_left[1]
    assert p.geometry == plan_geometry((64, 90), RES, crop="random", rng=item_rng(1, 0, 5))
    np.testing.assert_array_equal(p.cond, np.asarray(base)[:, left : left + RES])
    assert torch.equal(p.pixels, to_model_input(p.cond))


def test_prepare_resamples_a_same_aspect_cond_of_another_size():
    img, cond = noise(96, 64, seed=4), noise(48, 32, seed=5)
    p = prepare(make_item(encode(img), encode(cond)), resolution=RES)
    assert p.cond_resized is True and p.cond.shape == (RES, RES, 3)
    expected = np.asarray(cond.resize((96, 64), Image.Resampling.BILINEAR))[:, 16:80]
    np.testing.assert_array_equal(p.cond, expected)


def test_prepare_skips_a_cond_of_another_aspect():
    s = skip_of(prepare, make_item(encode(noise(96, 64)), encode(noise(64, 64))), resolution=RES)
    assert s.reason == "cond_size_mismatch" and "source/0.png" in s.detail and "64x64" in s.detail
    assert _cond_aspect_matches((64, 96), (33, 50))  # within 2%
    assert _cond_aspect_matches((10, 33), (2, 7))  # 3.5 vs 3.3: only the rounding of a 2 px side
    assert not _cond_aspect_matches((64, 96), (64, 64))
    assert not _cond_aspect_matches((64, 96), (96, 64))  # a rotated conditioning image


def test_prepare_skip_reasons():
    good, bad = encode(noise(64, 64)), b"\x89PNG\r\n\x1a\n broken"
    cases = [
        (make_item(good, good, error=("image_missing", "/data/x.png: file not found")), "image_missing", "/data/x.png"),
        (make_item(None, good), "image_missing", "target/0.png"),
        (make_item(bad, good), "image_corrupt", "target/0.png"),
        (make_item(good, None), "cond_missing", "source/0.png"),
        (make_item(good, bad), "cond_corrupt", "source/0.png"),
        (make_item(good, b""), "cond_empty", "source/0.png"),
        (make_item(good, good, captions=None), "caption_missing", "target/0.png"),
        (make_item(good, good, captions=["   "]), "caption_missing", "target/0.png"),
        (make_item(encode(noise(640, 64)), good), "aspect_extreme", "target/0.png"),
        (make_item(encode(noise(8, 8)), good), "image_too_small", "target/0.png"),
    ]
    for item, reason, name in cases:
        s = skip_of(prepare, item, resolution=RES)
        assert s.reason == reason and name in s.detail, (reason, s)
    kept = prepare(make_item(good, good, captions=[""]), resolution=RES, allow_empty_captions=True)
    assert kept.captions == [""]
    small = prepare(make_item(encode(noise(8, 8)), encode(noise(8, 8))), resolution=RES, min_size=0)
    assert small.geometry.resize_size == (RES, RES)
