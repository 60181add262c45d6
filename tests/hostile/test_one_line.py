"""Hostile cases of the README's promise "one line, never a traceback": YAML alias bombs and parse errors, values
no run can use (a seed past the random streams' range, a tracker that is not installed, a budget past the
model's context, more layers than the teacher has), data files that are empty, all bad, nested past any
parser, hold a lone surrogate or are no regular file, run folders that cannot be written, and the eval and
serve-teacher flags. Each must end in one line naming the key, flag or file, before any model loads where the
config alone shows it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.train.runs import write_config
from tropd.cli import main
from tropd.train.config import MAX_YAML_VALUES, ConfigError, load_config


def one_error_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tropd {command}: error: "), err
    return err


def bomb(levels: int = 9, width: int = 9, indent: str = "  ") -> str:
    """YAML lines defining anchors a0..a<levels-1>, each a list of ``width`` aliases of the one before: the last
    stands for width**levels values."""
    lines = [f"{indent}a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines)


# -- YAML ------------------------------------------------------------------------------------------------------
def test_an_alias_bomb_under_a_valid_key_is_refused_at_once_naming_the_file(tmp_path, capsys):
    # before: a MemoryError after ~50 s, and the error repr()'d the value
    path = tmp_path / "bomb.yaml"
    path.write_text("objective:\n  kwargs:\n" + bomb(indent="    ") + "\ntrain:\n  betas: *a8\n")
    start = time.process_time()
    assert main(["train", "--config", str(path)]) == 2
    assert time.process_time() - start < 5
    err = one_error_line(capsys)
    assert f"config file {path}: holds more than {MAX_YAML_VALUES:,} values, YAML aliases (*name) counted" in err
    assert "lol" not in err and len(err) < 400


def test_an_alias_bomb_in_a_command_line_value_is_refused(tmp_path, teacher_dir, capsys):
    levels = [f"&a0 [{', '.join(['1'] * 9)}]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    start = time.process_time()
    config = write_config(tmp_path, teacher_dir)
    assert main(["train", "--config", str(config), f"train.betas=[{', '.join(levels)}]"]) == 2
    assert time.process_time() - start < 5
    err = one_error_line(capsys)
    assert "command-line override train.betas=" in err and "holds more than" in err and len(err) < 400


def test_a_value_that_contains_itself_is_refused(tmp_path, capsys):
    path = tmp_path / "loop.yaml"
    path.write_text("train:\n  betas: &loop [0.9, *loop]\n")
    assert main(["train", "--config", str(path)]) == 2
    assert f"config file {path}: a YAML alias (*name) refers to a value that contains it (line 2)" in \
        one_error_line(capsys)


def test_a_long_wrong_value_is_shown_briefly(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("train:\n  report_to: [" + ", ".join(["[1]"] * 20_000) + "]\n")
    with pytest.raises(ConfigError, match=r"train\.report_to=\[\[1\], \[1\], \[1\], \[1\], \.\.\.\] has the wrong "
                                          "type") as err:
        load_config(path)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("text, where", [
    ("train:\n  steps: [1, 2\n  lr: 3\n", "line 3, column 5: expected ',' or ']', but got ':' (while parsing a "
                                          "flow sequence at line 2, column 10)"),
    ("train:\n  steps: 1\n lr: 3\n", "line 3, column 2: expected <block end>, but found '<block mapping start>' "
                                     "(while parsing a block mapping at line 1, column 1)"),
    ("train: {steps: 'open\n", "line 2, column 1: found unexpected end of stream (while scanning a quoted scalar "
                               "at line 1, column 16)"),
    ("train: \t- 1\n", "line 1, column 8: found character '\\t' that cannot start any token (while scanning "
                       "for the next token)"),
])
def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    assert one_error_line(capsys) == f"tropd train: error: config file {path} is not valid YAML: {where}\n"


def test_a_yaml_syntax_error_in_a_command_line_value_is_one_line(tmp_path, teacher_dir, capsys):
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), "train.betas=[0.9, 0.99"]) == 2
    assert one_error_line(capsys) == ("tropd train: error: command-line override train.betas='[0.9, 0.99' is not "
                                      "valid YAML: line 1, column 11: expected ',' or ']', but got '<stream end>' "
                                      "(while parsing a flow sequence at line 1, column 1)\n")


def test_a_config_path_that_is_no_regular_file_is_refused(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert one_error_line(capsys) == f"tropd train: error: config file {tmp_path} is not a regular file\n"


# -- values no run can use, refused before any model loads ---------------------------------------------------
def test_a_seed_past_the_data_order_streams_is_refused_up_front(tmp_path, teacher_dir, capsys):
    # before: accepted, then "Overflow when unpacking long long" after the models loaded, the folder left non-empty
    config = write_config(tmp_path, teacher_dir)
    for seed in ("20000000", "-1"):
        assert main(["train", "--config", str(config), f"train.seed={seed}"]) == 2
        err = one_error_line(capsys)
        assert f"command-line override 'train.seed={seed}': train.seed={seed} must be in [0, 18,446,080]" in err
    assert not (tmp_path / "run").exists()


def test_the_seed_limit_is_the_real_one():
    import torch

    from tropd.train.seeds import max_seed
    from tropd.train.trainer import step_generator

    for steps in (1, 200, 2_000_000):
        step_generator(max_seed(steps), steps - 1)  # the largest seed allowed works at the last step
        with pytest.raises((RuntimeError, ValueError), match="Overflow"):
            step_generator(max_seed(steps) + 1, steps - 1)
    load_config(None, ["train.seed=18446080"])
    torch.manual_seed(max_seed(1))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a run loads a model: what it refuses must be refused before."""
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("tropd.train.build.load_models", load_models)


def test_a_tracker_that_is_not_installed_is_refused_up_front(tmp_path, teacher_dir, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # not installed, whatever this machine has
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), "train.report_to=[wandb]"]) == 2
    assert "train.report_to has wandb, which is not installed: pip install wandb, or drop it from " \
           "train.report_to" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_response_budget_past_the_context_is_refused_before_any_model_loads(tmp_path, teacher_dir, capsys,
                                                                               no_model_loads):
    config = write_config(tmp_path, teacher_dir)
    for extra in ([], ["data.max_prompt_tokens=8"]):  # before, an explicit prompt limit skipped the check
        assert main(["train", "--config", str(config), "rollout.max_new_tokens=50000000", *extra]) == 2
        assert ("rollout.max_new_tokens=50000000 leaves no room for a prompt in the models' context of 256 tokens; "
                "lower it below 256") in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_more_student_layers_than_the_teacher_has_is_refused_before_any_model_loads(tmp_path, teacher_dir, capsys,
                                                                                   no_model_loads):
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), "model.student_layers=1000"]) == 2
    assert (f"model.student_layers=1000 is more than the 4 decoder layers of the teacher {teacher_dir}; keep at "
            "most 4") in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_the_embedded_teachers_layers_and_context_are_read_from_its_gguf_header():
    from tropd.models import model_facts
    from tropd.train.build import check_model_files

    assert model_facts("smollm2") == {"layers": 30, "context": 8192}
    with pytest.raises(ConfigError, match="model.student_layers=1000 is more than the 30 decoder layers"):
        check_model_files(load_config(None, ["model.student_layers=1000"]))
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=8192 leaves no room .* context of 8192 tokens"):
        check_model_files(load_config(None, ["rollout.max_new_tokens=8192"]))


def test_what_the_files_do_not_say_is_refused_right_after_loading(teacher_dir):
    from tropd.models import base_student, load_causal_lm

    teacher, tok = load_causal_lm(teacher_dir)
    m = load_config(None, [f"model.teacher={teacher_dir}", "model.student_layers=5"]).model
    with pytest.raises(ConfigError, match="model.student_layers=5 is more than the 4 decoder layers") as err:
        base_student(m, "cpu", teacher, tok)
    assert err.value.key == "model.student_layers"


@pytest.mark.parametrize("rows, skip, why", [
    ("", False, "it holds no rows"),
    ("\n  \n", True, "it holds no rows"),
    ('{"nope": 1}\n{"prompt": " "}\n', True, "all 2 of its rows are malformed (data.skip_bad_rows skipped them; "
                                              "the first: {path}:line 1: field 'prompt': missing"),
])
def test_a_data_file_with_no_usable_row_is_refused_before_any_model_loads(tmp_path, teacher_dir, capsys,
                                                                          no_model_loads, rows, skip, why):
    data = tmp_path / "data.jsonl"
    data.write_text(rows)
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), f"data.prompts={data}",
                 f"data.skip_bad_rows={str(skip).lower()}"]) == 2
    assert f"data.prompts={data}: no prompt to train on: {why.format(path=data)}" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("row, field", [
    ('{"prompt": ""}', "prompt"),
    ('{"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "  "}]}', "prompt"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}]}', "messages"),
])
def test_an_empty_prompt_is_refused_naming_file_line_and_field(tmp_path, teacher_dir, capsys, no_model_loads,
                                                               row, field):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "fine"}\n' + row + "\n")
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), f"data.prompts={data}"]) == 2
    assert f"{data}:line 2: field '{field}': empty prompt" in one_error_line(capsys)


# -- data files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, where", [
    ("deep.jsonl", '{"prompt": "fine"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 2: field '<json>'"),
    ("deep.json", '[{"prompt": "fine"},\n {"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}]\n",
     "line 2: field '<json>'"),
])
def test_deeply_nested_json_is_one_line(tmp_path, teacher_dir, capsys, no_model_loads, name, text, where):
    # before: a RecursionError traceback
    data = tmp_path / name
    data.write_text(text)
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), f"data.prompts={data}"]) == 2
    assert f"{data}:{where}: nested too deeply to parse" in one_error_line(capsys)


@pytest.mark.parametrize("row, field", [
    ('{"prompt": "hi \\ud800 there"}', "prompt"),
    ('{"messages": [{"role": "user", "content": "ok \\udfff"}]}', "messages[0].content"),
])
def test_a_lone_surrogate_in_a_prompt_is_one_line(tmp_path, teacher_dir, capsys, no_model_loads, row, field):
    # before: "TypeError: TextEncodeInput must be Union[...]" from the tokenizer, after the models loaded
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "fine"}\n' + row + "\n")
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), f"data.prompts={data}"]) == 2
    assert f"{data}:line 2: field '{field}': holds a lone surrogate" in one_error_line(capsys)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_behind_a_data_path_is_refused_without_reading(tmp_path, teacher_dir, capsys,
                                                                         no_model_loads, kind):
    # before: a FIFO blocked forever, /dev/zero was read without bound
    import os

    data = tmp_path / "data.jsonl"
    if kind == "fifo":
        os.mkfifo(data)
    else:
        data.symlink_to("/dev/zero")
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), f"data.prompts={data}"]) == 2
    assert f"{data}: field '<file>': is {what}, not a regular file" in one_error_line(capsys)
    from tropd.tasks import DataFormatError, load_prompts
    from tropd.train.prompts import data_fingerprint

    for read in (load_prompts, data_fingerprint):  # neither opens it
        with pytest.raises(DataFormatError, match="not a regular file"):
            read(data)


# -- run folders -----------------------------------------------------------------------------------------------
def test_a_run_dir_naming_an_existing_file_is_one_line(tmp_path, teacher_dir, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    for extra in ([], ["--resume"]):
        assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), "--run-dir", str(path),
                     *extra]) == 2
        assert f"{path} is a file, not a run folder; choose another --run-dir" in one_error_line(capsys)
    assert path.read_text() == "mine\n"


def test_a_read_only_run_folder_is_one_line(tmp_path, teacher_dir, capsys, monkeypatch):
    import builtins
    import os

    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a 0555 folder: make the OS refuse as it would refuse anyone else
        def refuse(file, *args, **kwargs):
            if str(file).startswith(str(run)):
                raise PermissionError(13, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr("tropd.train.lock.open", refuse, raising=False)
    try:
        assert main(["train", "--config", str(write_config(tmp_path, teacher_dir))]) == 2
        assert f"cannot open the run folder {run} (Permission denied); choose another --run-dir" in \
            one_error_line(capsys)
        assert list(run.iterdir()) == []
    finally:
        run.chmod(0o755)


@pytest.mark.parametrize("errno_, why", [(13, "Permission denied; choose a --run-dir this user can write"),
                                         (30, "Read-only file system; choose a --run-dir this user can write"),
                                         (28, "No space left on device; free some space, then `tropd train "
                                              "--run-dir <run> --resume` continues")])
def test_a_folder_that_stops_taking_writes_mid_run_is_one_line(tmp_path, teacher_dir, capsys, monkeypatch,
                                                               errno_, why):
    import os

    from tropd.train.trainer import Trainer

    def save(self, step):  # the run folder turned read-only, or the disk filled, at the first save
        raise OSError(errno_, os.strerror(errno_), str(self.run_dir / "checkpoints"))

    monkeypatch.setattr(Trainer, "save", save)
    config = write_config(tmp_path, teacher_dir)
    assert main(["train", "--config", str(config), "data.eval_prompts=0", "train.steps=1"]) == 1
    assert f"tropd train: error: cannot write or read {tmp_path / 'run' / 'checkpoints'}: {why}" in \
        one_error_line(capsys)


# -- the eval and serve-teacher flags --------------------------------------------------------------------------
@pytest.mark.parametrize("flags, why", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0: greedy), got inf"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--n", "0"], "--n must be an integer >= 1, got 0"),
    (["--limit", "-3"], "--limit must be an integer >= 1, got -3"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
])
def test_eval_refuses_numbers_it_cannot_use_before_loading(teacher_dir, capsys, monkeypatch, flags, why):
    # before: --temperature nan was accepted and sampled
    monkeypatch.setattr("tropd.models.load_named_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["eval", "--model", str(teacher_dir), "--tasks", "math", *flags]) == 2
    assert one_error_line(capsys, "eval") == f"tropd eval: error: {why}\n"


def test_eval_refuses_a_budget_past_the_context_before_sampling(teacher_dir, capsys, monkeypatch):
    monkeypatch.setattr("tropd.eval.tasks_eval.generate", lambda *a, **k: pytest.fail("sampled"))
    assert main(["eval", "--model", str(teacher_dir), "--tasks", "math", "--max-new-tokens", "300"]) == 2
    assert one_error_line(capsys, "eval") == ("tropd eval: error: --max-new-tokens 300 leaves no room for a prompt "
                                              "in the model's context of 256 tokens; lower it below 256\n")


@pytest.mark.parametrize("flags, why", [
    (["--max-batch-rows", "0"], "--max-batch-rows must be >= 1, got 0"),
    (["--chunk-size", "-1"], "--chunk-size must be >= 1, got -1"),
    (["--port", "99999"], "--port 99999: a port is 0 to 65535 (0: a free one)"),
    (["--max-request-rows", "0"], "--max-request-rows must be a positive number, got 0"),
    (["--max-body-mb", "nan"], "--max-body-mb must be a positive number, got nan"),
    (["--request-timeout", "inf"], "--request-timeout must be a positive number, got inf"),
    (["--header-timeout", "-1"], "--header-timeout must be a positive number, got -1.0"),
])
def test_serve_teacher_refuses_numbers_it_cannot_use_before_loading(teacher_dir, capsys, monkeypatch, flags, why):
    pytest.importorskip("uvicorn")
    monkeypatch.setattr("tropd.models.load_named_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["serve-teacher", str(teacher_dir), *flags]) == 2
    assert one_error_line(capsys, "serve-teacher") == f"tropd serve-teacher: error: {why}\n"


# -- other libraries' lines on the error path ------------------------------------------------------------------
def test_a_bad_parquet_row_is_one_line_without_the_datasets_progress_bar(tmp_path, teacher_dir, capfd,
                                                                         no_model_loads):
    # before: "Generating train split: 0 examples ..." (twice) printed above tropd's error
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["fine", "", "also fine"]}), data)
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), f"data.prompts={data}"]) == 2
    err = capfd.readouterr().err  # the file descriptor: what libraries write past sys.stderr too
    assert err == f"tropd train: error: {data}:row 2: field 'prompt': empty prompt\n"


def test_a_model_missing_a_weight_gets_one_warning_line_not_the_transformers_report(tmp_path, teacher_dir, capfd):
    # before: a multi-line "LlamaForCausalLM LOAD REPORT" table, printed above any error that followed
    import shutil

    from safetensors.torch import load_file, save_file

    from tropd.models import load_causal_lm

    folder = tmp_path / "student"
    shutil.copytree(teacher_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights.pop("model.layers.0.mlp.down_proj.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    capfd.readouterr()
    with pytest.warns(RuntimeWarning, match=r"1 weight\(s\) the model needs are not in its files and were "
                                            r"initialised at random \(e\.g\. model\.layers\.0\.mlp\.down_proj\.weight\)"):
        load_causal_lm(folder)
    assert "LOAD REPORT" not in capfd.readouterr().err
