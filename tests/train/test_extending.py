"""docs/extending.md: its custom-sampler example runs as written and the trainer uses it."""

from __future__ import annotations

import re
from pathlib import Path

from tests.train.runs import write_config
from tropd.train.config import load_config
from tropd.train.run import train_from_config
from tropd.train.tracking import read_metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def test_the_documented_custom_sampler_trains(tmp_path, teacher_dir):
    first_block = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)[0]
    namespace: dict = {}
    exec(compile(first_block, str(DOC), "exec"), namespace)
    seen = []

    class Recording(namespace["AnnealedTemperature"]):
        def sample(self, prompts, request):
            batch = super().sample(prompts, request)
            seen.append(self.inner.sampling.temperature)
            return batch

    cfg = load_config(write_config(tmp_path, teacher_dir, data={"eval_prompts": 0}), ["train.steps=3"])
    summary = train_from_config(cfg, console=lambda *_: None, make_sampler=Recording)
    assert summary["steps_done"] == 3
    assert seen == [1.5, 1.25, 1.0]  # one generation batch per step, annealed over the phase
    assert len([r for r in read_metrics(tmp_path / "run") if "loss" in r]) == 3
