"""Generate demo_arith.jsonl: SVAMP-style one- and two-step arithmetic word problems with equations.

Written for this project (templates below, numbers drawn from a seeded generator), not taken from any
benchmark. Rows use SVAMP's field layout (ID, Body, Question, Equation, Answer, Type), so the svamp task
reads the file as it is; every answer is a whole number. Re-running reproduces the file byte for byte:

    python -m undo_jax.data.make_demo            # writes undo_jax/data/demo_arith.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from fractions import Fraction
from pathlib import Path

NAMES = ["Anna", "Ben", "Carla", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]

# (type, body, question, equation); {a}, {b}, {c} are numbers, {n} a name. Division templates make a = b * q.
TEMPLATES = [
    ("Addition", "{n} has {a} stickers. A friend gives {n} {b} more stickers.", "How many stickers does {n} have now?",
     "a + b"),
    ("Addition", "A baker made {a} muffins in the morning and {b} muffins in the afternoon.",
     "How many muffins did the baker make in all?", "a + b"),
    ("Addition", "There are {a} red cars and {b} blue cars in a parking lot.", "How many cars are there in total?",
     "a + b"),
    ("Addition", "{n} read {a} pages on Monday and {b} pages on Tuesday.", "How many pages did {n} read?", "a + b"),
    ("Addition", "A farm has {a} hens. The farmer buys {b} more hens.", "How many hens does the farm have now?",
     "a + b"),
    ("Subtraction", "{n} had {a} marbles and lost {b} of them.", "How many marbles does {n} have left?", "a - b"),
    ("Subtraction", "A shop had {a} apples. It sold {b} apples today.", "How many apples are left in the shop?",
     "a - b"),
    ("Subtraction", "A book costs {a} dollars. {n} has a coupon for {b} dollars off.",
     "How much does {n} pay for the book?", "a - b"),
    ("Subtraction", "{n} has {a} balloons and {b} of them pop.", "How many balloons are still whole?", "a - b"),
    ("Subtraction", "A tank holds {a} liters of water. {b} liters leak out.", "How many liters remain in the tank?",
     "a - b"),
    ("Subtraction", "{n} scored {a} points and a friend scored {b} points.",
     "How many more points did {n} score than the friend?", "a - b"),
    ("Multiplication", "Each box holds {a} pencils. {n} has {b} boxes.", "How many pencils does {n} have?", "a * b"),
    ("Multiplication", "A garden has {a} rows with {b} tulips in each row.", "How many tulips are in the garden?",
     "a * b"),
    ("Multiplication", "{n} walks {a} kilometers every day for {b} days.", "How many kilometers does {n} walk?",
     "a * b"),
    ("Multiplication", "A ticket costs {a} dollars. A class buys {b} tickets.", "How much does the class pay?",
     "a * b"),
    ("Common-Division", "{n} shares {a} cookies equally among {b} friends.", "How many cookies does each friend get?",
     "a / b"),
    ("Common-Division", "A rope is {a} meters long and is cut into {b} equal pieces.", "How long is each piece?",
     "a / b"),
    ("Common-Division", "{a} students are split into teams of {b}.", "How many teams are there?", "a / b"),
    ("Common-Division", "A bus trip of {a} kilometers takes {b} hours at a steady speed.",
     "How many kilometers does the bus travel each hour?", "a / b"),
    ("Addition-Subtraction", "{n} had {a} coins, found {b} more and then spent {c}.",
     "How many coins does {n} have now?", "( a + b ) - c"),
    ("Addition-Subtraction", "A library had {a} books. It bought {b} new books and gave away {c} old ones.",
     "How many books does the library have now?", "( a + b ) - c"),
    ("Subtraction-Subtraction", "A jar had {a} candies. {n} ate {b} and a friend ate {c}.",
     "How many candies are left in the jar?", "( a - b ) - c"),
    ("Multiplication-Addition", "{n} buys {a} packs of {b} cards and already had {c} cards.",
     "How many cards does {n} have now?", "( a * b ) + c"),
    ("Multiplication-Subtraction", "A crate holds {a} bags with {b} oranges each. {c} oranges are rotten.",
     "How many good oranges are there?", "( a * b ) - c"),
    ("Addition-Multiplication", "{n} saves {a} dollars in the first week and {b} dollars in the second week, and does "
     "the same for {c} months.", "How many dollars does {n} save in all?", "( a + b ) * c"),
    ("Addition-Division", "{n} has {a} red beads and {b} blue beads and puts them equally into {c} bags.",
     "How many beads go into each bag?", "( a + b ) / c"),
]


def _numbers(rng: random.Random, equation: str) -> dict[str, int]:
    """Numbers for one template with a positive whole answer and exact divisions."""
    while True:
        a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
        if equation == "a - b":
            a, b = max(a, b) + rng.randint(1, 20), min(a, b)
        elif equation == "a / b":
            b = rng.randint(2, 12)
            a = b * rng.randint(2, 15)
        elif equation == "( a - b ) - c":
            a = b + c + rng.randint(1, 40)
        elif equation == "( a * b ) + c" or equation == "( a * b ) - c":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            c = rng.randint(1, a * b - 1) if equation.endswith("- c") else rng.randint(1, 40)
        elif equation == "( a + b ) - c":
            c = rng.randint(1, a + b - 1)
        elif equation == "( a + b ) * c":
            a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 6)
        elif equation == "( a + b ) / c":
            c = rng.randint(2, 9)
            total = c * rng.randint(3, 15)
            a = rng.randint(1, total - 1)
            b = total - a
        values = {"a": a, "b": b, "c": c}
        answer = _evaluate(equation, values)
        if answer > 0 and answer.denominator == 1:
            return values


def _substitute(equation: str, values: dict[str, int], fmt: str) -> str:
    return " ".join(fmt.format(values[t]) if t in values else t for t in equation.split())


def _evaluate(equation: str, values: dict[str, int]) -> Fraction:
    return eval(_substitute(equation, values, "Fraction({})"), {"Fraction": Fraction})  # noqa: S307 - own templates


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        kind, body, question, equation = TEMPLATES[len(rows) % len(TEMPLATES)]
        values = _numbers(rng, equation)
        name = rng.choice(NAMES)
        text = (body.format(n=name, **values), question.format(n=name, **values))
        if text in seen:
            continue
        seen.add(text)
        rendered = _substitute(equation, values, "{}.0")
        eq = rendered if rendered.startswith("(") else f"( {rendered} )"
        answer = _evaluate(equation, values)
        rows.append({"ID": f"demo-{len(rows) + 1}", "Body": text[0], "Question": text[1], "Equation": eq,
                     "Answer": float(answer), "Type": kind})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=420)
    p.add_argument("--seed", type=int, default=2504)
    p.add_argument("--out", default=str(Path(__file__).with_name("demo_arith.jsonl")))
    a = p.parse_args(argv)
    rows = make_rows(a.n, a.seed)
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} problems to {a.out}")


if __name__ == "__main__":
    main()
