"""``tropd serve-teacher --engine vllm`` (tropd/teacher/vllm_engine.py): tropd's own server and wire protocol on an
in-process vLLM engine. One server per module (a free port, a token). Its scores equal the in-process teacher's
within ``ATOL``; its rows are the in-process greedy rows, or sampled rows with the sampling distribution's
log-probs; what vLLM cannot compute is refused per request (422) and at a run's start-up (``/v1/info``)."""

from __future__ import annotations

import pytest
import torch

from tests.train.runs import write_config
from tests.vllm.conftest import ATOL, NEEDS_VLLM, V, free_port, started, student_batch, student_folder, untied
from tropd.cli import main
from tropd.needs import Needs
from tropd.rollout import RowStreams, SamplingConfig
from tropd.rollout.sampling import sampling_logprobs, teacher_rows
from tropd.teacher import InProcessTeacher, RemoteTeacher, TeacherServerError

pytestmark = [pytest.mark.slow, NEEDS_VLLM]
TOKEN = "e-s3cret"
K = 8


@pytest.fixture(scope="module")
def url(vllm_teacher_dir):
    port = free_port()
    args = ["-m", "tropd", "serve-teacher", str(vllm_teacher_dir), "--engine", "vllm", "--port", str(port),
            "--max-model-len", "128", "--kv-cache-mb", "128"]
    with started(args, f"http://127.0.0.1:{port}", "/v1/health", extra_env={"TROPD_TEACHER_TOKEN": TOKEN}):
        yield f"http://127.0.0.1:{port}"


def test_info_says_what_the_engine_computes(url, hf_teacher):
    teacher = RemoteTeacher(url, token=TOKEN)
    info = teacher.info
    assert info["engine"] == "vllm" and info["vocab_size"] == V and teacher.context_length == 127
    assert info["supports"] == {"teacher_logprobs": True, "teacher_topk": True, "teacher_entropy": False,
                                "teacher_logits": False}
    params = sum(p.numel() for p in hf_teacher.parameters())
    assert info["num_parameters"] == params and info["num_layers"] == 2
    assert teacher.describe().endswith(f"2 layers, {params / 1e6:.1f}M params (float32)")
    teacher.check_needs(Needs(teacher_topk=True, top_k=K))
    with pytest.raises(ValueError, match=r"needs teacher_logits, .*\(engine 'vllm'\).*--engine hf"):
        teacher.check_needs(Needs(teacher_logits=True))


def test_scores_equal_in_process_scores(url, hf_teacher):
    batch = student_batch(hf_teacher)
    needs = Needs(teacher_topk=True, top_k=K)
    want = InProcessTeacher(hf_teacher).score(batch, Needs(teacher_topk=True, top_k=K + 1))
    got = RemoteTeacher(url, token=TOKEN).score(batch, needs)
    mask = batch.loss_mask
    torch.testing.assert_close(got.teacher_logprobs[mask], want.teacher_logprobs[mask], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.teacher_topk_logprobs[mask], want.teacher_topk_logprobs[..., :K][mask],
                               atol=ATOL, rtol=0)
    untied_k = untied(want.teacher_topk_logprobs)[mask]
    assert torch.equal(got.teacher_topk_ids[mask][untied_k], want.teacher_topk_ids[..., :K][mask][untied_k])
    with pytest.raises(TeacherServerError, match=r"HTTP 422: needs: the objective needs the teacher's "
                                                 r"full-vocabulary entropy"):
        RemoteTeacher(url, token=TOKEN).score(batch, Needs(teacher_topk=True, top_k=K, teacher_entropy=True))


def test_rows_greedy_equal_and_sampled_carry_the_sampling_logprobs(url, hf_teacher):
    teacher = RemoteTeacher(url, token=TOKEN)
    contexts, budgets = [[5, 6], [7, 8, 9, 10], [11]], torch.tensor([6, 2, 0])
    greedy = SamplingConfig(max_new_tokens=6, eos_token_ids=(2, 3), pad_token_id=0, temperature=0.0)
    want = teacher_rows(InProcessTeacher(hf_teacher), contexts, greedy, budgets, RowStreams.of(3, 3))
    got = teacher_rows(teacher, contexts, greedy, budgets, RowStreams.of(3, 3))
    for a, b in zip(want, got):
        assert a.tokens.tolist() == b.tokens.tolist() and (a.eos, a.truncated) == (b.eos, b.truncated)
    cfg = SamplingConfig(max_new_tokens=8, eos_token_ids=(2, 3, 4), pad_token_id=0, temperature=0.7, top_p=0.9)
    rows = teacher_rows(teacher, [[5, 6], [12, 13]], cfg, torch.tensor([8, 8]), RowStreams.of(1, 2))
    again = teacher_rows(teacher, [[5, 6], [12, 13]], cfg, torch.tensor([8, 8]), RowStreams.of(1, 2))
    assert [r.tokens.tolist() for r in rows] == [r.tokens.tolist() for r in again]
    for context, row in zip([[5, 6], [12, 13]], rows):
        with torch.no_grad():
            logits = hf_teacher(torch.tensor([context + row.tokens.tolist()])).logits[0, len(context) - 1:-1]
        lp = sampling_logprobs(logits, cfg.temperature, cfg.top_p).gather(-1, row.tokens[:, None])[:, 0]
        torch.testing.assert_close(row.behavior_logprobs, lp, atol=ATOL, rtol=0)


def test_a_run_asking_for_the_entropy_is_refused_at_start_up(url, vllm_teacher_dir, tmp_path, capsys, monkeypatch):
    student = student_folder(vllm_teacher_dir, tmp_path / "student")
    path = write_config(tmp_path, vllm_teacher_dir, model={"student": str(student), "student_layers": None},
                        objective={"name": "eopd", "kwargs": {"top_k": K}})
    monkeypatch.setenv("TROPD_TEACHER_TOKEN", TOKEN)
    assert main(["train", "--config", str(path), f"model.teacher={url}"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("tropd train: error:")]
    assert len(lines) == 1 and "teacher_entropy" in lines[0], err[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
