"""Audio through the exported chains (MiniCPM-o 4.5 and 2.6): the audio step 1 s chunk by chunk with its encoder
cache, its tokens over the prompt's audio spans, greedy tokens equal to the eager reference on ONNX, ExecuTorch and
Core AI (fp32, float weights), for clips under 1 s, of exactly 1 s and of several seconds, audio with an image, and
audio in a second turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.bundle import audio_example
from minicpm.generation import SamplingConfig, generate
from minicpm.prompt import Prompt
from minicpm.split import AudioChunkStep
from runtime.audio_chunks import AudioChunker, AudioStepSpec
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import noise_image, speechlike

O_MODELS = ["tiny-minicpm-o-4.5", "tiny-minicpm-o-2.6"]
FORMATS = ["onnx", "executorch", "coreai"]
# Float weights, so the eager reference runs the same ones (the Core AI exporter quantises the LLM by default);
# the same command as tests/test_coreai.py's o-4.5 export, so the session's export pool runs it once.
EXPORT_ARGS = {"coreai": ["--quant", "none", "--precision", "fp32"]}
MAX_CONTEXT = 640
SAMPLING = SamplingConfig(max_new_tokens=12)


def export_args(fmt: str) -> list[str]:
    return ["--max-context", str(MAX_CONTEXT), *EXPORT_ARGS.get(fmt, [])]


# Core AI's audio asset and ExecuTorch's audio method are the same code for both o-models (the Whisper width and
# pool are data): o-4.5 covers them (an ExecuTorch lowering is a minute here).
CHAINS = [(fmt, name) for fmt in FORMATS for name in O_MODELS
          if fmt == "onnx" or name == "tiny-minicpm-o-4.5"]
EXPORTS_AHEAD = [(fmt, name, *export_args(fmt)) for fmt, name in CHAINS]  # queued at session start


def export_of(exports, fmt: str, name: str):
    return exports(fmt, name, *export_args(fmt))


def torch_audio_call(step: AudioChunkStep):
    def run(**inputs: np.ndarray):
        with torch.no_grad():
            return tuple(t.numpy() for t in step(**{k: torch.from_numpy(np.ascontiguousarray(v))
                                                   for k, v in inputs.items()}))
    return run


@pytest.fixture(scope="module", autouse=True)
def start_exports(request, exports):
    """The exports of this module's selected tests, two at a time in the background while the first tests run."""
    wanted = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "fmt" in params:
            wanted.add((params["fmt"], params["name"]))
    for fmt, name in CHAINS:
        if (fmt, name) in wanted:
            exports.start(fmt, name, *export_args(fmt))


@pytest.mark.parametrize("name", O_MODELS)
@pytest.mark.parametrize("frames", [37, 100, 437, 3157])
def test_chunk_by_chunk_equals_the_whole_clip(tiny, name, frames):
    """The audio step through the host's chunker equals the eager whole-clip encoding (upstream chat()'s), across
    the 30 s piece boundary too, whether the frames arrive at once or unevenly."""
    ckpt, model = tiny(name)
    step = AudioChunkStep(model).eval()
    features = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(frames))
    whole = model.encode_audio(features).detach().numpy()
    cache = model.apm.max_source_positions
    spec = AudioStepSpec(80, step.chunk, cache, step.pool, model.config.hidden_size,
                         (len(model.apm.layers), step.heads, cache, step.head_dim))
    for arrival in (frames, 37):
        chunker = AudioChunker(spec)
        out = [chunker.encode(features[0, :, s:s + arrival].numpy(), False, torch_audio_call(step))
               for s in range(0, frames, arrival)]
        out.append(chunker.encode(np.zeros((80, 0), np.float32), True, torch_audio_call(step)))
        got = np.concatenate(out)
        assert got.shape == whole.shape
        np.testing.assert_allclose(got, whole, atol=1e-5)
        assert chunker.calls == -(-frames // 100)  # one call per 1 s chunk, the last one short


@pytest.mark.parametrize("fmt, name", CHAINS)
def test_audio_step_matches_its_torch_module(exports, tiny, fmt, name):
    out = export_of(exports, fmt, name)
    manifest = read_manifest(out)
    _, model = tiny(name)
    assert manifest["schedule"]["steps"]["audio"]["frames"] == 50
    assert manifest["schedule"]["steps"]["audio"]["tokens"] == 50 // model.config.audio_pool_step
    assert manifest["schedule"]["audio_cache"]["shape"] == [len(model.apm.layers), 2, 1500, 16]
    assert manifest["preprocessing"]["audio"]["pool"] == model.config.audio_pool_step
    assert manifest["parity"]["audio"] < 1e-4
    session = Session(out)
    step = AudioChunkStep(model).eval()
    for inputs in audio_example(model):  # the first chunk, one with a filled cache, the short last one
        with torch.no_grad():
            expected = step(**inputs)
        got = session.backend.audio(**{k: v.numpy() for k, v in inputs.items()})
        np.testing.assert_allclose(got[0], expected[0].numpy(), atol=1e-4)
        if got[1] is not None:  # host-kept cache: the chunk's K/V too (stateful programs write their own)
            np.testing.assert_allclose(got[1], expected[1].numpy(), atol=1e-4)
            np.testing.assert_allclose(got[2], expected[2].numpy(), atol=1e-4)


def audio_file(tmp_path, seconds: float, seed: int) -> str:
    import soundfile as sf

    path = tmp_path / f"clip-{seconds}-{seed}.wav"
    sf.write(path, speechlike(seconds, seed=seed), 16000)
    return str(path)


@pytest.mark.parametrize("fmt, name", CHAINS)
def test_greedy_tokens_equal_the_eager_reference(exports, tiny, tmp_path, fmt, name):
    ckpt, model = tiny(name)
    session = Session(export_of(exports, fmt, name))  # the export's own runtime
    cases = [[{"type": "audio", "audio": audio_file(tmp_path, seconds, seed)}, "What did you hear?"]
             for seconds, seed in ((0.63, 1), (1.0, 2), (4.37, 3))]
    cases.append([noise_image(640, 480, 2), {"type": "audio", "audio": audio_file(tmp_path, 2.2, 4)},
                  "Does the sound match the picture?"])
    answers = []
    for content in cases:
        messages = [{"role": "user", "content": content}]
        session.reset()
        got = session.ask(messages, SAMPLING)
        expected = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, SAMPLING, ckpt.stop_ids)
        assert got.token_ids == expected.token_ids
        frames = sum(a.features.shape[1] for a in ckpt.prompts.build(messages).audios)
        assert got.stats["audio_chunks"] == -(-frames // 100)  # one audio call per 1 s chunk
        answers.append(tuple(got.token_ids))
    assert len(set(answers)) == len(answers)  # each clip gives its own answer: the audio reaches the LLM


@pytest.mark.parametrize("fmt, name", CHAINS)
def test_audio_in_the_second_turn(exports, tiny, tmp_path, fmt, name):
    ckpt, model = tiny(name)
    session = Session(export_of(exports, fmt, name))
    first = [{"role": "user", "content": "Hello, can you listen to something?"}]
    second = [{"role": "user", "content": [{"type": "audio", "audio": audio_file(tmp_path, 3.1, 5)},
                                           "What was it?"]}]
    a1 = session.ask(first, SAMPLING)
    a2 = session.ask(second, SAMPLING)
    t1 = ckpt.prompts.build(first)
    t2 = ckpt.prompts.build_turn(second, first_image=0)
    offset = len(t1.input_ids) + len(a1.token_ids)
    whole = Prompt(t1.input_ids + a1.token_ids + t2.input_ids, [], [], "",
                   [(s + offset, e + offset) for s, e in t2.audio_bounds], t2.audios)
    reference = generate(model, whole, ckpt.tokenizer, SAMPLING, ckpt.stop_ids)
    assert a2.token_ids == reference.token_ids
    assert a2.stats["audio_chunks"] == 4 and a2.stats["audio_ms_per_chunk"] > 0
