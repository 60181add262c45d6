"""Seeded generator of multi-step arithmetic word problems (GSM8K-like) with exact answers.

Ten templates (shopping, wages, travel, ages, garden, recipe, classroom, savings, tank, packing), each at
three difficulty levels: level 1 takes two or three steps, level 3 four or more. All arithmetic is exact
(:class:`fractions.Fraction`); a draw whose answer is not a whole number or a short terminating decimal is
rejected. A problem's identity (its split and id) is ``template|level|numbers``; names and items are decoration.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Elena", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zoe")
GOODS = (("notebooks", "pens"), ("apples", "pears"), ("T-shirts", "caps"), ("books", "bookmarks"),
         ("cupcakes", "cookies"), ("tickets", "programs"), ("plants", "pots"), ("batteries", "bulbs"))
PACKED = ("oranges", "eggs", "muffins", "candles", "soaps", "jars of jam")
CHORES = ("tutoring", "dog walking", "gardening", "waiting tables", "delivering groceries")


@dataclass(frozen=True)
class MathProblem:
    """One generated problem: canonical key, text, exact answer, template and level."""

    key: str
    text: str
    answer: Fraction
    template: str
    level: int


def format_number(value: Fraction) -> str:
    """Exact decimal text of a fraction with a terminating expansion (``7``, ``12.5``), else ``p/q``."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = 0
    while (value * 10**places).denominator != 1:
        places += 1
    text = f"{float(value):.{places}f}"
    assert Fraction(text) == value
    return text


def _nice(value: Fraction) -> bool:
    """Whole, or at most two decimal places, and positive."""
    return value > 0 and (value * 100).denominator == 1


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _money(value: Fraction | int) -> str:
    return "$" + format_number(Fraction(value))


def _shopping(rng: random.Random, level: int):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    p, q = rng.randint(2, 20), rng.randint(1, 12)
    name, (item1, item2) = rng.choice(NAMES), rng.choice(GOODS)
    total = Fraction(a * p + b * q)
    text = f"{name} buys {a} {item1} at {_money(p)} each and {b} {item2} at {_money(q)} each."
    if level == 1:
        return (a, p, b, q), text + f" How many dollars does {name} spend in total?", total
    d = rng.choice((10, 20, 25, 50)) if level == 3 else 0
    due = total * (100 - d) / 100
    bill = next(x for x in (20, 50, 100, 200, 500) if x > due)
    if level == 3:
        text += f" A coupon takes {d}% off the whole purchase."
    text += f" {name} pays with a {_money(bill)} bill. How much change, in dollars, does {name} get back?"
    return (a, p, b, q, d, bill), text, bill - due


def _wages(rng: random.Random, level: int):
    h, d, r = rng.randint(3, 10), rng.randint(2, 7), rng.randint(8, 30)
    name, chore = rng.choice(NAMES), rng.choice(CHORES)
    earned = Fraction(h * d * r)
    text = f"{name} earns {_money(r)} an hour {chore}. {name} works {h} hours a day for {d} days."
    if level == 1:
        return (h, d, r), text + f" How many dollars does {name} earn?", earned
    k = rng.choice((2, 3, 4, 5))
    left = earned - earned / k
    text += f" {name} spends 1/{k} of the money on a new phone case and rent for a locker."
    if level == 2:
        return (h, d, r, k), text + " How many dollars are left?", left
    pct = rng.choice((10, 20, 25, 40, 50))
    text += f" {name} then puts {pct}% of what is left into a savings account. How many dollars does {name} save?"
    return (h, d, r, k, pct), text, left * pct / 100


def _travel(rng: random.Random, level: int):
    v1, v2 = rng.randrange(30, 95, 5), rng.randrange(30, 95, 5)
    t1, t2 = rng.randint(1, 5), rng.randint(1, 4)
    name = rng.choice(NAMES)
    dist = Fraction(v1 * t1 + v2 * t2)
    text = f"{name} drives at {v1} km/h for {_count(t1, 'hour')}, then at {v2} km/h for {_count(t2, 'hour')}."
    if level == 1:
        return (v1, t1, v2, t2), text + f" How many kilometres does {name} drive in total?", dist
    v3 = rng.randrange(40, 125, 5)
    back = dist / v3
    text += f" {name} then drives straight back home the same way at {v3} km/h."
    if level == 2:
        return (v1, t1, v2, t2, v3), text + " How many hours does the drive back take?", back
    avg = 2 * dist / (t1 + t2 + back)
    return (v1, t1, v2, t2, v3), text + " What is the average speed, in km/h, over the whole round trip?", avg


def _ages(rng: random.Random, level: int):
    young, k, n = rng.randint(3, 15), rng.randint(2, 5), rng.randint(2, 12)
    a, b = rng.sample(NAMES, 2)
    old = k * young
    if level == 1:
        text = f"{a} is {k} times as old as {b}. {b} is {young} years old. How old will {a} be in {n} years?"
        return (young, k, n), text, Fraction(old + n)
    text = f"In {n} years, {a} will be {old + n} years old. Today {a} is {k} times as old as {b}."
    if level == 2:
        return (young, k, n), text + f" How old is {b} today?", Fraction(young)
    m = rng.randint(2, 20)
    return (young, k, n, m), text + f" What will be the sum of their ages in {m} years?", Fraction(old + young + 2 * m)


def _garden(rng: random.Random, level: int):
    length, width = rng.randint(5, 30), rng.randint(3, 20)
    fence = rng.randint(2, 15)
    name = rng.choice(NAMES)
    text = f"{name}'s rectangular garden is {length} m long and {width} m wide."
    fencing = Fraction(2 * (length + width) * fence)
    if level == 1:
        question = (f" Fencing costs {_money(fence)} per metre. How many dollars does it cost to fence the whole "
                    "garden?")
        return (length, width, fence), text + question, fencing
    side = rng.randint(1, min(length, width) - 1)
    seed = rng.randint(1, 6)
    sowing = Fraction((length * width - side * side) * seed)
    text += (f" A square patio {side} m on each side is built in it, and the rest of the garden is sown with "
             f"grass seed costing {_money(seed)} per square metre.")
    if level == 2:
        return (length, width, side, seed), text + " How many dollars does the grass seed cost?", sowing
    return ((length, width, side, seed, fence),
            text + f" The garden is also fenced all around at {_money(fence)} per metre. What is the total cost in "
                   "dollars of the seed and the fence?",
            sowing + fencing)


def _recipe(rng: random.Random, level: int):
    cups, batch = rng.randint(2, 6), rng.choice((6, 8, 10, 12, 16, 20, 24))
    want = batch * rng.randint(2, 6) // rng.choice((1, 2))
    name = rng.choice(NAMES)
    need = Fraction(cups * want, batch)
    text = f"A recipe uses {cups} cups of flour to make {batch} cookies."
    if level == 1:
        return (cups, batch, want), text + f" How many cups of flour are needed for {want} cookies?", need
    have = rng.randint(1, max(1, math.floor(need) - 1))
    more = need - have
    text += f" {name} wants to bake {want} cookies and has {_count(have, 'cup')} of flour."
    if level == 2:
        return (cups, batch, want, have), text + f" How many more cups of flour does {name} need?", more
    bag = rng.choice((2, 3, 4, 5))
    return ((cups, batch, want, have, bag),
            text + f" Flour is sold in bags of {bag} cups. How many bags must {name} buy to have enough?",
            Fraction(math.ceil(more / bag)))


def _classroom(rng: random.Random, level: int):
    pct = rng.choice((25, 40, 50, 60, 75, 20, 30, 70))
    k = rng.choice((2, 3, 4, 5))
    # people come in whole numbers: only class sizes that give whole numbers of girls and soccer players
    sizes = [t for t in range(16, 49) if t * pct % 100 == 0 and (t - t * pct // 100) % k == 0]
    if not sizes:
        return None
    total = rng.choice(sizes)
    girls = Fraction(total * pct, 100)
    boys = total - girls
    players = boys / k
    text = f"A class has {total} students, and {pct}% of them are girls."
    if level == 1:
        return (total, pct), text + " How many boys are in the class?", boys
    text += f" One in every {k} boys plays soccer."
    if level == 2:
        return (total, pct, k), text + " How many boys do not play soccer?", boys - players
    balls, price = rng.randint(0, 3), rng.randint(5, 25)
    has = "no balls" if balls == 0 else _count(balls, "ball")
    return ((total, pct, k, balls, price),
            text + f" Every soccer player needs a ball; the school already has {has} and a new one costs "
                   f"{_money(price)}. How many dollars must the school spend?",
            (players - balls) * price)


def _savings(rng: random.Random, level: int):
    have, weekly, price = rng.randint(5, 60), rng.randint(5, 25), rng.randint(80, 400)
    name = rng.choice(NAMES)
    text = f"{name} has {_money(have)} saved and saves {_money(weekly)} every week. A bike costs {_money(price)}."
    if level == 1:
        weeks = Fraction(math.ceil((price - have) / weekly))
        return (have, weekly, price), text + f" How many weeks must {name} save to afford the bike?", weeks
    gift = rng.randint(10, 50)
    text += f" For a birthday, {name} also gets {_money(gift)} today."
    if level == 2:
        return ((have, weekly, price, gift), text + " How many weeks must they save to afford the bike?",
                Fraction(math.ceil((price - have - gift) / weekly)))
    rise = rng.choice((10, 20, 25, 50))
    new_price = Fraction(price * (100 + rise), 100)
    return ((have, weekly, price, gift, rise),
            text + f" Before {name} buys it, the price of the bike goes up by {rise}%. How many weeks of saving "
                   f"does {name} need to afford it?",
            Fraction(math.ceil((new_price - have - gift) / weekly)))


def _tank(rng: random.Random, level: int):
    fill, leak = rng.randint(6, 30), rng.randint(1, 5)
    net = fill - leak
    minutes = rng.randint(4, 30)
    volume = net * minutes
    text = (f"A tank holds {volume} litres. A pipe fills it at {fill} litres per minute, but a leak drains {leak} "
            "litres per minute.")
    if level == 1:
        question = " Starting empty, how many minutes does it take to fill the tank?"
        return (volume, fill, leak), text + question, Fraction(minutes)
    pct = rng.choice((10, 20, 25, 40, 50, 60, 75))
    text += f" The tank is already {pct}% full."
    if level == 2:
        remaining = Fraction(volume * (100 - pct), 100 * net)
        return (volume, fill, leak, pct), text + " How many minutes until it is full?", remaining
    extra = rng.randint(2, 20)
    return ((volume, fill, leak, pct, extra),
            text + f" A second pipe that adds {extra} litres per minute is opened too. How many minutes until the "
                   "tank is full?",
            Fraction(volume * (100 - pct), 100 * (net + extra)))


def _packing(rng: random.Random, level: int):
    items, size = rng.randint(40, 400), rng.choice((6, 8, 10, 12, 15, 20, 24))
    box_price = rng.randint(5, 40)
    thing, name = rng.choice(PACKED), rng.choice(NAMES)
    boxes, loose = divmod(items, size)
    text = (f"{name} packs {items} {thing} into boxes of {size}, filling as many boxes as possible. Each full box "
            f"sells for {_money(box_price)}.")
    if level == 1:
        question = " How many dollars does selling all the full boxes bring in?"
        return (items, size, box_price), text + question, Fraction(boxes * box_price)
    each = rng.randint(1, 4)
    text += f" The {thing} that do not fill a box are sold for {_money(each)} each."
    total = Fraction(boxes * box_price + loose * each)
    if level == 2:
        return (items, size, box_price, each), text + " How many dollars does everything bring in?", total
    cost = rng.randint(1, 3)
    return ((items, size, box_price, each, cost),
            text + f" Each empty box costs {_money(cost)}. How many dollars of profit are left after paying for the "
                   "boxes used?",
            total - boxes * cost)


# A template returns (numbers, text, exact answer), or None when the draw makes no sense (e.g. 8.4 boys).
TEMPLATES: dict[str, Callable[[random.Random, int], tuple | None]] = {
    "shopping": _shopping, "wages": _wages, "travel": _travel, "ages": _ages, "garden": _garden,
    "recipe": _recipe, "classroom": _classroom, "savings": _savings, "tank": _tank, "packing": _packing,
}
LEVELS = (1, 2, 3)


def sample_problem(rng: random.Random, levels: tuple[int, ...] = LEVELS) -> MathProblem | None:
    """Draw one problem (``None`` when the draw has no short exact answer: draw again)."""
    template = rng.choice(sorted(TEMPLATES))
    level = rng.choice(levels)
    drawn = TEMPLATES[template](rng, level)
    if drawn is None:
        return None
    params, text, answer = drawn
    answer = Fraction(answer)
    if not _nice(answer):
        return None
    key = f"{template}|{level}|" + ",".join(str(p) for p in params)
    return MathProblem(key, text, answer, template, level)


PROMPT_SUFFIX = ("\n\nSolve the problem step by step. Put the final answer, a number only, in \\boxed{}.")
