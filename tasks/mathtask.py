"""Math tasks for pretrained LLM teams: questions, role prompts, and answers graded by math-verify.

    python train.py --task gsm8k --model Qwen/Qwen2.5-0.5B-Instruct --agents 3   # hub data (network)
    python train.py --task jsonl:my.jsonl --model DIR --agents 2                 # a local file
    python train.py --task words --model DIR --agents 2                          # generated, offline

Where the questions come from (`--task`, and the benchmarks of `--eval-tasks`) is tasks/mathdata.py.
The held-out set is the first --eval-size held-out questions in dataset order; every stage draws
its training questions from the rest (without any benchmark question) with a derived seed.

The team protocol is data, not code: a prompts file (tasks/prompts/team.json) gives every agent a role
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

from config import or_default
from tasks import mathdata
from tasks.base import Question, TaskError, final_answer

DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "team.json")
# seconds, math-verify's parsing and verification timeouts
TIMEOUT = 5


class MathTask:
    """A question pool with a held-out split, role prompts, math-verify grading, and the whole
    benchmark sets of --eval-tasks ({name: questions})."""

    def __init__(self, train, heldout, roles, turns: int, max_new_tokens, benchmarks=None, chat=None):
        self.pool, self.held, self.roles, self.turns = train, heldout, roles, turns
        # tokens per message: one value, or one per agent
        self.max_new_tokens = max_new_tokens
        self.benchmarks = benchmarks or {}
        # chat template options (enable_thinking)
        self.chat = chat or {}

    def train_questions(self, count: int, seed: int) -> list:
        """`count` training questions drawn with `seed` (all of them, shuffled, if the pool is smaller:
        the Stage-0 imitation of --replace may ask for more than a small file holds)."""
        return random.Random(seed).sample(self.pool, min(count, len(self.pool)))

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

    def answer(self, final_message: str) -> str:
        return final_answer(final_message)

    def reward(self, q: Question, final_message: str) -> float:
        return float(grade(q.answer, self.answer(final_message)))


def make(cfg) -> MathTask:
    """The task of a run from --task, --eval-tasks, --prompts, --agents (or single mode),
    --max-new-tokens and --thinking."""
    train, heldout = mathdata.load_questions(cfg.task)
    benchmarks = {
        mathdata.short_name(name): mathdata.benchmark(name) for name in cfg.eval_tasks.split(",") if name
    }
    train = mathdata.without(train, benchmarks.values())
    if not heldout:
        raise TaskError(
            f"--task {cfg.task}: no held-out questions (a quarter of a file's questions are held out)"
        )
    if len(train) < cfg.questions:
        raise TaskError(
            f"--task {cfg.task}: {len(train)} training questions"
            + (" without the --eval-tasks questions" if benchmarks else "")
            + f", fewer than --questions {cfg.questions}"
        )
    single = cfg.mode == "single"
    roles = team_roles(cfg.prompts or DEFAULT_PROMPTS, 1 if single else cfg.agents)
    turns = 1 if single else cfg.agents * cfg.rounds
    chat = {"enable_thinking": cfg.thinking == "on"}
    return MathTask(train, heldout, roles, turns, or_default(cfg.max_new_tokens, 256), benchmarks, chat)


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
            f"--prompts {path}: not a prompts file ({type(e).__name__}: {e}); see tasks/prompts/team.json"
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
