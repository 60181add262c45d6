"""metrics.jsonl writing, truncation on resume, and the tensorboard sink."""

from tropd.train.tracking import MetricsLog, read_metrics


def test_log_resume_truncation_and_tensorboard(tmp_path):
    log = MetricsLog(tmp_path, ["tensorboard"], {})
    for step in range(1, 5):
        log.log({"step": step, "loss": 1.0 / step, "phase": "tropd", "bad": float("nan")})
    log.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[0]["bad"] is None  # NaN -> null, valid JSON
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    MetricsLog(tmp_path, [], {}, keep_until=2).close()  # resume from the step-2 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    MetricsLog(tmp_path, [], {}).close()  # a fresh run starts a fresh log
    assert (tmp_path / "metrics.jsonl").read_text() == ""
