"""The fixed-shape vision graph of MiniCPM-V 4.6 / 4.7 (`minicpm.hybrid_vision`): parity with transformers' own
image-feature path slice by slice, padding invariance, the patch-row bound, and an export spike (torch.export,
ONNX through the dynamo exporter, onnxruntime)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from minicpm.hybrid_vision import HybridVisionStep, VisionLayout, max_patches_bound, split_slices, vision_inputs
from tests.conftest import noise_image

NAMES = ["tiny-minicpm-v-4.6", "tiny-minicpm-v-4.7"]
IMAGES = [(200, 150), (640, 480), (300, 900)]  # (width, height): not sliced, sliced 1x2, tall (3x1 + thumbnail)


def _bound(ckpt) -> int:
    ip = ckpt.processor.image_processor
    return max_patches_bound(ip.scale_resolution, ip.patch_size, ip.downsample_mode)


def _run(step: HybridVisionStep, one_slice: dict, max_patches: int) -> torch.Tensor:
    inputs = {k: torch.from_numpy(v) for k, v in step.vision_inputs(one_slice, max_patches).items()}
    with torch.no_grad():
        return step(**inputs)


def _step_features(step: HybridVisionStep, processed, max_patches: int) -> list[torch.Tensor]:
    out = []
    for one in split_slices(processed):
        h, w = one["target_sizes"][0].tolist()
        features = _run(step, one, max_patches)
        n = step.layout.tokens(h, w)
        assert features.shape == (max_patches // step.layout.patches_per_token, features.shape[1])
        assert not features[n:].any()  # padded rows are exact zeros
        out.append(features[:n])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_step_equals_model_image_features(hybrid, name):
    ckpt, model = hybrid(name)
    step = HybridVisionStep(model).eval()
    images = [noise_image(width, height, seed=i) for i, (width, height) in enumerate(IMAGES)]
    processed = ckpt.processor.image_processor(images, return_tensors="pt")  # one call: the processor's order
    assert processed["num_patches_per_image"] == [1, 3, 4]  # thumbnail only; thumbnail + 1x2; thumbnail + 3x1
    with torch.no_grad():
        reference = model.model.get_image_features(processed["pixel_values"], processed["target_sizes"]).pooler_output
    ours = _step_features(step, processed, _bound(ckpt))
    assert [f.shape for f in ours] == [f.shape for f in reference]
    assert (torch.cat(ours) - torch.cat(reference)).abs().max().item() <= 1e-5


def test_4x_mode_equals_model_image_features(hybrid):
    ckpt, model = hybrid("tiny-minicpm-v-4.6")
    step = HybridVisionStep(model, downsample_mode="4x").eval()
    processed = ckpt.processor.image_processor([noise_image(640, 480)], downsample_mode="4x", return_tensors="pt")
    with torch.no_grad():
        reference = model.model.get_image_features(processed["pixel_values"], processed["target_sizes"],
                                                   downsample_mode="4x").pooler_output
    ours = _step_features(step, processed, max_patches_bound(448, 14, "4x"))
    assert (torch.cat(ours) - torch.cat(reference)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_changes_valid_rows(hybrid, name):
    ckpt, model = hybrid(name)
    step = HybridVisionStep(model).eval()
    processed = ckpt.processor.image_processor([noise_image(640, 480)], return_tensors="pt")
    one = split_slices(processed)[1]  # a 40x28 refine slice
    h, w = one["target_sizes"][0].tolist()
    n = step.layout.tokens(h, w)
    exact = _run(step, one, h * w)  # no padding at all
    padded = _run(step, one, _bound(ckpt))
    wider = _run(step, one, _bound(ckpt) + 256)
    assert exact.shape[0] == n
    assert (padded[:n] - exact).abs().max().item() <= 1e-5
    assert (wider[:n] - exact).abs().max().item() <= 1e-5


def test_patch_order_is_the_models_merge_order():
    """The permutation groups each window, then each merge block, contiguously; the final tokens come out raster."""
    layout = VisionLayout(patch_size=14, num_patches_per_side=70, window=2, merge=(2, 2), merger_times=1)
    order = layout.patch_order(4, 8).reshape(1, 2, 2, 2, 2, 2)  # token r, c; merge block r, c; window r, c
    grid = np.arange(32).reshape(4, 8)
    assert (order[0, 1, 1, 0] == grid[2:4, 4:6]).all()  # token (0, 1), merge block (1, 0): rows 2-3, cols 4-5
    assert sorted(layout.patch_order(8, 12)) == list(range(96))


def test_max_patches_bound_covers_every_slice(hybrid):
    """The analytic bound equals the largest slice the processor's own sizing code makes (checked against it on a
    grid of image sizes), and a slice above the exported bound is refused in one line."""
    ckpt, model = hybrid("tiny-minicpm-v-4.6")
    ip = ckpt.processor.image_processor
    s, p, mode, slices = ip.scale_resolution, ip.patch_size, ip.downsample_mode, ip.max_slice_nums
    for max_aspect in (2, 20):
        seen = 0
        for height in range(28, 2000, 23):
            for width in range(max(14, math.ceil(height / max_aspect)), min(4000, int(height * max_aspect)) + 1, 19):
                grid = ip.get_sliced_grid((height, width), slices, s)
                sizes = [ip.find_best_resize((height, width), s, p, mode, allow_upscale=grid is None)]
                if grid:
                    rh, rw = ip.get_refine_size((height, width), grid, s, p, mode, allow_upscale=True)
                    sizes.append((rh // grid[0], rw // grid[1]))
                seen = max(seen, *((h // p) * (w // p) for h, w in sizes))
        bound = max_patches_bound(s, p, mode, max_aspect)
        assert seen <= bound and bound - seen <= 48, (max_aspect, seen, bound)
    assert max_patches_bound(448, 14, "16x", 8) == 1152 and max_patches_bound(448, 14, "16x", 20) == 1200
    step = HybridVisionStep(model)
    strip = ip([noise_image(1400, 14)], return_tensors="pt")  # a 100:1 strip: its thumbnail exceeds the bound
    too_big = max(split_slices(strip), key=lambda one: int(one["target_sizes"].prod()))
    with pytest.raises(ValueError, match=r"more than the 1200 the vision graph takes"):
        vision_inputs(too_big, 1200, step.layout)


@pytest.mark.parametrize("name", NAMES)
def test_export_spike_onnxruntime_matches_torch(hybrid, name, tmp_path):
    import onnx
    import onnxruntime as ort

    ckpt, model = hybrid(name)
    step = HybridVisionStep(model).eval()
    processed = ckpt.processor.image_processor([noise_image(300, 900)], return_tensors="pt")
    inputs = step.vision_inputs(split_slices(processed)[0], _bound(ckpt))  # the 56x20 thumbnail, padded
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(step, args, strict=False)
        shapes = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder"][-len(args):]
        assert all(isinstance(d, int) for s in shapes for d in s)  # static shapes throughout
        path = tmp_path / "vision.onnx"
        torch.onnx.export(step, args, str(path), input_names=list(inputs), output_names=["features"], dynamo=True,
                          verbose=False)
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 10)  # onnxruntime's supported IR
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, inputs)[0]
    with torch.no_grad():
        expected = step(*args).numpy()
        exported = program.module()(*args).numpy()
    assert np.abs(exported - expected).max() <= 1e-5
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4
