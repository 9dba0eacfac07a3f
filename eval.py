"""Team evaluation of a saved run: held-out accuracy, avg@k and pass@k, one agent alone.

    python eval.py runs/teamtr-n3-s0              # greedy held-out accuracy of a saved team
    python eval.py runs/teamtr-n3-s0 --samples 8  # plus avg@8 and pass@k (unbiased estimator)

On the relay it also prints each agent's turn accuracy (its message right given the value it
read), greedy and sampled, and with --samples K > 1 which messages the team reward favours
(`credit`): the diagnosis of why large teams stall (docs/results.md, "Eight agents").

It works for every task of the run (relay or mathtask.py's). The single-agent comparison plays
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
import runs
import tasks
import team as team_lib
from questions import TaskError


def play(
    team, task, qs, cfg, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed=None
) -> list:
    """`samples` team episodes per question (temperature 0: greedy) of this rank's questions,
    played to the end; seed: their random numbers (default: the run seed's evaluation seed)."""
    seed = (cfg.seed, "eval") if seed is None else seed
    episodes = rollout.new_episodes(qs, samples, len(team), cfg.rounds, cfg.order, seed)
    # this rank's questions
    episodes = [e for e in episodes if e.qid in parallel.shard(len(qs))]
    return rollout.play(team, task, episodes, temperature, top_p, seed)[0]


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


def heldout_metrics(team, task, qs, cfg) -> dict:
    """Greedy held-out accuracy (eval_acc) and, on tasks with a turn check, each agent's turn
    accuracy on the same episodes (eval_turn_acc/agent{i})."""
    played = play(team, task, qs, cfg)
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
        for t, (message, next_value) in enumerate(zip(texts, task.turn_correct(e.question, texts))):
            if t == 0 or texts[t - 1] == e.question.steps[t - 1]:
                kind = 0 if next_value else 1
            else:
                kind = 2 if next_value else 3 if message == e.question.steps[t] else 4
            total[kind] += a
            count[kind] += 1
    total, count = parallel.all_sum(total), parallel.all_sum(count)
    return {
        kind: ((total[k] / count[k]).item() if count[k] else 0.0, int(count[k]))
        for k, kind in enumerate(CREDIT)
    }


def single_accuracy(agent, cfg, qs) -> float:
    """Greedy accuracy of one agent alone, in the task's one-agent format."""
    solo = dataclasses.replace(cfg, mode="single", rounds=1, order="fixed")
    return accuracy([agent], tasks.make(solo), qs, solo)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def main(argv=None):
    parser = runs.Parser(prog="eval.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir",
        help="a run directory written by train.py (its trained team, or an unfinished run's last checkpoint)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        help="sampled episodes per question for avg@k and pass@k (0: greedy only)",
    )
    parser.add_argument(
        "--size", type=int, default=0, help="held-out questions (0, the default: the run's eval_size)"
    )
    args = parser.parse_args(argv)
    if args.samples < 0 or args.size < 0:
        parser.error(f"--samples and --size must be at least 0, got {args.samples} and {args.size}")
    try:
        cfg = runs.read_config(args.run_dir)[0]
        if cfg.mode == "compare":
            raise runs.RunError(
                f"{args.run_dir} is a --mode compare directory (its runs keep metrics, not teams)"
            )
        device, dtype = runs.placement(cfg)
        parallel.init(device, cfg.dist_timeout)
        folder, paths = runs.saved_team(args.run_dir)
        task = tasks.make(cfg)
        team = team_lib.load_team(paths, device, dtype)
    except (runs.RunError, TaskError, team_lib.LoadError) as e:
        parser.error(str(e))
    if folder != args.run_dir:
        parallel.print0(f"the run did not finish; evaluating its last checkpoint, {os.path.basename(folder)}")
    qs = task.heldout(args.size or cfg.eval_size)
    greedy = heldout_metrics(team, task, qs, cfg)
    parallel.print0(
        f"greedy held-out accuracy: {greedy['eval_acc']:.4f} ({len(qs)} questions, {len(team)} agents)"
    )
    if len(team) > 1:
        parallel.print0(
            f"single agent (agent0 alone, one-agent format): {single_accuracy(team[0], cfg, qs):.4f}"
        )
    if args.samples:
        played = play(team, task, qs, cfg, args.samples, temperature=1.0)
        counts = correct_counts(played, len(qs))
        parallel.print0(f"avg@{args.samples}: {sum(counts) / (len(qs) * args.samples):.4f}")
        for k in sorted({1, args.samples // 2, args.samples} - {0}):
            parallel.print0(f"pass@{k}: {sum(pass_at_k(args.samples, c, k) for c in counts) / len(qs):.4f}")
    turns = [v for key, v in greedy.items() if key.startswith("eval_turn_acc/")]
    if len(team) > 1 and turns:
        parallel.print0(
            "turn accuracy per agent (right given the value it read), greedy: "
            f"{' '.join(f'{v:.3f}' for v in turns)}"
        )
        if args.samples:
            sampled = tasks.turn_accuracy(task, played, len(team))
            parallel.print0(
                f"turn accuracy per agent, sampled: {' '.join(f'{v:.3f}' for v in sampled.values())}"
            )
        if args.samples > 1:
            parallel.print0(f"mean advantage of sampled messages (groups of {args.samples}), by kind:")
            for kind, (mean, count) in credit(task, played, args.samples, cfg.adv_max).items():
                parallel.print0(f"  {kind}: {mean:+.3f} ({count} messages)")
    parallel.close()


if __name__ == "__main__":
    main()
