"""Image loading and the MiniCPM-V slicing / patch layout, exactly as upstream.

All sizes are (width, height) unless a name says otherwise; `tgt_size` is (rows, cols) of 14x14 patches.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from minicpm.errors import UserError

# Larger images are refused before decoding (decompression bombs): 8192 x 8192.
MAX_IMAGE_PIXELS = 8192 * 8192
BICUBIC = Image.Resampling.BICUBIC


# ---------------------------------------------------------------------------------------------------------
# Loading: paths, bytes, PIL images, numpy arrays -> RGB PIL image
# ---------------------------------------------------------------------------------------------------------


def load_image(image: str | os.PathLike | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Return an RGB PIL image with EXIF orientation applied, or raise UserError saying what is wrong."""
    if isinstance(image, np.ndarray):
        return to_rgb(_array_to_pil(image))
    if isinstance(image, Image.Image):
        _check_size(image.size, "image")
        return to_rgb(ImageOps.exif_transpose(image))
    name = "<bytes>" if isinstance(image, bytes) else str(image)
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    if not isinstance(image, bytes) and not os.path.isfile(image):
        raise UserError(f"image not found: {name}")
    # Truncated files must fail, not be silently padded with grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(source) as img:
            _check_size(img.size, name)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except UserError:
        raise
    except Image.DecompressionBombError as e:
        raise UserError(f"{name}: image too large ({e})") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{name}: corrupt or truncated image ({e})") from None


def _check_size(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise UserError(f"{name}: image has zero size ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise UserError(f"{name}: image too large ({w}x{h} pixels, limit {MAX_IMAGE_PIXELS} pixels)")


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise UserError(f"numpy image must be HxW, HxWx3 or HxWx4, got shape {tuple(a.shape)}")
    _check_size((a.shape[1], a.shape[0]), "numpy image")
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) * 255 + 32767) // 65535  # 16-bit -> 8-bit with rounding
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.nan_to_num(a) * 255.0 + 0.5, 0, 255)  # floats are taken as [0, 1]
    elif a.dtype != np.uint8:
        raise UserError(f"numpy image dtype must be uint8, uint16 or float, got {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))  # mode follows the shape: L, RGB, RGBA


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB as upstream does (`convert("RGB")`: alpha is dropped, not composited);
    16-bit and float greyscale, which that conversion would clip, are rescaled to 8 bits first."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode != "I" or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# Slicing (upstream MiniCPMVImageProcessor arithmetic)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceConfig:
    patch_size: int = 14
    max_slice_nums: int = 9
    scale_resolution: int = 448
    slice_mode: bool = True


def ensure_divide(length: float, patch_size: int) -> int:
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int,
                    allow_upscale: bool = False) -> tuple[int, int]:
    width, height = size
    cols, rows = grid
    refine_width = ensure_divide(width, cols)
    refine_height = ensure_divide(height, rows)
    cell = find_best_resize((refine_width / cols, refine_height / rows), scale_resolution, patch_size,
                            allow_upscale=allow_upscale)
    return cell[0] * cols, cell[1] * rows


def get_sliced_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int,
                    never_split: bool = False) -> tuple[int, int] | None:
    """The [cols, rows] grid for an image, or None when it is not sliced."""
    width, height = size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    best, best_error = (1, 1), float("inf")
    for grid in candidates:
        error = abs(log_ratio - math.log(grid[0] / grid[1]))
        if error < best_error:  # strict: the first candidate wins ties
            best, best_error = grid, error
    return best


@dataclass
class SlicedImage:
    """One image after slicing: the source image first, then the slices row-major."""

    original_size: tuple[int, int]
    grid: tuple[int, int] | None
    images: list[Image.Image]

    @property
    def slice_sizes(self) -> list[tuple[int, int]]:
        return [im.size for im in self.images]


def slice_image(image: Image.Image, config: SliceConfig, max_slice_nums: int | None = None) -> SlicedImage:
    max_slices = config.max_slice_nums if max_slice_nums is None else max_slice_nums
    size = image.size
    grid = get_sliced_grid(size, max_slices, config.scale_resolution, never_split=not config.slice_mode)
    if grid is None:
        best = find_best_resize(size, config.scale_resolution, config.patch_size, allow_upscale=True)
        return SlicedImage(size, None, [image.resize(best, resample=BICUBIC)])
    source = image.resize(find_best_resize(size, config.scale_resolution, config.patch_size), resample=BICUBIC)
    refine = image.resize(get_refine_size(size, grid, config.scale_resolution, config.patch_size, True),
                          resample=BICUBIC)
    cell_w, cell_h = refine.size[0] // grid[0], refine.size[1] // grid[1]
    slices = [refine.crop((x, y, x + cell_w, y + cell_h))
              for y in range(0, refine.size[1], cell_h) for x in range(0, refine.size[0], cell_w)]
    return SlicedImage(size, grid, [source, *slices])


# ---------------------------------------------------------------------------------------------------------
# Pixels -> patch rows, tgt sizes, NaViT position ids, resampler position tables
# ---------------------------------------------------------------------------------------------------------


def normalize(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x/255 - mean) / std as the upstream processor computes it."""
    a = np.asarray(image, dtype=np.uint8).astype(np.float32) / 255
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def reshape_by_patch(chw: np.ndarray, patch_size: int) -> torch.Tensor:
    """[3, H, W] -> [3, p, N*p]: the 14x14 patches in raster order laid side by side in one row."""
    t = torch.from_numpy(chw)
    patches = torch.nn.functional.unfold(t, (patch_size, patch_size), stride=(patch_size, patch_size))
    patches = patches.reshape(t.size(0), patch_size, patch_size, -1)
    return patches.permute(0, 1, 3, 2).reshape(t.size(0), patch_size, -1)


def _arange_float32(start: float, end: float, step: float) -> np.ndarray:
    """`torch.arange(start, end, step)` in float32 as torch's scalar CPU kernel computes it: start + i * step in
    double, rounded to float32. Its vectorised kernel rounds each lane group's base to float32 first, so torch
    gives other values at a few bucket ties on AVX2 than on AVX-512 machines; this form is the one a device
    (MiniCPMKit's PositionTables) reproduces exactly."""
    count = math.ceil((end - start) / step)
    return (start + step * np.arange(count, dtype=np.float64)).astype(np.float32)


def navit_position_ids(tgt_h: int, tgt_w: int, num_patches_per_side: int) -> torch.Tensor:
    """Bucketised NaViT position ids of one slice, as upstream computes them on the host: float32 fractions
    `arange(0, 1 - 1e-6, 1 / tgt)` bucketised (right=True) against `arange(1 / side, 1, 1 / side)`."""
    side = num_patches_per_side
    boundaries = _arange_float32(1 / side, 1.0, 1 / side)

    def buckets(n: int) -> np.ndarray:
        step = float(np.float32(1) / np.float32(n))  # 1 / torch.tensor(n): a float32 step
        return np.searchsorted(boundaries, _arange_float32(0.0, 1 - 1e-6, step), side="right")

    return torch.from_numpy((buckets(tgt_h)[:, None] * side + buckets(tgt_w)).flatten().astype(np.int64))


@dataclass
class ImageInputs:
    """Everything the vision path needs for one image: pixels per slice and their patch grids."""

    sliced: SlicedImage
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # each [3, p, N*p]
    tgt_sizes: list[tuple[int, int]] = field(default_factory=list)  # each (rows, cols) of patches
    # Video (3D resampler): the "slices" are frames of one group, resampled together into one span;
    # one temporal id per frame in 0.1 s units, -1 for none.
    temporal_ids: list[int] | None = None

    @property
    def spans(self) -> int:
        """Placeholder spans in the prompt: one per slice, or one for a whole group of video frames."""
        return 1 if self.temporal_ids is not None else len(self.pixel_values)

    def summary(self) -> dict:
        return {
            "original_size": list(self.sliced.original_size),
            "grid": list(self.sliced.grid) if self.sliced.grid else None,
            "slice_sizes": [list(s) for s in self.sliced.slice_sizes],
            "tgt_sizes": [list(t) for t in self.tgt_sizes],
        }


def process_video_group(frames: list, temporal_ids: list[int], config: SliceConfig,
                        mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5)
                        ) -> ImageInputs:
    """Frames of one temporal group (MiniCPM-V 4.5 video): each frame unsliced, resampled together."""
    if not frames or len(frames) != len(temporal_ids):
        raise UserError(f"a video group needs one temporal id per frame ({len(frames)} frames, "
                        f"{len(temporal_ids)} ids)")
    parts = [process_image(f, config, mean, std, max_slice_nums=1) for f in frames]
    if len({p.tgt_sizes[0] for p in parts}) != 1:
        raise UserError("frames of one video group must have the same size")
    first = parts[0].sliced
    group = SlicedImage(first.original_size, None, [p.sliced.images[0] for p in parts])
    return ImageInputs(group, [p.pixel_values[0] for p in parts], [p.tgt_sizes[0] for p in parts],
                       [int(t) for t in temporal_ids])


def process_image(image, config: SliceConfig, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                  std: tuple[float, ...] = (0.5, 0.5, 0.5), max_slice_nums: int | None = None) -> ImageInputs:
    """Load, slice, normalise and patchify one image."""
    if max_slice_nums is not None and max_slice_nums < 1:
        raise UserError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    sliced = slice_image(load_image(image), config, max_slice_nums)
    out = ImageInputs(sliced)
    p = config.patch_size
    for im in sliced.images:
        chw = normalize(im, mean, std)
        out.pixel_values.append(reshape_by_patch(chw, p))
        out.tgt_sizes.append((chw.shape[1] // p, chw.shape[2] // p))
    return out
