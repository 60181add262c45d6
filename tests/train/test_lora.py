"""LoRA through PEFT: only adapters train, checkpoints hold them, resume is exact, self-distillation shares the
base, and `tropd merge-lora` gives a plain from_pretrained model equal to base + adapters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.train.runs import write_config
from tropd.cli import main
from tropd.lora import AdaptersDisabled, load_adapters
from tropd.models import base_student
from tropd.train.config import ConfigError, load_config
from tropd.train.build import load_models

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def latest(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_a_lora_step_changes_only_adapter_weights(tmp_path, teacher_dir):
    path = write_config(tmp_path, teacher_dir, model={"lora": LORA}, data={"eval_prompts": 0},
                        train={"steps": 2, "save_every": 1, "keep_checkpoints": 3})
    cfg = load_config(path)
    base, _ = base_student(cfg.model, "cpu")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    student, teacher, _ = load_models(cfg, device="cpu")
    teacher = teacher.model_for_blending()  # the teacher's own model
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the optimizer sees adapters only
    assert not isinstance(teacher, AdaptersDisabled)  # a pruned student: the teacher is its own model

    assert main(["train", "--config", str(path)]) == 0
    run = tmp_path / "run"
    ckpt = latest(run)
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    first = load_file(run / "checkpoints" / "step-000001" / "adapter_model.safetensors")
    last = load_file(ckpt / "adapter_model.safetensors")
    assert all("lora_" in k for k in last)
    assert any(not torch.equal(first[k], last[k]) for k in last)  # the adapters trained
    trained = load_adapters(base_student(cfg.model, "cpu")[0], ckpt)
    for name, value in trained.get_base_model().state_dict().items():  # the base did not move
        if "lora_" not in name:
            torch.testing.assert_close(value, before[name.replace(".base_layer", "")], rtol=0, atol=0)

    merged = tmp_path / "merged"
    assert main(["merge-lora", str(run), "--out", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, trained.eval()(ids).logits, atol=1e-5, rtol=0)
    assert main(["merge-lora", str(run), "--out", str(merged)]) == 2  # never over a non-empty folder


def test_lora_resume_is_exact(tmp_path, teacher_dir):
    path = write_config(tmp_path, teacher_dir, model={"lora": LORA}, data={"eval_prompts": 0},
                        train={"steps": 4, "save_every": 2})
    assert main(["train", "--config", str(path)]) == 0
    run = tmp_path / "run"
    expected = load_file(latest(run) / "adapter_model.safetensors")
    (run / "checkpoints" / "latest").write_text("step-000002\n")  # as if it had stopped after step 2
    for p in (run / "checkpoints" / "step-000004").iterdir():
        p.unlink()
    (run / "checkpoints" / "step-000004").rmdir()
    (run / "summary.json").unlink()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    got = load_file(latest(run) / "adapter_model.safetensors")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


def test_self_distillation_teacher_is_the_base_without_a_copy(tmp_path, teacher_dir):
    path = write_config(tmp_path, teacher_dir, model={"lora": LORA, "student_layers": None},
                        data={"eval_prompts": 0}, train={"steps": 2})
    student, teacher, _ = load_models(load_config(path), device="cpu")
    teacher = teacher.model_for_blending()  # the teacher's own model
    assert isinstance(teacher, AdaptersDisabled)
    base = {p.data_ptr() for p in student.get_base_model().parameters()}
    assert {p.data_ptr() for p in teacher.parameters()} <= base  # the same tensors: no second copy
    with torch.no_grad():  # adapters that do something: the teacher must not see them
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        with student.disable_adapter():
            reference = student(ids).logits
        assert not torch.allclose(student(ids).logits, reference)
        torch.testing.assert_close(teacher(input_ids=ids).logits, reference, rtol=0, atol=0)
    assert main(["train", "--config", str(path)]) == 0


@pytest.mark.parametrize("override, message", [
    ("model.lora.dropout=0.1", "model.lora.dropout must be 0"),
    ("model.lora.r=-1", "model.lora.r must be >= 0"),
])
def test_bad_lora_settings_are_refused(tmp_path, teacher_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, teacher_dir), [override])


def test_shared_base_refuses_another_teacher_dtype(tmp_path, teacher_dir):
    path = write_config(tmp_path, teacher_dir, model={"lora": LORA, "student_layers": None,
                                                      "teacher_dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="model.teacher_dtype=bfloat16 cannot apply"):
        load_config(path)
