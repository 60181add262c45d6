"""Hostile clients of the teacher server (`tropd serve-teacher`): one bad client must not hurt the others, and
the work one request can cause is bounded.

Each request is checked on arrival and refused alone with a 4xx and one line naming the field or the limit; a
valid request sent beside bad ones still gets its own scores; bodies, rows, tokens, answers, time, headers and
bodies sent slowly are all bounded; the token guards every route but the health check; the CLI refuses an
exposed server without a token and a bad port in one line.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server extra: pip install 'tropd[server]'")

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from tests.helpers import tiny_llama, tiny_tokenizer  # noqa: E402
from tropd.cli import main  # noqa: E402
from tropd.needs import Needs  # noqa: E402
from tropd.rollout.sampling import SamplingConfig, decode_rows  # noqa: E402
from tropd.teacher import wire  # noqa: E402
from tropd.teacher.remote import RemoteTeacher, TeacherServerError  # noqa: E402
from tropd.teacher.scoring import score_with_teacher  # noqa: E402
from tropd.teacher.server import (  # noqa: E402
    Batcher, HFEngine, Limits, _Job, check_settings, create_app, is_loopback, server_config)

V, CONTEXT = 64, 256  # the tiny model's vocabulary and context
TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
NEEDS = Needs(teacher_logprobs=True, teacher_topk=True, top_k=4, teacher_entropy=True)


def _model(**kwargs):
    return tiny_llama(vocab_size=V, layers=2, **kwargs)


def _engine(model=None, name: str = "/home/someone/models/teacher") -> HFEngine:
    return HFEngine(model if model is not None else _model(), tiny_tokenizer(V), name)


def _rows(seed: int, rows: int = 2, prompt: int = 4, response: int = 5):
    """A valid score layout: left-padded prompts, then responses (ids in [3, V))."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (rows, prompt + response), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # one left-padded prompt
    ids[0, 0] = 0
    return ids, mask, prompt


def _score_body(ids, mask, start, needs=NEEDS, tokens=None, **meta) -> bytes:
    return wire.pack({"input_ids": ids, "attention_mask": mask, "tokens": ids[:, start:] if tokens is None else tokens},
                     {"response_start": start, "needs": wire.needs_to_json(needs), **meta})


def _sampling(**over) -> dict:
    return {"max_new_tokens": 8, "eos_token_ids": [2], "pad_token_id": 0, "temperature": 1.0, "top_p": 1.0, **over}


def _generate_body(contexts, budgets, width=None, sampling=None, uniforms=None) -> bytes:
    width = width if width is not None else max(budgets)
    if uniforms is None:
        uniforms = torch.rand(len(contexts), width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return wire.pack({"context_ids": torch.tensor([t for c in contexts for t in c]),
                      "context_lengths": torch.tensor([len(c) for c in contexts]),
                      "budgets": torch.tensor(budgets), "uniforms": uniforms},
                     {"sampling": sampling if sampling is not None else _sampling()})


def _reference(model, ids, mask, start, needs=NEEDS):
    return score_with_teacher(model, ids, mask, start, ids[:, start:], needs)


def _assert_scores(got, want) -> None:
    for name, value in want.as_kwargs().items():
        if value is not None:
            torch.testing.assert_close(getattr(got, name), value, atol=1e-5, rtol=0, msg=name)


def _refusal(response, status: int | tuple, *fragments: str) -> str:
    """The one-line reason of a refusal, checked for its status and fragments."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail, detail
    for fragment in fragments:
        assert fragment in detail, (fragment, detail)
    return detail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(app, limits: Limits | None = None):
    """``app`` behind a real uvicorn server (the server's own settings) on a loopback port; yields the port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection, read until the server closes it: (what came back, seconds taken)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out, time.monotonic() - start


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def client(model):
    """A token-protected app on the tiny model, default limits but 8 rows and 1024 tokens per request."""
    app = create_app(_engine(model), TOKEN, limits=Limits(max_request_rows=8, max_request_tokens=1024))
    with TestClient(app, headers=AUTH) as c:
        yield c


# -- each bad field is refused alone, in one line naming it ------------------------------------------------
def _bad_score_requests():
    ids, mask, start = _rows(0)
    oov, neg = ids.clone(), ids.clone()
    oov[1, 6], neg[0, 2] = V, -1
    long_ids = torch.randint(3, V, (1, 1504))
    return {
        "id >= vocab": (_score_body(oov, mask, start), "input_ids: token id 64 is outside the vocabulary [0, 64)"),
        "negative id": (_score_body(neg, mask, start), "input_ids: token id -1 is outside the vocabulary [0, 64)"),
        "float ids": (_score_body(ids.float(), mask, start, tokens=ids[:, start:]), "input_ids: must hold integers"),
        "mask shape": (_score_body(ids, mask[:, :-1], start), "attention_mask: shape [2, 8] differs"),
        "mask values": (_score_body(ids, mask * 3, start), "attention_mask: value 3 is outside {0, 1}"),
        "response_start -3": (_score_body(ids, mask, start, tokens=ids[:, 1:], response_start=-3),
                              "response_start: -3 is outside [1, 8]"),
        "response_start text": (_score_body(ids, mask, start, response_start="4"), "response_start: must be an integer"),
        "tokens shape": (_score_body(ids, mask, start, tokens=ids[:, :2]), "tokens: shape [2, 2] is not"),
        "tokens oov": (_score_body(ids, mask, start, tokens=ids[:, start:] + V), "tokens: token id"),
        "beyond context": (_score_body(long_ids, torch.ones_like(long_ids), 4),
                           "input_ids: 1504 positions exceed the model's context of 256 tokens"),
        "top_k > vocab": (wire.pack({"input_ids": ids, "attention_mask": mask, "tokens": ids[:, start:]},
                                    {"response_start": start, "needs": {"teacher_topk": True, "top_k": 10**6}}),
                          "needs.top_k: 1000000 is outside [0, 64]"),
        "needs type": (wire.pack({"input_ids": ids, "attention_mask": mask, "tokens": ids[:, start:]},
                                 {"response_start": start, "needs": {"teacher_logits": "yes"}}),
                       "needs.teacher_logits: must be true or false"),
    }


@pytest.mark.parametrize("case", list(_bad_score_requests()))
def test_a_bad_score_request_is_refused_with_one_line_naming_the_field(client, case):
    body, fragment = _bad_score_requests()[case]
    _refusal(client.post("/v1/score", content=body), 422, fragment)


def _bad_generate_requests():
    ok = ([[5, 6, 7], [8, 9]], [4, 3])
    nan_u = torch.rand(2, 4, dtype=torch.float64)
    nan_u[1, 2] = float("nan")
    return {
        "NaN temperature": (_generate_body(*ok, sampling=_sampling(temperature=float("nan"))),
                            "sampling.temperature: must be a finite number >= 0, got nan"),
        "inf top_p": (_generate_body(*ok, sampling=_sampling(top_p=float("inf"))), "sampling.top_p: must be a finite"),
        "pad id oov": (_generate_body(*ok, sampling=_sampling(pad_token_id=V)), "sampling.pad_token_id: 64 is outside"),
        "eos id oov": (_generate_body(*ok, sampling=_sampling(eos_token_ids=[2, -5])),
                       "sampling.eos_token_ids[1]: -5 is outside"),
        "unknown sampling": (_generate_body(*ok, sampling=_sampling(beam=4)), "sampling: unknown field(s) beam"),
        "context id oov": (_generate_body([[5, 6, V + 3], [8, 9]], [4, 3]),
                           "context_ids: token id 67 is outside the vocabulary [0, 64)"),
        "negative budget": (_generate_body(ok[0], [4, -2], width=4), "budgets: must be >= 0, got -2"),
        "NaN uniforms": (_generate_body(*ok, uniforms=nan_u), "uniforms: must be finite numbers in [0, 1]"),
        "short uniforms": (_generate_body(ok[0], [9, 3], width=4), "uniforms: 4 per row, fewer than the largest"),
        "lengths sum": (wire.pack({"context_ids": torch.tensor([5, 6]), "context_lengths": torch.tensor([3]),
                                   "budgets": torch.tensor([2]), "uniforms": torch.rand(1, 2, dtype=torch.float64)},
                                  {"sampling": _sampling()}), "context_lengths: they sum to 3"),
        "beyond context": (_generate_body([list(range(3, 3 + 60)) * 5], [4]),
                           "context_lengths: a context of 300 tokens exceeds the model's context of 256"),
    }


@pytest.mark.parametrize("case", list(_bad_generate_requests()))
def test_a_bad_generate_request_is_refused_with_one_line_naming_the_field(client, case):
    body, fragment = _bad_generate_requests()[case]
    _refusal(client.post("/v1/generate", content=body), 422, fragment)


def test_a_body_that_is_not_a_wire_payload_is_a_400(client):
    _refusal(client.post("/v1/score", content=b"\xff" * 64), 400, "body: the body is not a tropd wire payload")
    _refusal(client.post("/v1/score", content=wire.pack({"input_ids": torch.ones(1, 2, dtype=torch.long)})), 400,
             "lacks tensor(s) attention_mask, tokens")


# -- one bad client does not hurt the others ---------------------------------------------------------------
def test_valid_requests_sent_beside_bad_ones_get_their_own_scores(model):
    """Six rounds, each of two valid clients and two sending ids outside the vocabulary at the same moment (before
    these checks, the valid ones got HTTP 500 IndexError in 4 of 6 rounds): the bad ones get 422, the valid ones
    200 and exactly their in-process scores."""
    app = create_app(_engine(model), TOKEN)
    with live(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=60) as http:
        for round_ in range(6):
            valid = [_rows(10 * round_ + i) for i in range(2)]
            bad = []
            for i, value in enumerate((V, -7)):
                ids, mask, start = _rows(10 * round_ + 5 + i)
                ids[1, 5] = value
                bad.append((ids, mask, start))
            answers: dict[int, httpx.Response] = {}
            barrier = threading.Barrier(4)

            def post(i, ids, mask, start):
                body = _score_body(ids, mask, start)
                barrier.wait()
                answers[i] = http.post("/v1/score", content=body)

            threads = [threading.Thread(target=post, args=(i, *rows)) for i, rows in enumerate(valid + bad)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, (ids, mask, start) in enumerate(valid):
                assert answers[i].status_code == 200, answers[i].text
                _assert_scores(wire.unpack_scores(answers[i].content), _reference(model, ids, mask, start))
            _refusal(answers[2], 422, "input_ids: token id 64 is outside the vocabulary [0, 64)")
            _refusal(answers[3], 422, "input_ids: token id -7 is outside the vocabulary [0, 64)")


def test_a_merged_batch_that_fails_is_rerun_request_by_request(model):
    """Past the checks (the batcher alone, fed an unchecked bad request): the batch of a good and a bad request
    fails, and each is rerun alone: the good one gets its scores, the bad one alone the error."""
    batcher = Batcher(_engine(model), wait_s=0.3)
    ids, mask, start = _rows(1)
    bad = ids.clone()
    bad[0, 6] = V + 1
    key = repr(wire.needs_to_json(NEEDS))

    def job(x):
        return _Job("score", key, 2, {"input_ids": x, "attention_mask": mask, "tokens": x[:, start:],
                                      "response_start": start, "needs": NEEDS})

    failing, good = batcher.submit(job(bad)), batcher.submit(job(ids))
    _assert_scores(good.result(timeout=120), _reference(model, ids, mask, start))
    assert isinstance(failing.exception(timeout=120), IndexError)
    assert batcher.stats == {"requests": 2, "batches": 1, "rows": 4}  # they were merged, then run apart


# -- bounded work per request ------------------------------------------------------------------------------
def test_too_many_rows_or_tokens_are_refused_with_the_limit_named(client):
    ids, mask, start = _rows(2, rows=9)
    _refusal(client.post("/v1/score", content=_score_body(ids, mask, start)), 413,
             "input_ids: 9 rows exceed the server's limit of 8 per request (--max-request-rows)")
    ids, mask, start = _rows(3, rows=8, prompt=100, response=40)
    _refusal(client.post("/v1/score", content=_score_body(ids, mask, start)), 413,
             "input_ids: 8 rows x 140 positions = 1120 tokens exceed the server's limit of 1024 per request "
             "(--max-request-tokens)")
    _refusal(client.post("/v1/generate", content=_generate_body([[5, 6]] * 8, [250] * 8)), 413,
             "context_ids: 8 rows x (2 context + 250 new) = 2016 tokens", "(--max-request-tokens)")


def test_sixty_thousand_rows_are_refused_at_once_by_default(model):
    with TestClient(create_app(_engine(model)), headers={}) as c:
        ids = torch.randint(3, V, (60_000, 6))
        start = time.monotonic()
        _refusal(c.post("/v1/score", content=_score_body(ids, torch.ones_like(ids), 3)), 413,
                 "60000 rows exceed the server's limit of 1024 per request (--max-request-rows)")
        assert time.monotonic() - start < 30


def test_an_answer_too_large_is_refused_with_the_limit_named(model):
    app = create_app(_engine(model), limits=Limits(max_response_mb=0.01))
    with TestClient(app) as c:
        ids, mask, start = _rows(4, rows=8, response=20)
        _refusal(c.post("/v1/score", content=_score_body(ids, mask, start, Needs(teacher_logits=True))), 413,
                 "needs: the answer would be", "(--max-response-mb)")
        assert c.post("/v1/score", content=_score_body(ids, mask, start, Needs())).status_code == 200


def test_a_generate_budget_beyond_the_context_is_cut_to_it(model, client):
    context = [3 + i % 60 for i in range(250)]  # 6 positions left of the model's 256
    cfg = SamplingConfig(max_new_tokens=1000, eos_token_ids=(), pad_token_id=0)
    uniforms = torch.rand(1, 1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    body = _generate_body([context], [1000], sampling=wire.sampling_to_json(cfg), uniforms=uniforms)
    response = client.post("/v1/generate", content=body)
    assert response.status_code == 200, response.text
    [row] = wire.unpack_rows(response.content)
    [want] = decode_rows(model, [context], cfg, torch.tensor([6]), uniforms[:, :6])
    assert row.tokens.tolist() == want.tokens.tolist() and len(row.tokens) == 6 and row.truncated


def test_a_huge_body_is_refused_from_its_content_length_before_it_is_read(model):
    limits = Limits(read_timeout=1.0)
    with live(create_app(_engine(model), TOKEN, limits=limits), limits) as port:
        head = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {10**9}\r\n\r\n").encode()
        out, took = _raw(port, head)  # not one byte of the 1 GB body is sent: the answer comes anyway
        assert out.startswith(b"HTTP/1.1 413 ") and b"(--max-body-mb)" in out and b"1000000000 bytes" in out, out
        assert took < 10  # and the connection is closed once --read-timeout has passed without the body
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as http:
            _refusal(http.post("/v1/score", content=b"\0" * (129 * 2**20)), 413,  # a client that sends it all
                     "body: 135266304 bytes exceed the server's limit of 128 MiB (--max-body-mb)")


def test_a_chunked_body_is_cut_at_the_limit(model):
    with TestClient(create_app(_engine(model), limits=Limits(max_body_mb=1))) as c:
        def chunks():
            for _ in range(64):  # 4 MiB offered in 64 KiB chunks, no Content-Length
                yield b"\0" * 65536

        _refusal(c.post("/v1/score", content=chunks()), 413, "body: at least", "(--max-body-mb)")


def test_clients_that_never_finish_their_headers_or_body_are_dropped(model):
    limits = Limits(header_timeout=0.5, read_timeout=0.5)
    with live(create_app(_engine(model), limits=limits), limits) as port:
        out, took = _raw(port, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Le")  # headers never finished
        assert out == b"" and took < 5
        out, took = _raw(port, b"")  # connects, says nothing
        assert out == b"" and took < 5
        out, took = _raw(port, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"\0" * 10)
        assert out.startswith(b"HTTP/1.1 408 ") and b"body: not received within 0.5 s (--read-timeout)" in out, out
        assert took < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a prompt client is served as before
            for _ in range(2):
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                out = b""
                while not out.endswith(b'{"ok":true}'):
                    chunk = s.recv(4096)
                    assert chunk, out
                    out += chunk
                assert out.startswith(b"HTTP/1.1 200 ")
                time.sleep(1.0)  # idle on its keep-alive connection, past the header timeout: not cut


def test_a_request_past_its_time_limit_gets_503_and_its_work_stops():
    model = _model()
    calls, slow = [0], [True]

    def crawl(module, args):  # each decoding step of the model takes 0.1 s while `slow`
        calls[0] += 1
        if slow[0]:
            time.sleep(0.1)

    model.get_input_embeddings().register_forward_pre_hook(crawl)
    app = create_app(_engine(model), limits=Limits(request_timeout=0.5))
    with TestClient(app) as c:
        body = _generate_body([[5, 6, 7]], [200], sampling=_sampling(eos_token_ids=[]))
        start = time.monotonic()
        _refusal(c.post("/v1/generate", content=body), 503, "not answered within 0.5 s (--request-timeout)")
        assert time.monotonic() - start < 5
        time.sleep(1.0)
        stopped_at = calls[0]
        assert stopped_at < 40, stopped_at  # not the 200 steps asked: the batch stopped once nobody waited
        time.sleep(0.5)
        assert calls[0] == stopped_at
        slow[0] = False
        response = c.post("/v1/generate", content=_generate_body([[5, 6, 7]], [4]))  # the server goes on
        assert response.status_code == 200, response.text


# -- the token, the routes, what /v1/info says -----------------------------------------------------------
def test_every_route_but_health_needs_the_token_and_info_shows_no_local_path(model):
    app = create_app(_engine(model, name="/home/someone/models/teacher"), TOKEN)
    with TestClient(app) as c:
        assert c.get("/v1/health").json() == {"ok": True}
        for path in ("/openapi.json", "/docs", "/redoc", "/v1/info", "/nothing"):
            _refusal(c.get(path), 401, "missing or wrong token")
        _refusal(c.post("/v1/score", content=b"x"), 401, "missing or wrong token")
        _refusal(c.get("/v1/info", headers={"authorization": "Bearer wrong"}), 401)
        for path in ("/openapi.json", "/docs", "/redoc"):  # not served at all, even with the token
            assert c.get(path, headers=AUTH).status_code == 404
        response = c.get("/v1/info", headers=AUTH)
        assert response.status_code == 200
        info = response.json()
        assert info["model"] == "teacher" and "/home/someone" not in response.text
        assert (info["vocab_size"], info["context_length"]) == (V, CONTEXT)


def test_the_client_gets_what_it_needs_and_a_refusal_as_one_line(model):
    with live(create_app(_engine(model), TOKEN)) as port:
        url = f"http://127.0.0.1:{port}"
        remote = RemoteTeacher(url, token=TOKEN)
        assert (remote.vocab_size, remote.context_length, len(remote.tokenizer)) == (V, CONTEXT, V)
        assert remote.describe().startswith(f"teacher at {url}: 2 layers")
        ids, mask, start = _rows(7)
        ids[0, 7] = V
        with pytest.raises(TeacherServerError) as err:
            remote._request("POST", "/v1/score", _score_body(ids, mask, start))
        assert str(err.value) == (f"teacher server {url}/v1/score: HTTP 422: input_ids: token id 64 is outside the "
                                  f"vocabulary [0, 64)")


def test_a_503_the_client_gives_up_on_shows_the_servers_reason():
    reason = "not answered within 300 s (--request-timeout): the server is busy or the request too large"

    class Busy:
        status_code, text = 503, ""

        def json(self):
            return {"detail": reason}

    class Client:
        def request(self, *args, **kwargs):
            return Busy()

    with pytest.raises(TeacherServerError) as err:
        RemoteTeacher("http://teacher:8000", client=Client(), retry_s=0)
    assert f"/v1/info: HTTP 503: {reason}; gave up after 1 tries" in str(err.value)


# -- the command line --------------------------------------------------------------------------------------
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tropd serve-teacher: error: "), err
    return lines[0]


def test_a_port_out_of_range_is_one_line(capsys):
    assert main(["serve-teacher", "smollm2", "--port", "99999"]) == 2
    assert "--port 99999: a port is 0 to 65535" in _one_error_line(capsys)


def test_an_exposed_server_without_a_token_is_refused_unless_allowed(capsys, monkeypatch):
    monkeypatch.delenv("TROPD_TEACHER_TOKEN", raising=False)
    assert main(["serve-teacher", "smollm2", "--host", "0.0.0.0", "--port", str(_free_port())]) == 2
    line = _one_error_line(capsys)
    assert "--host 0.0.0.0 is reachable from other machines and no token is set" in line
    assert "TROPD_TEACHER_TOKEN" in line and "--allow-no-token" in line
    check_settings("0.0.0.0", 8000, None, True, 64, 512)  # allowed explicitly
    check_settings("0.0.0.0", 8000, TOKEN, False, 64, 512)  # or with a token
    check_settings("localhost", 8000, None, False, 64, 512)  # loopback needs none
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")


@pytest.mark.parametrize("flag", ["--max-body-mb", "--request-timeout", "--header-timeout", "--max-request-rows"])
def test_a_limit_that_is_not_positive_is_one_line(capsys, flag):
    assert main(["serve-teacher", "smollm2", flag, "0"]) == 2
    assert f"{flag} must be a positive number, got 0" in _one_error_line(capsys)
