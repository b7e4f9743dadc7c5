"""Video through the exported chains (tiny MiniCPM-V 4.5): every format's video function against its torch
module on frame groups, and greedy tokens of the ONNX, ExecuTorch and Core AI chains identical to the eager
reference for a short video (one group), a long one (ten groups of three frames: two batches), a follow-up
question in a second turn, and an image and a video in one conversation. Core ML is checked structurally."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpm.generation import SamplingConfig, generate
from minicpm.prompt import Prompt
from minicpm.split import VideoGroupStep
from minicpm.video import load_video
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import V45_EXPORTS as EXPORTS
from tests.conftest import encode_video, noise_image, v45_command

pytest.importorskip("av")

MODEL = "tiny-minicpm-v-4.5"
EXPORTS_AHEAD = [v45_command(fmt) for fmt in EXPORTS]  # queued at session start
BACKENDS = {"onnx": "onnxruntime", "executorch": "executorch", "coreai": "coreai"}
SAMPLING = SamplingConfig(max_new_tokens=16)


@pytest.fixture(scope="module")
def exported(v45_exports):
    return v45_exports


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """short: 1 s at 10 fps sampled to 3 frames packed into one group; long: 10 s, 30 frames in ten groups of
    three (more groups than one vision batch of 8); other: as short, other content."""
    root = tmp_path_factory.mktemp("videos")
    return {"short": load_video(encode_video(root / "short.mp4", 10, 10, seed=1), max_frames=1),
            "long": load_video(encode_video(root / "long.mp4", 100, 10, seed=2), max_frames=10),
            "other": load_video(encode_video(root / "other.mp4", 10, 10, seed=3), max_frames=1)}


def conversation(videos) -> dict[str, list[list[dict]]]:
    """Scenario -> its turns (each a list of new messages)."""
    image, photo = noise_image(200, 150, 1), noise_image(640, 480, 2)
    return {
        "short": [[{"role": "user", "content": [videos["short"].content(), "What happens in this video?"]}]],
        "long": [[{"role": "user", "content": [videos["long"].content(), "Describe the video."]}]],
        "follow-up": [[{"role": "user", "content": [videos["other"].content(), "What happens?"]}],
                      [{"role": "user", "content": "And after that?"}]],
        "image and video": [[{"role": "user", "content": [image, videos["short"].content(), "Compare them."]}],
                            [{"role": "user", "content": [photo, "And this photo?"]}]],
    }


_REFERENCES: dict = {}  # (scenario, earlier answers) -> eager tokens: the three chains share one reference run


def reference(ckpt, model, turns: list[list[dict]], answers: list[list[int]] | None = None,
              name: str | None = None) -> list[list[int]]:
    """Eager greedy tokens of each turn, the whole conversation as one prompt (turn 1, answer 1, turn 2, ...);
    `answers`: the earlier answers to build on (the chain's own, so a mismatch shows in the turn it happens)."""
    key = (name, tuple(tuple(a) for a in (answers or [])[:-1]))
    if name is not None and key in _REFERENCES:
        return _REFERENCES[key]
    whole, out = None, []
    for i, turn in enumerate(turns):
        if whole is None:
            whole = ckpt.prompts.build(turn)
        else:
            nxt = ckpt.prompts.build_turn(turn, len(whole.images))
            previous = (answers or out)[i - 1]
            offset = len(whole.input_ids) + len(previous)
            whole = Prompt(whole.input_ids + previous + nxt.input_ids,
                           whole.image_bounds + [(s + offset, e + offset) for s, e in nxt.image_bounds],
                           whole.images + nxt.images)
        out.append(generate(model, whole, ckpt.tokenizer, SAMPLING, ckpt.stop_ids).token_ids)
    if name is not None:
        _REFERENCES[key] = out
    return out


def test_the_recipe_gives_the_planned_groups(videos):
    assert videos["short"].plan.temporal_ids == [[1, 5, 8]]
    assert len(videos["long"].plan.temporal_ids) == 10
    assert all(len(g) == 3 for g in videos["long"].plan.temporal_ids)


def test_references_can_tell_chains_apart(tiny, videos):
    """The tiny model's greedy answers differ between the scenarios (so the token comparisons below catch a
    schedule that drops, reorders or misplaces groups), and its group features move by far more than the 1e-4
    tolerance with the frames' content or temporal ids (so the feature comparisons catch a wrong encoding;
    tokens of the tiny model barely depend on content)."""
    ckpt, model = tiny(MODEL)
    answers = {name: reference(ckpt, model, turns, name=name)[0] for name, turns in conversation(videos).items()}
    assert len({tuple(a) for a in answers.values()}) == len(answers), answers
    short, other = (ckpt.prompts.build([{"role": "user", "content": [videos[k].content(), "x"]}]).images[0]
                    for k in ("short", "other"))
    untimed = ckpt.prompts.build([{"role": "user", "content": [
        {"type": "video", "frames": videos["short"].frames, "temporal_ids": [[-1, -1, -1]]}, "x"]}]).images[0]
    features = {k: model.encode_video_group(g) for k, g in (("short", short), ("other", other), ("untimed", untimed))}
    assert (features["short"] - features["other"]).abs().max() > 1e-3
    assert (features["short"] - features["untimed"]).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["onnx", "executorch", "coreai"])
def test_video_function_matches_its_torch_module(exported, tiny, videos, fmt):
    """Frame groups of the long video (full and partly used slots) through the backend's video call against
    VideoGroupStep and against the eager per-group encoder (no padding) within 1e-4."""
    out = exported(fmt)
    manifest = read_manifest(out)
    step = manifest["schedule"]["steps"]["video"]
    assert step["frames"] == 6 and manifest["parity"]["video" if fmt != "executorch" else "video_encoder"] < 1e-4
    ckpt, model = tiny(MODEL)
    session = Session(out, BACKENDS[fmt])
    frames = videos["long"].frames
    groups = ckpt.prompts.build([{"role": "user", "content": [
        {"type": "video", "frames": frames[:9] + frames[9:10], "temporal_ids": [[0, 3, 7, 10, 13, 17], [20, 23, 27],
                                                                                 [30]]}]}]).images
    got = np.stack(session._video(groups))
    with torch.no_grad():
        batch = {k: v for k, v in session_inputs(session, groups).items()}
        expected = VideoGroupStep(model).eval()(**batch).numpy()
        eager = torch.cat([model.encode_video_group(g) for g in groups]).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - eager).max() < 1e-4


def session_inputs(session: Session, groups) -> dict[str, torch.Tensor]:
    from minicpm.modeling import video_inputs  # noqa: PLC0415

    pre = session.manifest["preprocessing"]
    return video_inputs(groups, 6, pre["patch_size"], pre["num_patches_per_side"],
                        session.manifest["model"]["hidden_size"], session.max_patches)


@pytest.mark.parametrize("fmt", ["onnx", "executorch", "coreai"])
def test_chain_tokens_match_the_eager_reference(exported, tiny, videos, fmt):
    ckpt, model = tiny(MODEL)
    session = Session(exported(fmt))  # the export's own runtime
    assert session.backend.name == BACKENDS[fmt]
    for name, turns in conversation(videos).items():
        session.reset()
        got = [session.ask(turn, SAMPLING).token_ids for turn in turns]
        assert got == reference(ckpt, model, turns, got, name), (fmt, name)


def test_an_export_without_a_video_step_refuses_video(exported, videos):
    """An image-only export (V-4.0 has no 3D resampler; its manifest has no steps.video): one clear line,
    before any graph runs."""
    from minicpm.errors import UserError  # noqa: PLC0415

    session = Session(exported("onnx"))
    del session.manifest["schedule"]["steps"]["video"]
    with pytest.raises(UserError, match="export has no video step"):
        session.ask([{"role": "user", "content": [videos["short"].content(), "x"]}], SAMPLING)


def test_coreml_vision_package_has_a_video_function_sharing_the_weights(exported):
    ct = pytest.importorskip("coremltools")
    out = exported("coreml")
    manifest = read_manifest(out)
    assert manifest["schedule"]["steps"]["video"] == {"artifact": "vision", "function": "video", "frames": 6,
                                                      "batch": 1}
    functions = manifest["artifacts"]["vision"]["functions"]
    shapes = {f: {t["name"]: t["shape"] for t in functions[f]["inputs"]} for f in ("main", "video")}
    patches, hidden = manifest["preprocessing"]["max_patches"], manifest["model"]["hidden_size"]
    assert shapes["video"] == {"pixel_values": [1, 6, 3, 14, 14 * patches], "position_ids": [1, 6, patches],
                               "patch_mask": [1, 6, patches], "pos_embed": [1, 6, patches, hidden]}
    assert shapes["main"]["pos_embed"] == [1, patches, hidden]
    assert functions["video"]["outputs"][0]["shape"] == [1, 64, hidden]
    assert manifest["parity"]["video"] < 1e-4
    spec = ct.utils.load_spec(str(out / "vision.mlpackage"))
    assert spec.description.defaultFunctionName == "main"

    def weights(function: str) -> dict[str, int]:
        fn = spec.mlProgram.functions[function]
        return {op.outputs[0].name: op.attributes["val"].blobFileValue.offset
                for op in fn.block_specializations[fn.opset].operations
                if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue"
                and op.outputs[0].name.startswith(("p_", "b_"))}

    assert weights("main") and weights("main") == weights("video")  # one copy of the vision weights


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_manifest_describes_video_preprocessing(exported, fmt):
    manifest = read_manifest(exported(fmt))
    video = manifest["preprocessing"]["video"]
    assert (video["frames_per_group"], video["default_packing"], video["max_frames"], video["max_slice_nums"],
            video["use_image_id"]) == (6, 3, 180, 1, False)
    assert manifest["schedule"]["steps"]["video"]["frames"] == video["frames_per_group"]
