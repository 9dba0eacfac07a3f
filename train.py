"""Train a team with TeamTR (or a baseline mode) and write a run directory.

    python train.py --agents 3 --mode teamtr        # the default: relay task, tiny CPU agents
    python train.py --agents 3 --mode stale         # same, evaluated on stale occupancy
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --grad-ckpt
    python train.py --mode compare                  # every mode side by side (tools/compare.py)
    python train.py --resume runs/teamtr-n3-s0      # continue a run that was stopped or crashed

What a run does: check every input (plumbing/cli.py); build the task; build the agents (warmup.py: tiny Qwen2
models warmed up to an imperfect start and copied once per agent, or Hugging Face models);
evaluate the starting team on the held-out set; run the stages of teamtr.py, with a checkpoint
after each (plumbing/runs.py); save one Hugging Face checkpoint per agent; print held-out accuracy before
and after. A bad input ends in one line on stderr, exit 2, before anything is written; Ctrl-C
prints the command that resumes the run.

runs/<name>/ holds config.json (the resolved config), metrics.jsonl (one JSON object per update
and per stage; its names are in docs/design.md, "Metrics"), transcripts.jsonl (the first held-out
episodes of every evaluation), checkpoint-stage<S>/ (the last stage's weights, optimiser and RNG
states), agent{i}/ (save_pretrained), summary.md, and with --tracker tensorboard, tensorboard/.
Every flag is a field of config.Config; `python train.py --help` lists them in groups (plumbing/cli.py).
"""

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import time

import torch

import parallel
import replace
import rollout
import tasks
import team as team_lib
import warmup
from config import Config
from parallel import fsdp
from plumbing import cli, loop, runs, tracking
from tasks.base import TaskError
from tools import compare


def fail(message: str, code: int = 2):
    """One line on stderr; exit 2 for a bad input (nothing written yet), 1 for a run that failed."""
    runs.fail("train.py", message, code)


def write_summary(run_dir, cfg: Config, accs, seconds, resumed_after=None):
    """summary.md; resumed_after: the checkpoint's stage when this process resumed the run (the
    command is then the resume's, and the seconds those since the resume)."""
    rows = "\n".join(f"| {s} | {a:.3f} |" for s, a in zip(loop.evaluated_stages(cfg), accs))
    since = (
        ""
        if resumed_after is None
        else f" since the resume after stage {resumed_after} (the run's config is in config.json)"
    )
    text = (
        f"# {os.path.basename(run_dir)}\n\n`python train.py {' '.join(sys.argv[1:])}`\n\n"
        f"mode {cfg.mode} (resample {cfg.resample}, trust region {cfg.trust_region}), {cfg.agents} agents, "
        f"seed {cfg.seed}\n\n"
        f"held-out accuracy: {accs[0]:.3f} -> {accs[-1]:.3f} ({100 * (accs[-1] - accs[0]):+.1f} points), "
        f"{seconds:.0f} s{since}\n\n"
        f"| stage | held-out accuracy |\n|---|---|\n{rows}\n"
    )
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(text)


def checked_inputs(cfg: Config, sizes: list[int]):
    """The task (its data and prompts loaded), after the models' configs and tokenizers were
    checked: every bad input ends here in one line, exit 2, before anything is written."""
    try:
        for name in dict.fromkeys(
            filter(None, [cfg.model, *cfg.models.split(","), cfg.replace and replace.target(cfg)[1]])
        ):
            team_lib.check_model(name)
        # --tracker's package, before any run directory exists
        tracking.check(cfg.tracker)
        return [tasks.make(dataclasses.replace(cfg, agents=n)) for n in sizes][0]
    except (TaskError, team_lib.LoadError, tracking.TrackerError) as e:
        fail(str(e))


def resume_command(run_dir: str) -> str:
    launcher = f"torchrun --nproc-per-node {parallel.WORLD} " if parallel.WORLD > 1 else "python "
    return f"{launcher}train.py --resume {run_dir}"


def start(cfg: Config, sizes: list[int], resume: str, device, dtype):
    """(team, records so far, run directory): a resumed run's checkpoint, or a new run's starting
    team and directory (created by rank 0). Bad input ends here in one line, exit 2, before
    anything is written."""
    try:
        if resume:
            team, done = runs.load_checkpoint(resume, cfg, device, dtype)
            if parallel.main():
                runs.remove_partial(resume)
            return team, done, resume
        runs.check_out_dir(cfg.out_dir)
        # a saved team; every rank loads the same files
        if cfg.init:
            team, begin = replace.load_init(cfg, device, dtype), None
        else:
            begin = warmup.starting_model(cfg, device, dtype)
            team = warmup.build_team(cfg, begin, device, dtype)
        run_dir = parallel.broadcast_object(runs.create(cfg, sizes) if parallel.main() else None)
        # the warmed-up tiny base, which the adapters are saved against
        if cfg.lora_rank and not cfg.model and parallel.main():
            team_lib.save_model(*begin, runs.lora_base(cfg, run_dir))
        return team, [], run_dir
    except (runs.RunError, team_lib.LoadError) as e:
        fail(str(e))


def checkpoint(run_dir: str, team, stage: int, log: runs.Log, base: str):
    """Rank 0 writes the checkpoint; every rank learns whether it could, after checking that the
    ranks' weights are the same."""
    parallel.check_identical(team)
    # --fsdp: the whole weights and optimiser states, gathered by every rank
    states, error = fsdp.full_state(team), ""
    if parallel.main():
        try:
            runs.save_checkpoint(run_dir, team, stage, log.records, base, states)
        except runs.RunError as e:
            error = str(e)
    if error := parallel.broadcast_object(error):
        raise runs.RunError(error)


class Stopped(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (kill, torchrun ending the other processes), raised where the
    run is; it exits 128 + the signal's number, 130 or 143."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """Inside it, Ctrl-C and SIGTERM stop the run as Stopped. Installed whatever the process
    inherited: a job started in the background by a non-interactive shell starts with SIGINT
    ignored, and Python then never raises KeyboardInterrupt. The handlers before it come back at
    its end (train.main called in-process, as the tests do)."""

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def stops_cleanly(run_dir: str, resumable=None):
    """A stop (Stopped, KeyboardInterrupt) and a lost process end in one line: the resume command
    where resumable() says something is kept; otherwise the run's directory is removed, so that
    the same command, --name included, starts it again."""
    resumable = resumable or (lambda: True)
    try:
        yield
    except KeyboardInterrupt as e:
        # torchrun may signal again while this one ends
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = 128 + getattr(e, "signum", signal.SIGINT)
        if resumable():
            fail(f"interrupted; continue with: {resume_command(run_dir)}", code)
        if parallel.main():
            shutil.rmtree(run_dir, ignore_errors=True)
        fail(
            f"interrupted before the first checkpoint: nothing was kept ({run_dir} removed); start again",
            code,
        )
    except (parallel.ProcessLost, RuntimeError) as e:
        # --fsdp: a collective inside FSDP failed (parallel.lost); any other error is raised as it is
        reason = e if isinstance(e, parallel.ProcessLost) else parallel.lost(e)
        if reason is None:
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fail(
            f"another process of this run stopped or stopped answering ({reason}); continue with: "
            f"{resume_command(run_dir)}",
            1,
        )


def tracker(cfg: Config, run_dir: str, done: list):
    """The run's --tracker (tracking.start); one that cannot start ends the run in one line, and a
    new run's directory, with nothing trained in it yet, goes with it."""
    try:
        return tracking.start(cfg, run_dir, done=done)
    except tracking.TrackerError as e:
        if not done and parallel.main():
            shutil.rmtree(run_dir)
        fail(str(e))


def train(cfg: Config, sizes: list[int], resume: str, device, dtype, task, began: float):
    """One run (or a compare directory) to the end."""
    if cfg.mode == "compare":
        try:
            run_dir = resume or parallel.broadcast_object(
                runs.check_out_dir(cfg.out_dir) or (runs.create(cfg, sizes) if parallel.main() else None)
            )
            parallel.print0(f"run directory: {run_dir}")
            with stops_cleanly(run_dir):
                return compare.run(cfg, sizes, device, dtype, run_dir, resume=bool(resume))
        # --out-dir, or an unreadable results.json on --resume
        except runs.RunError as e:
            fail(str(e))
    team, done, run_dir = start(cfg, sizes, resume, device, dtype)
    parallel.print0(
        f"run directory: {run_dir}" + (f" (resumed after stage {done[-1]['stage']})" if done else "")
    )
    # from here to the saved team, a stop keeps what the last checkpoint holds, or nothing
    with stops_cleanly(run_dir, lambda: bool(runs.checkpoints(run_dir))):
        run(cfg, team, done, run_dir, task, device, dtype, began)


def run(cfg: Config, team, done: list, run_dir: str, task, device, dtype, began: float):
    """A single run's stages, from its start or its last checkpoint, and its saved team."""
    heldout = task.heldout(cfg.eval_size)
    log = runs.Log(
        os.path.join(run_dir, "metrics.jsonl"),
        done,
        echo=True,
        tracker=tracker(cfg, run_dir, done),
        transcripts=os.path.join(run_dir, "transcripts.jsonl"),
    )
    base = runs.lora_base(cfg, run_dir)
    try:
        if cfg.replace and not done:
            team = replace.swap_and_align(team, task, heldout, cfg, log, device, dtype)
        accs = loop.train_stages(
            team, task, heldout, cfg, log, done, lambda stage: checkpoint(run_dir, team, stage, log, base)
        )
    except rollout.ContextTooLong as e:
        # found by the very first sampling: nothing worth keeping was written
        if parallel.main() and not runs.checkpoints(run_dir):
            shutil.rmtree(run_dir)
        fail(str(e))
    # a failed checkpoint write
    except runs.RunError as e:
        fail(str(e), 1)
    finally:
        log.close()
    parallel.check_identical(team)
    states = fsdp.full_state(team)
    if parallel.main():
        team_lib.save_team(team, run_dir, base, states)
        write_summary(run_dir, cfg, accs, time.time() - began, done[-1]["stage"] if done else None)
    parallel.print0(
        f"held-out accuracy ({len(heldout)} questions): starting team {accs[0]:.3f} -> trained team "
        f"{accs[-1]:.3f} "
        f"({100 * (accs[-1] - accs[0]):+.1f} points) in {time.time() - began:.0f} s; wrote {run_dir}"
    )


def main(argv=None):
    cfg, sizes, resume = cli.parse(__doc__.splitlines()[0], argv)
    began = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = runs.placement(cfg)
    parallel.init(device, cfg.dist_timeout)
    # Ctrl-C, kill and torchrun's SIGTERM (sent to the other processes when one fails)
    with stop_on_signals():
        task = checked_inputs(cfg, sizes)
        try:
            train(cfg, sizes, resume, device, dtype, task, began)
        # before the run's directory is known: the warm-up, or loading the checkpoint of --resume
        except KeyboardInterrupt as e:
            code = 128 + getattr(e, "signum", signal.SIGINT)
            if resume:
                fail(f"interrupted; continue with: {resume_command(resume)}", code)
            fail("interrupted before training began: nothing to resume", code)
    parallel.close()


if __name__ == "__main__":
    main()
