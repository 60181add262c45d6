"""RunConfig in code: with_overrides sets dotted keys to Python values with the command line's checks; every key
that leaves its value to the run shows, in --help-config, the value a plain run uses."""

from __future__ import annotations

import pytest

from tropd.cli import main
from tropd.rollout import GuidanceConfig, TRBConfig
from tropd.train.config import ConfigError, load_config


def test_with_overrides_equals_the_command_line_and_leaves_the_original():
    base = load_config()
    typed = base.with_overrides(**{"train.lr": 1e-4, "train.steps": 30, "objective.kwargs": {"top_k": 16},
                                   "objective.kwargs.beta": 0.01, "data.chat_template": False})
    parsed = load_config(None, ["train.lr=1e-4", "train.steps=30", "objective.kwargs={top_k: 16}",
                                "objective.kwargs.beta=0.01", "data.chat_template=false"])
    assert typed == parsed
    assert typed.train.lr == 1e-4 and isinstance(typed.train.lr, float)
    assert base == load_config()  # unchanged
    kwargs = {"top_k": 8}
    cfg = base.with_overrides(**{"objective.kwargs": kwargs})
    kwargs["top_k"] = 9  # the config holds its own copy
    assert cfg.objective.kwargs == {"top_k": 8}
    lr = base.with_overrides(**{"train.lr": 3}).train.lr
    assert lr == 3.0 and isinstance(lr, float)  # an int for a float setting, as YAML's 3 would be


@pytest.mark.parametrize("values, message", [
    ({"train.stepz": 3}, "override 'train.stepz=3': unknown config key train.stepz"),
    ({"train.steps": "abc"}, "override \"train.steps='abc'\": train.steps='abc' has the wrong type"),
    ({"train.lr": -1.0}, "override 'train.lr=-1.0': train.lr must be a positive number"),
    ({"objective.kwargs": {"top_kk": 3}}, "objective.kwargs.top_kk is not a setting of 'tropd'"),
    ({"guidance.guided_fraction": 2.0}, "override 'guidance.guided_fraction=2.0': guidance.guided_fraction must be "
                                        "in [0, 1], got 2.0"),
    ({"objective.name": "opd"}, "the config with overrides objective.name='opd': objective.kwargs.top_k is not a "
                                "setting of 'opd'"),
    ({"objective.name": "opd"}, "(objective.kwargs={} gives opd's defaults, e.g. after changing objective.name "
                                "from the config file's)"),
    ({"train.lr.x": 1}, "override train.lr.x: lr is not a section"),
])
def test_with_overrides_refuses_what_the_command_line_refuses(values, message):
    with pytest.raises(ConfigError) as err:
        load_config().with_overrides(**values)
    assert message in str(err.value)


def test_help_config_shows_what_a_run_makes_of_null_and_auto(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    default = load_config()
    steps = default.train.steps - default.train.sft_warmup_steps
    for line in ("model.student = None   (a run uses: the teacher's 24 layers of smollm2)",
                 "guidance.enabled = None   (a run uses: True)",
                 f"guidance.anneal_steps = None   (a run uses: {steps})",
                 "model.teacher_dtype = None   (a run uses: 'float32')",
                 "objective.chunk_size = None   (a run uses: loss 1024, teacher 512)",
                 "train.output_dir = None   (a run uses: runs/tropd-<date-time>)",
                 "'tau': -1.38"):
        assert line in out, line
    assert main(["train", "--help-config", "objective.name=opd", "objective.kwargs={}", "objective.fused=false",
                 "objective.chunk_size=64"]) == 0
    out = capsys.readouterr().out
    assert "guidance.enabled = None   (a run uses: False)" in out
    assert "objective.chunk_size = 64   (a run uses: loss 64, teacher 64)" in out


@pytest.mark.parametrize("make, message", [
    (lambda: GuidanceConfig(guided_fraction=2), "guidance.guided_fraction must be in [0, 1], got 2"),
    (lambda: GuidanceConfig(guided_fraction="half"), "guidance.guided_fraction must be a number, got 'half'"),
    (lambda: GuidanceConfig(anneal_steps=0), "guidance.anneal_steps must be >= 1 or null, got 0"),
    (lambda: GuidanceConfig(enabled="yes"), "guidance.enabled must be true, false or null, got 'yes'"),
    (lambda: TRBConfig(eps0=-0.1), "trb.eps0 must be >= 0, got -0.1"),
    (lambda: TRBConfig(warmup_steps=2.5), "trb.warmup_steps must be an integer, got 2.5"),
    (lambda: TRBConfig(iters=0), "trb.iters must be >= 1, got 0"),
])
def test_guidance_and_trb_sections_check_their_ranges_when_built(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value) == message and err.value.key == message.split()[0]


def test_validate_rechecks_sections_changed_in_place():
    cfg = load_config()
    cfg.trb.iters = 0
    with pytest.raises(ConfigError, match=r"trb\.iters must be >= 1, got 0"):
        cfg.validate()
    cfg = load_config()
    cfg.guidance.guided_fraction = 1.5
    with pytest.raises(ConfigError, match=r"guidance\.guided_fraction must be in \[0, 1\], got 1.5"):
        cfg.validate()


def test_build_run_validates_a_config_built_in_code(tmp_path):
    """A config changed in code is checked by build_run as load_config checks a file: the error names the key,
    before any prompt is read or model loaded (the teacher here does not exist)."""
    from tests.train.runs import write_config
    from tropd.train.build import build_accelerator, build_run

    cfg = load_config(write_config(tmp_path, tmp_path / "no-teacher"))
    cfg.train.lr = -1.0
    with pytest.raises(ConfigError, match="train.lr must be a positive number"):
        build_run(cfg, build_accelerator(cfg))


def test_with_overrides_merges_a_section_into_the_config():
    """A whole section given as a dict sets the keys it names and keeps the others (this config's, not the
    built-in defaults); nested sections merge too; a dict-valued setting is replaced whole."""
    base = load_config().with_overrides(**{"train.steps": 30, "train.seed": 7, "model.lora.r": 4,
                                           "objective.kwargs": {"top_k": 16, "beta": 0.01}})
    dotted = base.with_overrides(**{"train.lr": 1e-3})
    for merged in (base.with_overrides(train={"lr": 1e-3}), base.with_overrides(**{"train": {"lr": 1e-3}})):
        assert merged == dotted
        assert (merged.train.lr, merged.train.steps, merged.train.seed) == (1e-3, 30, 7)
    lora = base.with_overrides(model={"lora": {"alpha": 8.0}})
    assert (lora.model.lora.r, lora.model.lora.alpha, lora.model.teacher) == (4, 8.0, base.model.teacher)
    assert base.with_overrides(**{"model.lora": {"alpha": 8.0}}) == lora
    kwargs = base.with_overrides(objective={"kwargs": {"top_k": 8}})
    assert kwargs.objective.kwargs == {"top_k": 8} and kwargs.objective.name == base.objective.name
    assert load_config(None, ["train.steps=30", "train={lr: 0.001}"]).train.steps == 30  # the command line too
    with pytest.raises(ConfigError, match=r"override \"train=\{'stepz': 3\}\": unknown config key train.stepz"):
        base.with_overrides(train={"stepz": 3})


def test_help_config_with_a_teacher_server_shows_what_such_a_run_uses(capsys):
    """With model.teacher a URL, the teacher's dtype and chunk are the server's and the student's device is the
    only device of this run: --help-config shows that, not the in-process teacher's values."""
    assert main(["train", "--help-config", "model.teacher=http://127.0.0.1:9", "model.student=/some/student",
                 "model.teacher_dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    for line in ("model.teacher_dtype = 'bfloat16'   (not used: the teacher server's own dtype applies (tropd "
                 "serve-teacher --dtype))",
                 "objective.chunk_size = None   (a run uses: loss 1024, teacher as the server was started (tropd "
                 "serve-teacher --chunk-size))",
                 "the teacher runs on the server)",
                 "model.student_layers = 24   (not used: model.student is given)"):
        assert line in out, line
    assert "model.teacher_timeout = 300.0\n" in out  # read: no note
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "model.teacher_timeout = 300.0   (not used: model.teacher is not a teacher server)" in out
    assert "model.teacher_dtype = None   (a run uses: 'float32')" in out


def test_help_config_loads_no_model_code_and_prints_what_it_printed_with_it(capsys):
    """`tropd train --help-config` in a fresh process imports neither transformers nor the model loaders (it was
    10-24 s under load, mostly imports), and prints the same text as in this process, where they are loaded."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import tropd.models  # noqa: F401 - the eager state: every module loaded
    import tropd.teacher.in_process  # noqa: F401

    code = ("import contextlib, io, json, sys\nfrom tropd.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    rc = main(['train', '--help-config'])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or m in "
            "('tropd.models', 'tropd.teacher.in_process', 'tropd.train.trainer'))\n"
            "print(json.dumps([rc, heavy, buf.getvalue()]))\n")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rc, heavy, text = json.loads(done.stdout.splitlines()[-1])
    assert rc == 0 and heavy == []
    assert main(["train", "--help-config"]) == 0
    assert capsys.readouterr().out == text
