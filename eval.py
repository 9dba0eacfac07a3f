"""Team evaluation of a saved run: held-out accuracy, avg@k and pass@k, one agent alone.

    python eval.py runs/teamtr-n3-s0              # greedy held-out accuracy of a saved team
    python eval.py runs/teamtr-n3-s0 --samples 8  # plus avg@8 and pass@k (unbiased estimator)
    python eval.py RUN --tasks aime24,math500 --samples 16 --temperature 0.7   # whole benchmarks

Each task gets a table: greedy accuracy, avg@K and pass@k for k = 1, 2, 4, ..., K, each with its
standard error over questions, for the team and for agent0 alone.

On the relay it also prints each agent's turn accuracy (its message right given the value it
read), greedy and sampled, and with --samples K > 1 which messages the team reward favours
(`credit`): the diagnosis of why large teams stall (docs/results.md, "Eight agents").

It works for every task of the run (relay or tasks/mathtask.py's). The single-agent comparison plays
the same held-out questions with agent0 alone in the task's one-agent format (the relay's solo
chain, or a real task's one-agent prompt): what the team adds over one of its members.

Under torchrun (`torchrun --nproc-per-node K eval.py RUN_DIR`) each process plays its block of
the questions and the counts are summed; rank 0 prints.

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
pass@k = 1 - C(n - c, k) / C(n, k); avg@k is the mean accuracy over the k samples.
"""

import dataclasses
import os
from math import comb

import torch

import losses
import parallel
import rollout
import tasks
import team as team_lib
from plumbing import runs
from tasks import mathdata
from tasks.base import TaskError


def play(
    team, task, qs, cfg, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed=None
) -> list:
    """`samples` team episodes per question (temperature 0: greedy) of this rank's questions,
    played to the end; seed: their random numbers (default: the run seed's evaluation seed)."""
    seed = (cfg.seed, "eval") if seed is None else seed
    episodes = rollout.new_episodes(qs, samples, len(team), cfg.rounds, cfg.order, seed)
    # this rank's questions
    episodes = [e for e in episodes if e.qid in parallel.shard(len(qs))]
    return rollout.play(team, task, episodes, rollout.Settings(temperature, seed, top_p))[0]


def correct_counts(played, count: int) -> list[int]:
    """How many of each question's episodes were correct, over every rank's episodes (count: questions)."""
    counts = torch.zeros(count, dtype=torch.long)
    for e in played:
        counts[e.qid] += int(e.reward)
    return parallel.all_sum(counts).tolist()


def accuracy(team, task, qs, cfg, played=None) -> float:
    """Greedy held-out team accuracy (played: this rank's greedy episodes, if already played)."""
    played = play(team, task, qs, cfg) if played is None else played
    return sum(correct_counts(played, len(qs))) / len(qs)


def heldout_metrics(team, task, qs, cfg, played=None) -> dict:
    """Greedy held-out accuracy (eval_acc) and, on tasks with a turn check, each agent's turn
    accuracy on the same episodes (eval_turn_acc/agent{i}); played: this rank's greedy episodes,
    if already played."""
    played = play(team, task, qs, cfg) if played is None else played
    return {"eval_acc": accuracy(team, task, qs, cfg, played)} | {
        f"eval_{key}": v for key, v in tasks.turn_accuracy(task, played, len(team)).items()
    }


CREDIT = (
    "read right, wrote the next value",
    "read right, wrote another",
    "read wrong, wrote the next value from it",
    "read wrong, wrote the true value",
    "read wrong, wrote another",
)


def credit(task, episodes, group: int, adv_max: float) -> dict:
    """The relay: which messages does the team reward favour? {kind: (mean advantage, count)}: the
    group-normalised advantage (as in training) of sampled messages, by whether the value the
    writer read was right and what it wrote: the next value from what it read (the skill the
    turn check measures), the true value of the chain (repairing an upstream error, which only
    the question's operations could tell it) or another. Groups: the `group` samples of a question."""
    advantages = losses.group_advantages(torch.tensor([e.reward for e in episodes]), group, adv_max)[0]
    total, count = (
        torch.zeros(len(CREDIT), dtype=torch.float64),
        torch.zeros(len(CREDIT), dtype=torch.float64),
    )
    for e, a in zip(episodes, advantages.tolist()):
        texts = [s.text for s in e.steps]
        # what each message says (its value, with --work)
        values = [task.value(text) for text in texts]
        for t, (value, next_value) in enumerate(zip(values, task.turn_correct(e.question, texts))):
            if t == 0 or values[t - 1] == e.question.steps[t - 1]:
                kind = 0 if next_value else 1
            else:
                kind = 2 if next_value else 3 if value == e.question.steps[t] else 4
            total[kind] += a
            count[kind] += 1
    total, count = parallel.all_sum(total), parallel.all_sum(count)
    return {
        kind: ((total[k] / count[k]).item() if count[k] else 0.0, int(count[k]))
        for k, kind in enumerate(CREDIT)
    }


def solo_task(cfg):
    """agent0 alone in the task's one-agent format: (task, config). The relay's solo chain holds
    every operation of the team's questions, agents x rounds, and so does its message length."""
    solo = dataclasses.replace(
        cfg, mode="single", agents=cfg.agents * cfg.rounds, rounds=1, order="fixed", eval_tasks=""
    )
    return tasks.make(solo), solo


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def ks(samples: int) -> list[int]:
    """k = 1, 2, 4, ... up to `samples`, and `samples` itself."""
    return sorted({2**j for j in range(samples.bit_length()) if 2**j <= samples} | {samples})


def mean_se(values) -> tuple[float, float]:
    """The mean over questions and its standard error (sample standard deviation / sqrt(N))."""
    x = torch.tensor(values, dtype=torch.float64)
    return x.mean().item(), (x.std() / len(x) ** 0.5).item() if len(x) > 1 else 0.0


def scores(team, task, qs, cfg, samples: int, temperature: float, top_p: float) -> dict:
    """{metric: (mean, standard error)} over the questions: greedy accuracy, and with samples K,
    avg@K and unbiased pass@k for k = 1, 2, 4, ..., K."""
    out = {"greedy": mean_se(correct_counts(play(team, task, qs, cfg), len(qs)))}
    if samples:
        counts = correct_counts(play(team, task, qs, cfg, samples, temperature, top_p), len(qs))
        out[f"avg@{samples}"] = mean_se([c / samples for c in counts])
        out.update({f"pass@{k}": mean_se([pass_at_k(samples, c, k) for c in counts]) for k in ks(samples)})
    return out


def report(name: str, count: int, columns: dict, args):
    """One task's table: a row per metric, a column per player (team, agent0 alone)."""
    sampled = f", {args.samples} samples each (temperature {args.temperature}, top-p {args.top_p})"
    parallel.print0(f"{name}: {count} questions{sampled if args.samples else ''}")
    parallel.print0((f"  {'metric':<10}" + "".join(f"{player:<20}" for player in columns)).rstrip())
    for metric in next(iter(columns.values())):
        row = "".join(f"{f'{m:.4f} ± {se:.4f}':<20}" for m, se in (c[metric] for c in columns.values()))
        parallel.print0(f"  {metric:<10}{row}".rstrip())


def benchmark_sets(names: str, cfg, task, size: int) -> dict:
    """{name: questions} of --tasks: `heldout` is the run's held-out set, any other name a whole
    benchmark set of a real-task run (mathdata.benchmark), except the set the run trained from
    (its --task), of which only the held-out part is evaluated: the run trained on the rest."""
    if cfg.task == "relay" and names != "heldout":
        raise TaskError(f"--tasks {names}: a relay run has its held-out set only (heldout)")
    mathdata.check_names(names.split(","), "--tasks", extra=("heldout",))
    sets = {}
    for name in names.split(","):
        spec = mathdata.absolute(name)
        if name == "heldout":
            sets[name] = task.heldout(size)
        elif spec == cfg.task:
            sets[f"{mathdata.short_name(name)} (held-out part)"] = mathdata.load_questions(spec)[1]
        else:
            sets[mathdata.short_name(name)] = mathdata.benchmark(spec)
    return sets


def relay_diagnosis(team, task, qs, cfg, args):
    """The relay: each agent's turn accuracy, greedy and sampled, and which messages the team
    reward favours (credit)."""
    greedy = heldout_metrics(team, task, qs, cfg)
    turns = [v for key, v in greedy.items() if key.startswith("eval_turn_acc/")]
    if len(team) < 2 or not turns:
        return
    greedy_turns = " ".join(f"{v:.3f}" for v in turns)
    parallel.print0(f"turn accuracy per agent (right given the value it read), greedy: {greedy_turns}")
    if args.samples:
        played = play(team, task, qs, cfg, args.samples, args.temperature, args.top_p)
        sampled = tasks.turn_accuracy(task, played, len(team))
        parallel.print0(f"turn accuracy per agent, sampled: {' '.join(f'{v:.3f}' for v in sampled.values())}")
    if args.samples > 1:
        parallel.print0(f"mean advantage of sampled messages (groups of {args.samples}), by kind:")
        for kind, (mean, count) in credit(task, played, args.samples, cfg.adv_max).items():
            parallel.print0(f"  {kind}: {mean:+.3f} ({count} messages)")


def arguments(argv):
    parser = runs.Parser(prog="eval.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir",
        help="a run directory written by train.py (its trained team, or an unfinished run's last checkpoint)",
    )
    parser.add_argument(
        "--tasks",
        default="heldout",
        help="comma-separated: heldout (the run's held-out set) and whole benchmarks: aime24, aime25, "
        "math500, gsm8k (its test split), words, jsonl:PATH, parquet:PATH",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        help="sampled episodes per question for avg@K and pass@k (0: greedy only)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled episodes")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of the sampled episodes")
    parser.add_argument(
        "--size", type=int, default=0, help="held-out questions (0, the default: the run's eval_size)"
    )
    args = parser.parse_args(argv)
    if args.samples < 0 or args.size < 0:
        parser.error(f"--samples and --size must be at least 0, got {args.samples} and {args.size}")
    if not (args.temperature > 0 and 0 < args.top_p <= 1):
        parser.error(
            f"--temperature must be positive and --top-p in (0, 1], got {args.temperature}, {args.top_p}"
        )
    return parser, args


def main(argv=None):
    parser, args = arguments(argv)
    try:
        cfg = runs.read_config(args.run_dir)[0]
        if cfg.mode == "compare":
            raise runs.RunError(
                f"{args.run_dir} is a --mode compare directory (its runs keep metrics, not teams)"
            )
        device, dtype = runs.placement(cfg)
        parallel.init(device, cfg.dist_timeout)
        folder, paths = runs.saved_team(args.run_dir)
        cfg = dataclasses.replace(cfg, eval_tasks="")
        task = tasks.make(cfg)
        sets = benchmark_sets(args.tasks, cfg, task, args.size or cfg.eval_size)
        team = team_lib.load_team(paths, device, dtype)
        # agent0 alone, in the task's one-agent format
        solo = solo_task(cfg) if len(team) > 1 else None
    except (runs.RunError, TaskError, team_lib.LoadError) as e:
        parser.error(str(e))
    if folder != args.run_dir:
        parallel.print0(f"the run did not finish; evaluating its last checkpoint, {os.path.basename(folder)}")
    sampling = (args.samples, args.temperature, args.top_p)
    for name, qs in sets.items():
        columns = {f"team of {len(team)}": scores(team, task, qs, cfg, *sampling)}
        if solo:
            columns["agent0 alone"] = scores([team[0]], solo[0], qs, solo[1], *sampling)
        report(name, len(qs), columns, args)
        if name == "heldout":
            relay_diagnosis(team, task, qs, cfg, args)
    parallel.close()


if __name__ == "__main__":
    main()
