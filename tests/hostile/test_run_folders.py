"""Hostile cases of data loss and silent overwrite: two processes in one run folder, a crash in the middle of a
checkpoint's replacement, paths the command line mangled, a data file changed under a run, a ``latest`` pointer
that leaves the run. Each case is reproduced on tiny models and must end in one line naming what to do, or in
intact data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.runs import write_config
from tropd.cli import main
from tropd.train.config import load_config
from tropd.train.lock import LOCK_FILE, RunFolderBusyError, RunLock
from tropd.train.run import train_from_config
from tropd.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"console": lambda *_: None}


def run_once(tmp_path: Path, teacher_dir: Path, *overrides: str, **sections) -> Path:
    cfg = load_config(write_config(tmp_path, teacher_dir, **sections), ["data.eval_prompts=0", *overrides])
    train_from_config(cfg, **QUIET)
    return tmp_path / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tropd train: error: "), err
    return err


# -- one process per run folder ------------------------------------------------------------------------------
HOLD = ("import sys; from tropd.train.lock import RunLock; lock = RunLock.acquire(sys.argv[1]); "
        "print('locked', flush=True); sys.stdin.read(); lock.release()")


class Holder:
    """Another process holding a run folder's lock until closed."""

    def __init__(self, run: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "locked"

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_a_second_fresh_run_in_a_held_folder_is_refused_naming_the_holder(tmp_path, teacher_dir, capsys):
    config = write_config(tmp_path, teacher_dir)
    run = tmp_path / "run"
    with Holder(run) as holder:
        assert main(["train", "--config", str(config), "data.eval_prompts=0"]) == 2
        err = one_error_line(capsys)
        assert f"{run} is in use by another tropd process (pid {holder.proc.pid} on" in err and "--run-dir" in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written beside the holder's lock
    assert not run.exists()  # the holder made the folder and removed what it made


def test_a_second_resume_of_a_held_run_is_refused_and_changes_nothing(tmp_path, teacher_dir, capsys):
    run = run_once(tmp_path, teacher_dir, "train.steps=2")
    (run / "summary.json").unlink()  # as if the run had died right after its last save: a resume would train
    with Holder(run) as holder:
        before = snapshot(run)
        assert main(["train", "--run-dir", str(run), "--resume"]) == 2
        assert f"is in use by another tropd process (pid {holder.proc.pid} on" in one_error_line(capsys)
        assert snapshot(run) == before
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0  # the holder gone, the folder is free
    assert not (run / LOCK_FILE).exists()


def test_the_lock_is_held_for_the_whole_run_fresh_and_resumed(tmp_path, teacher_dir, monkeypatch):
    run = tmp_path / "run"
    refusals = []
    original = Trainer.run_step

    def run_step(self, step):  # a second process starting mid-run
        with pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()} on") as err:
            RunLock.acquire(run)
        refusals.append(str(err.value))
        return original(self, step)

    monkeypatch.setattr(Trainer, "run_step", run_step)
    run_once(tmp_path, teacher_dir)  # 4 steps, saved at 2 and 4
    assert len(refusals) == 4 and not (run / LOCK_FILE).exists()
    (run / "summary.json").unlink()
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert len(refusals) == 6 and not (run / LOCK_FILE).exists()


def test_a_stale_lock_file_of_a_dead_process_blocks_nothing(tmp_path, teacher_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("pid 999999 on elsewhere\n")  # left by a killed run: no process holds the lock
    run_once(tmp_path, teacher_dir, "train.steps=1")
    assert (run / "summary.json").is_file() and not (run / LOCK_FILE).exists()


def test_a_refused_start_leaves_no_folder_behind(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err and not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_under_accelerate_every_process_refuses_a_held_folder(tmp_path, teacher_dir):
    """Only the main process takes the lock; the refusal reaches every process (none waits for it forever)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    config = write_config(tmp_path, teacher_dir, data={"eval_prompts": 0})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with Holder(tmp_path / "run") as holder:
        proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                               "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                               "-m", "tropd", "train", "--config", str(config)],
                              capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert proc.stderr.count(f"is in use by another tropd process (pid {holder.proc.pid} on") == 2, proc.stderr[-3000:]


# -- checkpoints: the newest complete copy is never deleted ------------------------------------------------
def test_a_kill_between_the_two_renames_of_a_resave_loses_no_checkpoint(tmp_path, teacher_dir, capsys):
    """save_checkpoint replaces an existing step-N by renaming it aside (.step-N.old-PID), then the complete
    temporary folder in; a kill between the renames leaves two complete copies and no step-N. The next --resume
    puts the set-aside one back instead of deleting both as leftovers ("no readable checkpoint")."""
    run = run_once(tmp_path, teacher_dir, train={"keep_checkpoints": 1})  # 4 steps: only step-000004 is kept
    ckpts = run / "checkpoints"
    expected = snapshot(ckpts / "step-000004")
    os.replace(ckpts / "step-000004", ckpts / ".step-000004.old-4242")  # the crashed state, as pid 4242 left it
    shutil.copytree(ckpts / ".step-000004.old-4242", ckpts / ".step-000004.tmp-4242")
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "restored 1 complete checkpoint(s) that an interrupted save had set aside: step-000004" in out
    assert "removed 1 leftover(s) of an interrupted save: .step-000004.tmp-4242" in out
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004"]
    assert snapshot(ckpts / "step-000004") == expected


def test_an_incomplete_set_aside_copy_is_still_a_leftover(tmp_path, teacher_dir, capsys):
    run = run_once(tmp_path, teacher_dir)  # checkpoints at steps 2 and 4
    ckpts = run / "checkpoints"
    (ckpts / ".step-000006.old-4242").mkdir()  # half of a folder: never a checkpoint
    (ckpts / ".step-000006.old-4242" / "model.safetensors").write_bytes(b"partial")
    (run / "summary.json").unlink()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert "removed 1 leftover(s) of an interrupted save: .step-000006.old-4242" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002", "step-000004"]


def test_a_stop_request_during_a_periodic_save_does_not_save_that_step_again(tmp_path, teacher_dir, monkeypatch):
    import tropd.train.trainer as trainer_module

    saved_steps = []
    save_checkpoint, save = trainer_module.save_checkpoint, Trainer.save

    def counting_save_checkpoint(run_dir, step, *args, **kwargs):
        saved_steps.append(step)
        return save_checkpoint(run_dir, step, *args, **kwargs)

    def stopped_while_saving(self, step):  # Ctrl-C arrives while the periodic save of step 2 is written
        path = save(self, step)
        self._stop_requested = True
        return path

    monkeypatch.setattr(trainer_module, "save_checkpoint", counting_save_checkpoint)
    monkeypatch.setattr(Trainer, "save", stopped_while_saving)
    cfg = load_config(write_config(tmp_path, teacher_dir), ["data.eval_prompts=0"])
    summary = train_from_config(cfg, **QUIET)
    assert summary["interrupted"] and summary["steps_done"] == 2
    assert saved_steps == [2] and summary["checkpoint"].endswith("step-000002")


def test_a_latest_pointer_that_leaves_the_run_is_refused(tmp_path, teacher_dir, capsys):
    other = run_once(tmp_path / "other", teacher_dir, "train.steps=2", train={"save_every": 0})
    run = run_once(tmp_path / "mine", teacher_dir, "train.steps=2", train={"save_every": 0})
    (run / "summary.json").unlink()
    pointer = run / "checkpoints" / "latest"
    for target in ["../../../other/run/checkpoints/step-000002", str(other / "checkpoints" / "step-000002"),
                   "step-000002/../../../../other/run/checkpoints/step-000002"]:
        pointer.write_text(target + "\n")
        before = snapshot(run)
        assert main(["train", "--run-dir", str(run), "--resume"]) == 2
        err = one_error_line(capsys)
        assert f"{pointer} names {target!r}, which is not a step-* folder of this run" in err
        assert snapshot(run) == before


# -- a data file changed under a run -------------------------------------------------------------------------
def _write_rows(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(n)))


def test_a_changed_data_file_is_refused_on_resume_unless_overridden(tmp_path, teacher_dir, capsys):
    data = tmp_path / "prompts.jsonl"
    _write_rows(data, 20)
    run = run_once(tmp_path, teacher_dir, data={"prompts": str(data)})  # checkpoints at steps 2 and 4
    recorded = json.loads((run / "data_fingerprint.json").read_text())
    assert recorded == {"data.prompts": str(data), "fingerprint": {
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "bytes": data.stat().st_size, "rows": 20}}
    (run / "summary.json").unlink()  # as if the run had stopped after step 2
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    _write_rows(data, 21)  # same path, other content
    before = snapshot(run)
    assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    err = one_error_line(capsys)
    assert f"--resume with settings that differ from {run / 'config.yaml'}: data.prompts content " \
           "(data_fingerprint.json): 'sha256 " in err and "20 rows' -> 'sha256 " in err and "21 rows'" in err
    assert "--override-config" in err and snapshot(run) == before

    assert main(["train", "--run-dir", str(run), "--resume", "--override-config"]) == 0
    assert "resumed at step 2 with --override-config: data.prompts content" in (run / "config.yaml").read_text()
    assert json.loads((run / "data_fingerprint.json").read_text())["fingerprint"]["rows"] == 21


def test_an_unchanged_data_file_resumes_and_a_missing_one_is_named(tmp_path, teacher_dir, capsys):
    data = tmp_path / "prompts.jsonl"
    _write_rows(data, 20)
    run = run_once(tmp_path, teacher_dir, data={"prompts": str(data)})
    (run / "summary.json").unlink()
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    shutil.rmtree(run / "checkpoints" / "step-000004")
    data.rename(tmp_path / "elsewhere.jsonl")
    assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    assert f"no such prompt file or folder: {data} (data.prompts)" in one_error_line(capsys)
    (tmp_path / "elsewhere.jsonl").rename(data)
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0


# -- paths on the command line are taken as written --------------------------------------------------------
@pytest.mark.parametrize("key", ["train.output_dir", "model.student", "model.teacher", "data.prompts"])
@pytest.mark.parametrize("written", ["runs/exp #2", "/models/student #v2", "null", "~", "2024", "1e-3", "yes",
                                     "[a, b]", "{x: 1}", "a: b"])
def test_a_path_override_is_the_string_as_written(tmp_path, teacher_dir, key, written):
    cfg = load_config(write_config(tmp_path, teacher_dir), [f"{key}={written}"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == written


def test_run_dir_and_path_keys_as_written_on_the_command_line(tmp_path, teacher_dir, capsys):
    config = str(write_config(tmp_path, teacher_dir))
    for run_dir in ("runs/exp #2", "null", "~", "2024"):
        assert main(["train", "--config", config, "--run-dir", run_dir, "model.student=/models/student #v2",
                     "--help-config"]) == 0
        out = capsys.readouterr().out
        assert f"train.output_dir = {run_dir!r}" in out and "model.student = '/models/student #v2'" in out
    assert main(["train", "--config", config, "model.student=", "--help-config"]) == 0  # empty: null
    assert "model.student = None" in capsys.readouterr().out
    missing = tmp_path / "data #1.jsonl"  # the whole name reaches the error, not 'data'
    assert main(["train", "--config", config, f"data.prompts={missing}"]) == 2
    assert f"no such prompt file or folder: {missing}" in one_error_line(capsys)


def test_a_run_in_a_folder_named_with_a_hash(tmp_path, teacher_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(write_config(tmp_path, teacher_dir))
    assert main(["train", "--config", config, "--run-dir", "exp #2", "train.steps=1", "data.eval_prompts=0"]) == 0
    assert (tmp_path / "exp #2" / "summary.json").is_file() and not (tmp_path / "exp").exists()


def test_a_run_folder_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path, teacher_dir, capsys):
    config = str(write_config(tmp_path, teacher_dir))
    (tmp_path / "taken").write_text("a file")
    assert main(["train", "--config", config, "--run-dir", str(tmp_path / "taken")]) == 2
    assert f"{tmp_path / 'taken'} is a file, not a run folder" in one_error_line(capsys)
    assert main(["train", "--config", config, "--run-dir", str(tmp_path / "taken" / "run")]) == 2
    assert f"cannot open the run folder {tmp_path / 'taken' / 'run'}" in one_error_line(capsys)
