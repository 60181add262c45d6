"""A stock vLLM server (``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs) as the teacher:
``model.teacher=vllm+http://...`` (tropd/teacher/openai_server.py).

One server per module, started by the test on a free port with a token, ``--logprobs-mode processed_logprobs``
and ``--max-logprobs 16``. Its scores equal the in-process teacher's on left-padded prompts and ragged responses
(within ``ATOL``, top-k ids wherever the teacher's log-probs are not tied); its written rows are greedy rows equal
to the in-process ones, or sampled rows that repeat with the same uniforms and carry the sampling distribution's
log-probs; what it cannot do is one line; and a run through it ends with the weights of the in-process run.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_tokenizer
from tests.train.runs import final_weights, write_config
from tests.vllm.conftest import ATOL, NEEDS_VLLM, V, free_port, started, student_batch, student_folder, untied
from tropd.cli import main
from tropd.needs import Needs
from tropd.rollout import RowStreams, SamplingConfig
from tropd.rollout.sampling import sampling_logprobs, teacher_rows
from tropd.teacher import InProcessTeacher, TeacherServerError, VLLMServerTeacher

pytestmark = [pytest.mark.slow, NEEDS_VLLM]
TOKEN = "v-s3cret"
K = 8


@pytest.fixture(scope="module")
def url(vllm_teacher_dir):
    """``vllm+http://127.0.0.1:PORT`` of the module's stock vLLM server."""
    port = free_port()
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_teacher_dir), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
            "--kv-cache-memory-bytes", str(128 << 20), "--max-logprobs", "16",
            "--logprobs-mode", "processed_logprobs", "--api-key", TOKEN]
    with started(args, f"http://127.0.0.1:{port}", "/health"):
        yield f"vllm+http://127.0.0.1:{port}"


def test_scores_equal_in_process_scores(url, hf_teacher):
    batch = student_batch(hf_teacher)
    teacher = VLLMServerTeacher(url, token=TOKEN, top_k=K)
    assert teacher.processed and teacher.context_length == 127
    want = InProcessTeacher(hf_teacher).score(batch, Needs(teacher_topk=True, top_k=K + 1))
    got = teacher.score(batch, Needs(teacher_topk=True, top_k=K))
    mask = batch.loss_mask
    for name in ("teacher_logprobs", "teacher_topk_logprobs"):
        value = getattr(got, name)
        assert value.dtype == torch.float32 and value.shape[:2] == mask.shape, name
    torch.testing.assert_close(got.teacher_logprobs[mask], want.teacher_logprobs[mask], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.teacher_topk_logprobs[mask], want.teacher_topk_logprobs[..., :K][mask],
                               atol=ATOL, rtol=0)
    untied_k = untied(want.teacher_topk_logprobs)[mask]
    assert untied_k.float().mean() > 0.9
    assert torch.equal(got.teacher_topk_ids[mask][untied_k], want.teacher_topk_ids[..., :K][mask][untied_k])
    only = teacher.score(batch, Needs())  # the sampled token's log-prob alone (prompt_logprobs=0)
    assert only.teacher_topk_ids is None
    torch.testing.assert_close(only.teacher_logprobs[mask], want.teacher_logprobs[mask], atol=ATOL, rtol=0)


def test_greedy_rows_equal_in_process_rows(url, hf_teacher):
    cfg = SamplingConfig(max_new_tokens=6, eos_token_ids=(2, 3), pad_token_id=0, temperature=0.0)
    contexts, budgets, streams = [[5, 6], [7, 8, 9, 10], [11]], torch.tensor([6, 2, 0]), RowStreams.of(3, 3, step=5)
    want = teacher_rows(InProcessTeacher(hf_teacher), contexts, cfg, budgets, streams)
    got = teacher_rows(VLLMServerTeacher(url, token=TOKEN), contexts, cfg, budgets, streams)
    for a, b in zip(want, got):
        assert a.tokens.tolist() == b.tokens.tolist() and (a.eos, a.truncated) == (b.eos, b.truncated)
        assert b.behavior_logprobs.tolist() == [0.0] * len(b.tokens)


def test_sampled_rows_repeat_and_carry_the_sampling_distributions_logprobs(url, hf_teacher):
    cfg = SamplingConfig(max_new_tokens=8, eos_token_ids=(2, 3, 4), pad_token_id=0, temperature=0.7, top_p=0.9)
    teacher = VLLMServerTeacher(url, token=TOKEN, rows_at=(0.7, 0.9))
    contexts, budgets = [[5, 6], [7, 8, 9, 10], [11], [12, 13]], torch.tensor([8, 3, 8, 8])
    first = teacher_rows(teacher, contexts, cfg, budgets, RowStreams.of(1, 4, step=2))
    again = teacher_rows(teacher, contexts, cfg, budgets, RowStreams.of(1, 4, step=2))
    other = teacher_rows(teacher, contexts, cfg, budgets, RowStreams.of(1, 4, step=3))
    assert [r.tokens.tolist() for r in first] == [r.tokens.tolist() for r in again]
    assert [r.tokens.tolist() for r in first] != [r.tokens.tolist() for r in other]
    for context, budget, row in zip(contexts, budgets.tolist(), first + other):
        n = len(row.tokens)
        assert 0 < n <= budget and row.eos == (row.tokens[-1].item() in cfg.eos_token_ids)
        assert row.truncated == (not row.eos and n == budget)
        with torch.no_grad():
            logits = hf_teacher(torch.tensor([context + row.tokens.tolist()])).logits[0, len(context) - 1:-1]
        want = sampling_logprobs(logits, cfg.temperature, cfg.top_p).gather(-1, row.tokens[:, None])[:, 0]
        torch.testing.assert_close(row.behavior_logprobs, want, atol=ATOL, rtol=0)


def test_what_the_server_cannot_do_is_one_line(url, hf_teacher):
    with pytest.raises(ValueError, match=r"refuses prompt_logprobs=32 .*--max-logprobs 32"):
        VLLMServerTeacher(url, token=TOKEN, top_k=32)
    with pytest.raises(TeacherServerError, match="HTTP 401"):
        VLLMServerTeacher(url, token="wrong", retry_s=0)
    teacher = VLLMServerTeacher(url, token=TOKEN, top_k=K)
    with pytest.raises(ValueError, match="full-vocabulary entropy .*eopd"):
        teacher.score(student_batch(hf_teacher), Needs(teacher_topk=True, top_k=K, teacher_entropy=True))
    with pytest.raises(ValueError, match="TRB .*not behind a vLLM server"):
        teacher.model_for_blending()


def test_the_students_tokenizer_and_vocabulary_are_checked(url):
    teacher = VLLMServerTeacher(url, token=TOKEN)
    teacher.check_student(tiny_tokenizer(V), V, top_k=K)
    with pytest.raises(ValueError, match="tokenizers differ"):
        teacher.check_student(tiny_tokenizer(V, word_prefix="x"), V)
    with pytest.raises(ValueError, match="student logits have 80 entries, but .* refuses token id 79"):
        teacher.check_student(tiny_tokenizer(V), 80)
    with pytest.raises(ValueError, match="student logits have 48 entries, but .* takes token id 48"):
        teacher.check_student(tiny_tokenizer(48), 48)


def test_a_run_through_the_server_equals_the_in_process_run(url, vllm_teacher_dir, tmp_path, monkeypatch):
    """tropd (top-k scores, guidance off: the teacher writes only the greedy held-out answers), 3 steps."""
    student = student_folder(vllm_teacher_dir, tmp_path / "student")
    sections = dict(model={"student": str(student), "student_layers": None}, guidance={"enabled": False},
                    train={"steps": 3, "save_every": 3})
    local = write_config(tmp_path / "local", vllm_teacher_dir, **sections)
    served = write_config(tmp_path / "served", vllm_teacher_dir, **sections)
    assert main(["train", "--config", str(local)]) == 0
    monkeypatch.setenv("TROPD_TEACHER_TOKEN", TOKEN)
    assert main(["train", "--config", str(served), f"model.teacher={url}"]) == 0
    want, got = final_weights(tmp_path / "local" / "run"), final_weights(tmp_path / "served" / "run")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=0, msg=k)
