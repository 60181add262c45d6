"""The vLLM teachers without vLLM: the URL spelling, the refusals made before any server or engine is asked
(config check, serve-teacher flags), the server's per-request refusal hook, and the start-up probes of
VLLMServerTeacher against a stand-in client (raw or logits log-probs mode, rows it cannot write exactly). The
teachers themselves, on real vLLM, are tested in tests/vllm."""

from __future__ import annotations

import pytest

from tropd.cli import main
from tropd.needs import Needs
from tropd.rollout import SamplingConfig
from tropd.teacher import VLLMServerTeacher
from tropd.teacher.openai_server import http_url
from tropd.teacher.remote import is_url, is_vllm_url
from tropd.train.config import ConfigError, load_config


def test_the_vllm_spelling_is_its_own_scheme():
    assert is_vllm_url("vllm+http://host:8000") and is_vllm_url("vllm+https://host")
    assert not is_vllm_url("http://host:8000") and not is_vllm_url("/models/vllm+http")
    assert is_url("vllm+http://host:8000") and is_url("http://host:8000")  # both: a teacher behind HTTP
    assert http_url("vllm+http://host:8000/") == "http://host:8000"


@pytest.mark.parametrize("objective, named", [("gkd", "full logits"), ("trb", "trb blends"),
                                              ("eopd", "full-vocabulary entropy")])
def test_what_a_vllm_server_cannot_give_is_refused_by_the_config_check(objective, named):
    with pytest.raises(ConfigError, match=named) as err:
        load_config(None, ["model.teacher=vllm+http://127.0.0.1:9", "model.student=/s", f"objective.name={objective}",
                           "objective.kwargs={}"])
    assert err.value.key == "objective.name" and "\n" not in str(err.value)
    load_config(None, ["model.teacher=vllm+http://127.0.0.1:9", "model.student=/s"])  # tropd: top-k only


class _Answer:
    def __init__(self, body: dict, status: int = 200) -> None:
        self.body, self.status_code = body, status

    def json(self) -> dict:
        return self.body


class _StockServer:
    """An httpx stand-in for a vLLM server: ``/v1/models`` and the two probes of ``/v1/completions``, answering
    with the top log-prob ``raw`` (prompt log-probs) and ``sampled`` (the sample at temperature 0.5)."""

    def __init__(self, raw: float, sampled: float) -> None:
        self.raw, self.sampled = raw, sampled

    def request(self, method, path, content=None, headers=None, json=None):
        if path == "/v1/models":
            return _Answer({"data": [{"id": "m", "max_model_len": 64}]})
        if "prompt_logprobs" in json:
            entries = {"7": {"logprob": self.raw, "rank": 1}, "0": {"logprob": self.raw - 2, "rank": 5}}
            return _Answer({"choices": [{"index": 0, "prompt_logprobs": [None, entries, entries, entries]}]})
        return _Answer({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:7": self.sampled}]}}]})


def test_a_server_returning_raw_logprobs_writes_rows_at_temperature_1_only():
    raw = _StockServer(raw=-0.5, sampled=-0.5)
    teacher = VLLMServerTeacher("vllm+http://m:1", client=raw, rows_at=(1.0, 1.0))
    assert not teacher.processed and teacher.context_length == 63
    with pytest.raises(ValueError, match=r"temperature 0.7 and top-p 1 .*--logprobs-mode processed_logprobs, or set "
                                         r"rollout.temperature and rollout.top_p to 1"):
        VLLMServerTeacher("vllm+http://m:1", client=raw, rows_at=(0.7, 1.0))
    with pytest.raises(ValueError, match="top-p 0.9"):
        teacher.write_rows([[1]], SamplingConfig(max_new_tokens=2, eos_token_ids=(), pad_token_id=0, top_p=0.9),
                           None, None)
    processed = VLLMServerTeacher("vllm+http://m:1", client=_StockServer(raw=-0.5, sampled=-0.2), rows_at=(0.7, 0.9))
    assert processed.processed and "processed log-probs" in processed.describe()


def test_a_server_returning_logits_is_refused():
    with pytest.raises(ValueError, match="returns logits, not log-probs .*--logprobs-mode raw_logprobs"):
        VLLMServerTeacher("vllm+http://m:1", client=_StockServer(raw=3.5, sampled=3.5))


def test_serve_teacher_shows_its_engines_and_refuses_flags_of_the_other(capsys):
    pytest.importorskip("fastapi", reason="the server extra: pip install 'tropd[server]'")
    from tropd.teacher.server import load_engine

    with pytest.raises(SystemExit):
        main(["serve-teacher", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--engine {hf,vllm}" in out and "(default: hf)" in out
    with pytest.raises(ValueError, match="--max-model-len applies to --engine vllm only"):
        load_engine("/no/model", "hf", max_model_len=128)
    with pytest.raises(ValueError, match="--device cpu: vLLM runs on the device its build supports"):
        load_engine("/no/model", "vllm", device="cpu")
    with pytest.raises(ValueError, match="--engine 'trt'"):
        load_engine("/no/model", "trt")


def test_the_server_refuses_what_its_engine_cannot_score():
    pytest.importorskip("fastapi", reason="the server extra: pip install 'tropd[server]'")
    import torch
    from fastapi import HTTPException

    from tropd.teacher.server import Limits, score_request

    class TopKOnly:
        vocab_size = id_limit = 64
        context_length = 32

        def unsupported(self, needs: Needs) -> str | None:
            return "no entropy here" if needs.teacher_entropy else None

    t = {"input_ids": torch.ones(1, 4, dtype=torch.int32), "attention_mask": torch.ones(1, 4, dtype=torch.int32),
         "tokens": torch.ones(1, 2, dtype=torch.int32)}
    score_request(TopKOnly(), Limits(), t, {"response_start": 2, "needs": {"teacher_logprobs": True}})
    with pytest.raises(HTTPException) as err:
        score_request(TopKOnly(), Limits(), t, {"response_start": 2, "needs": {"teacher_entropy": True}})
    assert err.value.status_code == 422 and err.value.detail == "needs: no entropy here"
