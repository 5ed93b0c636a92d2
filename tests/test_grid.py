"""Decoding, conversions and splitting of grids; every bad input gets a clear error."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from carve3d_reward.errors import InvalidInputError, TooManyPixelsError, UnsupportedFormatError
from carve3d_reward.grid import (
    decode_grid,
    decode_image,
    grid_from_array,
    grid_from_image,
    image_to_array,
    join_grid,
    load_image,
    open_image,
    resize_views,
    split_grid,
    to_grid_tensor,
)
from carve3d_reward.layouts import INSTANT3D_2X2, GridLayout
from carve3d_reward.pixels import to_uint8


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_round_trip_is_lossless() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(arr)))
    assert out.dtype == np.float32 and out.shape == (32, 48, 3)
    np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), arr)


def test_jpeg_decodes_close() -> None:
    arr = np.full((32, 32, 3), 128, dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(arr), "JPEG", quality=95))
    assert np.abs(out - 128 / 255).max() < 0.02


def test_grayscale_is_replicated() -> None:
    out = decode_image(encode(Image.fromarray(np.full((8, 8), 51, dtype=np.uint8), "L")))
    np.testing.assert_allclose(out, 0.2, atol=1e-6)


def test_alpha_is_composited_over_white() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:4, :, 3] = 255  # top half opaque, bottom transparent
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_allclose(out[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(out[7, 0], [1.0, 1.0, 1.0])  # transparent -> white background


def test_sixteen_bit_is_scaled_from_full_range() -> None:
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = decode_image(encode(img))
    np.testing.assert_allclose(out, 0.5, atol=1e-4)


def test_palette_and_cmyk_convert_to_rgb() -> None:
    pal = Image.fromarray(np.full((8, 8, 3), [0, 0, 255], dtype=np.uint8)).convert("P")
    np.testing.assert_allclose(decode_image(encode(pal))[0, 0], [0, 0, 1], atol=1e-6)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=100))
    assert out[0, 0, 0] > 0.9 and out[0, 0, 1] < 0.1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"definitely not an image", "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image"),
    ],
)
def test_undecodable_bytes_raise_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_image(data)


def test_truncated_png_raises_clear_error() -> None:
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InvalidInputError):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(InvalidInputError, match="more than the limit"):
        decode_image(data, max_pixels=50 * 50)


def test_load_image_names_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(InvalidInputError, match=r"bad\.png"):
        load_image(bad)
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_image(tmp_path / "missing.png")


def test_to_grid_tensor_accepts_uint8_and_float() -> None:
    u8 = np.full((2, 8, 8, 3), 255, dtype=np.uint8)
    t = to_grid_tensor(u8)
    assert t.shape == (2, 3, 8, 8) and t.dtype == torch.float32 and t.max() == 1.0
    assert to_grid_tensor(np.zeros((8, 8, 3), np.float32)).shape == (1, 3, 8, 8)
    with pytest.raises(InvalidInputError, match=r"\[H, W, 3\]"):
        to_grid_tensor(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(InvalidInputError, match="uint8 or float"):
        to_grid_tensor(np.zeros((8, 8, 3), np.int32))
    with pytest.raises(InvalidInputError, match="NaN"):
        to_grid_tensor(np.full((8, 8, 3), np.nan, np.float32))


def test_split_is_row_major_tile_order_and_join_inverts_it() -> None:
    grid = torch.zeros(1, 3, 64, 64)
    grid[:, :, :32, :32] = 0.1  # top-left
    grid[:, :, :32, 32:] = 0.2  # top-right
    grid[:, :, 32:, :32] = 0.3  # bottom-left
    grid[:, :, 32:, 32:] = 0.4  # bottom-right
    views = split_grid(grid, INSTANT3D_2X2)
    assert views.shape == (1, 4, 3, 32, 32)
    torch.testing.assert_close(views.mean(dim=(2, 3, 4))[0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    rnd = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(join_grid(split_grid(rnd, INSTANT3D_2X2), INSTANT3D_2X2), rnd, rtol=0, atol=0)


def test_other_layouts_split_too() -> None:
    layout = GridLayout("3x2", 2, 3, (0.0,) * 6, (0.0,) * 6)
    img = torch.zeros(1, 3, 32, 48)
    for k in range(6):
        r, c = divmod(k, 3)
        img[:, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = k
    views = split_grid(img, layout)
    torch.testing.assert_close(views.amax(dim=(2, 3, 4))[0], torch.arange(6.0))


@pytest.mark.parametrize(
    ("h", "w", "message"),
    [(65, 64, "does not split"), (64, 96, "must be square"), (16, 16, "too small")],
)
def test_bad_sizes_are_rejected_with_reason(h: int, w: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        split_grid(torch.zeros(1, 3, h, w), INSTANT3D_2X2)


ALL_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
ALL_MODES += ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_pillow_mode_converts_to_rgb_in_range(mode: str) -> None:
    img = Image.new(mode, (8, 6))
    out = image_to_array(img)
    assert out.shape == (6, 8, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_premultiplied_alpha_composites_like_straight_alpha() -> None:
    grey, alpha = 120, 51  # a = 0.2
    straight = image_to_array(
        Image.fromarray(np.dstack([np.full((4, 4), grey, np.uint8), np.full((4, 4), alpha, np.uint8)]), "LA")
    )
    premultiplied = np.dstack([np.full((4, 4), round(grey * alpha / 255), np.uint8), np.full((4, 4), alpha, np.uint8)])
    got = image_to_array(Image.frombytes("La", (4, 4), premultiplied.tobytes()))
    expect = grey / 255 * 0.2 + 0.8  # over white
    np.testing.assert_allclose(straight, expect, atol=1e-6)
    np.testing.assert_allclose(got, expect, atol=3e-3)  # the premultiplied byte is rounded


def test_non_finite_float_pixels_are_refused() -> None:
    arr = np.zeros((4, 4), np.float32)
    arr[1, 1] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        image_to_array(Image.fromarray(arr, "F"))
    arr[1, 1] = np.inf
    with pytest.raises(InvalidInputError, match="infinite"):
        image_to_array(Image.fromarray(arr, "F"))


@pytest.mark.parametrize(("fmt", "name"), [("TIFF", "TIFF"), ("BMP", "BMP"), ("GIF", "GIF")])
def test_formats_other_than_png_jpeg_webp_are_refused_by_name(fmt: str, name: str) -> None:
    data = encode(Image.new("RGB", (32, 32), "white"), fmt)
    with pytest.raises(UnsupportedFormatError, match=f"{name} images are not accepted") as info:
        decode_image(data)
    assert info.value.status == 415


def test_animations_are_refused() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    with pytest.raises(InvalidInputError, match="animated image"):
        decode_image(encode(frames[0], "PNG", save_all=True, append_images=frames[1:]))


def test_decode_grid_reduces_each_view_with_the_metrics_resize_then_quantises() -> None:
    rng = np.random.default_rng(3)
    grid = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # 128 px views
    out = decode_grid(encode(Image.fromarray(grid)), INSTANT3D_2X2, view_size=48)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    views = split_grid(to_grid_tensor(grid), INSTANT3D_2X2)
    want = join_grid(resize_views(views, 48), INSTANT3D_2X2)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out, to_uint8(want))
    # not larger than the working size: the pixels as they are (no resampling, nothing lost)
    np.testing.assert_array_equal(decode_grid(encode(Image.fromarray(grid)), INSTANT3D_2X2, view_size=128), grid)
    np.testing.assert_array_equal(grid_from_array(grid, INSTANT3D_2X2, view_size=48), out)


def test_decode_grid_checks_the_size_from_the_header_before_decoding() -> None:
    data = encode(Image.new("RGB", (129, 128)))[:60]  # the header only: the pixels would not even decode
    with pytest.raises(InvalidInputError, match="does not split"):
        grid_from_image(open_image(data), INSTANT3D_2X2, view_size=64)
    with pytest.raises(TooManyPixelsError) as info:
        decode_grid(encode(Image.new("RGB", (128, 128))), INSTANT3D_2X2, view_size=64, max_pixels=100)
    assert info.value.status == 413


def test_one_quantisation_rule_for_numpy_and_torch() -> None:
    values = np.array([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5, 1.0, 1.7], np.float32)
    from_numpy = to_uint8(values)
    from_torch = to_uint8(torch.from_numpy(values))
    assert from_numpy.dtype == np.uint8 and from_torch.dtype == torch.uint8
    np.testing.assert_array_equal(from_numpy, from_torch.numpy())
    assert from_numpy.tolist() == [0, 0, 0, 2, 2, 128, 255, 255]  # clipped; halves go to the even neighbour
