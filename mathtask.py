"""Math tasks for pretrained LLM teams: questions, role prompts, and answers graded by math-verify.

    python train.py --task gsm8k --model Qwen/Qwen2.5-0.5B-Instruct --agents 3   # hub data (network)
    python train.py --task jsonl:my.jsonl --model DIR --agents 2                 # a local file
    python train.py --task words --model DIR --agents 2                          # generated, offline

Where the questions come from (`--task`):
  - hub names, loaded with `datasets`: gsm8k (openai/gsm8k, config main, gold after "####";
    train/test splits), math500 (HuggingFaceH4/MATH-500), aime24 (HuggingFaceH4/aime_2024) and
    aime25 (yentinglin/aime_2025). The last three have one split, so it is divided like a local file.
  - `jsonl:PATH` and `parquet:PATH`, loaded with `datasets`: one row per question, a `question`
    (or `problem`) field and an `answer` field. One file is divided deterministically: a question
    is held out when the CRC32 of its text is 0 mod 4 (a quarter), the rest is for training.
  - `words`: short multi-step word problems with small whole numbers, generated in code (offline),
    the CPU demonstration of a pretrained team; held out by the same CRC32 rule.
The held-out set is the first --eval-size held-out questions in dataset order; every stage draws
its training questions from the rest with a derived seed.

The team protocol is data, not code: a prompts file (prompts/team.json) gives every agent a role
(a name and instructions) and the one-agent prompt of `single`. A team of n takes the first n - 1
roles and the last one (solver, ..., finalizer). Each agent sees a system message with its role
and a user message with the problem and the transcript so far, every earlier message labelled
with its writer's role; each agent's own chat template turns that into tokens (team.Agent.encode).
Roles belong to agents, not to turn positions, so a random turn order keeps them.

Grading (math-verify, the grader of TRL and open-r1): the final message's answer is its last
\\boxed{...}, else its last "Answer: X", else its last number; it is parsed as LaTeX and verified
against the gold answer (so \\frac{1}{2} == 0.5 and 1,000 == 1000), with math-verify's timeouts.
"""

import json
import os
import random

import hub
from questions import Question, TaskError, final_answer, split

# --task name -> (hub path, config, train split or None, held-out split)
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "train", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, None, "test"),
    "aime24": ("HuggingFaceH4/aime_2024", None, None, "train"),
    "aime25": ("yentinglin/aime_2025", None, None, "train"),
}
LOCAL = ("jsonl", "parquet")
DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "team.json")
# seconds, math-verify's parsing and verification timeouts
TIMEOUT = 5


def is_math_task(name: str) -> bool:
    return name in HUB or name == "words" or name.split(":", 1)[0] in LOCAL


class MathTask:
    """A question pool with a held-out split, role prompts, and math-verify grading."""

    def __init__(self, train: list, heldout: list, roles: list, turns: int, max_new_tokens: int):
        self.pool, self.held, self.roles, self.turns, self.max_new_tokens = (
            train,
            heldout,
            roles,
            turns,
            max_new_tokens,
        )

    def train_questions(self, count: int, seed: int) -> list:
        return random.Random(seed).sample(self.pool, count)

    def heldout(self, count: int) -> list:
        return self.held[:count]

    def context(self, q: Question, steps: list, agent: int) -> list:
        """Chat messages for the agent acting after `steps`: its role, the problem, the transcript."""
        role, n = self.roles[agent], len(self.roles)
        team = (
            "You solve the problem alone."
            if n == 1
            else f"You are the {role['name']} in a team of {n} that solves a math problem together."
        )
        transcript = "".join(f"\n\n[{self.roles[s.agent]['name']}]:\n{s.text}" for s in steps)
        user = f"Problem: {q.text}" + (f"\n\nThe team so far:{transcript}" if steps else "")
        return [
            {"role": "system", "content": f"{team} {role['instructions']}"},
            {"role": "user", "content": user},
        ]

    def reward(self, q: Question, final_message: str) -> float:
        return float(grade(q.answer, final_answer(final_message)))


def make(cfg) -> MathTask:
    """The task of a run from --task, --prompts, --agents (or single mode), --max-new-tokens."""
    train, heldout = load_questions(cfg.task)
    if not heldout:
        raise TaskError(
            f"--task {cfg.task}: no held-out questions (a quarter of a file's questions are held out)"
        )
    if len(train) < cfg.questions:
        raise TaskError(
            f"--task {cfg.task}: {len(train)} training questions, fewer than --questions {cfg.questions}"
        )
    single = cfg.mode == "single"
    roles = team_roles(cfg.prompts or DEFAULT_PROMPTS, 1 if single else cfg.agents)
    return MathTask(
        train, heldout, roles, 1 if single else cfg.agents * cfg.rounds, cfg.max_new_tokens or 256
    )


def team_roles(path: str, agents: int) -> list:
    """The role of each agent (the one-agent prompt for one agent)."""
    try:
        with open(path) as f:
            prompts = json.load(f)
        roles, single = prompts["roles"], prompts["single"]
        if not all(isinstance(r, dict) and {"name", "instructions"} <= r.keys() for r in [*roles, single]):
            raise KeyError("every role needs a name and instructions")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TaskError(
            f"--prompts {path}: not a prompts file ({type(e).__name__}: {e}); see prompts/team.json"
        ) from None
    if agents == 1:
        return [single]
    if len(roles) < agents:
        raise TaskError(
            f"--prompts {path}: {len(roles)} roles, fewer than --agents {agents}; give a file with {agents} "
            "or more "
            f"(a team takes the first n - 1 roles and the last)"
        )
    return roles[: agents - 1] + roles[-1:]


def load_questions(spec: str) -> tuple[list, list]:
    """(training questions, held-out questions) of --task."""
    if spec == "words":
        import wordproblems

        return split([Question(text, answer) for text, answer in wordproblems.generate(4000, seed=0)])
    # imported here: the relay never needs it
    import datasets

    datasets.disable_progress_bars()
    if spec in HUB:
        path, config, train_split, heldout_split = HUB[spec]
        if not hub.reachable():
            raise TaskError(
                f"--task {spec}: the hub ({path}) cannot be reached; without network, pass a local file: "
                f"--task jsonl:PATH or parquet:PATH"
            )
        try:
            if train_split is None:
                return split(
                    rows_to_questions(datasets.load_dataset(path, config, split=heldout_split), spec)
                )
            return tuple(
                rows_to_questions(datasets.load_dataset(path, config, split=s), spec)
                for s in (train_split, heldout_split)
            )
        # no network, no cache: one line, and what to do instead
        except Exception as e:
            raise TaskError(
                f"--task {spec}: could not load {path} from the hub ({type(e).__name__}); "
                f"pass a local file instead: --task jsonl:PATH or parquet:PATH"
            ) from None
    kind, path = spec.split(":", 1)
    if not os.path.isfile(path):
        raise TaskError(f"--task {spec}: no such file {path}")
    if kind == "jsonl":
        check_jsonl(path)
    try:
        rows = datasets.load_dataset("json" if kind == "jsonl" else "parquet", data_files=path, split="train")
    except Exception as e:
        raise TaskError(f"--task {spec}: {path} could not be read as {kind} ({type(e).__name__})") from None
    return split(rows_to_questions(rows, spec))


def check_jsonl(path: str):
    """Name the first malformed line (datasets' own error does not)."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError:
                    raise TaskError(f"{path}, line {number}: not valid JSON") from None


def rows_to_questions(rows, spec: str) -> list:
    """Question(text, gold) per row: `question` or `problem`, and `answer` (GSM8K: after ####)."""
    text = "question" if "question" in rows.column_names else "problem"
    if text not in rows.column_names or "answer" not in rows.column_names:
        raise TaskError(
            f"--task {spec}: needs a 'question' (or 'problem') and an 'answer' field; found "
            f"{rows.column_names}"
        )
    if len(rows) == 0:
        raise TaskError(f"--task {spec}: no questions")
    return [Question(str(r[text]), str(r["answer"]).split("####")[-1].strip()) for r in rows]


def grade(gold: str, answer: str) -> bool:
    """math-verify: both sides parsed as LaTeX or plain expressions, then compared symbolically."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if not answer.strip():
        return False
    extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed, answer_parsed = (
        parse(f"${s}$", extraction_config=extraction, parsing_timeout=TIMEOUT) for s in (gold, answer)
    )
    return bool(gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=TIMEOUT))
