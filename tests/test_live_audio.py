"""The live turn of runtime.live_audio (upstream's streaming mel frames, each finished 1 s chunk encoded and
prefilled as it arrives): its prompt and greedy answer equal the recorded-clip path on the same frames, on a fresh
conversation and as a follow-up turn (the streaming frames themselves: tests/test_audio_streaming.py)."""

from __future__ import annotations

import numpy as np
import pytest

from minicpm.audio import AudioInputs, audio_tokens, mel_frames
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig
from runtime.session import Session
from tests.conftest import speechlike

MAX_CONTEXT = 640
EXPORTS_AHEAD = [("onnx", name, "--max-context", str(MAX_CONTEXT))  # queued at session start
                 for name in ("tiny-minicpm-o-4.5", "tiny-minicpm-o-2.6")]


@pytest.mark.parametrize("follow_up", [False, True])
@pytest.mark.parametrize("name", ["tiny-minicpm-o-4.5", "tiny-minicpm-o-2.6"])
def test_live_turn_equals_the_recorded_clip_path(exports, tiny, name, follow_up):
    ckpt, _ = tiny(name)
    session = Session(exports("onnx", name, "--max-context", str(MAX_CONTEXT)))
    x = speechlike(3.3, seed=6)
    sampling = SamplingConfig(max_new_tokens=12)
    opening = [{"role": "user", "content": "Listen to this, please."}]
    if follow_up:
        session.ask(opening, sampling)
    before = session.cache_len
    turn = session.listen()
    assert session.cache_len > before  # the turn's prefix is in the cache before any audio
    prefix = session.cache_len
    for i in range(0, x.size, 1600):  # 100 ms at a time, as a microphone delivers
        turn.feed(x[i:i + 1600])
    assert session.cache_len > prefix  # finished chunks were encoded and prefilled while the user spoke
    live = turn.answer(sampling)
    assert live.stats["audio_chunks"] == 4 and live.stats["last_sample_to_first_token_ms"] > 0
    history = list(session.history.input_ids)
    # the recorded path on the same frames, with one span per chunk
    features = np.concatenate(turn.frames, axis=1)
    assert features.shape[1] == mel_frames(x.size)
    pool = session.manifest["schedule"]["steps"]["audio"]["pool"]
    clip = AudioInputs(features, x.size, x.size / 16000, audio_tokens(x.size, pool), 1)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": clip}]}]
    session.reset()
    if follow_up:
        session.ask(opening, sampling)
    else:
        prompt = ckpt.prompts.build(messages, stream_input=True)
        assert history[:len(prompt.input_ids)] == prompt.input_ids
    recorded = session.ask(messages, sampling, stream_input=True)
    assert live.token_ids == recorded.token_ids
    assert session.history.input_ids == history
    with pytest.raises(UserError, match="answered"):
        turn.feed(x[:10])
