"""Seeded generator of "write a Python function" problems with hidden unit tests.

Each template is a small family of functions with parameters (a divisor, a shift, a base, ...); a problem is
``template + parameters``. Its tests are computed by a reference implementation run *here* (trusted code) on
inputs drawn from a generator seeded by the problem key, so a problem's tests never depend on the sampling
seed. Tests are in HumanEval style: ``def check(candidate): assert candidate(...) == ...``. The prompt shows
two of the cases as examples; the rest stay hidden.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "orbit", "pixel", "maple", "quartz", "ember",
         "delta", "sky", "fig", "a", "to", "jazz", "north", "violet", "kiwi", "elephant", "umbrella", "horizon",
         "blueberry", "lighthouse", "triangle", "adventure", "octopus", "marmalade", "zebra")


@dataclass(frozen=True)
class Template:
    """A family of function problems.

    ``make(params)`` returns (description, reference implementation); ``inputs(rng, params)`` returns a list
    of argument tuples; ``draw(rng)`` returns parameters.
    """

    name: str
    signature: str
    draw: Callable[[random.Random], tuple]
    make: Callable[[tuple], tuple[str, Callable[..., Any]]]
    inputs: Callable[[random.Random, tuple], list[tuple]]


def _ints(rng: random.Random, lo: int = -20, hi: int = 30, max_len: int = 9) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, max_len))]


def _text(rng: random.Random, max_words: int = 6) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(0, max_words))]
    words = [w.capitalize() if rng.random() < 0.3 else w for w in words]
    return " ".join(words) + (rng.choice(["", "!", ".", "?", " 42", ", ok"]) if words else "")


def _list_cases(rng: random.Random, _params: tuple) -> list[tuple]:
    return [([],), ([5],)] + [(_ints(rng),) for _ in range(6)]


def _soup(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "!,. ") for _ in range(rng.randint(5, 20)))


def _text_cases(rng: random.Random, _params: tuple) -> list[tuple]:
    return [("",), ("Hello, World!",)] + [(_text(rng),) for _ in range(4)] + [(_soup(rng),) for _ in range(3)]


def _sum_divisible(params: tuple):
    k, negate = params
    if negate:
        return (f"returns the sum of the elements of `nums` that are NOT divisible by {k}",
                lambda nums: sum(x for x in nums if x % k != 0))
    return (f"returns the sum of the elements of `nums` that are divisible by {k}",
            lambda nums: sum(x for x in nums if x % k == 0))


def _count_chars(params: tuple):
    (chars,) = params
    shown = ", ".join(repr(c) for c in chars)
    return (f"returns how many characters of `s` are one of {shown} (case-sensitive)",
            lambda s: sum(1 for c in s if c in chars))


def _caesar(params: tuple):
    shift, direction = params
    step = shift if direction == "forward" else -shift

    def ref(s: str) -> str:
        return "".join(chr((ord(c) - 97 + step) % 26 + 97) if "a" <= c <= "z" else c for c in s)

    wrap = "z is followed by a" if direction == "forward" else "a is preceded by z"
    return (f"shifts every lowercase letter a-z of `s` {shift} places {direction} in the alphabet, wrapping around "
            f"({wrap}), and leaves all other characters unchanged", ref)


def _rotate(params: tuple):
    k, side = params

    def ref(xs: list) -> list:
        if not xs:
            return []
        r = k % len(xs)
        return xs[-r:] + xs[:-r] if side == "right" else xs[r:] + xs[:r]

    return (f"returns a new list with the elements of `xs` rotated {k} positions to the {side} "
            "(an empty list stays empty)", ref)


def _recurrence(params: tuple):
    a, b, c = params

    def ref(n: int) -> int:
        value = c
        for _ in range(n):
            value = a * value + b
        return value

    return f"returns f(n) where f(0) = {c} and f(n) = {a} * f(n - 1) + ({b}) for n >= 1", ref


def _fizz(params: tuple):
    a, b, wa, wb = params

    def ref(n: int) -> list:
        out = []
        for i in range(1, n + 1):
            word = (wa if i % a == 0 else "") + (wb if i % b == 0 else "")
            out.append(word or str(i))
        return out

    return (f"returns a list of strings for the numbers 1..n: \"{wa}\" for multiples of {a}, \"{wb}\" for multiples "
            f"of {b}, \"{wa}{wb}\" for multiples of both, and the number itself (as a string) otherwise", ref)


def _digit_sum(params: tuple):
    (base,) = params

    def ref(n: int) -> int:
        total, n = 0, abs(n)
        while n:
            n, digit = divmod(n, base)
            total += digit
        return total

    return f"returns the sum of the digits of abs(n) written in base {base}", ref


def _long_words(params: tuple):
    k, strict = params
    relation = "more than" if strict else "at least"

    def ref(s: str) -> int:
        words = "".join(c if c.isalpha() else " " for c in s).split()
        return sum(1 for w in words if (len(w) > k if strict else len(w) >= k))

    return (f"returns how many words of `s` have {relation} {k} letters, where a word is a maximal run of letters", ref)


def _kth_largest(params: tuple):
    k, default = params

    def ref(xs: list):
        distinct = sorted(set(xs), reverse=True)
        return distinct[k - 1] if len(distinct) >= k else default

    return (f"returns the {k}{['st', 'nd', 'rd', 'th'][min(k, 4) - 1]} largest DISTINCT value in `xs`, or {default!r} "
            f"if there are fewer than {k} distinct values", ref)


def _rle(params: tuple):
    (style,) = params

    def ref(s: str) -> str:
        out, i = [], 0
        while i < len(s):
            j = i
            while j < len(s) and s[j] == s[i]:
                j += 1
            out.append(f"{s[i]}{j - i}" if style == "char-count" else f"{j - i}{s[i]}")
            i = j
        return "".join(out)

    example = "a3b1" if style == "char-count" else "3a1b"
    return (f"returns the run-length encoding of `s`: each run of equal characters becomes "
            f"{'the character then the run length' if style == 'char-count' else 'the run length then the character'} "
            f"(e.g. \"aaab\" -> \"{example}\")", ref)


def _rle_cases(rng: random.Random, _params: tuple) -> list[tuple]:
    runs = lambda: "".join(rng.choice("abcz ") * rng.randint(1, 4) for _ in range(rng.randint(1, 5)))  # noqa: E731
    return [("",), ("aaab",)] + [(runs(),) for _ in range(6)]


def _clamp_sum(params: tuple):
    lo, hi = params
    return (f"returns the sum of the elements of `nums` after clamping each one into the range [{lo}, {hi}] "
            f"(values below {lo} count as {lo}, values above {hi} count as {hi})",
            lambda nums: sum(min(max(x, lo), hi) for x in nums))


def _pair_count(params: tuple):
    (target,) = params
    return (f"returns the number of index pairs (i, j) with i < j such that nums[i] + nums[j] == {target}",
            lambda nums: sum(1 for i in range(len(nums)) for j in range(i + 1, len(nums))
                             if nums[i] + nums[j] == target))


def _pair_cases(rng: random.Random, params: tuple) -> list[tuple]:
    return [([],), ([params[0], 0],)] + [([rng.randint(-5, 15) for _ in range(rng.randint(2, 9))],) for _ in range(6)]


def _window_max(params: tuple):
    (k,) = params

    def ref(nums: list) -> int:
        if len(nums) < k:
            return 0
        return max(sum(nums[i:i + k]) for i in range(len(nums) - k + 1))

    return (f"returns the largest sum of {k} consecutive elements of `nums`, or 0 if `nums` has fewer than {k} "
            "elements", ref)


def _dedupe_mod(params: tuple):
    (m,) = params

    def ref(nums: list) -> list:
        seen, out = set(), []
        for x in nums:
            if x % m not in seen:
                seen.add(x % m)
                out.append(x)
        return out

    return (f"returns the elements of `nums` in order, keeping only the first element of each remainder class "
            f"modulo {m} "
            f"(Python's % operator)", ref)


def _small_ints(rng: random.Random, _params: tuple) -> list[tuple]:
    return [(0,), (1,)] + [(n,) for n in rng.sample(range(2, 13), 5)]


def _numbers(rng: random.Random, _params: tuple) -> list[tuple]:
    return [(0,), (7,)] + [(rng.randint(-10**6, 10**6),) for _ in range(6)]


def _fizz_cases(rng: random.Random, _params: tuple) -> list[tuple]:
    return [(0,), (1,)] + [(n,) for n in rng.sample(range(2, 40), 4)]


_FIZZ_WORDS = ("Fizz", "Buzz", "Bang", "Pop", "Zip", "Zap")

TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("sum_divisible", "sum_divisible(nums: list[int]) -> int",
             lambda r: (r.randint(2, 13), r.random() < 0.5), _sum_divisible, _list_cases),
    Template("count_chars", "count_chars(s: str) -> int",
             lambda r: ("".join(sorted(r.sample(string.ascii_letters + string.digits + "!,. ", 3))),),
             _count_chars, _text_cases),
    Template("caesar", "caesar(s: str) -> str",
             lambda r: (r.randint(1, 25), r.choice(("forward", "backward"))), _caesar, _text_cases),
    Template("rotate", "rotate(xs: list[int]) -> list[int]",
             lambda r: (r.randint(1, 9), r.choice(("left", "right"))), _rotate, _list_cases),
    Template("recurrence", "recurrence(n: int) -> int",
             lambda r: (r.randint(1, 4), r.randint(-3, 5), r.randint(0, 5)), _recurrence, _small_ints),
    Template("fizz", "fizz(n: int) -> list[str]",
             lambda r: (*sorted(r.sample(range(2, 10), 2)), *r.sample(_FIZZ_WORDS, 2)), _fizz, _fizz_cases),
    Template("digit_sum", "digit_sum(n: int) -> int", lambda r: (r.randint(2, 16),), _digit_sum, _numbers),
    Template("long_words", "long_words(s: str) -> int",
             lambda r: (r.randint(2, 7), r.random() < 0.5), _long_words, _text_cases),
    Template("kth_largest", "kth_largest(xs: list[int])",
             lambda r: (r.randint(1, 4), r.choice((None, 0, -1))), _kth_largest, _list_cases),
    Template("rle", "rle(s: str) -> str", lambda r: (r.choice(("char-count", "count-char")),), _rle, _rle_cases),
    Template("clamp_sum", "clamp_sum(nums: list[int]) -> int",
             lambda r: (r.randint(-10, 0), r.randint(1, 15)), _clamp_sum, _list_cases),
    Template("pair_count", "pair_count(nums: list[int]) -> int", lambda r: (r.randint(-5, 20),),
             _pair_count, _pair_cases),
    Template("window_max", "window_max(nums: list[int]) -> int", lambda r: (r.randint(1, 6),),
             _window_max, _list_cases),
    Template("dedupe_mod", "dedupe_mod(nums: list[int]) -> list[int]", lambda r: (r.randint(2, 10),),
             _dedupe_mod, _list_cases),
]}


@dataclass(frozen=True)
class CodeProblem:
    """One generated problem: canonical key, prompt text, tests and entry point."""

    key: str
    prompt: str
    tests: str
    entry_point: str
    template: str


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


@lru_cache(maxsize=4096)
def build_problem(template: Template, params: tuple) -> CodeProblem:
    """The problem of ``template`` with ``params``: tests from the reference implementation, prompt (cached)."""
    key = f"{template.name}|" + ",".join(repr(p) for p in params)
    description, reference = template.make(params)
    case_rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    cases, seen = [], set()
    for args in template.inputs(case_rng, params):
        if repr(args) not in seen:
            seen.add(repr(args))
            cases.append((args, reference(*args)))
    name = template.name
    lines = ["def check(candidate):"]
    lines += [f"    assert {_call('candidate', args)} == {expected!r}" for args, expected in cases]
    tests = "\n".join(lines) + "\n"
    shown = [c for c in cases if c[0][0] not in ([], "", 0)][:2]
    examples = "\n".join(f">>> {_call(name, args)}\n{expected!r}" for args, expected in shown)
    prompt = (f"Write a Python function `{template.signature}` that {description}.\n\n"
              f"Examples:\n{examples}\n\n"
              f"Use only the standard library. Reply with the complete function in a single ```python code block.")
    return CodeProblem(key, prompt, tests, name, template.name)


def is_degenerate(problem: CodeProblem) -> bool:
    """Whether every test expects the same value (a constant function would pass)."""
    expected = [line.split(" == ", 1)[1] for line in problem.tests.splitlines() if " == " in line]
    return len(set(expected)) < 2


def sample_problem(rng: random.Random) -> CodeProblem | None:
    """Draw one problem: a template, then its parameters (``None`` for a degenerate draw: draw again)."""
    template = TEMPLATES[rng.choice(sorted(TEMPLATES))]
    problem = build_problem(template, template.draw(rng))
    return None if is_degenerate(problem) else problem
