"""User prompt data: formats, grader selection, errors naming file/line/field, skip mode, rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tropd.tasks import DataFormatError, Example, grade, load_prompts, parse_row, render_prompt

GOOD_ROWS = [
    {"prompt": "What is 2 + 2?", "answer": 4},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3", "entry_point": "add", "id": "code-1"},
    {"prompt": "Describe tea.", "constraints": [{"type": "max_words", "value": 20}]},
    {"prompt": "Pick one: A) 1 B) 2", "choices": ["1", "2"], "answer": 1},
    {"prompt": "Pick one", "choices": ["red", "blue", "green"], "answer": "green"},
    {"prompt": "Pick", "answer": "b", "domain": "mcq"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def check_good(loaded) -> None:
    rows = loaded.rows
    assert len(rows) == len(GOOD_ROWS) and loaded.skipped == 0
    assert rows[0].domain == "math" and rows[0].reference == {"answer": "4"}
    assert rows[1].domain is None and [m["role"] for m in rows[1].messages] == ["system", "user"]
    assert [m["content"] for m in rows[2].messages] == ["Hi"]  # final assistant turn dropped
    assert rows[3].domain == "code" and rows[3].id == "code-1"
    assert rows[3].reference == {"tests": "assert add(1, 2) == 3", "entry_point": "add"}
    assert rows[4].domain == "if"
    assert rows[5].reference == {"answer": "B", "choices": ["1", "2"]}
    assert rows[6].reference["answer"] == "C"
    assert rows[7].domain == "mcq" and rows[7].reference == {"answer": "B"}


def test_jsonl(tmp_path: Path) -> None:
    loaded = load_prompts(write_jsonl(tmp_path / "p.jsonl", GOOD_ROWS))
    check_good(loaded)
    assert loaded.rows[0].id == "p.jsonl:1"


def test_json_array(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD_ROWS, indent=2))
    check_good(load_prompts(path))


def test_parquet_and_saved_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "Say hi."}]
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "p.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([1])}).save_to_disk(str(tmp_path / "dict"))
    for loaded in (load_prompts(tmp_path / "p.parquet"), load_prompts(tmp_path / "saved"),
                   load_prompts(tmp_path / "dict")):
        assert [r.domain for r in loaded] == ["math", None]  # parquet's null "answer" counts as absent
        assert loaded[0].reference == {"answer": "2"}
    assert len(load_prompts(tmp_path / "dict", split="test")) == 1


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "ok"}, {"prompt": ""}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataFormatError) as info:
        load_prompts(tmp_path / "bad.parquet")
    assert info.value.line == 2 and info.value.field == "prompt" and "row 2" in str(info.value)


BAD_ROWS = [
    # (row text, field named in the error)
    ('{"prompt": "ok", "answer": "1"', "<json>"),
    ('["not", "an", "object"]', "<row>"),
    ('{"text": "no prompt here"}', "prompt"),
    ('{"prompt": "   "}', "prompt"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "prompt"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', "prompt[1].role"),
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    ('{"messages": [{"role": "assistant", "content": "only me"}]}', "messages"),
    ('{"prompt": "q", "tests": "assert f() == 1"}', "entry_point"),
    ('{"prompt": "q", "tests": "", "entry_point": "f"}', "tests"),
    ('{"prompt": "q", "constraints": [{"type": "max_words", "value": -3}]}', "constraints[0].value"),
    ('{"prompt": "q", "constraints": [{"type": "lowercase"}, {"kind": "x"}]}', "constraints[1].type"),
    ('{"prompt": "q", "choices": ["a", "b"], "answer": "C"}', "answer"),
    ('{"prompt": "q", "choices": ["a", "b"]}', "answer"),
    ('{"prompt": "q", "choices": ["only one"], "answer": "A"}', "choices"),
    ('{"prompt": "q", "answer": ""}', "answer"),
    ('{"prompt": "q", "answer": "1", "tests": "assert 1", "entry_point": "f"}', "answer"),
    ('{"prompt": "q", "domain": "poetry"}', "domain"),
    ('{"prompt": "q", "id": [1]}', "id"),
]


@pytest.mark.parametrize("text,field", BAD_ROWS)
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ['{"prompt": "fine"}', "", text])
    with pytest.raises(DataFormatError) as info:
        load_prompts(path)
    error = info.value
    assert error.line == 3 and error.field == field  # blank lines are skipped but still counted
    assert str(path) in str(error) and "line 3" in str(error) and repr(field) in str(error)


def test_json_array_errors_give_the_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "ok"},\n  {"prompt": "q",\n   "choices": ["a"], "answer": "A"}\n]')
    with pytest.raises(DataFormatError) as info:
        load_prompts(path)
    assert info.value.line == 3 and info.value.field == "choices"
    path.write_text('{"prompt": "not an array"}')
    with pytest.raises(DataFormatError, match="array"):
        load_prompts(path)


def test_skip_mode_counts_and_keeps_the_good_rows(tmp_path: Path) -> None:
    rows = ['{"prompt": "good 1"}'] + [text for text, _ in BAD_ROWS] + ['{"prompt": "good 2", "answer": 3}']
    loaded = load_prompts(write_jsonl(tmp_path / "mixed.jsonl", rows), on_error="skip")
    assert [r.messages[0]["content"] for r in loaded] == ["good 1", "good 2"]
    assert loaded.skipped == len(BAD_ROWS) == len(loaded.errors)
    assert [e.line for e in loaded.errors] == list(range(2, 2 + len(BAD_ROWS)))


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_prompts(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_prompts(tmp_path / "p.csv", on_error="ignore")  # type: ignore[arg-type]


def test_rows_feed_the_graders() -> None:
    row = parse_row({"prompt": "Compute 1/2 + 1/4.", "answer": "3/4"})
    assert grade(row.domain, r"\boxed{0.75}", row.reference) == 1.0
    mcq = parse_row({"prompt": "Pick", "choices": ["x", "y"], "answer": 0})
    assert grade(mcq.domain, "Answer: A", mcq.reference) == 1.0
    example = row.to_example()
    assert isinstance(example, Example) and example.prompt == "Compute 1/2 + 1/4."
    with pytest.raises(ValueError, match="grader"):
        parse_row({"prompt": "no grader"}).to_example()
    with pytest.raises(ValueError, match="answer"):
        parse_row({"prompt": "q", "answer": None, "domain": "math"})


class TemplateTokenizer:
    """Duck-typed stand-in for a tokenizer with a chat template."""

    chat_template = "{% for m in messages %}...{% endfor %}"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append((messages, tokenize, add_generation_prompt))
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class PlainTokenizer:
    chat_template = None


def test_render_with_a_chat_template() -> None:
    tokenizer = TemplateTokenizer()
    row = parse_row({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                  {"role": "assistant", "content": "A"}]})
    assert render_prompt(row, tokenizer) == "<system>S<user>U<assistant>"
    messages, tokenize, add_generation_prompt = tokenizer.calls[-1]
    assert tokenize is False and add_generation_prompt is True and len(messages) == 2
    assert render_prompt("plain", tokenizer) == "<user>plain<assistant>"


def test_render_without_a_chat_template() -> None:
    assert render_prompt("just text") == "just text"
    assert render_prompt(parse_row({"prompt": "single turn"}), PlainTokenizer()) == "single turn"
    chat = parse_row({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]})
    with pytest.raises(ValueError, match="chat template") as info:
        render_prompt(chat, PlainTokenizer())
    assert "PlainTokenizer" in str(info.value)
    with pytest.raises(ValueError, match="required"):
        render_prompt("text", PlainTokenizer(), require_chat_template=True)


# ---------------------------------------------------------------------------------- encodings, damaged files


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_non_utf8_jsonl_names_the_file_and_line(tmp_path: Path, on_error: str) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n{"prompt": "d"}\n')
    with pytest.raises(DataFormatError) as info:
        load_prompts(path, on_error=on_error)  # type: ignore[arg-type]
    error = info.value
    assert error.line == 3 and error.field == "<encoding>"
    message = str(error)
    assert f"{path}:line 3" in message and "0xe9" in message and "column 16" in message
    assert "byte offset 47" in message and "re-encode the file as UTF-8" in message and "\n" not in message


def test_non_utf8_far_into_a_jsonl_file(tmp_path: Path) -> None:
    """The reader decodes in blocks: the line is still the right one past the first block."""
    path = tmp_path / "long.jsonl"
    lines = [json.dumps({"prompt": f"question {i} " + "x" * 50}).encode() for i in range(500)]
    lines[400] = b'{"prompt": "na\xefve"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError) as info:
        load_prompts(path)
    assert info.value.line == 401 and f"{path}:line 401" in str(info.value)


def test_non_utf8_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n  {"prompt": "a"},\n  {"prompt": "b"},\n  {"prompt": "caf\xe9"}\n]')
    with pytest.raises(DataFormatError) as info:
        load_prompts(path)
    assert info.value.line == 4 and info.value.field == "<encoding>"
    assert f"{path}:line 4" in str(info.value) and "re-encode" in str(info.value)


def test_utf16_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "utf16.jsonl"
    path.write_bytes('{"prompt": "hi"}\n'.encode("utf-16"))  # with its byte-order mark
    with pytest.raises(DataFormatError, match="UTF-16") as info:
        load_prompts(path)
    assert info.value.line == 1 and str(path) in str(info.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    jsonl, array = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    jsonl.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "caf\u00e9"}\n{"prompt": "b"}\n'.encode())
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_ROWS).encode())
    rows = load_prompts(jsonl).rows
    assert [r.messages[0]["content"] for r in rows] == ["caf\u00e9", "b"] and rows[0].id == "bom.jsonl:1"
    check_good(load_prompts(array))
    bad = tmp_path / "bom-latin1.jsonl"  # a BOM, then a latin-1 byte on line 1: columns count bytes
    bad.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataFormatError) as info:
        load_prompts(bad)
    assert info.value.line == 1 and "column 19" in str(info.value) and "byte offset 18" in str(info.value)


def test_damaged_parquet_and_dataset_folder_name_the_file(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    good = tmp_path / "good.parquet"
    datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]).to_parquet(str(good))
    data = good.read_bytes()
    cases = {"truncated.parquet": (data[: len(data) // 2], "truncated"), "garbage.parquet": (b"x" * 100, "truncated"),
             "empty.parquet": (b"", "empty")}
    for name, (content, phrase) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataFormatError, match=phrase) as info:
            load_prompts(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and info.value.field == "<file>"

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]).save_to_disk(str(folder))
    (folder / "state.json").write_text("{oops")
    with pytest.raises(DataFormatError, match="cannot read this datasets folder") as info:
        load_prompts(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "not-a-dataset").mkdir()
    with pytest.raises(DataFormatError, match="cannot read this datasets folder"):
        load_prompts(tmp_path / "not-a-dataset")
