"""Damaged model files (teacher, student or checkpoint folders): one ValueError line naming the file, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import tiny_llama, tiny_tokenizer
from tropd.cli import main
from tropd.models import check_model_folder, load_causal_lm


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny model folder, saved once; tests damage copies of it."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def model_dir(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


def _refused(folder: Path, names: Path | str, *phrases: str) -> str:
    """Both :func:`check_model_folder` and :func:`load_causal_lm` refuse ``folder`` in one line naming ``names``."""
    with pytest.raises(ValueError) as checked:
        check_model_folder(folder)
    with pytest.raises(ValueError) as loaded:
        load_causal_lm(folder)
    message = str(loaded.value)
    assert message == str(checked.value)
    assert str(names) in message and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_intact_folder_passes(model_dir):
    check_model_folder(model_dir)
    check_model_folder(str(model_dir))
    with pytest.raises(ValueError, match="does not exist"):
        check_model_folder(model_dir / "absent")


def test_truncated_safetensors(model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _refused(model_dir, weights, "truncated", "re-copy or re-download")
    assert f"file has {len(data) // 2 - 8 - int.from_bytes(data[:8], 'little')}" in message
    weights.write_bytes(data[:5])  # shorter than the length prefix
    _refused(model_dir, weights, "truncated")
    weights.write_bytes(data[:100])  # cut inside the JSON header
    _refused(model_dir, weights, "truncated")
    weights.write_bytes(data + b"\0" * 16)  # too long
    _refused(model_dir, weights, "16 bytes too many")


def test_garbage_and_lfs_pointer_safetensors(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 8)
    _refused(model_dir, weights, "not a safetensors file")
    weights.write_bytes((8).to_bytes(8, "little") + b"[1, 2]  " + b"\0" * 32)  # a header, but not an object
    _refused(model_dir, weights, "not a JSON object")
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 92848\n")
    _refused(model_dir, weights, "Git LFS pointer", "git lfs pull")


def test_safetensors_header_that_lies_about_a_tensor(model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    raw = json.dumps(header).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    _refused(model_dir, weights, repr(name), "corrupt")


def test_garbage_config_json(model_dir):
    config = model_dir / "config.json"
    config.write_bytes(b"\x00\xff\xfegarbage{")
    _refused(model_dir, config, "not UTF-8")
    config.write_text('{"model_type": "llama", "hidden_size": 32')  # cut short
    _refused(model_dir, config, "not valid JSON", "line 1")
    config.write_text("")
    _refused(model_dir, config, "is empty")


def test_config_json_valid_but_not_a_model_config(model_dir):
    config = model_dir / "config.json"
    original = json.loads(config.read_text())
    config.write_text("[1, 2, 3]")
    _refused(model_dir, config, "holds an array, not a JSON object")
    config.write_text(json.dumps({k: v for k, v in original.items() if k != "model_type"}))
    _refused(model_dir, config, '"model_type"')


def test_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    tiny_llama().save_pretrained(folder, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 2
    check_model_folder(folder)
    (folder / shards[1]).unlink()
    _refused(folder, index, shards[1], f"{len(shards)} shard files, 1 of them missing")
    (folder / shards[0]).write_bytes(b"")  # a present shard is checked too
    (folder / shards[1]).write_bytes((folder / shards[2]).read_bytes())
    _refused(folder, folder / shards[0], "truncated")


def test_bad_tokenizer_files(model_dir):
    tokenizer_json = model_dir / "tokenizer.json"
    text = tokenizer_json.read_text()
    tokenizer_json.write_text(text[: len(text) // 2])
    _refused(model_dir, tokenizer_json, "not valid JSON")
    tokenizer_json.write_text(text)
    (model_dir / "tokenizer_config.json").write_text("{oops")
    _refused(model_dir, model_dir / "tokenizer_config.json", "not valid JSON")


def test_tokenizer_file_that_parses_but_is_wrong_names_the_folder(model_dir):
    (model_dir / "tokenizer.json").write_text("{}")
    check_model_folder(model_dir)  # well-formed JSON: left to the tokenizers library
    with pytest.raises(ValueError) as info:
        load_causal_lm(model_dir)
    message = str(info.value)
    assert f"cannot load the tokenizer in {model_dir}" in message and "tokenizer.json" in message
    assert "\n" not in message


def test_generation_config_that_transformers_would_silently_skip(model_dir):
    (model_dir / "generation_config.json").write_text('{"eos_token_id": ')
    _refused(model_dir, model_dir / "generation_config.json", "not valid JSON")


def test_missing_weights_or_tokenizer(model_dir):
    (model_dir / "model.safetensors").unlink()
    _refused(model_dir, model_dir, "no weights")
    folder = model_dir.parent / "no-tokenizer"
    tiny_llama().save_pretrained(folder)
    _refused(folder, folder, "no tokenizer")


def test_library_errors_beyond_the_checks_become_one_line(model_dir):
    """A header the checks accept (unknown dtype) but safetensors refuses: wrapped, naming the folder."""
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for key, info in header.items():
        if key != "__metadata__":
            info["dtype"] = "Q9"
    raw = json.dumps(header).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    check_model_folder(model_dir)
    with pytest.raises(ValueError) as info:
        load_causal_lm(model_dir)
    message = str(info.value)
    assert message.startswith(f"cannot load the model in {model_dir}: ") and "\n" not in message
    assert isinstance(info.value.__cause__, Exception)  # the library's error stays chained (TROPD_DEBUG=1)


def test_cli_prints_one_line(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("TROPD_DEBUG", raising=False)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["eval", "--model", str(model_dir), "--tasks", "math", "--limit", "1", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tropd eval: error: ") and str(weights) in err and "\n" not in err
