"""Slicing, resizing, patch layout and NaViT positions pinned to upstream MiniCPM-V behaviour."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from minicpm.errors import UserError
from minicpm.image_processing import (
    SliceConfig,
    ensure_divide,
    load_image,
    navit_position_ids,
    normalize,
    process_image,
    reshape_by_patch,
    slice_image,
)

# (width, height) -> grid [cols, rows] or None, source image size, first slice size.
# Rows marked "independent" were worked out by hand from the upstream rules (banker's rounding,
# truncation, first-minimum grid choice), not produced by this code.
SLICES = [
    ((1, 1), None, (448, 448), None),
    ((1, 4000), None, (14, 28336), None),
    ((4000, 1), None, (28000, 14), None),
    ((448, 448), None, (448, 448), None),
    ((449, 449), (1, 2), (448, 448), (630, 322)),  # independent: square just above 448^2 -> 1 col x 2 rows
    ((100, 100), None, (448, 448), None),  # independent: small images are upscaled
    ((14, 14), None, (448, 448), None),
    ((13, 27), None, (308, 644), None),
    ((500, 500), (1, 2), (448, 448), (630, 322)),  # independent
    ((640, 480), (2, 1), (518, 392), (364, 546)),  # independent
    ((480, 640), (1, 2), (392, 518), (546, 364)),
    ((800, 600), (2, 2), (518, 392), (518, 392)),
    ((1000, 500), (2, 1), (630, 322), (448, 448)),  # independent
    ((1024, 768), (2, 2), (518, 392), (518, 392)),  # independent
    ((1280, 720), (3, 2), (602, 336), (490, 406)),  # independent
    ((720, 1280), (2, 3), (336, 602), (406, 490)),
    ((1920, 1080), (4, 2), (602, 336), (420, 476)),  # independent
    ((1080, 1920), (2, 4), (336, 602), (476, 420)),
    ((2020, 1000), (4, 2), (630, 308), (448, 448)),  # independent: 315/14 = 22.5 rounds to 22 (banker's)
    ((4000, 3000), (3, 3), (518, 392), (518, 392)),  # independent
    ((500, 2000), (1, 4), (224, 896), (448, 448)),  # independent
    ((2000, 500), (4, 1), (896, 224), (448, 448)),
    ((3000, 100), (3, 1), (2436, 84), (1414, 140)),
    ((100, 3000), (1, 3), (84, 2450), (140, 1414)),
    ((896, 448), (2, 1), (630, 322), (448, 448)),
    ((448, 896), (1, 2), (322, 630), (448, 448)),
    ((1344, 448), (3, 1), (770, 252), (448, 448)),
    ((600, 601), (1, 2), (448, 448), (630, 322)),
    ((2048, 2048), (3, 3), (448, 448), (448, 448)),
    ((4096, 4096), (3, 3), (448, 448), (448, 448)),
    ((1200, 1600), (3, 3), (392, 518), (392, 518)),
    ((300, 900), (1, 3), (252, 770), (448, 448)),
    ((200, 150), None, (518, 392), None),
    ((8000, 200), (9, 1), (2800, 70), (938, 210)),
    ((1500, 1500), (3, 3), (448, 448), (448, 448)),
    ((673, 1), None, (11438, 14), None),
    ((4000, 4000), (3, 3), (448, 448), (448, 448)),
]


@pytest.mark.parametrize("size,grid,source,cell", SLICES, ids=[f"{s[0][0]}x{s[0][1]}" for s in SLICES])
def test_slice_grid_and_sizes(size, grid, source, cell):
    sliced = slice_image(Image.new("RGB", size), SliceConfig())
    assert sliced.grid == grid
    assert sliced.slice_sizes[0] == source
    if grid is None:
        assert len(sliced.images) == 1
    else:
        assert len(sliced.images) == 1 + grid[0] * grid[1]
        assert all(s == cell for s in sliced.slice_sizes[1:])


def test_max_slice_nums_caps_the_grid():
    img = Image.new("RGB", (1920, 1080))
    assert slice_image(img, SliceConfig(), max_slice_nums=1).grid is None
    assert slice_image(img, SliceConfig(), max_slice_nums=4).grid == (3, 1)  # |log(16/9) - log 3| < |.. - log 1|
    assert slice_image(img, SliceConfig(max_slice_nums=2)).grid == (2, 1)


def test_ensure_divide_uses_bankers_rounding():
    assert ensure_divide(315, 14) == 308  # 22.5 -> 22
    assert ensure_divide(329, 14) == 336  # 23.5 -> 24
    assert ensure_divide(3, 14) == 14  # never below one patch


def test_slices_are_row_major_crops_of_the_refined_image():
    img = Image.fromarray(np.arange(640 * 480 * 3, dtype=np.uint32).reshape(480, 640, 3).astype(np.uint8))
    sliced = slice_image(img, SliceConfig())
    refine = img.resize((728, 546), resample=Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(sliced.images[1]), np.asarray(refine.crop((0, 0, 364, 546))))
    assert np.array_equal(np.asarray(sliced.images[2]), np.asarray(refine.crop((364, 0, 728, 546))))


def test_normalize_matches_float32_formula_for_every_byte():
    img = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (3, 1)).T.reshape(16, 16, 3))
    got = normalize(img, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    expected = (np.asarray(img).astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert got.dtype == np.float32
    assert np.array_equal(got, expected.transpose(2, 0, 1))


def test_patch_row_layout():
    chw = np.random.RandomState(0).rand(3, 28, 42).astype(np.float32)
    row = reshape_by_patch(chw, 14).numpy()
    assert row.shape == (3, 14, 6 * 14)
    # patch l = r * cols + c occupies columns [14 l, 14 l + 14) of the 14-pixel strip
    for r in range(2):
        for c in range(3):
            l = r * 3 + c
            assert np.array_equal(row[:, :, 14 * l:14 * l + 14], chw[:, 14 * r:14 * r + 14, 14 * c:14 * c + 14])


def test_process_image_tgt_sizes_are_rows_cols():
    out = process_image(Image.new("RGB", (640, 480)), SliceConfig())
    assert out.tgt_sizes == [(28, 37), (39, 26), (39, 26)]
    assert [tuple(p.shape) for p in out.pixel_values] == [(3, 14, 28 * 37 * 14), (3, 14, 39 * 26 * 14),
                                                           (3, 14, 39 * 26 * 14)]
    assert out.summary() == {"original_size": [640, 480], "grid": [2, 1],
                             "slice_sizes": [[518, 392], [364, 546], [364, 546]],
                             "tgt_sizes": [[28, 37], [39, 26], [39, 26]]}


def test_navit_positions_are_bucketised_in_float32():
    ids = navit_position_ids(25, 1, 70)
    assert ids[5].item() == 13 * 70  # float32 arange puts 5/25 in bucket 13, floor(5*70/25) would say 14
    full = navit_position_ids(70, 70, 70)
    assert torch.equal(full, torch.arange(4900))
    small = navit_position_ids(2, 3, 70)
    assert small.tolist() == [0, 23, 46, 35 * 70, 35 * 70 + 23, 35 * 70 + 46]


# ----- loading ------------------------------------------------------------------------------------------


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "LA", "1", "I;16"])
def test_modes_become_rgb(mode, tmp_path):
    img = Image.new("RGB", (30, 20), (200, 100, 50))
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    path = tmp_path / "x.tiff"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":  # 16-bit is scaled down, not clipped to white
        assert np.asarray(out)[0, 0].tolist() == [156, 156, 156]


def test_rgba_drops_alpha_like_upstream():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_image(img))[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 60)


def test_numpy_inputs():
    assert load_image(np.zeros((5, 7), dtype=np.uint8)).size == (7, 5)
    assert np.asarray(load_image(np.ones((5, 7, 3), dtype=np.float32)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(np.full((5, 7, 3), 65535, dtype=np.uint16)))[0, 0].tolist() == [255] * 3
    with pytest.raises(UserError, match="shape"):
        load_image(np.zeros((5, 7, 2), dtype=np.uint8))
    with pytest.raises(UserError, match="zero size"):
        load_image(np.zeros((0, 7, 3), dtype=np.uint8))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("this is not an image")
    with pytest.raises(UserError, match="not an image"):
        load_image(tmp_path / "text.png")
    data = _png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_image(tmp_path / "cut.jpg")


def test_decompression_bomb_is_refused(tmp_path):
    # A real PNG header announcing 20000 x 20000 pixels: refused from the header, before decoding.
    big = Image.new("1", (20000, 20000))
    path = tmp_path / "bomb.png"
    big.save(path)
    with pytest.raises(UserError, match="too large"):
        load_image(path)
