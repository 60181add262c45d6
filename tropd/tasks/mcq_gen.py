"""Seeded generator of STEM multiple-choice questions with one correct option among four shuffled ones.

Families: unit conversions (length, mass, time, volume, speed, temperature), physics formulas (force,
kinetic and potential energy, speed, Ohm's law, power, density, work, pressure, momentum), chemistry
(moles, mass from moles, molarity) and arithmetic facts (percentages, gcd/lcm, powers, squares, circle area
in terms of pi). Correct values are exact (:class:`fractions.Fraction`); the three distractors come from
typical mistakes (inverted formula, wrong factor, off by ten, forgotten unit conversion). A draw whose four
options are not distinct is rejected. A problem's identity is ``family|numbers``; the option order is decoration.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from tropd.tasks.math_gen import format_number

LETTERS = "ABCD"


def fmt(value: Fraction | int | float) -> str:
    """Exact text for short terminating values, else 4 significant digits."""
    value = Fraction(value)
    if (value * 10**4).denominator == 1:
        return format_number(value)
    return f"{float(value):.4g}"


@dataclass(frozen=True)
class MCQProblem:
    """One generated question: canonical key, stem, options (correct first, before shuffling), family."""

    key: str
    question: str
    correct: str
    distractors: tuple[str, str, str]
    family: str


# params, question, correct value, distractor values, unit of the options
Draw = tuple[tuple, str, "Fraction | str", list, str]

CONVERSIONS = (  # (quantity, from unit, to unit, factor)
    ("length", "km", "m", Fraction(1000)), ("length", "m", "cm", Fraction(100)), ("length", "cm", "mm", Fraction(10)),
    ("length", "inches", "cm", Fraction(254, 100)), ("length", "feet", "inches", Fraction(12)),
    ("length", "miles", "km", Fraction(1609344, 1000000)),
    ("mass", "kg", "g", Fraction(1000)), ("mass", "g", "mg", Fraction(1000)), ("mass", "tonnes", "kg", Fraction(1000)),
    ("time", "hours", "minutes", Fraction(60)), ("time", "minutes", "seconds", Fraction(60)),
    ("time", "days", "hours", Fraction(24)), ("volume", "litres", "mL", Fraction(1000)),
    ("volume", "cubic metres", "litres", Fraction(1000)),
)


def _conversion(rng: random.Random) -> Draw:
    i = rng.randrange(len(CONVERSIONS))
    _, src, dst, factor = CONVERSIONS[i]
    value = Fraction(rng.choice((1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 25)), rng.choice((1, 1, 2, 4)))
    if rng.random() < 0.5:  # the reverse direction
        src, dst, factor = dst, src, 1 / factor
        value = value * rng.choice((10, 100, 1000, 60, 24, 12))
    answer = value * factor
    question = f"Convert {fmt(value)} {src} to {dst}."
    return (i, src, value), question, answer, [value / factor, answer * 10, answer / 10], dst


def _speed_units(rng: random.Random) -> Draw:
    kmh = 18 * rng.randint(1, 10)
    answer = Fraction(kmh * 1000, 3600)
    question = f"A car moves at {kmh} km/h. What is its speed in m/s?"
    return (kmh,), question, answer, [Fraction(kmh * 3600, 1000), Fraction(kmh, 60), answer * 10], "m/s"


def _temperature(rng: random.Random) -> Draw:
    celsius = 5 * rng.randint(-8, 24)
    if rng.random() < 0.5:
        f = Fraction(celsius * 9, 5) + 32
        question = f"What is {celsius} °C in degrees Fahrenheit?"
        return (celsius, "F"), question, f, [Fraction(celsius * 5, 9) + 32, Fraction(celsius * 9, 5), f + 32], "°F"
    k = celsius + Fraction(27315, 100)
    question = f"What is {celsius} °C in kelvin?"
    return (celsius, "K"), question, k, [celsius - Fraction(27315, 100), k + 100, Fraction(celsius + 273)], "K"


def _two(rng: random.Random, lo: int = 2, hi: int = 20) -> tuple[Fraction, Fraction]:
    return Fraction(rng.randint(lo, hi)), Fraction(rng.randint(lo, hi))


def _force(rng: random.Random) -> Draw:
    m, a = _two(rng)
    question = f"A {fmt(m)} kg object accelerates at {fmt(a)} m/s². What is the net force on it?"
    return (m, a), question, m * a, [m / a, m + a, m * a * 10], "N"


def _kinetic(rng: random.Random) -> Draw:
    m, v = _two(rng)
    question = f"What is the kinetic energy of a {fmt(m)} kg ball moving at {fmt(v)} m/s?"
    return (m, v), question, m * v * v / 2, [m * v * v, m * v / 2, m * v], "J"


def _avg_speed(rng: random.Random) -> Draw:
    t = Fraction(rng.randint(2, 20))
    v = Fraction(rng.randint(2, 15))
    d = v * t
    question = f"A runner covers {fmt(d)} m in {fmt(t)} s. What is the average speed?"
    return (d, t), question, v, [d * t, t / d, v * 10], "m/s"


def _ohm(rng: random.Random) -> Draw:
    i, r = _two(rng, 1, 12)
    question = f"A current of {fmt(i)} A flows through a {fmt(r)} Ω resistor. What is the voltage across it?"
    return (i, r), question, i * r, [i / r, r / i, i + r], "V"


def _power(rng: random.Random) -> Draw:
    v, i = Fraction(rng.choice((5, 6, 9, 12, 24, 110, 230))), Fraction(rng.randint(1, 10))
    question = f"A device draws {fmt(i)} A at {fmt(v)} V. What power does it use?"
    return (v, i), question, v * i, [v / i, v + i, v * i * 10], "W"


def _density(rng: random.Random) -> Draw:
    rho, vol = _two(rng, 1, 12)
    mass = rho * vol
    question = f"A block has a mass of {fmt(mass)} g and a volume of {fmt(vol)} cm³. What is its density?"
    return (mass, vol), question, rho, [mass * vol, vol / mass, rho * 10], "g/cm³"


def _work(rng: random.Random) -> Draw:
    f, d = _two(rng)
    question = f"A constant force of {fmt(f)} N pushes a box {fmt(d)} m along the force. How much work is done?"
    return (f, d), question, f * d, [f / d, f + d, f * d / 2], "J"


def _pressure(rng: random.Random) -> Draw:
    p, area = Fraction(rng.randint(2, 50)), Fraction(rng.choice((2, 4, 5, 10)))
    force = p * area
    question = f"A force of {fmt(force)} N acts evenly on an area of {fmt(area)} m². What is the pressure?"
    return (force, area), question, p, [force * area, area / force, p * 10], "Pa"


def _potential(rng: random.Random) -> Draw:
    m, h = _two(rng, 1, 10)
    g = Fraction(98, 10)
    question = (f"Taking g = 9.8 m/s², what is the gravitational potential energy of a {fmt(m)} kg mass raised "
                f"{fmt(h)} m?")
    return (m, h), question, m * g * h, [m * h, m * g * h * 10, m * g / h], "J"


def _momentum(rng: random.Random) -> Draw:
    m, v = _two(rng)
    question = f"What is the momentum of a {fmt(m)} kg cart moving at {fmt(v)} m/s?"
    return (m, v), question, m * v, [m * v * v / 2, m / v, m + v], "kg·m/s"


MOLAR = {"water (H2O)": 18, "carbon dioxide (CO2)": 44, "methane (CH4)": 16, "oxygen gas (O2)": 32,
         "ammonia (NH3)": 17, "glucose (C6H12O6)": 180, "calcium carbonate (CaCO3)": 100,
         "sodium chloride (NaCl)": Fraction(117, 2)}


def _moles(rng: random.Random) -> Draw:
    name = rng.choice(sorted(MOLAR))
    molar = Fraction(MOLAR[name])
    n = Fraction(rng.choice((1, 2, 3, 4, 5, 6, 8, 10)), rng.choice((1, 2, 4)))
    mass = n * molar
    if rng.random() < 0.5:
        return ((name, mass), f"How many moles are in {fmt(mass)} g of {name} (molar mass {fmt(molar)} g/mol)?",
                n, [mass * molar, molar / mass, n * 2], "mol")
    return ((name, n, "mass"), f"What is the mass of {fmt(n)} mol of {name} (molar mass {fmt(molar)} g/mol)?",
            mass, [n / molar, molar / n, mass * 10], "g")


def _molarity(rng: random.Random) -> Draw:
    n = Fraction(rng.choice((1, 2, 3, 4, 5)), rng.choice((1, 2, 4, 10)))
    ml = rng.choice((100, 200, 250, 400, 500, 1000, 2000))
    conc = n / Fraction(ml, 1000)
    question = f"{fmt(n)} mol of salt is dissolved to make {ml} mL of solution. What is the concentration?"
    return (n, ml), question, conc, [n / ml, n * ml / 1000, conc * 10], "mol/L"


def _percent(rng: random.Random) -> Draw:
    p, base = rng.choice((5, 10, 12, 15, 20, 25, 30, 40, 60, 75, 120)), rng.randint(2, 60) * 10
    answer = Fraction(p * base, 100)
    return (p, base), f"What is {p}% of {base}?", answer, [answer * 10, Fraction(base * 100, p), base - answer], ""


def _gcd_lcm(rng: random.Random) -> Draw:
    a, b = rng.randint(4, 60), rng.randint(4, 60)
    if rng.random() < 0.5:
        g = math.gcd(a, b)
        question = f"What is the greatest common divisor of {a} and {b}?"
        return (a, b, "gcd"), question, Fraction(g), [a * b // g, g * 2, abs(a - b) or a + b], ""
    lcm = a * b // math.gcd(a, b)
    question = f"What is the least common multiple of {a} and {b}?"
    return (a, b, "lcm"), question, Fraction(lcm), [math.gcd(a, b), a * b * 2, a + b], ""


def _power_of(rng: random.Random) -> Draw:
    base, exp = rng.randint(2, 9), rng.randint(2, 6)
    question = f"What is {base}^{exp}?"
    return (base, exp), question, Fraction(base**exp), [base * exp, base ** (exp - 1), base ** (exp + 1)], ""


def _circle(rng: random.Random) -> Draw:
    r = rng.randint(2, 15)
    question = f"What is the area of a circle of radius {r} cm?"
    return ((r,), question, f"{r * r}π", [f"{2 * r}π", f"{r}π", f"{2 * r * r}π"], "cm²")


FAMILIES: dict[str, Callable[[random.Random], Draw]] = {
    "conversion": _conversion, "speed_units": _speed_units, "temperature": _temperature,
    "force": _force, "kinetic_energy": _kinetic, "average_speed": _avg_speed, "ohm": _ohm, "power": _power,
    "density": _density, "work": _work, "pressure": _pressure, "potential_energy": _potential,
    "momentum": _momentum, "moles": _moles, "molarity": _molarity, "percent": _percent, "gcd_lcm": _gcd_lcm,
    "power_of": _power_of, "circle_area": _circle,
}


def _with_unit(value: Fraction | str | int, unit: str) -> str:
    text = value if isinstance(value, str) else fmt(value)
    return f"{text} {unit}".strip()


def sample_problem(rng: random.Random) -> MCQProblem | None:
    """Draw one question (``None`` when its options are not four distinct positive values: draw again)."""
    family = rng.choice(sorted(FAMILIES))
    params, question, correct, wrong, unit = FAMILIES[family](rng)
    if any(not isinstance(v, str) and Fraction(v) <= 0 for v in [correct, *wrong]) and family != "temperature":
        return None
    options = [_with_unit(v, unit) for v in [correct, *wrong]]
    if len(set(options)) != 4:
        return None
    key = f"{family}|" + ",".join(str(p) for p in params)
    return MCQProblem(key, question, options[0], (options[1], options[2], options[3]), family)


def render(problem: MCQProblem, rng: random.Random) -> tuple[str, str, list[str]]:
    """Shuffle the options; return (prompt text, correct letter, options in letter order)."""
    options = [problem.correct, *problem.distractors]
    rng.shuffle(options)
    letter = LETTERS[options.index(problem.correct)]
    lines = "\n".join(f"{LETTERS[i]}) {option}" for i, option in enumerate(options))
    prompt = (f"{problem.question}\n\n{lines}\n\n"
              "Think it through, then finish with a line of the form \"Answer: X\", where X is the letter of the "
              "correct option.")
    return prompt, letter, options
