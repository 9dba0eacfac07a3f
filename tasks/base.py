"""What every task is made of: a question with its gold answer, the held-out split, and the one
way an answer is read from a message. The relay (tasks/__init__.py) and the math tasks
(mathtask.py) both build on it.

The held-out split is by content, the same for every task and run: a question is held out when
the CRC32 of its text is 0 mod 4 (a quarter); training questions come from the rest.
"""

import re
import zlib
from dataclasses import dataclass


class TaskError(ValueError):
    """A bad --task, data file or prompts file: the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    # the relay only: the true message of every turn (for the warm-up) and the operation of every
    # turn, e.g. ("0", "8", "9") and ("+3", "-2", "+1") for "7+3-2+1"
    steps: tuple = ()
    ops: tuple = ()


def is_heldout(text: str) -> bool:
    return zlib.crc32(text.encode()) % 4 == 0


def split(questions: list) -> tuple[list, list]:
    """(training questions, held-out questions), by is_heldout."""
    return [q for q in questions if not is_heldout(q.text)], [q for q in questions if is_heldout(q.text)]


def final_answer(message: str) -> str:
    """The answer a message gives: its last \\boxed{...} (nested braces allowed), else its last
    "Answer: X", else its last number ("0;8;9" gives "9"); "" if it has none."""
    boxed = boxed_contents(message)
    if boxed:
        return boxed[-1]
    found = re.findall(r"Answer:\s*([^\n]+)", message)
    if found:
        return found[-1].strip().rstrip(".")
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", message)
    return numbers[-1] if numbers else ""


def boxed_contents(message: str) -> list:
    """The contents of every \\boxed{...} in the message, in order."""
    out, start = [], message.find("\\boxed{")
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        while i < len(message) and depth:
            depth += {"{": 1, "}": -1}.get(message[i], 0)
            i += 1
        if depth == 0:
            out.append(message[start + len("\\boxed{") : i - 1])
        start = message.find("\\boxed{", i)
    return out
