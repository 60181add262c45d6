"""The Teacher protocol names everything a run asks of its teacher, and both teachers implement it the same way:
scores, rows, the model for TRB, the context length (which bounds the prompts) and a description."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_llama, tiny_tokenizer
from tropd.teacher import InProcessTeacher, RemoteTeacher, Teacher


class _Response:
    status_code = 200

    def __init__(self, body: dict) -> None:
        self.body = body

    def json(self) -> dict:
        return self.body


class _InfoOnly:
    """An httpx client stand-in that answers /v1/info with a given body."""

    def __init__(self, info: dict) -> None:
        self.info = info

    def request(self, method, path, content=None, headers=None):
        assert (method, path) == ("GET", "/v1/info")
        return _Response(self.info)


def test_the_protocol_asks_for_context_length_and_describe():
    class Scores:
        def score(self, batch, needs): ...
        def write_rows(self, contexts, cfg, budgets, uniforms): ...
        def model_for_blending(self): ...

    assert not isinstance(Scores(), Teacher)  # a teacher that cannot say its context length or what it is

    class Complete(Scores):
        context_length = None

        def describe(self):
            return "a teacher"

    assert isinstance(Complete(), Teacher)


def test_in_process_and_remote_teachers_say_the_same_through_the_protocol():
    pytest.importorskip("fastapi", reason="the server extra: pip install 'tropd[server]'")
    from tropd.teacher.server import HFEngine

    model = tiny_llama(layers=2)
    local = InProcessTeacher(model)
    remote = RemoteTeacher("http://teacher:8000", client=_InfoOnly(HFEngine(model, tiny_tokenizer(64), "tiny").info()))
    for teacher in (local, remote):
        assert isinstance(teacher, Teacher)
    assert local.context_length == remote.context_length == model.config.max_position_embeddings
    params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
    assert local.describe() == f"2 layers, {params}"
    assert remote.describe() == f"tiny at http://teacher:8000: 2 layers, {params} (float32)"
    info = {**HFEngine(model, tiny_tokenizer(64), "tiny").info(), "context_length": None}  # a server not saying
    assert RemoteTeacher("http://teacher:8000", client=_InfoOnly(info)).context_length is None
