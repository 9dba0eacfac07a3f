"""Team evaluation: held-out accuracy (greedy), avg@k / pass@k from k samples per question, and
the single-agent comparison.

    python eval.py runs/teamtr-n3-s0              # greedy held-out accuracy of a saved team
    python eval.py runs/teamtr-n3-s0 --samples 8  # plus avg@8 and pass@k (unbiased estimator)

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

import mathtask
import parallel
import rollout
import runs
import tasks
import team as team_lib


def correct_counts(team, task, qs, cfg, samples: int = 1, temperature: float = 0.0) -> list[int]:
    """How many of `samples` team episodes per question were correct (temperature 0: greedy)."""
    episodes = rollout.new_episodes(qs, samples, len(team), cfg.rounds, cfg.order, (cfg.seed, "eval"))
    episodes = [e for e in episodes if e.qid in parallel.shard(len(qs))]  # this rank's questions
    played = rollout.play(team, task, episodes, temperature, 1.0, (cfg.seed, "eval"))[0]
    counts = torch.zeros(len(qs), dtype=torch.long)
    for e in played:
        counts[e.qid] += int(e.reward)
    return parallel.all_sum(counts).tolist()


def accuracy(team, task, qs, cfg) -> float:
    """Greedy held-out team accuracy."""
    return sum(correct_counts(team, task, qs, cfg)) / len(qs)


def single_accuracy(agent, cfg, qs) -> float:
    """Greedy accuracy of one agent alone, in the task's one-agent format."""
    solo = dataclasses.replace(cfg, mode="single", rounds=1, order="fixed")
    return accuracy([agent], tasks.make(solo), qs, solo)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def main(argv=None):
    parser = runs.Parser(prog="eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory written by train.py (its trained team, or the last checkpoint of an unfinished run)")
    parser.add_argument("--samples", type=int, default=0, help="sampled episodes per question for avg@k and pass@k (0: greedy only)")
    parser.add_argument("--size", type=int, default=0, help="held-out questions (default: the run's eval_size)")
    args = parser.parse_args(argv)
    if args.samples < 0 or args.size < 0:
        parser.error(f"--samples and --size must be at least 0, got {args.samples} and {args.size}")
    try:
        cfg = runs.read_config(args.run_dir)[0]
        if cfg.mode == "compare":
            raise runs.RunError(f"{args.run_dir} is a --mode compare directory (its runs keep metrics, not teams)")
        device, dtype = runs.placement(cfg)
        parallel.init(device, cfg.dist_timeout)
        folder, paths = runs.saved_team(args.run_dir)
        task = tasks.make(cfg)
        team = team_lib.load_team(paths, device, dtype, lr=0.0)
    except (runs.RunError, mathtask.TaskError, team_lib.LoadError) as e:
        parser.error(str(e))
    if folder != args.run_dir:
        parallel.print0(f"the run did not finish; evaluating its last checkpoint, {os.path.basename(folder)}")
    qs = task.heldout(args.size or cfg.eval_size)
    parallel.print0(f"greedy held-out accuracy: {accuracy(team, task, qs, cfg):.4f} ({len(qs)} questions, {len(team)} agents)")
    if len(team) > 1:
        parallel.print0(f"single agent (agent0 alone, one-agent format): {single_accuracy(team[0], cfg, qs):.4f}")
    if args.samples:
        counts = correct_counts(team, task, qs, cfg, args.samples, temperature=1.0)
        parallel.print0(f"avg@{args.samples}: {sum(counts) / (len(qs) * args.samples):.4f}")
        for k in sorted({1, args.samples // 2, args.samples} - {0}):
            parallel.print0(f"pass@{k}: {sum(pass_at_k(args.samples, c, k) for c in counts) / len(qs):.4f}")


if __name__ == "__main__":
    main()
