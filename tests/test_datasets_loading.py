"""Decoding every supported kind of file, crops and tensors; broken bytes never raise."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from datasets_tools import ImageDecodeError, compute_crop, decode_image, prepare_image
from datasets_tools.formats import read_header
from datasets_tools.transform import to_tensor
from tests.datasets_helpers import noise_image, sixteen_bit_grey_png, with_exif_orientation

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def close(a, b, tol: int = 12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: shows where the image's left side ends up."""
    im = Image.new("RGB", size, RED)
    im.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return im


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_exif_orientation_is_applied_and_seen_by_the_header(tmp_path: Path, ext: str) -> None:
    path = with_exif_orientation(tmp_path / f"r{ext}", halves(), orientation=6)
    header = read_header(path)
    assert (header.width, header.height) == (20, 40)  # sizes come from the header, rotated
    im = decode_image(path)
    assert im.size == (20, 40)
    # Orientation 6 = turn 90 degrees clockwise to display: the left (red) half goes on top.
    assert close(im.getpixel((10, 5)), RED) and close(im.getpixel((10, 35)), BLUE)


def test_rgba_is_composited_on_white_unless_alpha_is_kept(tmp_path: Path) -> None:
    im = Image.new("RGBA", (4, 1), (255, 0, 0, 255))
    im.putpixel((1, 0), (255, 0, 0, 0))
    im.putpixel((2, 0), (255, 0, 0, 128))
    im.save(tmp_path / "a.png")
    rgb = decode_image(tmp_path / "a.png")
    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [RED, WHITE, (255, 127, 127)]
    kept = decode_image(tmp_path / "a.png", keep_alpha=True)
    assert kept.mode == "RGBA" and kept.getpixel((1, 0))[3] == 0


@pytest.mark.parametrize("mode", ["P", "LA", "L", "1", "CMYK"])
def test_other_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    source = Image.new("RGB", (8, 8), (200, 40, 40))
    converted = source.convert("L").convert(mode) if mode in ("LA", "1") else source.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    converted.save(path)
    im = decode_image(path)
    assert im.mode == "RGB"
    expected = source.convert("L").convert(mode).convert("RGB").getpixel((0, 0)) \
        if mode in ("LA", "1", "L") else (200, 40, 40)
    assert close(im.getpixel((0, 0)), expected, tol=20)


def test_palette_transparency_goes_white(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png", transparency=1)
    assert [decode_image(tmp_path / "p.png").getpixel((x, 0)) for x in range(2)] == [RED, WHITE]


def test_sixteen_bit_grey_keeps_its_brightness(tmp_path: Path) -> None:
    path = sixteen_bit_grey_png(tmp_path / "g.png", (4, 4), 32896)  # 50% grey in 16 bits
    assert Image.open(path).mode.startswith("I;16")
    assert decode_image(path).getpixel((0, 0)) == (128, 128, 128)  # not clipped to white


@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_animated_files_use_the_first_frame(tmp_path: Path, ext: str) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    frames[0].save(tmp_path / f"a{ext}", save_all=True, append_images=frames[1:], lossless=True)
    assert read_header(tmp_path / f"a{ext}").frames == 3
    assert close(decode_image(tmp_path / f"a{ext}").getpixel((8, 8)), RED, tol=4)


def test_bmp_and_mislabelled_png_in_jpg_name(tmp_path: Path) -> None:
    halves().save(tmp_path / "a.bmp")
    halves().save(tmp_path / "b.jpg", format="PNG")  # content decides, not the name
    for name in ("a.bmp", "b.jpg"):
        assert decode_image(tmp_path / name).getpixel((0, 0)) == RED


def test_crop_center_and_random() -> None:
    spec = compute_crop((400, 200), (128, 128))
    assert (spec.scaled_w, spec.scaled_h, spec.left, spec.top) == (256, 128, 64, 0)
    crops = {compute_crop((400, 200), (128, 128), "random", random.Random(s)) for s in range(30)}
    assert len(crops) > 1
    assert all(0 <= c.left <= 128 and c.top == 0 for c in crops)
    again = compute_crop((400, 200), (128, 128), "random", random.Random(7))
    assert again == compute_crop((400, 200), (128, 128), "random", random.Random(7))
    with pytest.raises(ValueError):
        compute_crop((400, 200), (128, 128), "random")


def test_prepare_image_tensor_shape_range_flip_and_mask(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (200, 100), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (100, 0, 200, 100))  # right half transparent blue
    rgba.save(tmp_path / "a.png")
    spec = compute_crop((200, 100), (64, 32))
    plain = prepare_image(tmp_path / "a.png", spec)
    assert plain.pixels.shape == (3, 32, 64) and plain.pixels.dtype == torch.float32
    assert plain.mask is None
    assert plain.pixels.min() >= -1 and plain.pixels.max() <= 1
    assert torch.allclose(plain.pixels[:, 16, 60], torch.tensor([1.0, 1.0, 1.0]))  # white
    flipped = prepare_image(tmp_path / "a.png", spec, flip=True)
    assert torch.equal(flipped.pixels, torch.flip(plain.pixels, dims=[-1]))
    masked = prepare_image(tmp_path / "a.png", spec, keep_alpha=True)
    assert masked.mask is not None and masked.mask.shape == (1, 32, 64)
    assert masked.mask[0, 16, 4] == 1.0 and masked.mask[0, 16, 60] == 0.0


def test_to_tensor_maps_0_255_to_minus_one_one() -> None:
    t = to_tensor(Image.new("RGB", (2, 2), (0, 255, 0)))
    assert t[:, 0, 0].tolist() == [-1.0, 1.0, -1.0]


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    noise_image((24, 16), seed=1).save(buf, format=fmt)
    return buf.getvalue()


SAMPLES = {ext: _encoded(fmt) for ext, fmt in
           ((".jpg", "JPEG"), (".png", "PNG"), (".webp", "WEBP"), (".bmp", "BMP"))}


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ext=st.sampled_from(sorted(SAMPLES)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=8))
def test_damaged_files_raise_only_image_decode_error(tmp_path: Path, ext, cut, flips) -> None:
    data = bytearray(SAMPLES[ext][: max(1, int(len(SAMPLES[ext]) * cut))])
    for where, xor in flips:
        data[min(len(data) - 1, int(where * len(data)))] ^= xor
    path = tmp_path / f"f{ext}"
    path.write_bytes(bytes(data))
    for load in (read_header, decode_image):
        try:
            load(path)
        except ImageDecodeError as exc:
            assert exc.code in {"corrupt", "truncated", "not_an_image", "unsupported_format",
                                "too_large"}
            assert "\n" not in exc.reason


def test_decoded_pixels_match_the_source(tmp_path: Path) -> None:
    source = noise_image((32, 16), seed=3)
    source.save(tmp_path / "n.png")
    assert np.array_equal(np.asarray(decode_image(tmp_path / "n.png")), np.asarray(source))


def test_crop_planned_on_a_wrong_header_size_is_replanned_not_distorted(tmp_path) -> None:
    halves((40, 20)).save(tmp_path / "h.png")
    wrong = compute_crop((20, 40), (16, 32))  # as if the header had said "rotated"
    got = prepare_image(tmp_path / "h.png", wrong)
    right = prepare_image(tmp_path / "h.png", compute_crop((40, 20), (16, 32)))
    assert torch.equal(got.pixels, right.pixels) and got.crop == right.crop
