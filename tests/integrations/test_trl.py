"""tropd objectives inside TRL (`tropd.integrations.trl.TrOPDTrainer`), with tiny models on this CPU.

On one batch, the adapter's loss and gradient equal tropd's native objective (to 1e-6); a few TRL training
steps run end to end, change the weights and log tropd's metrics; what TRL cannot do is refused in one line.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import tiny_llama, tiny_tokenizer
from tropd.objectives import TokenInputs, get_objective
from tropd.objectives.head import LMHead
from tropd.teacher import score_with_teacher

# TRL is imported by the tests, not at collection: it pulls PEFT, transformers' trainer and vLLM (about 5 s), which
# only the pytest worker that runs this module needs
pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="the TRL adapter is an optional extra: pip install 'tropd[trl]'")

V = 64


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """TRL's trainer sets accelerate's process-wide state; later in-process runs must start from a clean one."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def make_trainer(tmp_path, student, teacher, objective="fkl_outlier", **config):
    from datasets import Dataset
    from trl import DistillationConfig

    from tropd.integrations.trl import TrOPDTrainer

    tok = tiny_tokenizer(V)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}]}
                              for i in range(8)])
    args = DistillationConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3,
                              max_completion_length=6, learning_rate=1e-3, logging_steps=1, report_to=[],
                              use_cpu=True, bf16=False, save_strategy="no", temperature=0.9, top_k=0, **config)
    return TrOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok,
                        objective=objective, objective_kwargs={"top_k": 8} if objective == "fkl_outlier" else {},
                        chunk_size=5)


@pytest.mark.parametrize("objective", ["fkl_outlier", "opd", "eopd"])
def test_loss_and_gradient_equal_the_native_objective(tmp_path, objective):
    student = tiny_llama(vocab_size=V, hidden=32, layers=2, seed=0).double()
    teacher = tiny_llama(vocab_size=V, hidden=32, layers=2, seed=1).double()
    trainer = make_trainer(tmp_path, student, teacher, objective)
    g = torch.Generator().manual_seed(0)
    prompt_ids, completion_ids = torch.randint(7, V, (3, 4), generator=g), torch.randint(7, V, (3, 6), generator=g)
    completion_mask = torch.ones(3, 6, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[2, 2:] = 0
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask}
    trainer.model.train()
    torch.manual_seed(3)  # the same draws of the sampled trust mask in both computations
    loss, _, _ = trainer._compute_loss(student, inputs, num_items_in_batch=torch.tensor(9.0))
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    logits = LMHead.of(student)(student.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 3:-1])
    native = get_objective(objective, **({"top_k": 8} if objective == "fkl_outlier" else {}))
    scores = score_with_teacher(teacher, ids, mask, 4, completion_ids, native.needs)
    behavior = torch.log_softmax(logits.detach().float() / 0.9, -1).gather(-1, completion_ids[..., None])[..., 0]
    torch.manual_seed(3)
    out = native(TokenInputs(student_logits=logits, tokens=completion_ids, behavior_logprobs=behavior,
                             loss_mask=completion_mask.bool(), **scores.as_kwargs()), num_tokens=9)
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss, rtol=1e-6, atol=1e-12)
    for name, p in student.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-6, atol=1e-10, msg=name)


def test_a_few_trl_steps_train_and_log_tropd_metrics(tmp_path):
    student = tiny_llama(vocab_size=V, hidden=32, layers=2, seed=0)
    teacher = tiny_llama(vocab_size=V, hidden=32, layers=2, seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = make_trainer(tmp_path, student, teacher)
    trainer.train()
    assert any(not torch.equal(before[n], p.detach()) for n, p in student.named_parameters())
    logged = {k for record in trainer.state.log_history for k in record}
    assert {"tropd/trust_frac", "tropd/k1_rkl", "tropd/reward_p01", "loss"} <= logged
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.state.log_history if "loss" in r)


@pytest.mark.parametrize("objective, config, message", [
    ("tropd", {}, "trains on teacher-written prefixes, which TRL's generation cannot write"),
    ("trb", {}, "needs 'trb_blend' rollouts"),
    ("fkl_outlier", {"top_p": 0.9}, "top_p=0.9"),
])
def test_what_trl_cannot_do_is_refused(tmp_path, objective, config, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, tiny_llama(vocab_size=V, hidden=32, layers=2, seed=0),
                     tiny_llama(vocab_size=V, hidden=32, layers=2, seed=1), objective, **config)
