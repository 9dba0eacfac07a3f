"""The training loop around the algorithm: teamtr.run_stage for every stage, with the held-out
evaluation, the printed lines, peak memory and the checkpoint callback. train.py (one run) and
tools/compare.py (modes side by side) both run their stages here.
"""

import os
import resource

import torch
from tqdm import tqdm

import eval as evaluation
import parallel
import teamtr
from config import Config
from plumbing import tracking


def train_stages(team, task, heldout, cfg: Config, log, done=(), checkpoint=None) -> list[float]:
    """The stage loop, with a held-out evaluation before training and after every --eval-every
    stages (and the last). Returns eval_acc per evaluation (with --eval-every 1, index s is stage
    s). log(record, line) receives every update's and stage's metrics; checkpoint(stage), if
    given, is called after stage 0's evaluation and after every stage. done: the records of a
    resumed run, up to its checkpoint; the loop goes on from the stage after it."""
    accs = [r["stage/eval_acc"] for r in done if r.get("stage/eval_acc") is not None]
    if not done:
        record = {"stage": 0, **evaluate(team, task, heldout, cfg, log, 0)}
        accs = [record["stage/eval_acc"]]
        log(record, f"stage 0: held-out accuracy {accs[0]:.3f}{turns_line(record)}")
        checkpoint and checkpoint(0)
    first = done[-1]["stage"] + 1 if done else 1
    bar = dict(desc="stages", unit="stage", initial=first - 1, total=cfg.stages, disable=not parallel.main())
    memory = Memory(next(team[0].model.parameters()).device)
    for stage in tqdm(range(first, cfg.stages + 1), **bar):
        memory.start_stage()
        record, acc = teamtr.run_stage(team, task, cfg, stage, log), ""
        if stage in evaluated_stages(cfg):
            record.update(evaluate(team, task, heldout, cfg, log, stage))
            accs.append(record["stage/eval_acc"])
            record["stage/realized_gain"] = accs[-1] - accs[-2]
            acc = f"held-out accuracy {accs[-1]:.3f} (gain {accs[-1] - accs[-2]:+.3f}){turns_line(record)} "
        record.update(memory.end_stage())
        certificate, turns = record["stage/certificate"], record["stage/turns"]
        log(
            record,
            f"stage {stage}: {acc}certificate {certificate:+.4f} turns {turns:.0f} "
            f"{record['stage/seconds']:.1f}s",
        )
        checkpoint and checkpoint(stage)
    return accs


def evaluate(team, task, heldout, cfg: Config, log, stage: int) -> dict:
    """The held-out metrics, named as in a stage's record, and each benchmark's greedy accuracy
    (stage/eval_acc/<task>, --eval-tasks); the held-out set's first greedy episodes go to the
    log's transcripts (plumbing/tracking.py)."""
    played = evaluation.play(team, task, heldout, cfg)
    log.transcripts(tracking.transcripts(task, played, stage))
    metrics = evaluation.heldout_metrics(team, task, heldout, cfg, played)
    record = {f"stage/{key}": v for key, v in metrics.items()}
    for name, qs in task.benchmarks.items():
        record[f"stage/eval_acc/{name}"] = evaluation.accuracy(team, task, qs, cfg)
    return record


def evaluated_stages(cfg: Config) -> list[int]:
    """The stages after which the held-out set is evaluated (0: before training)."""
    return [s for s in range(cfg.stages + 1) if s % cfg.eval_every == 0 or s == cfg.stages]


def turns_line(record: dict) -> str:
    """ ", turn accuracy 0.98 0.91 ..." from a record's per-agent held-out turn accuracies (if any),
    and ", aime24 0.033 ..." from its benchmarks' accuracies."""
    turn = [v for key, v in record.items() if key.startswith("stage/eval_turn_acc/")]
    benchmarks = [
        f", {key.split('/')[-1]} {v:.3f}" for key, v in record.items() if key.startswith("stage/eval_acc/")
    ]
    return (f", turn accuracy {' '.join(f'{v:.2f}' for v in turn)}" if turn else "") + "".join(benchmarks)


def peak_memory_mb(device) -> float:
    """The process's peak memory since it started or was last reset: allocated on CUDA, resident
    (ru_maxrss, KiB on Linux) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


class Memory:
    """Peak memory per stage (its update and evaluation), and over the run so far: a run's peak
    can only rise, so a stage's own peak is what shows memory held on to from stage to stage."""

    # Linux: writing 5 resets the process's peak resident memory (VmHWM, ru_maxrss)
    CLEAR = "/proc/self/clear_refs"

    def __init__(self, device):
        self.device = device
        self.run = peak_memory_mb(device)
        self.resettable = device.type == "cuda" or os.access(self.CLEAR, os.W_OK)

    def start_stage(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            with open(self.CLEAR, "w") as f:
                f.write("5")

    def end_stage(self) -> dict:
        """perf/peak_memory_mb (the run's) and perf/stage_peak_memory_mb (None where the peak
        cannot be reset: on CPU off Linux)."""
        stage = peak_memory_mb(self.device)
        self.run = max(self.run, stage)
        return {
            "perf/peak_memory_mb": self.run,
            "perf/stage_peak_memory_mb": stage if self.resettable else None,
        }
