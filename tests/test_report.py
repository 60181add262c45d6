"""`tropd report`: per-phase summary tables, one PNG per figure, y labels and the warm-up marker on every panel."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

from tropd.report import build_figures, phase_boundaries, write_report
from tropd.train.tracking import read_metrics


def _step(step: int, phase: str, loss: float, **extra) -> dict:
    rec = {"step": step, "phase": phase, "loss": loss, "grad_norm": 10.0 * step, "tokens_per_second": 100.0 + step,
           "rollout/response_len_mean": 16.0, "rollout/eos_rate": 0.0, "rollout/truncation_rate": 1.0}
    rec.update(extra)
    return rec


def _write_run(tmp_path, records: list[dict]):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


RECORDS = [
    {"step": 0, "eval/teacher_text_nll": 4.5, "eval/distinct_ratio": 0.6, "eval/teacher_distinct_ratio": 0.95,
     "eval/task_score": 0.0, "eval/sample": ""},
    _step(1, "sft", 6.5, loss_guidance=6.5),
    _step(2, "sft", 5.0, loss_guidance=5.0, grad_norm=None),  # a NaN gradient norm, logged as null
    _step(3, "sft", 4.25, loss_guidance=4.25),
    {"step": 3, "eval/teacher_text_nll": 2.5, "eval/distinct_ratio": 0.55, "eval/teacher_distinct_ratio": 0.95,
     "eval/task_score": None, "eval/sample": "a `sample`\nwith a newline"},
    _step(4, "tropd", 1.5, k1_rkl=3.75, trust_frac=0.25, reward_min=-16.0, reward_p01=-14.5, reward_p50=-2.5,
          student_entropy=4.5, loss_trust=-0.05, loss_outlier=1.0, **{"rollout/guidance_cap": 16.0}),
    _step(5, "tropd", 1.25, k1_rkl=2.5, trust_frac=0.3, reward_min=-12.0, reward_p01=-11.0, reward_p50=-2.0,
          student_entropy=4.75, loss_trust=-0.1, loss_outlier=1.2, **{"rollout/guidance_cap": 8.0}),
    _step(6, "tropd", 0.75, k1_rkl=None, trust_frac=0.375, reward_min=-10.0, reward_p01=-9.0, reward_p50=-1.5,
          student_entropy=5.0, loss_trust=-0.2, loss_outlier=0.9, **{"rollout/guidance_cap": 0.0}),
    {"step": 6, "eval/teacher_text_nll": 2.0, "eval/distinct_ratio": 0.7, "eval/teacher_distinct_ratio": 0.95,
     "eval/task_score": 0.25, "eval/sample": "after"},
]


def _table_row(section: str, key: str) -> list[str]:
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {key} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_summary_has_one_first_last_table_per_phase(tmp_path):
    run = _write_run(tmp_path, RECORDS)
    path = write_report(run)
    assert path == run / "report" / "summary.md"
    text = path.read_text()
    warm = text.split("## SFT warm-up: steps 1–3", 1)[1].split("## ", 1)[0]
    obj = text.split("## objective tropd: steps 4–6", 1)[1].split("## ", 1)[0]
    assert "| metric | unit | first (step 1) | last (step 3) |" in warm
    assert _table_row(warm, "loss") == ["loss", "nats/token", "6.5", "4.25"]
    assert _table_row(warm, "grad_norm")[2:] == ["10", "30"]
    assert "k1_rkl" not in warm and "trust_frac" not in warm  # not logged during the warm-up
    assert "| metric | unit | first (step 4) | last (step 6) |" in obj
    assert _table_row(obj, "loss")[2:] == ["1.5", "0.75"]
    assert _table_row(obj, "k1_rkl")[2:] == ["3.75", "NaN"]  # null: not finite
    assert _table_row(obj, "trust_frac")[2:] == ["0.25", "0.375"]
    assert _table_row(obj, "tokens_per_second") == ["tokens_per_second", "tokens/s", "104", "106"]
    assert "NaN: the value was not finite" in text
    # the held-out evaluation table stays, one row per evaluation, with the null task score as NaN
    ev = text.split("## Held-out evaluation", 1)[1]
    assert "| step | when | distinct_ratio | task_score | teacher_distinct_ratio | teacher_text_nll |" in ev
    assert "| 0 | before training | 0.6 | 0 | 0.95 | 4.5 |" in ev
    assert "| 3 | end of SFT warm-up | 0.55 | NaN | 0.95 | 2.5 |" in ev
    assert "| 6 | end of training | 0.7 | 0.25 | 0.95 | 2 |" in ev
    assert "Student sample at step 0: (empty)" in ev and "Student sample at step 6: `after`" in ev


def test_every_figure_is_written_and_linked(tmp_path):
    run = _write_run(tmp_path, RECORDS)
    text = write_report(run).read_text()
    for stem in ("loss", "trust", "reward", "grad_norm", "entropy", "length", "throughput", "eval"):
        png = run / "report" / f"{stem}.png"
        assert png.is_file() and png.stat().st_size > 1000, stem
        assert f"![{stem}]({stem}.png)" in text
    assert plt.get_fignums() == []  # write_report closes what it drew


def test_figures_have_y_labels_and_the_warm_up_marker(tmp_path):
    records = read_metrics(_write_run(tmp_path, RECORDS))
    assert phase_boundaries(records) == [(3, "sft", "tropd")]
    figures = build_figures(records)
    try:
        assert set(figures) == {"loss", "trust", "reward", "grad_norm", "entropy", "length", "throughput", "eval"}
        for stem, fig in figures.items():
            for ax in fig.axes:
                assert ax.get_ylabel(), f"{stem}: a panel without a y label"
                markers = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [3, 3] and ln.get_linestyle() == "--"]
                assert len(markers) == 1, f"{stem}: no warm-up marker at step 3"
                assert markers[0].get_label() == "end of SFT warm-up (step 3)"
            assert fig.axes[-1].get_xlabel() == "step"
        # quantities of different scale get their own panels
        assert [ax.get_ylabel() for ax in figures["reward"].axes] == [
            "K1 reward log p_T − log p_S (nats)", "reverse KL, K1 estimate (nats/token)"]
        assert len(figures["eval"].axes) == 3 and len(figures["length"].axes) == 2
        units = {ax.get_ylabel() for fig in figures.values() for ax in fig.axes}
        assert {"loss (nats/token)", "length (tokens)", "throughput (tokens/s)",
                "teacher-text NLL (nats/token)"} <= units
        # a null value is a gap (NaN), not a dropped point
        (grad,) = [ln for ln in figures["grad_norm"].axes[0].get_lines() if ln.get_label() == "grad_norm"]
        assert list(grad.get_xdata()) == [1, 2, 3, 4, 5, 6]
        assert grad.get_ydata()[1] != grad.get_ydata()[1]
    finally:
        for fig in figures.values():
            plt.close(fig)


def test_a_run_stopped_during_the_warm_up_has_no_marker(tmp_path):
    run = _write_run(tmp_path, RECORDS[:3])
    figures = build_figures(read_metrics(run))
    try:
        assert "eval" in figures and "reward" not in figures
        for fig in figures.values():
            for ax in fig.axes:
                assert not [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    finally:
        for fig in figures.values():
            plt.close(fig)
    text = write_report(run).read_text()
    assert "2 training steps logged: sft (steps 1–2)." in text
    assert "| loss | nats/token | 6.5 | 5 |" in text


@pytest.mark.parametrize("bad", [{"step": 1}, {"phase": "sft", "loss": 1.0}])
def test_records_without_phase_data_or_step_are_ignored(tmp_path, bad):
    run = _write_run(tmp_path, [bad, *RECORDS[1:4]])
    assert "3 training steps logged" in write_report(run).read_text()


def _lines(fig, label: str):
    return [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == label]


def test_a_one_region_step_does_not_hide_the_loss_and_sft_steps_draw_no_trust_fractions(tmp_path):
    """An SFT step logs its loss twice (``loss`` and its only region, ``loss_guidance``) and no student token:
    loss.png draws ``loss`` there alone, trust.png draws no fraction there (nothing was computed)."""
    sft = [_step(s, "sft", 6.0 - s, loss_guidance=6.0 - s, student_tokens=0.0, frac_masked=0.0) for s in (1, 2, 3)]
    opd = [_step(s, "tropd", 1.0, loss_guidance=0.01, loss_trust=-0.1, loss_outlier=1.09, student_tokens=40.0,
                 trust_frac=0.5, p_trust=0.45, frac_masked=0.5) for s in (4, 5)]
    figures = build_figures(read_metrics(_write_run(tmp_path, sft + opd)))
    try:
        (loss,) = _lines(figures["loss"], "loss")
        (guidance,) = _lines(figures["loss"], "loss_guidance")
        assert list(loss.get_xdata()) == [1, 2, 3, 4, 5]
        assert list(guidance.get_xdata()) == [4, 5]  # not at the SFT steps, where it equals the loss
        for key in ("trust_frac", "p_trust", "frac_masked"):
            (line,) = _lines(figures["trust"], key)
            assert list(line.get_xdata()) == [4, 5], key
    finally:
        for fig in figures.values():
            plt.close(fig)


def test_every_evaluation_row_says_when(tmp_path):
    records = [*RECORDS[:7], {"step": 5, "eval/teacher_text_nll": 2.2}, *RECORDS[7:],
               {"step": 9, "eval/teacher_text_nll": 1.9}]
    text = write_report(_write_run(tmp_path, records)).read_text()
    rows = [ln for ln in text.split("## Held-out evaluation", 1)[1].splitlines() if ln.startswith("| ")][1:]
    whens = {int(r.split("|")[1]): r.split("|")[2].strip() for r in rows}
    assert whens == {0: "before training", 3: "end of SFT warm-up", 5: "during objective tropd",
                     6: "end of training", 9: "after training"}
