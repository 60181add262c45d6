"""The composition root's model checks: student and teacher share a vocabulary whatever the objective reads of
the teacher, and the objective's teacher top-k fits in it, also when load_models is called on its own."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_llama, tiny_tokenizer
from tests.train.runs import V, write_config
from tropd.models import ModelCompatibilityError
from tropd.train.build import load_models
from tropd.train.config import load_config


def test_load_models_checks_the_configured_top_k_by_default(tmp_path, teacher_dir):
    cfg = load_config(write_config(tmp_path, teacher_dir), [f"objective.kwargs.top_k={V + 1}"])
    with pytest.raises(ModelCompatibilityError, match=f"top_k={V + 1} exceeds the vocabulary size {V}"):
        load_models(cfg, device="cpu")
    student, _, _ = load_models(cfg, device="cpu", top_k=V)  # an explicit top-k (build_run's) is the one checked
    assert student.config.num_hidden_layers == 2


@pytest.mark.parametrize("objective", ["objective.name=gkd", "objective.name=opd", "objective.name=tropd"])
def test_another_vocabulary_is_refused_whatever_the_objective_reads(tmp_path, teacher_dir, objective):
    """Full logits (gkd, top-k 0), sampled-token log-probs (opd, top-k 0) or top-k (tropd): always checked."""
    student = tmp_path / "student"
    tiny_llama(vocab_size=V, layers=2).save_pretrained(student)
    tiny_tokenizer(V, word_prefix="x").save_pretrained(student)
    cfg = load_config(write_config(tmp_path, teacher_dir, model={"student": str(student)}),
                      [objective, "objective.kwargs={}", "guidance.enabled=false"])
    with pytest.raises(ModelCompatibilityError, match="tokenizers differ"):
        load_models(cfg, device="cpu", top_k=0)
