"""Code-generated task families with exact answers and written reasoning traces (the "distillation gym").

Every problem has a short prompt ending in ``=``, an exact answer string, and traces in two valid styles. A
completion is ``trace + " #### " + answer``; the training code appends the tokenizer's EOS token after it::

    prompt                 completion (style "teacher")
    "345+678="             "5+8=13 4+7+1=12 3+6+1=10 #### 1023"

Families (``FAMILIES``; the difficulty is the constructor argument, default in brackets):

``add`` -- multi-digit addition, both operands in ``[10, 10**digits)``; difficulty ``digits`` in 2..6 [3].
    teacher: digit columns right to left, the carry written as a third term::

        "345+678="  ->  "5+8=13 4+7+1=12 3+6+1=10 #### 1023"
    alt: left to right, adding ever longer prefixes of the right-aligned operands::

        "345+678="  ->  "3+6=9 34+67=101 345+678=1023 #### 1023"

``modchain`` -- a chain of ``+``/``*`` with operands 1..9, then a modulus 2..9; difficulty ``ops`` in 2..6 [2].
    teacher: each operation, then its reduction modulo m::

        "((3*4)+5)%7="  ->  "3*4=12 12%7=5 5+5=10 10%7=3 #### 3"
    alt: evaluate the whole chain, reduce once at the end::

        "((3*4)+5)%7="  ->  "3*4=12 12+5=17 17%7=3 #### 3"

``sort`` -- sort a list of single digits (0..9, repeats allowed); difficulty ``length`` in 3..8 [5].
    teacher: selection sort, moving the smallest remaining digit to the sorted prefix (``prefix|rest``)::

        "sort 53142="  ->  "1|5342 12|534 123|54 1234|5 #### 12345"
    alt: selection sort from the back, moving the largest remaining digit to the sorted suffix (``rest|suffix``)::

        "sort 53142="  ->  "3142|5 312|45 12|345 1|2345 #### 12345"

The minimum difficulties are chosen so that the two styles differ on every problem.

Noisy traces (``noisy_trace``): the teacher trace (steps are separated by single spaces and contain none), where
each step independently, with probability ``noise``, has one digit of its result (the text after its last ``=``;
for ``sort`` anywhere in the step) replaced by a different digit -- no leading zero is created. The answer after the
marker stays correct. The draws come from ``(seed, problem)`` and are nested across noise levels: the steps
corrupted at noise 0.2 are also corrupted, identically, at 0.5.

Splits: a problem's canonical string is its ``key``, ``"<family>:<prompt>"`` (e.g. ``"add:345+678="``); with
``h = int(sha256(key)[:8 bytes]) % 10`` it is in ``"heldout"`` iff ``h == 0`` (about 10%), in ``"valid"`` iff
``h == 1`` (about 10%: for choices such as learning rates, never the held-out set), else in ``"train"``. The split
never depends on the difficulty or the seed, so the splits are disjoint across difficulties and seeds too.

Sampling: ``problems(split, n, seed)`` walks a seeded pseudorandom permutation of the family's finite problem space
(a Feistel network with cycle walking) and keeps the problems of ``split``, so its result is deterministic, free
of repeats, prefix-stable in ``n``, and exhausting the split raises :class:`ValueError` with the exact count.
"""

from __future__ import annotations

import hashlib
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

ANSWER_MARKER = "####"
SPLITS: tuple[str, ...] = ("train", "valid", "heldout")
STYLES: tuple[str, ...] = ("teacher", "alt")
HELDOUT_MODULUS = 10  # hash(key) % HELDOUT_MODULUS: 0 held out, 1 validation, else train


# --------------------------------------------------------------------------------------------- problems, splits


@dataclass(frozen=True)
class Problem:
    """One generated problem.

    Attributes:
        family: name of the family that made it (a key of ``FAMILIES``).
        prompt: the model's input, e.g. ``"345+678="``.
        answer: the exact final answer, e.g. ``"1023"``.
        data: the family's operands (e.g. ``(345, 678)``); traces are computed from it.
    """

    family: str
    prompt: str
    answer: str
    data: tuple[Any, ...]

    @property
    def key(self) -> str:
        """Canonical string of the problem, ``"<family>:<prompt>"``: its identity and the input of its split hash."""
        return f"{self.family}:{self.prompt}"

    @property
    def split(self) -> str:
        """``"train"``, ``"valid"`` or ``"heldout"`` (see :func:`split_of`)."""
        return split_of(self.key)


def split_of(key: str) -> str:
    """With ``h`` the first 8 bytes of ``sha256(key)`` (big-endian) mod 10: ``"heldout"`` iff ``h == 0``,
    ``"valid"`` iff ``h == 1``, else ``"train"``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return {0: "heldout", 1: "valid"}.get(int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS, "train")


def make_completion(trace: str, answer: str) -> str:
    """``trace + " #### " + answer`` (no EOS: the tokenizer's EOS token follows it in training)."""
    return f"{trace} {ANSWER_MARKER} {answer}"


def extract_answer(completion: object) -> str | None:
    """The text after the last answer marker, stripped; ``None`` without a marker or for a non-string."""
    if not isinstance(completion, str):
        return None
    at = completion.rfind(ANSWER_MARKER)
    if at < 0:
        return None
    return completion[at + len(ANSWER_MARKER):].strip()


def grade(problem: Problem, completion: object) -> float:
    """1.0 iff the text after the LAST ``####`` of ``completion``, stripped, equals ``problem.answer``; else 0.0.

    Never raises on the completion (any string, or even a non-string, which scores 0.0). Pass decoded text
    without special tokens.
    """
    return 1.0 if extract_answer(completion) == problem.answer else 0.0


# --------------------------------------------------------------------------------------------- seeded permutation

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """The splitmix64 finalizer: a cheap, well-mixing 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _Permutation:
    """A keyed pseudorandom bijection of ``range(size)``: 4 Feistel rounds on ``2*half`` bits plus cycle walking."""

    def __init__(self, size: int, key: str) -> None:
        self.size = size
        self.half = (max(2, (size - 1).bit_length()) + 1) // 2
        self.mask = (1 << self.half) - 1
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        self.round_keys = [int.from_bytes(digest[8 * i:8 * i + 8], "big") for i in range(4)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        x = self._encrypt(i)
        while x >= self.size:  # the domain is < 4*size, so a few steps on average
            x = self._encrypt(x)
        return x


# --------------------------------------------------------------------------------------------- the family interface


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r}")  # noqa: TRY004 -- one error type for bad arguments
    return value


class TaskFamily(ABC):
    """A family of problems with a finite, indexable problem space, two trace styles and noisy traces.

    Subclasses set the class attributes and implement :meth:`space_size`, :meth:`problem_at` and :meth:`steps`.
    """

    name: ClassVar[str]
    difficulty_name: ClassVar[str]  # what the difficulty counts, e.g. "digits"
    difficulty_range: ClassVar[tuple[int, int]]  # inclusive
    default_difficulty: ClassVar[int]

    def __init__(self, difficulty: int | None = None) -> None:
        value = self.default_difficulty if difficulty is None else difficulty
        lo, hi = self.difficulty_range
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"family {self.name!r}: difficulty ({self.difficulty_name}) must be an int in "
                             f"[{lo}, {hi}], got {difficulty!r}")
        self.difficulty: int = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.difficulty_name}={self.difficulty})"

    # ---- the problem space

    @abstractmethod
    def space_size(self) -> int:
        """Number of distinct problems at this difficulty (both splits)."""

    @abstractmethod
    def problem_at(self, index: int) -> Problem:
        """The problem of ``index`` in ``range(space_size())``; distinct indices give distinct problems."""

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split``, the same list for the same (difficulty, split, n, seed).

        The list for ``n`` is a prefix of the list for any larger ``n`` (same seed).

        Raises:
            ValueError: unknown split, ``n`` not a non-negative int, a non-int seed, or fewer than ``n`` problems
                in the split (the message names the family and the count).
        """
        if split not in SPLITS:
            raise ValueError(f"family {self.name!r}: split must be one of {list(SPLITS)}, got {split!r}")
        if _check_int(n, "n") < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        _check_int(seed, "seed")
        size = self.space_size()
        if n > size:
            raise ValueError(f"family {self.name!r} ({self.difficulty_name}={self.difficulty}) has only {size} "
                             f"problems in both splits together, fewer than the n={n} asked for {split!r}")
        perm = _Permutation(size, f"{self.name}|{seed}")
        out: list[Problem] = []
        for i in range(size):
            if len(out) == n:
                return out
            problem = self.problem_at(perm(i))
            if problem.split == split:
                out.append(problem)
        if len(out) < n:
            raise ValueError(f"family {self.name!r} ({self.difficulty_name}={self.difficulty}) has only {len(out)} "
                             f"{split!r} problems, fewer than the n={n} asked for")
        return out

    # ---- traces and completions

    @abstractmethod
    def steps(self, problem: Problem, style: str = "teacher") -> list[str]:
        """The trace's steps (each without spaces) in ``style``; the last one holds or implies the answer."""

    def _check(self, problem: Problem, style: str = "teacher") -> None:
        if not isinstance(problem, Problem) or problem.family != self.name:
            got = problem.family if isinstance(problem, Problem) else type(problem).__name__
            raise ValueError(f"family {self.name!r} cannot trace a problem of {got!r}")
        if style not in STYLES:
            raise ValueError(f"family {self.name!r}: style must be one of {list(STYLES)}, got {style!r}")

    def trace(self, problem: Problem, style: str = "teacher") -> str:
        """The reasoning trace in ``style`` (``"teacher"`` or ``"alt"``): its steps joined by single spaces."""
        self._check(problem, style)
        return " ".join(self.steps(problem, style))

    def completion(self, problem: Problem, style: str = "teacher") -> str:
        """``trace + " #### " + answer``: what a model should generate after the prompt."""
        return make_completion(self.trace(problem, style), problem.answer)

    def noisy_trace(self, problem: Problem, noise: float, seed: int = 0) -> str:
        """The teacher trace with each step corrupted independently with probability ``noise`` (seeded).

        Raises:
            ValueError: ``noise`` outside ``[0, 1]`` or not a number, or a non-int seed.
        """
        self._check(problem)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            raise ValueError(f"family {self.name!r}: noise must be a number in [0, 1], got {noise!r}")
        _check_int(seed, "seed")
        rng = random.Random(f"noise|{seed}|{problem.key}")
        out = []
        for step in self.steps(problem, "teacher"):
            u = rng.random()
            corrupted = self._corrupt_step(step, rng)  # drawn always, so noise levels share their draws
            out.append(corrupted if u < noise else step)
        return " ".join(out)

    def noisy_completion(self, problem: Problem, noise: float, seed: int = 0) -> str:
        """``noisy_trace + " #### " + answer`` (the answer stays correct)."""
        return make_completion(self.noisy_trace(problem, noise, seed), problem.answer)

    def grade(self, problem: Problem, completion: object) -> float:
        """Exact-match grade, see :func:`grade`."""
        return grade(problem, completion)

    def _corrupt_step(self, step: str, rng: random.Random) -> str:
        """``step`` with one digit of its result (after its last ``=``) replaced, never by a leading zero."""
        start = step.rfind("=") + 1
        positions = [i for i in range(start, len(step)) if step[i].isdigit()]
        i = rng.choice(positions)
        leading = (i == 0 or not step[i - 1].isdigit()) and i + 1 < len(step) and step[i + 1].isdigit()
        choices = [d for d in ("123456789" if leading else "0123456789") if d != step[i]]
        return step[:i] + rng.choice(choices) + step[i + 1:]


# --------------------------------------------------------------------------------------------- the families


class Addition(TaskFamily):
    """``a+b=`` with ``a, b`` in ``[10, 10**digits)``; see the module docstring for the trace styles."""

    name = "add"
    difficulty_name = "digits"
    difficulty_range = (2, 6)
    default_difficulty = 3

    def _width(self) -> int:
        return 10**self.difficulty - 10

    def space_size(self) -> int:
        return self._width() ** 2

    def problem_at(self, index: int) -> Problem:
        a, b = divmod(index, self._width())
        a, b = a + 10, b + 10
        return Problem(self.name, f"{a}+{b}=", str(a + b), (a, b))

    def steps(self, problem: Problem, style: str = "teacher") -> list[str]:
        a, b = problem.data
        width = max(len(str(a)), len(str(b)))
        xs, ys = str(a).zfill(width), str(b).zfill(width)
        if style == "alt":
            return [f"{int(xs[:k])}+{int(ys[:k])}={int(xs[:k]) + int(ys[:k])}" for k in range(1, width + 1)]
        out, carry = [], 0
        for x, y in zip(map(int, reversed(xs)), map(int, reversed(ys))):
            total = x + y + carry
            out.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
            carry = total // 10
        return out


class ModChain(TaskFamily):
    """``((a op b) op c)%m=`` with ops in ``+*``, operands 1..9, m in 2..9; see the module docstring."""

    name = "modchain"
    difficulty_name = "ops"
    difficulty_range = (2, 6)
    default_difficulty = 2

    OPERANDS: ClassVar[range] = range(1, 10)
    MODULI: ClassVar[range] = range(2, 10)
    OPS: ClassVar[str] = "+*"

    def space_size(self) -> int:
        per_op = len(self.OPS) * len(self.OPERANDS)
        return len(self.MODULI) * len(self.OPERANDS) * per_op**self.difficulty

    def problem_at(self, index: int) -> Problem:
        index, r = divmod(index, len(self.MODULI))
        m = self.MODULI[r]
        index, r = divmod(index, len(self.OPERANDS))
        start = self.OPERANDS[r]
        ops = []
        for _ in range(self.difficulty):
            index, r = divmod(index, len(self.OPS) * len(self.OPERANDS))
            op_i, operand_i = divmod(r, len(self.OPERANDS))
            ops.append((self.OPS[op_i], self.OPERANDS[operand_i]))
        expr, value = str(start), start
        for op, b in ops:
            expr, value = f"({expr}{op}{b})", _apply(op, value, b)
        return Problem(self.name, f"{expr}%{m}=", str(value % m), (start, tuple(ops), m))

    def steps(self, problem: Problem, style: str = "teacher") -> list[str]:
        value, ops, m = problem.data
        out = []
        for op, b in ops:
            result = _apply(op, value, b)
            out.append(f"{value}{op}{b}={result}")
            if style == "teacher":
                out.append(f"{result}%{m}={result % m}")
                result %= m
            value = result
        if style == "alt":
            out.append(f"{value}%{m}={value % m}")
        return out


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a * b


class SortDigits(TaskFamily):
    """``sort 53142=`` -> ``12345``: a list of ``length`` digits 0..9; see the module docstring."""

    name = "sort"
    difficulty_name = "length"
    difficulty_range = (3, 8)
    default_difficulty = 5

    def space_size(self) -> int:
        return 10**self.difficulty

    def problem_at(self, index: int) -> Problem:
        digits = str(index).zfill(self.difficulty)
        return Problem(self.name, f"sort {digits}=", "".join(sorted(digits)), tuple(map(int, digits)))

    def steps(self, problem: Problem, style: str = "teacher") -> list[str]:
        rest = [str(d) for d in problem.data]
        done = ""
        out = []
        for _ in range(len(rest) - 1):
            pick = min(rest) if style == "teacher" else max(rest)
            rest.remove(pick)  # the first occurrence
            if style == "teacher":
                done += pick
                out.append(f"{done}|{''.join(rest)}")
            else:
                done = pick + done
                out.append(f"{''.join(rest)}|{done}")
        return out

    def _corrupt_step(self, step: str, rng: random.Random) -> str:
        """``step`` with one of its digits (anywhere) replaced by a different digit."""
        i = rng.choice([i for i, ch in enumerate(step) if ch.isdigit()])
        return step[:i] + rng.choice([d for d in "0123456789" if d != step[i]]) + step[i + 1:]


FAMILIES: dict[str, type[TaskFamily]] = {cls.name: cls for cls in (Addition, ModChain, SortDigits)}


# --------------------------------------------------------------------------------------------- helpers


def get_family(name: str, difficulty: int | None = None) -> TaskFamily:
    """An instance of the family ``name`` at ``difficulty`` (its default when ``None``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name](difficulty)


def family_of(problem: Problem) -> TaskFamily:
    """The family (default difficulty; traces do not depend on it) that made ``problem``."""
    return get_family(problem.family)


def trace(problem: Problem, style: str = "teacher") -> str:
    """``problem``'s trace in ``style``, whatever its family."""
    return family_of(problem).trace(problem, style)


def completion(problem: Problem, style: str = "teacher") -> str:
    """``problem``'s completion (trace, marker, answer) in ``style``, whatever its family."""
    return family_of(problem).completion(problem, style)


def noisy_completion(problem: Problem, noise: float, seed: int = 0) -> str:
    """``problem``'s noisy teacher completion, whatever its family."""
    return family_of(problem).noisy_completion(problem, noise, seed)


def make_dataset(families: Sequence[str | TaskFamily], split: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems of ``split`` from several families, interleaved round-robin in the order given.

    Family ``i`` of ``k`` contributes ``n // k`` problems, plus one more for ``i < n % k``, drawn with
    ``problems(split, count, seed)``; names use the family's default difficulty, instances their own.

    Raises:
        ValueError: no families, an unknown or repeated family, or any ``problems`` error.
    """
    if isinstance(families, (str, TaskFamily)) or len(families) == 0:
        raise ValueError(f"families must be a non-empty list of family names or instances, got {families!r}")
    fams = [get_family(f) if isinstance(f, str) else f for f in families]
    names = [f.name for f in fams]
    if len(set(names)) != len(names):
        raise ValueError(f"each family may appear once in make_dataset, got {names}")
    _check_int(n, "n")
    k = len(fams)
    lists = [fam.problems(split, n // k + (i < n % k), seed) for i, fam in enumerate(fams)]
    rounds = math.ceil(n / k) if n > 0 else 0
    return [lst[j] for j in range(rounds) for lst in lists if j < len(lst)]
