"""User prompt data: load rows from jsonl / json / parquet / a ``datasets.save_to_disk`` folder, pick a grader
from the fields present, and render prompts to text (with the tokenizer's chat template when it has one).

Row formats (one object per row):

* ``{"prompt": "text"}``: a single user turn;
* ``{"prompt": [{"role": ..., "content": ...}, ...]}``: TRL's conversational prompt (must not end with an
  assistant turn);
* ``{"messages": [...]}``: a chat; the prompt is every message up to, not including, a final assistant turn.

Optional fields select a grader (and build its reference):

* ``tests`` + ``entry_point`` (+ ``setup``) → ``code``;
* ``constraints`` → ``if`` (the same spec as :mod:`tropd.tasks.instruct`);
* ``choices`` + ``answer`` → ``mcq``; the answer is a letter (``"B"``), a 0-based index, or the choice text;
* ``answer`` alone → ``math``;
* ``domain`` names the grader explicitly (then its fields must be present).

A row without grader fields is a prompt only (``domain`` and ``reference`` are ``None``): distillation needs
no reward. ``id`` is kept when present, else ``"<file name>:<line>"``. Missing values (``null``, which
parquet writes for absent columns) count as absent.

A malformed row raises :class:`DataFormatError` naming the file, the line (jsonl, json) or row (parquet,
folder; 1-based) and the field; with ``on_error="skip"`` it is skipped and counted instead.

jsonl and json files are read as UTF-8 (a leading byte-order mark is accepted). A byte that is not UTF-8
raises :class:`DataFormatError` with field ``"<encoding>"``, naming the line, column and byte offset, in both
``on_error`` modes (a file in another encoding would lose every row with an accent). A truncated or foreign
parquet file, or a folder ``datasets`` cannot load, raises it with field ``"<file>"``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

from tropd.tasks.instruct import SpecError, validate_spec
from tropd.tasks.types import DOMAINS, Example

ROLES = ("system", "user", "assistant", "tool")
Message = Mapping[str, str]


class DataFormatError(ValueError):
    """A malformed row: ``path``, 1-based ``line`` (or row number), the offending ``field`` and why."""

    def __init__(self, path: str, line: int | None, field: str, message: str, unit: str = "line") -> None:
        where = f"{path}:{unit} {line}" if line is not None else path
        super().__init__(f"{where}: field {field!r}: {message}")
        self.path = path
        self.line = line
        self.field = field
        self.message = message


class _RowError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PromptRow:
    """A parsed row.

    Attributes:
        messages: the prompt conversation (ends before the reply to generate).
        domain: the grader's domain, or ``None`` for a prompt without a grader.
        reference: the grader's reference, or ``None``.
        id: the row's ``id`` field, else ``"<file name>:<line>"``.
        source: ``"<path>:<line>"`` for messages about this row.
    """

    messages: tuple[dict[str, str], ...]
    domain: str | None
    reference: dict[str, Any] | None
    id: str
    source: str = ""

    def to_example(self) -> Example:
        """This row as an :class:`Example` (single-user-turn prompts only; needs a grader)."""
        if self.domain is None or self.reference is None:
            raise ValueError(f"{self.source or self.id}: row has no grader fields, cannot be an Example")
        if len(self.messages) != 1 or self.messages[0]["role"] != "user":
            raise ValueError(f"{self.source or self.id}: an Example holds one user turn; this row has "
                             f"{[m['role'] for m in self.messages]}")
        return Example(self.messages[0]["content"], self.domain, dict(self.reference), self.id)


@dataclass
class LoadedPrompts:
    """Rows read from a file, plus how many malformed rows were skipped (``on_error="skip"``) and why."""

    rows: list[PromptRow]
    skipped: int = 0
    errors: list[DataFormatError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PromptRow]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> PromptRow:
        return self.rows[index]


def _missing(row: Mapping[str, Any], key: str) -> bool:
    return row.get(key) is None


def _text(value: str, field_name: str) -> str:
    """``value``, refused when it is not text a tokenizer can encode: a lone surrogate (``"\\ud800"`` in JSON
    without its pair) makes every tokenizer fail with an unrelated TypeError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _RowError(field_name, f"holds a lone surrogate {value[err.start]!r} at character {err.start + 1} (a "
                                    "\\ud800-\\udfff escape without its pair), which is not text; fix or drop "
                                    "that escape") from None
    return value


def _messages(value: Any, field_name: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _RowError(field_name, "expected a non-empty list of {'role', 'content'} messages")
    out = []
    for i, message in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(message, Mapping):
            raise _RowError(where, f"expected a message object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowError(f"{where}.role", f"expected one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _RowError(f"{where}.content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": _text(content, f"{where}.content")})
    return out


def _prompt_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = _prompt_turns(row)
    if not any(m["content"].strip() for m in messages):
        field_name = "prompt" if not _missing(row, "prompt") else "messages"
        raise _RowError(field_name, "empty prompt: every turn's content is blank")
    return messages


def _prompt_turns(row: Mapping[str, Any]) -> list[dict[str, str]]:
    has_prompt, has_messages = not _missing(row, "prompt"), not _missing(row, "messages")
    if has_prompt and has_messages:
        raise _RowError("prompt", "give either 'prompt' or 'messages', not both")
    if has_prompt:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _RowError("prompt", "empty prompt")
            return [{"role": "user", "content": _text(prompt, "prompt")}]
        messages = _messages(prompt, "prompt")
        if messages[-1]["role"] == "assistant":
            raise _RowError(f"prompt[{len(messages) - 1}].role",
                            "a prompt must not end with an assistant turn (use 'messages' for full chats)")
        return messages
    if has_messages:
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise _RowError("messages", "no turns before the final assistant turn")
        return messages
    raise _RowError("prompt", "missing: a row needs 'prompt' (text or messages) or 'messages'")


def _mcq_letter(answer: Any, choices: Sequence[str]) -> str:
    letters = string.ascii_uppercase[: len(choices)]
    if isinstance(answer, bool):
        raise _RowError("answer", f"expected a letter, an index or a choice, got {answer!r}")
    if isinstance(answer, int):
        if 0 <= answer < len(choices):
            return letters[answer]
        raise _RowError("answer", f"index {answer} is out of range for {len(choices)} choices")
    if isinstance(answer, str):
        text = answer.strip()
        if len(text) == 1 and text.upper() in letters:
            return text.upper()
        if text in choices:
            return letters[list(choices).index(text)]
    raise _RowError("answer",
                    f"expected one of the letters {letters!r}, a 0-based index or a choice's text, got {answer!r}")


def _grader_fields(row: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    present = {
        "code": not _missing(row, "tests"),
        "if": not _missing(row, "constraints"),
        "mcq": not _missing(row, "choices"),
        "math": not _missing(row, "answer") and _missing(row, "choices"),
    }
    domain = row.get("domain")
    if domain is not None:
        if domain not in DOMAINS:
            raise _RowError("domain", f"expected one of {list(DOMAINS)}, got {domain!r}")
        if domain == "mcq" and not present["mcq"] and not _missing(row, "answer"):
            present["mcq"], present["math"] = True, False  # letter answer without the choices listed
    else:
        found = [d for d, here in present.items() if here]
        if len(found) > 1:
            field_of = {"code": "tests", "if": "constraints", "mcq": "choices", "math": "answer"}
            raise _RowError(field_of[found[1]],
                            f"fields for several graders ({', '.join(found)}); keep one or set 'domain'")
        domain = found[0] if found else None
    if domain is None:
        return None, None
    if domain == "code":
        tests, entry = row.get("tests"), row.get("entry_point")
        if not isinstance(tests, str) or not tests.strip():
            raise _RowError("tests", "expected a non-empty string of Python tests")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise _RowError("entry_point", f"expected the name of the function under test, got {entry!r}")
        reference: dict[str, Any] = {"tests": tests, "entry_point": entry}
        if not _missing(row, "setup"):
            if not isinstance(row["setup"], str):
                raise _RowError("setup", "expected a string of Python code")
            reference["setup"] = row["setup"]
        return domain, reference
    if domain == "if":
        reference = {"constraints": row.get("constraints")}
        try:
            validate_spec(reference)
        except SpecError as err:
            raise _RowError(err.field, err.message) from None
        return domain, reference
    if domain == "mcq":
        if _missing(row, "answer"):
            raise _RowError("answer", "missing: multiple choice needs the correct answer")
        choices = row.get("choices")
        if choices is None:
            answer = row["answer"]
            if not (isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha()):
                raise _RowError("answer", f"without 'choices' the answer must be a letter, got {answer!r}")
            return domain, {"answer": answer.strip().upper()}
        if (not isinstance(choices, (list, tuple)) or len(choices) < 2 or len(choices) > 26
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise _RowError("choices", "expected a list of 2 to 26 non-empty strings")
        return domain, {"answer": _mcq_letter(row["answer"], list(choices)), "choices": list(choices)}
    answer = row.get("answer")  # math
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise _RowError("answer", f"expected a non-empty answer (string or number), got {answer!r}")
    if isinstance(answer, float) and not math.isfinite(answer):  # JSON's NaN / Infinity: no answer to grade
        raise _RowError("answer", f"expected a finite number or a string, got {answer!r}; write the true answer")
    return domain, {"answer": str(answer).strip()}


def parse_row(row: Any, *, source: str = "<row>", default_id: str | None = None) -> PromptRow:
    """Parse one row (see the module docstring). Raises ``ValueError("<field>: <why>")`` when malformed."""
    try:
        return _parse(row, source, default_id or source)
    except _RowError as err:
        raise ValueError(f"{err.field}: {err.message}") from None


def _parse(row: Any, source: str, default_id: str) -> PromptRow:
    if not isinstance(row, Mapping):
        raise _RowError("<row>", f"expected an object, got {type(row).__name__}")
    messages = _prompt_messages(row)
    domain, reference = _grader_fields(row)
    row_id = row.get("id")
    if row_id is not None and not isinstance(row_id, (str, int)):
        raise _RowError("id", f"expected a string or integer, got {type(row_id).__name__}")
    return PromptRow(tuple(messages), domain, reference, str(row_id) if row_id is not None else default_id, source)


_REENCODE = ("re-encode the file as UTF-8, e.g. `iconv -f cp1252 -t utf-8 old > new` for a latin-1/Windows "
             "file")


def _not_utf8(path: Path, data: bytes, start: int, line: int, line_start: int, base: int = 0) -> DataFormatError:
    """The error for an undecodable byte at ``data[start]``: ``line`` begins at ``data[line_start]``, and
    ``data`` at byte ``base`` of the file."""
    if line == 1 and data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return DataFormatError(str(path), 1, "<encoding>",
                               "the file is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8; "
                               "re-encode it as UTF-8, e.g. `iconv -f utf-16 -t utf-8 old > new`")
    return DataFormatError(str(path), line, "<encoding>",
                           f"not UTF-8: byte {data[start]:#04x} at column {start - line_start + 1} "
                           f"(byte offset {base + start} in the file) cannot be decoded; {_REENCODE}")


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise _not_utf8(path, data, err.start, data.count(b"\n", 0, err.start) + 1, line_start) from None
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:pos + 1] == "[":
        raise DataFormatError(str(path), None, "<file>", "expected a JSON array of row objects")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataFormatError(str(path), text.count("\n", 0, pos) + 1, "<json>", "unterminated JSON array")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFormatError(str(path), err.lineno, "<json>", f"invalid JSON: {err.msg}") from None
        except RecursionError:
            raise DataFormatError(str(path), line, "<json>", _TOO_DEEP) from None
        yield line, value


def _undecodable_line(path: Path) -> DataFormatError:
    """Find the first line of ``path`` that is not UTF-8 (the text reader decodes in blocks, not by line)."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")  # a byte-order mark is valid UTF-8; columns count bytes, from the line start
            except UnicodeDecodeError as err:
                return _not_utf8(path, raw, err.start, number, 0, offset)
            offset += len(raw)
    return DataFormatError(str(path), None, "<encoding>", f"not UTF-8; {_REENCODE}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open(encoding="utf-8-sig") as handle:  # a UTF-8 byte-order mark is accepted
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    value = _InvalidJSON(f"invalid JSON: {err.msg}")
                except RecursionError:
                    value = _InvalidJSON(_TOO_DEEP)
                yield number, value
    except UnicodeDecodeError:
        raise _undecodable_line(path) from None


@dataclass(frozen=True)
class _InvalidJSON:
    message: str


_TOO_DEEP = "nested too deeply to parse (lists or objects inside each other past Python's recursion limit)"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[0][:300] if lines else ""
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__


def _check_parquet(path: Path) -> None:
    """A parquet file begins and ends with ``PAR1``: a truncated or foreign file is refused before pyarrow logs."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(4)
        handle.seek(max(size - 4, 0))
        tail = handle.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        what = "is empty" if size == 0 else "is truncated or not a parquet file (no PAR1 marker at its " + (
            "start)" if head != b"PAR1" else "end)")
        raise DataFormatError(str(path), None, "<file>", f"{what}; re-copy or re-export it")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bar ("Generating train split: ...") and no log line below an error from ``datasets`` while tropd
    reads a data file: what goes wrong is said in tropd's one line; both are put back after."""
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    shown, level = not are_progress_bars_disabled(), datasets.logging.get_verbosity()
    with warnings.catch_warnings():  # HF_DATASETS_DISABLE_PROGRESS_BARS set: it wins, without a warning
        warnings.simplefilter("ignore")
        disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if shown:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable_progress_bars()


def _dataset_rows(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets

    kind = "datasets folder (save_to_disk)" if path.is_dir() else "parquet file"
    if not path.is_dir():
        _check_parquet(path)
    try:
        with _quiet_datasets():
            if path.is_dir():
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except MemoryError:
        raise
    except Exception as err:  # pyarrow / datasets errors do not always name the file
        raise DataFormatError(str(path), None, "<file>", f"cannot read this {kind}: {_first_line(err)}") from err
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("train" if "train" in loaded else names[0] if len(names) == 1 else None)
        if chosen not in loaded:
            raise ValueError(f"{path}: a DatasetDict with splits {names}; pass split= one of them")
        loaded = loaded[chosen]
    rows = iter(loaded)
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except MemoryError:
            raise
        except Exception as err:
            raise DataFormatError(str(path), index + 1, "<file>", f"cannot read this {kind}: {_first_line(err)}",
                                  "row") from err
        index += 1
        yield index, row


SUPPORTED = (".jsonl", ".ndjson", ".json", ".parquet", "a datasets.save_to_disk folder")

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_data_path(path: str | Path) -> None:
    """Refuse, before opening it, a data path that is neither a regular file nor a folder (checked with
    ``os.stat``, a symbolic link followed): a FIFO would block the read forever and ``/dev/zero`` would never
    end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no such prompt file or folder: {path}") from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise DataFormatError(str(path), None, "<file>", f"is {kind}, not a regular file; prompts are read from regular "
                                                     "files and datasets folders only (a pipe or a device may never "
                                                     "end): copy the data into a file")


def load_prompts(path: str | Path, *, on_error: Literal["raise", "skip"] = "raise",
                 split: str | None = None) -> LoadedPrompts:
    """Read prompt rows from ``path`` (jsonl, json array, parquet, or a ``save_to_disk`` folder).

    Args:
        path: the file or folder.
        on_error: ``"raise"`` (default) raises :class:`DataFormatError` at the first malformed row;
            ``"skip"`` drops malformed rows, counting them in ``skipped`` and keeping each error in ``errors``
            (a syntax error inside a ``.json`` array, a byte that is not UTF-8 and an unreadable file stop the
            read in both modes).
        split: which split of a saved ``DatasetDict`` (default ``"train"``, or its only split).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    check_data_path(path)
    suffix = path.suffix.lower()
    unit = "line"
    if path.is_dir() or suffix == ".parquet":
        rows: Iterator[tuple[int, Any]] = _dataset_rows(path, split)
        unit = "row"
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    else:
        raise ValueError(f"{path}: unsupported format {suffix!r}; supported: {', '.join(SUPPORTED)}")

    loaded = LoadedPrompts([])
    for number, row in rows:
        try:
            if isinstance(row, _InvalidJSON):
                raise _RowError("<json>", row.message)
            try:
                loaded.rows.append(_parse(row, f"{path}:{number}", f"{path.name}:{number}"))
            except RecursionError:
                raise _RowError("<row>", _TOO_DEEP) from None
        except _RowError as err:
            error = DataFormatError(str(path), number, err.field, err.message, unit)
            if on_error == "raise":
                raise error from None
            loaded.skipped += 1
            loaded.errors.append(error)
    return loaded


def _messages_of(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (PromptRow, Example)):
        return [dict(m) for m in prompt.messages]
    try:
        return _messages(prompt, "prompt")
    except _RowError as err:
        raise ValueError(f"{err.field}: {err.message}") from None


def render_prompt(prompt: PromptRow | Example | Sequence[Message] | str, tokenizer: Any = None, *,
                  require_chat_template: bool = False) -> str:
    """The text a model continues for ``prompt``.

    With a tokenizer that has a chat template: ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``. Without one (or with no tokenizer), a single user turn renders as its
    plain text; anything else (a system turn, several turns), or ``require_chat_template=True``, raises
    ``ValueError`` because there is no faithful way to lay it out.
    """
    messages = _messages_of(prompt)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    name = type(tokenizer).__name__ if tokenizer is not None else "no tokenizer"
    roles = [m["role"] for m in messages]
    if require_chat_template:
        raise ValueError(f"a chat template is required but {name} has none (tokenizer.chat_template is empty)")
    if roles == ["user"]:
        return messages[0]["content"]
    raise ValueError(f"this prompt has turns {roles}: rendering it needs a chat template, and {name} has none "
                     f"(tokenizer.chat_template is empty); set tokenizer.chat_template or use single-turn prompts")
