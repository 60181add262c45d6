"""Trainer, checkpoints, config and CLI on tiny random models (teacher 4 layers, student = 2 of them)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.train.runs import final_weights, write_config
from tropd.cli import main
from tropd.train.build import build_accelerator, build_run
from tropd.train.config import ConfigError, load_config
from tropd.train.run import train_from_config
from tropd.train.trainer import Trainer, merge_metrics


def test_run_writes_metrics_and_checkpoint(tmp_path, teacher_dir):
    cfg = load_config(write_config(tmp_path, teacher_dir, train={"sft_warmup_steps": 1}))
    summary = train_from_config(cfg, console=lambda *_: None)
    run = Path(summary["run_dir"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["phase"] for r in steps] == ["sft", "tropd", "tropd", "tropd"]
    for key in ("k1_rkl", "trust_frac", "p_trust", "reward_p01", "reward_min", "student_entropy", "grad_norm",
                "loss_trust", "loss_outlier", "loss_guidance", "teacher_topk_mass", "rollout/guidance_cap",
                "rollout/eos_rate", "rollout/truncation_rate", "rollout/response_len_mean", "tokens_per_second"):
        assert key in steps[-1], key
    # the in-process sampler's behaviour log-probs are the trainer's own (temperature 1): float noise apart
    assert all(0 <= r["behavior_gap"] <= r["behavior_gap_max"] < 1e-4 for r in steps[1:])
    # the region losses add up to the loss
    last = steps[-1]
    assert last["loss"] == pytest.approx(last["loss_trust"] + last["loss_outlier"] + last["loss_guidance"], abs=1e-5)
    assert any("eval/teacher_text_nll" in r for r in records)
    assert not (run / "report").exists()  # the training job writes no report: `tropd train` does, after it
    ckpt = Path(summary["checkpoint"])
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert reloaded.config.num_hidden_layers == 2


def test_ctrl_c_then_resume_matches_uninterrupted_run(tmp_path, teacher_dir, monkeypatch):
    """A run interrupted by SIGINT during step 2 saves after that step; --resume ends with identical weights."""
    (tmp_path / "a").mkdir()
    train_from_config(load_config(write_config(tmp_path / "a", teacher_dir), ["data.eval_prompts=0"]),
                      console=lambda *_: None)

    (tmp_path / "b").mkdir()
    path_b = write_config(tmp_path / "b", teacher_dir, train={"save_every": 0})
    original = Trainer.run_step

    def interrupted(self, step):
        record = original(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return record

    monkeypatch.setattr(Trainer, "run_step", interrupted)
    first = train_from_config(load_config(path_b, ["data.eval_prompts=0"]), console=lambda *_: None)
    assert first["interrupted"] and first["steps_done"] == 2
    monkeypatch.setattr(Trainer, "run_step", original)
    summary = train_from_config(load_config(path_b, ["data.eval_prompts=0"]), resume=True, console=lambda *_: None)
    assert summary["steps_done"] == 4 and not summary["interrupted"]

    wa, wb = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    lines = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]


def test_accumulation_matches_one_batch(tmp_path, teacher_dir):
    """The same step's rollouts as 1 micro-batch of 4 or 4 micro-batches of 1 give the same gradient; and
    micro_batch_size does not change the samples."""
    cfg = load_config(write_config(tmp_path, teacher_dir), ["objective.kwargs.trust_mode=expected"])
    parts = build_run(cfg, build_accelerator(cfg))
    student = parts.student
    grads, samples = [], []
    for mb in (4, 1):
        cfg.train.micro_batch_size = mb
        trainer = Trainer(cfg, parts, tmp_path / "run")
        objective, micro, progress = trainer.step_rollouts(step=1)
        assert len(micro) == 4 // mb and [m.offset for m in micro] == list(range(0, 4, mb))
        samples.append(torch.cat([m.batch.tokens for m in micro]))
        student.zero_grad(set_to_none=True)
        trainer.accumulate(objective, micro, progress, step=1)
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    assert torch.equal(samples[0], samples[1])
    assert any(g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_step_streams_micro_batches(tmp_path, teacher_dir):
    """Each micro-batch is scored by the teacher only after the previous one's backward: one micro-batch of
    teacher tensors and activations alive at a time."""
    from tropd.teacher import InProcessTeacher

    cfg = load_config(write_config(tmp_path, teacher_dir, train={"micro_batch_size": 1}))
    parts = build_run(cfg, build_accelerator(cfg))
    student = parts.student
    events = []

    class Recording(InProcessTeacher):
        def score(self, batch, needs):
            events.append("score")
            return super().score(batch, needs)

    head = student.get_output_embeddings().weight
    head.register_post_accumulate_grad_hook(lambda p: events.append("backward"))
    recording = Recording(parts.teacher.model_for_blending())
    trainer = Trainer(cfg, dataclasses.replace(parts, teacher=recording), tmp_path / "run")
    objective, micro, progress = trainer.step_rollouts(step=1)
    assert events == [] and len(micro) == 4  # rollouts first, nothing scored yet
    trainer.accumulate(objective, micro, progress, step=1)
    assert events == ["score", "backward"] * 4


@pytest.mark.parametrize("override, message", [
    ("objective.name=nope", "objective.name='nope' is not registered"),
    ("objective.kwargs.top_kk=3", "objective.kwargs.top_kk is not a setting of 'tropd'"),
    ("objective.kwargs.trust_mode=maybe", "trust_mode must be one of"),
    ("train.lr=-1", "train.lr must be a positive number"),
    ("train.stepz=3", "unknown config key train.stepz"),
    ("rollout.top_p=0", "rollout.top_p must be in (0, 1]"),
    ("train.steps=abc", "train.steps='abc' has the wrong type"),
    ("train.sft_warmup_steps=-1", "train.sft_warmup_steps must be >= 0"),
])
def test_bad_config_fails_before_models_load(tmp_path, teacher_dir, override, message, capsys):
    path = write_config(tmp_path, teacher_dir, model={"teacher": str(tmp_path / "does-not-exist")})
    with pytest.raises(ConfigError, match=None) as err:
        load_config(path, [override])
    assert message in str(err.value)
    assert main(["train", "--config", str(path), override]) == 2
    assert message in capsys.readouterr().err


def test_guidance_with_opd_is_rejected(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="puts no loss on teacher-prefix positions"):
        load_config(write_config(tmp_path, teacher_dir), ["objective.name=opd", "objective.kwargs={}",
                                                          "guidance.enabled=true"])


def test_top_k_larger_than_vocab_is_refused(tmp_path, teacher_dir, capsys):
    path = write_config(tmp_path, teacher_dir)
    assert main(["train", "--config", str(path), "objective.kwargs.top_k=100"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_write_report_false_leaves_the_report_to_tropd_report(tmp_path, teacher_dir, capsys):
    path = write_config(tmp_path, teacher_dir, train={"steps": 1, "write_report": False})
    assert main(["train", "--config", str(path), "data.eval_prompts=0"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert f"checkpoint: {run / 'checkpoints' / 'step-000001'}" in out and "report:" not in out
    assert not (run / "report").exists() and "report" not in json.loads((run / "summary.json").read_text())
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0  # complete, and no report is owed
    assert "nothing to do" in capsys.readouterr().out and not (run / "report").exists()
    assert main(["report", str(run)]) == 0 and (run / "report" / "summary.md").is_file()


def test_cli_two_step_smoke_run(tmp_path, teacher_dir, capsys):
    path = write_config(tmp_path, teacher_dir, train={"write_report": True})
    rc = main(["train", "--config", str(path), "train.steps=2", "objective.name=opd", "objective.kwargs={}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "run directory:" in out and "teacher_text_nll" in out
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    report = tmp_path / "run" / "report"
    assert f"report: {report / 'summary.md'}" in out  # written by the command, after the run
    assert (report / "summary.md").is_file() and (report / "loss.png").is_file()
    # the same run directory again, without --resume: refused, nothing overwritten
    assert main(["train", "--config", str(path), "train.steps=2"]) == 2
    assert f"{tmp_path / 'run'} is not empty" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run")]) == 0
    assert main(["objectives"]) == 0
    listed = capsys.readouterr().out
    for name in ("tropd", "opd", "gkd", "trb", "sft"):
        assert name in listed


def test_train_on_user_file_with_graded_eval(tmp_path, teacher_dir):
    """A user jsonl (plain, conversational and messages rows, with answers) trains and is graded at eval."""
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]
    rows += [{"prompt": [{"role": "user", "content": "Say 7."}], "answer": "7"},
             {"messages": [{"role": "user", "content": "Say 8."}, {"role": "assistant", "content": "8"}],
              "answer": "8"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(write_config(tmp_path, teacher_dir), [f"data.prompts={data}", "train.steps=1"])
    summary = train_from_config(cfg, console=lambda *_: None)
    assert 0.0 <= summary["eval_after"]["task_score"] <= 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt field"}) + "\n")
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="bad.jsonl.*2"):
        train_from_config(load_config(write_config(tmp_path / "b", teacher_dir), [f"data.prompts={bad}"]),
                          console=lambda *_: None)


@pytest.mark.parametrize("objective", ["tropd", "gkd"])
def test_fused_loss_trains_like_the_logits_loss(tmp_path, teacher_dir, objective):
    """objective.fused (hidden states + LM head, chunked) and objective.fused=false (full logits) end with the
    same weights."""
    kwargs = {"top_k": 8} if objective == "tropd" else {}
    weights = {}
    for fused in (True, False):
        path = write_config(tmp_path / str(fused), teacher_dir, objective={"name": objective, "kwargs": kwargs,
                                                                          "chunk_size": 5, "fused": fused},
                            data={"eval_prompts": 0}, train={"steps": 3})
        assert main(["train", "--config", str(path)]) == 0
        weights[fused] = final_weights(tmp_path / str(fused) / "run")
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=0, atol=1e-5, msg=k)


def test_merge_metrics_sums_losses_takes_extremes_and_weights_the_rest():
    parts = [{"loss": 0.5, "student_tokens": 1.0, "reward_min": -3.0, "behavior_gap_max": 0.2, "k1_rkl": 1.0},
             {"loss": 0.25, "student_tokens": 3.0, "reward_min": -1.0, "behavior_gap_max": 0.7, "k1_rkl": 2.0},
             {"loss": 0.0, "student_tokens": 0.0, "reward_min": -9.0, "behavior_gap_max": 9.0, "k1_rkl": 9.0}]
    out = merge_metrics(parts)
    assert out["loss"] == 0.75 and out["student_tokens"] == 4.0
    assert out["reward_min"] == -3.0 and out["behavior_gap_max"] == 0.7  # a part without student tokens is ignored
    assert out["k1_rkl"] == pytest.approx((1.0 + 3 * 2.0) / 4)
