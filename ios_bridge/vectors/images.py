"""Image vectors: slicing grids/sizes, pixel rows of real and synthetic images, position ids and tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ios_bridge.vectors.common import array_ref, write_case
from minicpm.image_processing import SliceConfig, load_image, navit_position_ids, process_image, slice_image
from minicpm.resampler import pos_embed_2d

SIZES = [(1, 1), (1, 4000), (4000, 1), (448, 448), (640, 480), (1920, 1080), (13, 9999), (9999, 13), (14, 14),
         (447, 449), (449, 447), (896, 896), (1344, 1344), (4000, 3000), (3000, 4000), (100, 1000), (1000, 100),
         (300, 200), (800, 600), (1024, 768), (2048, 1536), (500, 500), (33, 777), (1280, 720), (720, 1280),
         (5000, 500), (634, 634), (1000, 1), (2, 3), (3024, 4032), (700, 300), (1500, 1499)]
PRE = {"patch_size": 14, "scale_resolution": 448, "max_slice_nums": 9, "slice_mode": True, "mean": [0.5] * 3,
       "std": [0.5] * 3, "query_num": 64, "use_image_id": True, "image_tag": "(<image>./</image>)",
       "max_patches": 1088, "num_patches_per_side": 70}


def _synthetic(w: int, h: int, seed: int, alpha: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], -1)
    base += rng.normal(0, 20, base.shape)
    a = np.clip(base, 0, 255).astype(np.uint8)
    if alpha:
        a = np.concatenate([a, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], -1)
    return a


def write(out: Path, models: list[str], images: list[Path], prompts: list[str]) -> None:
    cfg = SliceConfig()
    for cap in (9, 4, 1):
        for w, h in SIZES:
            im = Image.new("RGB", (w, h))
            s = slice_image(im, cfg, cap)
            write_case(out / "slicing", f"{w}x{h}_cap{cap}", {"width": w, "height": h, "max_slice_nums": cap,
                       "grid": list(s.grid) if s.grid else None, "slice_sizes": [list(x) for x in s.slice_sizes],
                       "preprocessing": PRE})
    arrays = [("house", np.asarray(load_image(Path(__file__).parents[2] / "examples/house.png")))]
    for i, (w, h, alpha) in enumerate([(300, 200, False), (1000, 700, True), (1600, 900, False), (57, 250, True)]):
        arrays.append((f"synthetic{i}_{w}x{h}", _synthetic(w, h, i, alpha)))
    arrays += [(f"user{i}", np.asarray(load_image(p))) for i, p in enumerate(images)]
    for name, a in arrays:
        folder = out / "pixels"
        inputs = process_image(a, cfg)
        case = {"width": a.shape[1], "height": a.shape[0], "channels": a.shape[2], "preprocessing": PRE,
                "input": array_ref(folder, f"{name}_input", a),
                "grid": list(inputs.sliced.grid) if inputs.sliced.grid else None,
                "tgt_sizes": [list(t) for t in inputs.tgt_sizes],
                "rows": [array_ref(folder, f"{name}_row{j}", r.numpy()) for j, r in enumerate(inputs.pixel_values)]}
        write_case(out / "pixels", name, {**case, "dir": name})
    # 25, 49, 58, 77 and 98 hold bucket ties (where torch's vectorised arange differs from its scalar form)
    for h, w in [(1, 1), (32, 32), (28, 37), (70, 70), (2024, 1), (1, 71), (17, 5), (100, 3), (25, 49), (58, 77),
                 (98, 10), (1088, 1)]:
        for dim in (256, 64, 1152):
            if h * w > 3000 and dim > 64:
                continue
            folder, tag = out / "positions", f"{h}x{w}_{dim}"
            write_case(out / "positions", tag, {"h": h, "w": w, "dim": dim, "dir": tag,
                       "ids": array_ref(folder, f"{tag}_ids", navit_position_ids(h, w, 70).numpy()),
                       "table": array_ref(folder, f"{tag}_table", pos_embed_2d(dim, h, w))})
    write_orientations(out / "orientation")


def write_orientations(folder: Path) -> None:
    """A 5x3 image under each EXIF orientation, and Pillow's `ImageOps.exif_transpose` of it (what a photo
    looks like upright): Swift's `RGBImage.applyingOrientation` must give the same pixels."""
    import io  # noqa: PLC0415

    from PIL import ImageOps  # noqa: PLC0415

    raw = (np.arange(5 * 3 * 3, dtype=np.uint8).reshape(3, 5, 3) * 5)
    for exif_value in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = exif_value  # Orientation
        buffer = io.BytesIO()
        Image.fromarray(raw).save(buffer, "PNG", exif=exif)
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
        write_case(folder, f"exif{exif_value}", {"orientation": exif_value, "input": array_ref(folder, "input", raw),
                                                 "upright": array_ref(folder, f"exif{exif_value}_upright", upright)})
