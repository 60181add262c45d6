"""Where step metrics go: ``metrics.jsonl`` always, tensorboard / wandb when ``train.report_to`` asks."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from tropd.files import write_text_atomic


class MetricsLog:
    """Appends one JSON object per step to ``<run>/metrics.jsonl`` and forwards scalars to optional trackers."""

    def __init__(self, run_dir: Path, report_to: list[str], config: dict, keep_until: int | None = None) -> None:
        """``keep_until``: on resume, the checkpoint's step (later lines are dropped); None starts a fresh log."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(keep_until)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = self._wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("train.report_to has tensorboard, which is not installed: pip install tensorboard, "
                                 "or drop it from train.report_to") from err
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("train.report_to has wandb, which is not installed: pip install wandb, or drop it "
                                 "from train.report_to") from err
            self._wandb = wandb.init(project="tropd", dir=str(run_dir), config=config, resume="allow")

    def _truncate_after(self, step: int | None) -> None:
        """Drop lines logged after ``step`` (they will be produced again), or all of them when ``step`` is None."""
        if not self.path.exists():
            return
        kept = [] if step is None else [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))  # a crash keeps the old log whole

    def eval_at(self, step: int) -> dict:
        """The evaluation logged at ``step`` (keys without the ``eval/`` prefix), or {}."""
        out = {}
        for rec in read_metrics(self.path):
            if rec.get("step") == step:
                out.update({k[5:]: v for k, v in rec.items() if k.startswith("eval/")})
        return out

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (or a run directory holding one).

    A torn last line (a crash mid-write) is skipped with a warning; any other line that is not a JSON object
    raises ValueError naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory or its metrics.jsonl")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): is it a metrics.jsonl?") from None
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    records = []
    for i, line in numbered:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise json.JSONDecodeError("expected a JSON object", line, 0)
        except json.JSONDecodeError as err:
            if i == numbered[-1][0]:
                warnings.warn(f"{path}:{i}: ignoring a torn last line (a crash while it was written)", stacklevel=2)
                break
            raise ValueError(f"{path}:{i}: not a JSON object ({err.msg}, column {err.colno}); "
                             "fix or delete that line") from None
        records.append(record)
    return records
