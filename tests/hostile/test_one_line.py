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
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), f"train.betas=[{', '.join(levels)}]"]) == 2
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
