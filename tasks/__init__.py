"""Tasks: what the team is asked, how each turn's shared context is rendered, how it is scored.

The default task, `relay`, is built in code so that a fresh machine with no network can train:
a start digit and one operation per turn, in arithmetic mod 10 ("7+3-2+1": 7, 0, 8, 9). The agent
at turn t reads the question and the messages so far and writes the value after operation t;
the final message is scored against the true result. Every agent's work matters, and when an
upstream agent changes, what the downstream agents read changes with it: the occupancy shift TeamTR is about.

Rendering is plain text, the interface between agents (each agent re-tokenises it):

    team turn 3:  "7+3-2+1|7;0;8|+1>"  ->  agent writes "9"
    solo:         "7+3-2+1="           ->  one agent writes "0;8;9" (the `single` baseline)

A team context is the question, the value chain so far (the start value, then every message),
and the acting agent's role: its operation. Each agent needs the last value it reads and its own
operation; a wrong or malformed upstream message is what every later agent then works on.
The arithmetic is modular on purpose: every value is equally likely whatever the operation, so
the answer cannot be guessed from an agent's own operation (with values merely kept in 0..9,
"-9" would give away "0"), and a team is right only if every agent computed right.

The coordination variant (--codes) is the same task from a different start. A message may be
written in either of two codes, plainly (7) or mirrored (9 - 7 = 2), with nothing to mark which;
only the last message, the one scored, must be plain. The warm-up demonstrator picks a code at
random for every other message, so each agent learns to read and write both and the team starts
without a shared convention: a link works only if the reader decodes the code the writer chose.
RL must make the agents agree, and each agent's best code depends on what its neighbours do now,
which is where fresh and stale occupancy can differ (the plain relay gives every agent the same
reading whatever upstream does: a wrong value is distributed like a right one). --code-links f
is the coupling knob: only a fraction f of the links carry two codes, the rest stay plain.

The long-message variant (--work K) gives each message K work lines before its value: what the
agent read, its operation and "=" ("8+1=8+1=9" at K = 2), about 4K + 2 tokens. It was designed to
share one property of an LLM's messages: most of their tokens follow from the context and a few
decide. Readers see only the values (the chain stays "7;0;8"), and the reward reads the final
message's value, so what is scored and what later agents read are the plain relay's.

Questions are deterministic by seed; the held-out set is the questions whose CRC32 falls in one
bucket of four, and training questions are drawn from the other three, so the two are disjoint.

Real math tasks for pretrained models (GSM8K, MATH-500, AIME, local files, generated word
problems) with role prompts and math-verify grading are in tasks/mathtask.py; `make` picks by --task.

Answers are read from the final message by base.final_answer (the last \\boxed{X}, else the
last "Answer: X", else the last number), so a solo message "0;8;9" is scored by its last value.
"""

import random
from typing import Protocol, runtime_checkable

import torch

import parallel
from config import or_default
from tasks import mathtask
from tasks.base import Question, TaskError, final_answer, is_heldout

# the relay alphabet; the character tokenizer is built from it
CHARS = "0123456789+-|;>="
HELDOUT_SEED = 1_000_003


@runtime_checkable
class Task(Protocol):
    """What a task provides, and all the rest of the code reads of it; the relay (below) and
    mathtask.MathTask are the two. To add one, write a class with these and pick it in `make`.

    Optional: `turn_correct(question, messages) -> list[bool]` (each message right given what it
    read: per-agent turn accuracy, tasks.turn_accuracy), `deciding(message) -> int` (how many of a
    message's last characters decide it: the deciding-token KL, rollout.deciding_span) and `roles`
    (one {"name", "instructions"} per agent: the tracker's transcripts)."""

    # turns per episode (agents x rounds; 1 for a solo task)
    turns: int
    # tokens per message: one value, or one per agent
    max_new_tokens: int | list
    # chat template options (enable_thinking), {} for none
    chat: dict
    # whole benchmark sets scored at every evaluation, {name: questions}
    benchmarks: dict

    def train_questions(self, count: int, seed: int) -> list[Question]:
        """`count` training questions, the same for the same seed, none of them held out."""

    def heldout(self, count: int) -> list[Question]:
        """The first `count` held-out questions, the same in every run."""

    def context(self, q: Question, steps: list, agent: int):
        """What `agent` reads after `steps` (rollout.Step): a string, or chat messages."""

    def answer(self, final_message: str) -> str:
        """The answer the reward grades, read from the last message (the transcripts show it)."""

    def reward(self, q: Question, final_message: str) -> float:
        """The team's reward, read from the last message alone."""


class Relay:
    """Arithmetic relay mod `modulus`: one operation +a or -a (a in 1..max_arg) per turn."""

    def __init__(
        self,
        n_ops: int,
        solo: bool = False,
        modulus: int = 10,
        max_arg: int = 3,
        p_max_arg: float = 0.0,
        work: int = 0,
    ):
        self.n_ops, self.solo, self.modulus, self.max_arg, self.p_max_arg = (
            n_ops,
            solo,
            modulus,
            max_arg,
            p_max_arg,
        )
        # a team message's work lines (--work); the solo chain has none
        self.work = 0 if solo else work
        self.turns = 1 if solo else n_ops
        # chat template options: the tiny agents have no template; no benchmarks but the held-out set
        self.chat, self.benchmarks = {}, {}
        self.digits = len(str(modulus - 1))
        # one work line: the value read, the operation ("+3") and "="
        line = self.digits + 1 + len(str(max_arg)) + 1
        # "3;6;2" + EOS, or the work lines, "3" + slack
        self.max_new_tokens = (self.digits + 1) * n_ops if solo else self.work * line + self.digits + 2

    def question(self, rng: random.Random) -> Question:
        value = rng.randrange(self.modulus)
        text, steps, ops = str(value), [], []
        for _ in range(self.n_ops):
            op = rng.choice("+-") + str(self.argument(rng))
            value = apply(value, op) % self.modulus
            text += op
            steps.append(str(value))
            ops.append(op)
        return Question(text, str(value), tuple(steps), tuple(ops))

    def argument(self, rng: random.Random) -> int:
        """Uniform in 1..max_arg; with p_max_arg > 0, max_arg with that probability, else 1..max_arg-1."""
        if self.p_max_arg:
            return self.max_arg if rng.random() < self.p_max_arg else rng.randint(1, self.max_arg - 1)
        return rng.randint(1, self.max_arg)

    def train_questions(self, count: int, seed: int) -> list[Question]:
        return questions(self, count, seed, heldout=False)

    def heldout(self, count: int) -> list[Question]:
        return heldout_set(self, count)

    def context(self, q: Question, steps: list, agent: int) -> str:
        """What the agent acting after `steps` (rollout.Step) reads; relay agents have no roles."""
        return self.render(q, [s.text for s in steps])

    def render(self, q: Question, messages: list[str]) -> str:
        if self.solo:
            return f"{q.text}="
        values = map(self.value, messages)
        return f"{q.text}|{';'.join([start_value(q), *values])}|{q.ops[len(messages)]}>"

    def value(self, message: str) -> str:
        """What a message says, all a reader reads: the message, or with --work what follows its
        last "=" ("8+1=8+1=9" says "9"; without an "=" nothing), at most as long as a plain
        relay message, so that contexts stay the plain relay's length."""
        return self.tail(message)[: self.digits + 2] if self.work else message

    def tail(self, message: str) -> str:
        """The message after its last "=" with --work (all of it without, "" if it has none)."""
        if not self.work:
            return message
        return message.rsplit("=", 1)[-1] if "=" in message else ""

    def deciding(self, message: str) -> int:
        """How many of the message's last characters decide what it says: those after its last
        "=" with --work (a value too long to be read whole counted in full), all of it without.
        The others follow from the context; EOS, which ends the value, is counted with them."""
        return len(self.tail(message))

    def answer(self, final_message: str) -> str:
        return final_answer(self.value(final_message))

    def reward(self, q: Question, final_message: str) -> float:
        return float(self.answer(final_message) == q.answer)

    def turn_correct(self, q: Question, messages: list[str]) -> list[bool]:
        """Per message: is it the value its writer's operation gives from the value it read (the
        previous message, or the start)? A turn after a wrong one can still be right; a turn after
        a malformed one cannot. The plain code only (--codes messages may be mirrored)."""
        read, right = start_value(q), []
        for op, message in zip(q.ops, messages):
            value = self.value(message)
            right.append(read.isdigit() and value == str(apply(int(read), op) % self.modulus))
            read = value
        return right


def make(cfg) -> Task:
    """The task of a run: the relay with one operation per turn (`single` mode plays it solo), or
    a math task (tasks/mathtask.py); each provides what `Task` lists."""
    if cfg.task != "relay":
        return mathtask.make(cfg)
    relay = Relay(
        cfg.agents * cfg.rounds, cfg.mode == "single", cfg.modulus, cfg.max_arg, cfg.p_max_arg, cfg.work
    )
    relay.max_new_tokens = or_default(cfg.max_new_tokens, relay.max_new_tokens)
    # a short chain has few questions
    found = len(questions(relay, cfg.questions, 0, heldout=False, partial=True))
    if found < cfg.questions:
        raise TaskError(
            f"--questions {cfg.questions}: the relay has only {found} distinct training questions at "
            f"--agents {cfg.agents}, "
            f"--rounds {cfg.rounds}, --max-arg {cfg.max_arg}; lower --questions, or raise --rounds or "
            "--max-arg"
        )
    return relay


def heldout_set(task, count: int) -> list[Question]:
    """The held-out questions: the same for every run seed, so runs are comparable. A small
    question space (two agents) may hold fewer than `count`; then all that were found are used."""
    qs = questions(task, count, seed=HELDOUT_SEED, heldout=True, partial=True)
    if len(qs) < count:
        parallel.print0(
            f"note: the task has only {len(qs)} distinct held-out questions; evaluating on all of them"
        )
    return qs


def start_value(q: Question) -> str:
    """The relay's start value: its question's text before the operations ("7" of "7+3-2+1")."""
    return q.text[: len(q.text) - len("".join(q.ops))]


def apply(value: int, op: str) -> int:
    """apply(7, "-5") == 2 (an operation is a signed number)"""
    return value + int(op)


def mirror(value: int, modulus: int) -> int:
    """The second code of the coordination variant (--codes): mirror(2, 10) == 7, and back."""
    return modulus - 1 - value


def questions(task, count: int, seed: int, heldout: bool, partial: bool = False) -> list[Question]:
    """`count` distinct questions from the held-out or the training side of the split
    (partial: fewer, if that many cannot be found in 200 * count draws)."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(200 * count):
        q = task.question(rng)
        # the one CRC32 split of every task
        if is_heldout(q.text) == heldout and q.text not in seen:
            seen.add(q.text)
            out.append(q)
            if len(out) == count:
                return out
    if partial:
        return out
    raise ValueError(f"could not draw {count} distinct {'held-out' if heldout else 'train'} questions")


def turn_accuracy(task, episodes, n: int) -> dict:
    """{"turn_acc/agent{i}": the fraction of agent i's messages that were right given what it
    read} over every rank's episodes, for tasks with a turn check (the relay's; {} otherwise).
    A team is right only if every link of its chain is: where a team fails, these say which link."""
    if not hasattr(task, "turn_correct") or task.turns == 1:
        return {}
    right, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for e in episodes:
        for step, ok in zip(e.steps, task.turn_correct(e.question, [s.text for s in e.steps])):
            right[step.agent] += ok
            count[step.agent] += 1
    right, count = parallel.all_sum(right), parallel.all_sum(count)
    return {f"turn_acc/agent{i}": (right[i] / count[i]).item() for i in range(n) if count[i] > 0}
