"""The teacher server (`tropd serve-teacher`), started as a real process on loopback, and its client.

Scores and written rows equal the in-process teacher's; concurrent requests are batched; a server that is down,
slow, token-protected, or serving another vocabulary gives one clear error; a training run through the server
ends with the weights of the same run with the teacher in process, even when the server restarts mid-run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import tiny_llama, tiny_tokenizer
from tests.train.runs import final_weights, write_config
from tropd.cli import main
from tropd.models import prune_layers
from tropd.objectives.registry import Needs
from tropd.rollout import RowStreams, SamplingConfig, sample
from tropd.rollout.sampling import teacher_rows
from tropd.teacher import InProcessTeacher
from tropd.teacher.remote import RemoteTeacher, TeacherServerError

ROOT = Path(__file__).resolve().parents[2]
ALL_NEEDS = Needs(teacher_logprobs=True, teacher_topk=True, top_k=8, teacher_entropy=True, teacher_logits=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TROPD_TEACHER_TOKEN"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@contextlib.contextmanager
def server(model_dir: Path, port: int = 0, token: str | None = None):
    """`python -m tropd serve-teacher` on loopback; yields its URL."""
    env = _env(**({"TROPD_TEACHER_TOKEN": token} if token else {}))
    proc = subprocess.Popen([sys.executable, "-m", "tropd", "serve-teacher", str(model_dir), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}")
            if "listening on " in line:
                url = line.split("listening on ")[1].strip()
        assert url, "the server did not start"
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def dirs(teacher_dir, tmp_path_factory):
    """The session's tiny teacher folder and a 2-layer student folder pruned from it."""
    root = tmp_path_factory.mktemp("served")
    student = prune_layers(AutoModelForCausalLM.from_pretrained(teacher_dir), 2)
    student.save_pretrained(root / "student")
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(root / "student")
    return teacher_dir, root / "student"


#: the token of the module's server (`url`): its clients pass it, and a client without it is refused
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def url(dirs):
    """The module's server of the tiny teacher, token-protected (one server start for the tests that share it)."""
    with server(dirs[0], token=TOKEN) as u:
        yield u


def _batch(model_dir: Path, prompts, seed=0):
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = SamplingConfig(max_new_tokens=7, eos_token_ids=(2,), pad_token_id=0)
    return sample(student, prompts, cfg, streams=RowStreams.of(seed, len(prompts)))


def test_scores_equal_in_process_scores(dirs, url):
    teacher = AutoModelForCausalLM.from_pretrained(dirs[0])
    batch = _batch(dirs[1], [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]])
    local = InProcessTeacher(teacher).score(batch, ALL_NEEDS)
    remote = RemoteTeacher(url, token=TOKEN).score(batch, ALL_NEEDS)
    for name, value in local.as_kwargs().items():
        got = getattr(remote, name)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        torch.testing.assert_close(got, value, atol=1e-5, rtol=0, msg=name)
    assert RemoteTeacher(url, token=TOKEN).score(batch, Needs(teacher_logprobs=False)).teacher_logprobs is None


def test_written_rows_equal_in_process_rows(dirs, url):
    teacher = AutoModelForCausalLM.from_pretrained(dirs[0]).eval()
    cfg = SamplingConfig(max_new_tokens=6, eos_token_ids=(2, 3), pad_token_id=0, temperature=0.9, top_p=0.95)
    contexts, budgets = [[5, 6], [7, 8, 9, 10], [11]], torch.tensor([6, 2, 4])
    streams = RowStreams.of(3, 3, step=5)
    local = teacher_rows(InProcessTeacher(teacher), contexts, cfg, budgets, streams)
    remote = teacher_rows(RemoteTeacher(url, token=TOKEN), contexts, cfg, budgets, streams)
    for a, b in zip(local, remote):
        assert a.tokens.tolist() == b.tokens.tolist() and (a.eos, a.truncated) == (b.eos, b.truncated)
        torch.testing.assert_close(b.behavior_logprobs, a.behavior_logprobs, atol=1e-5, rtol=0)


def test_concurrent_requests_share_batches(dirs, url):
    teacher = AutoModelForCausalLM.from_pretrained(dirs[0])
    batches = [_batch(dirs[1], [[5 + i, 6], [7, 8, 9 + i][: 2 + i % 2]], seed=i) for i in range(8)]
    client = RemoteTeacher(url, token=TOKEN)
    before = client._request("GET", "/v1/info").json()["stats"]
    results = [None] * len(batches)

    def score(i):
        results[i] = client.score(batches[i], ALL_NEEDS)

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = client._request("GET", "/v1/info").json()["stats"]
    assert after["requests"] - before["requests"] == len(batches)
    assert after["batches"] - before["batches"] < len(batches)  # some requests were merged
    for batch, got in zip(batches, results):  # merged or not, each answer is its own batch's
        want = InProcessTeacher(teacher).score(batch, ALL_NEEDS)
        torch.testing.assert_close(got.teacher_topk_logprobs, want.teacher_topk_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.teacher_logprobs, want.teacher_logprobs, atol=1e-5, rtol=0)


def test_a_server_that_is_down_is_one_clear_error():
    start = time.monotonic()
    with pytest.raises(TeacherServerError, match=r"not reachable .*gave up after \d+ tries in 1 s"):
        RemoteTeacher(f"http://127.0.0.1:{free_port()}", retry_s=1)
    assert time.monotonic() - start < 10


def test_a_server_that_does_not_answer_is_one_clear_error():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with pytest.raises(TeacherServerError, match=r"no answer within 0.5 s \(model.teacher_timeout\)"):
            RemoteTeacher(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5, retry_s=1)


def test_a_token_protected_server_refuses_other_clients(url):
    with pytest.raises(TeacherServerError, match="HTTP 401: missing or wrong token"):
        RemoteTeacher(url, token="")
    with pytest.raises(TeacherServerError, match=r"HTTP 401.*set TROPD_TEACHER_TOKEN to the server's token"):
        RemoteTeacher(url, token="wrong")
    assert RemoteTeacher(url, token=TOKEN).vocab_size == 64


def test_a_404_on_the_first_endpoint_asks_whether_the_url_names_the_other_kind_of_server():
    from tropd.teacher.remote import _hint

    assert "vllm+http://host:port: is it the other kind?" in _hint(404, "/v1/info")
    assert "vllm+http://host:port: is it the other kind?" in _hint(404, "/v1/models")
    assert _hint(404, "/v1/score") == "" and _hint(500, "/v1/info") == ""


@pytest.mark.slow
def test_a_server_with_another_vocabulary_is_refused_at_start(dirs, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_llama(vocab_size=80, hidden=32, layers=2, seed=3).save_pretrained(other)
    tiny_tokenizer(80).save_pretrained(other)
    path = write_config(tmp_path, dirs[0], model={"student": str(dirs[1]), "student_layers": None})
    with server(other) as u:
        assert main(["train", "--config", str(path), f"model.teacher={u}"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("tropd train: error:")]
    assert len(lines) == 1 and "tokenizers differ" in lines[0], err[-2000:]


@pytest.mark.slow
def test_training_through_the_server_equals_in_process_and_survives_a_restart(dirs, tmp_path):
    """tropd with guidance (prefixes written by the server) and top-k scores; the server is killed after the
    first step and restarted at least 2 s later: the run waits, retries, and ends as the in-process run does
    (made in this process meanwhile: the served run and the reference share the time)."""
    teacher_dir, student_dir = dirs
    cfg = dict(model={"student": str(student_dir), "student_layers": None, "teacher_retry_s": 60},
               data={"eval_prompts": 2}, train={"steps": 4, "save_every": 2})
    port = free_port()
    remote = write_config(tmp_path / "remote", teacher_dir, **cfg)
    run_dir = tmp_path / "remote" / "run"
    stack = contextlib.ExitStack()
    stack.enter_context(server(teacher_dir, port))
    train = subprocess.Popen([sys.executable, "-m", "tropd", "train", "--config", str(remote),
                              f"model.teacher=http://127.0.0.1:{port}"], env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    outage = {}

    def take_the_server_down_after_step_1() -> None:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and '"step": 1' in metrics.read_text()) and time.monotonic() < deadline:
            if train.poll() is not None:
                break
            time.sleep(0.01)
        outage["mid_run"] = train.poll() is None
        if outage["mid_run"]:  # held while the server goes down, so it cannot finish its steps first under load
            train.send_signal(signal.SIGSTOP)
        stack.close()  # the server goes down mid-run
        outage["at"] = time.monotonic()
        if outage["mid_run"]:
            train.send_signal(signal.SIGCONT)

    watcher = threading.Thread(target=take_the_server_down_after_step_1)
    watcher.start()
    try:
        local = write_config(tmp_path / "local", teacher_dir, **cfg)
        assert main(["train", "--config", str(local)]) == 0  # the reference, in this process
    finally:
        watcher.join()
    assert outage["mid_run"], train.communicate()[1][-3000:]
    time.sleep(max(0.0, 2.0 - (time.monotonic() - outage["at"])))
    with server(teacher_dir, port):
        out, err = train.communicate(timeout=600)
    assert train.returncode == 0, err[-3000:]
    assert "teacher server" in err and "retrying for up to 60 s" in err  # the outage was met, and waited out
    steps = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and not any(r["nonfinite"] for r in steps)
    want, got = final_weights(tmp_path / "local" / "run"), final_weights(run_dir)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
