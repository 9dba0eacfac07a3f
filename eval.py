"""Team evaluation: held-out accuracy (greedy), and avg@k / pass@k from k samples per question.

    python eval.py runs/teamtr-n3-s0              # greedy held-out accuracy of a saved team
    python eval.py runs/teamtr-n3-s0 --samples 8  # plus avg@8 and pass@k (unbiased estimator)

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
pass@k = 1 - C(n - c, k) / C(n, k); avg@k is the mean accuracy over the k samples.
"""
import argparse
import json
import os
import sys
from math import comb

import torch

import rollout
import tasks
import team as team_lib


def correct_counts(team, task, qs, cfg, samples: int = 1, temperature: float = 0.0) -> list[int]:
    """How many of `samples` team episodes per question were correct (temperature 0: greedy)."""
    episodes = rollout.new_episodes(qs, samples, len(team), cfg.rounds, cfg.order, (cfg.seed, "eval"))
    played, _, _ = rollout.play(team, task, episodes, temperature, 1.0, (cfg.seed, "eval"))
    counts = [0] * len(qs)
    for e in played:
        counts[e.qid] += int(e.reward)
    return counts


def accuracy(team, task, qs, cfg) -> float:
    """Greedy held-out team accuracy."""
    return sum(correct_counts(team, task, qs, cfg)) / len(qs)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory written by train.py")
    parser.add_argument("--samples", type=int, default=0, help="sampled episodes per question for avg@k and pass@k (0: greedy only)")
    parser.add_argument("--size", type=int, default=0, help="held-out questions (default: the run's eval_size)")
    args = parser.parse_args(argv)
    config_path = os.path.join(args.run_dir, "config.json")
    if not os.path.exists(config_path):
        sys.exit(f"eval.py: error: {config_path} not found (is {args.run_dir} a run directory?)")
    cfg = argparse.Namespace(**json.load(open(config_path)))
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device == "cuda") else torch.float32
    paths = sorted((p for p in os.listdir(args.run_dir) if p.startswith("agent") and p[5:].isdigit()), key=lambda p: int(p[5:]))
    team = team_lib.load_team([os.path.join(args.run_dir, p) for p in paths], device, dtype, lr=0.0)
    task = tasks.make(cfg)
    qs = tasks.heldout_set(task, args.size or cfg.eval_size)
    print(f"greedy held-out accuracy: {accuracy(team, task, qs, cfg):.4f} ({len(qs)} questions, {len(team)} agents)")
    if args.samples:
        counts = correct_counts(team, task, qs, cfg, args.samples, temperature=1.0)
        print(f"avg@{args.samples}: {sum(counts) / (len(qs) * args.samples):.4f}")
        for k in sorted({1, args.samples // 2, args.samples} - {0}):
            print(f"pass@{k}: {sum(pass_at_k(args.samples, c, k) for c in counts) / len(qs):.4f}")


if __name__ == "__main__":
    main()
