"""Generated word problems: the offline math task (`--task words`) of the CPU demonstration.

One- and two-step problems about a person and things, with whole numbers from 2 to 9, e.g.:

    "Mia has 7 apples. She buys 5 more apples and then gives 3 apples to a friend.
     How many apples does Mia have now?"   ->  9

They are easy enough that a 135M-parameter instruct model solves some of them (about one in five,
greedy), so a team of it has room to learn from the team reward alone.
Questions are deterministic by seed and distinct; base.split holds a quarter of them out.
"""

import random

NAMES = [
    ("Mia", "She"),
    ("Leo", "He"),
    ("Ava", "She"),
    ("Sam", "He"),
    ("Zoe", "She"),
    ("Ben", "He"),
    ("Ivy", "She"),
    ("Tom", "He"),
    ("Ema", "She"),
    ("Max", "He"),
    ("Lily", "She"),
    ("Noah", "He"),
]
THINGS = ["apples", "pens", "stickers", "marbles", "books", "cookies", "cards", "shells", "coins", "stamps"]
# (text with {name} {pronoun} {thing} {a} {b} {c}, answer from a, b, c; None: no count goes below 0)
TEMPLATES = [
    (
        "{name} has {a} {thing}. {pronoun} buys {b} more {thing}. How many {thing} does {name} have now?",
        lambda a, b, c: a + b,
    ),
    (
        "{name} has {a} {thing}. {pronoun} gives {b} {thing} to a friend. How many {thing} does {name} have "
        "now?",
        lambda a, b, c: a - b if b <= a else None,
    ),
    (
        "{name} has {a} {thing}. {pronoun} buys {b} more {thing} and then gives {c} {thing} to a friend. "
        "How many {thing} does {name} have now?",
        lambda a, b, c: a + b - c if c <= a + b else None,
    ),
    (
        "{name} has {a} {thing}. {pronoun} gets {b} more {thing} and then {c} more. How many {thing} does "
        "{name} have now?",
        lambda a, b, c: a + b + c,
    ),
    (
        "{name} has {a} boxes with {b} {thing} in each box. How many {thing} does {name} have in all?",
        lambda a, b, c: a * b,
    ),
    (
        "{name} has {a} boxes with {b} {thing} in each box, and {c} more {thing}. How many {thing} does "
        "{name} have in all?",
        lambda a, b, c: a * b + c,
    ),
    (
        "{name} had {a} {thing}. {pronoun} lost {b} {thing} and then found {c} {thing}. How many {thing} "
        "does {name} have now?",
        lambda a, b, c: a - b + c if b <= a else None,
    ),
]


def generate(count: int, seed: int) -> list:
    """`count` distinct (question, answer) pairs, the same for the same seed."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < count:
        template, answer = rng.choice(TEMPLATES)
        (name, pronoun), thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b, c = (rng.randint(2, 9) for _ in range(3))
        value = answer(a, b, c)
        text = template.format(name=name, pronoun=pronoun, thing=thing, a=a, b=b, c=c)
        if value is not None and text not in seen:
            seen.add(text)
            out.append((text, str(value)))
    return out
