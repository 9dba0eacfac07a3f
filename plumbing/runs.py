"""The run's plumbing: one-line errors, the run directory, its metrics log, checkpoints and resume.

    runs/<name>/config.json             the resolved config; --resume reads it
    runs/<name>/metrics.jsonl           one JSON object per update and per stage
    runs/<name>/transcripts.jsonl       the first held-out episodes of every evaluation (plumbing/tracking.py)
    runs/<name>/checkpoint-stage<S>/    the last complete checkpoint (see save_checkpoint)
    runs/<name>/agent<i>/, summary.md   the trained team and its summary, at the end

Checkpoints are atomic: written into checkpoint-stage<S>.tmp/, flushed to disk, renamed to
checkpoint-stage<S>/ (a rename is atomic), and only then is the previous one removed. A crash at
any moment leaves at least one complete checkpoint; a leftover .tmp folder is never read, and is
removed when the run resumes.
"""

import argparse
import dataclasses
import json
import os
import pickle
import random
import shutil
import sys
import tempfile
import time

import torch
from tqdm import tqdm

import parallel
import team as team_lib
from config import Config
from parallel import fsdp

TMP = ".tmp"


class RunError(Exception):
    """A run directory that cannot be created, read, resumed or checkpointed (one line)."""


def fail(prog: str, message: str, code: int = 2):
    """A bad input: one line on stderr and exit code 2 (callers make sure nothing was written yet).
    Under torchrun every rank finds a bad input and rank 0 reports it; a failure (any other code)
    is reported by each rank that meets it, with its rank."""
    if parallel.main() or code != 2:
        sys.stderr.write(f"{prog}: error: {'' if parallel.main() else f'rank {parallel.RANK}: '}{message}\n")
    elif parallel.WORLD > 1:
        # a rank that exits first makes torchrun stop the others, rank 0 too, maybe before its line
        # is written: the others wait for rank 0 to exit (torchrun then stops them)
        time.sleep(10)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit 2."""

    def error(self, message):
        fail(self.prog, message)


def placement(cfg: Config) -> tuple[torch.device, torch.dtype]:
    """The run's device (cuda when asked, or auto with CUDA available) and weight dtype (bf16 when
    asked, or auto on CUDA; else fp32)."""
    device = torch.device(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    return device, torch.bfloat16 if cfg.dtype == "bf16" or (
        cfg.dtype == "auto" and device.type == "cuda"
    ) else torch.float32


def check_out_dir(out_dir: str):
    """RunError unless a run directory can be created under out_dir. It probes the nearest existing
    folder with a temporary folder it removes at once, so even root on a read-only file system is
    caught, and nothing is left behind."""
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunError(f"--out-dir {out_dir}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:
        raise RunError(f"--out-dir {out_dir}: cannot write in {parent} ({e.strerror})") from None


def create(cfg: Config, sizes: list[int]) -> str:
    """A new run directory holding config.json (with a numeric suffix if the name is taken)."""
    base = cfg.name or f"{cfg.mode}-n{'-'.join(map(str, sizes))}-s{cfg.seed}"
    path, suffix = os.path.join(cfg.out_dir, base), 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join(cfg.out_dir, f"{base}-{suffix}")
    try:
        os.makedirs(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(
                {**dataclasses.asdict(cfg), "agents": sizes if cfg.mode == "compare" else cfg.agents},
                f,
                indent=2,
            )
    except OSError as e:
        raise RunError(f"cannot create the run directory {path} ({e.strerror})") from None
    return path


def read_config(run_dir: str) -> tuple[Config, list[int]]:
    """The config and team sizes a run was started with."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        fields = {f.name for f in dataclasses.fields(Config)}
        sizes = saved["agents"] if isinstance(saved["agents"], list) else [saved["agents"]]
        return Config(**{**{k: v for k, v in saved.items() if k in fields}, "agents": sizes[0]}), sizes
    except FileNotFoundError:
        raise RunError(f"{run_dir} is not a run directory (no config.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


class Log:
    """metrics.jsonl: every record is written and flushed as it comes (and its line printed with
    echo). A resumed run's log starts again from its checkpoint's records, so it never holds the
    half stage that a crash interrupted. Under torchrun rank 0 writes and prints; every rank keeps
    the records (they are reduced over ranks, so they are the same). tracker (tracking.start):
    mirrors every record and the transcripts; transcripts: the path of the evaluations'
    transcripts.jsonl, cut on resume to the stages of the checkpoint's records."""

    def __init__(self, path: str, records=(), echo: bool = False, tracker=None, transcripts: str = ""):
        self.records, self.echo, self.file = list(records), echo and parallel.main(), None
        self.tracker, self.transcript_file = tracker, None
        if parallel.main():
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
            self.file = open(path, "a")
        # a resume keeps the transcripts of the stages whose records it keeps
        if parallel.main() and transcripts:
            last = self.records[-1]["stage"] if self.records else -1
            rows = [row for row in read_lines(transcripts) if row["stage"] <= last]
            write_atomic(transcripts, "".join(json.dumps(row) + "\n" for row in rows))
            self.transcript_file = open(transcripts, "a")

    def __call__(self, record: dict, line: str):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.records.append(record)
        if self.echo:
            tqdm.write(line)
        if self.tracker:
            self.tracker.metrics(record)

    def transcripts(self, rows: list[dict]):
        """An evaluation's transcripts (tracking.transcripts), one line each."""
        if self.transcript_file:
            self.transcript_file.write("".join(json.dumps(row) + "\n" for row in rows))
            self.transcript_file.flush()
        if self.tracker:
            self.tracker.transcripts(rows)

    def close(self):
        for f in (self.file, self.transcript_file):
            if f:
                f.close()
        if self.tracker:
            self.tracker.close()


def read_lines(path: str) -> list[dict]:
    """The complete lines of a JSON-lines file, parsed (none if there is no file; a line a crash
    cut has no newline)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def write_atomic(path: str, text: str):
    """path holds either its old content or text, whenever a crash comes."""
    with open(path + TMP, "w") as f:
        f.write(text)
    os.replace(path + TMP, path)


def checkpoints(run_dir: str) -> list[str]:
    """The complete checkpoints of a run, oldest first."""
    names = [n for n in os.listdir(run_dir) if n.startswith("checkpoint-stage") and n[16:].isdigit()]
    return [os.path.join(run_dir, n) for n in sorted(names, key=lambda n: int(n[16:]))]


def saved_team(run_dir: str) -> tuple[str, list[str]]:
    """(folder, agent folders) of a run's team: the trained team, or the last checkpoint of a run
    that did not finish; RunError if it has neither."""
    folder = run_dir if os.path.isdir(os.path.join(run_dir, "agent0")) else (checkpoints(run_dir) or [""])[-1]
    if not folder:
        raise RunError(f"{run_dir} holds neither a trained team nor a checkpoint")
    names = sorted(
        (n for n in os.listdir(folder) if n.startswith("agent") and n[5:].isdigit()), key=lambda n: int(n[5:])
    )
    return folder, [os.path.join(folder, n) for n in names]


def lora_base(cfg: Config, run_dir: str) -> str:
    """Where a LoRA run's base model is: --model, or the warmed-up tiny base saved in the run ('' without "
    "LoRA)."""
    return (cfg.model or os.path.join(run_dir, "base")) if cfg.lora_rank else ""


def save_checkpoint(run_dir: str, team, stage: int, records: list[dict], base: str = "", states=None):
    """checkpoint-stage<stage>/: agent<i>/ (Hugging Face weights and tokenizer, or a LoRA team's
    adapters on `base`), optimizer<i>.pt, and state.pt (the stage, the metrics so far and the RNG
    states); written atomically. states: sharded agents' whole weights and optimiser states
    (fsdp.full_state)."""
    final = os.path.join(run_dir, f"checkpoint-stage{stage}")
    tmp = final + TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        team_lib.save_team(team, tmp, base, states)
        for i, agent in enumerate(team):
            optimizer = states[i][1] if states and states[i] else agent.optimizer.state_dict()
            torch.save(optimizer, os.path.join(tmp, f"optimizer{i}.pt"))
        rng = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(
            {"stage": stage, "agents": len(team), "records": records, "rng": rng},
            os.path.join(tmp, "state.pt"),
        )
        # on disk before the rename makes the checkpoint visible
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync(os.path.join(folder, name))
        os.rename(tmp, final)
        fsync(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [os.path.basename(c) for c in checkpoints(run_dir)]
        kept = (
            f"{previous[-1]} is intact; python train.py --resume {run_dir}"
            if previous
            else "no earlier checkpoint"
        )
        raise RunError(
            f"could not write the checkpoint of stage {stage} ({e.strerror or e}); {kept}"
        ) from None
    for old in checkpoints(run_dir)[:-1]:
        shutil.rmtree(old)


def fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(run_dir: str, cfg: Config, device, dtype):
    """(team, records) from the last complete checkpoint, with the optimiser and RNG states
    restored; RunError if there is none or it cannot be read. Nothing is written."""
    found = checkpoints(run_dir)
    if not found:
        raise RunError(f"--resume {run_dir}: no complete checkpoint in it")
    path = found[-1]
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
        agents = [os.path.join(path, f"agent{i}") for i in range(state["agents"])]
        team = team_lib.load_team(agents, device, dtype, team_lib.Training.of(cfg))
        if cfg.fsdp:
            fsdp.shard_team(team, device)
        for i, agent in enumerate(team):
            saved = torch.load(os.path.join(path, f"optimizer{i}.pt"), map_location=device, weights_only=True)
            if cfg.fsdp:
                fsdp.load_optimizer(agent, saved)
            else:
                agent.optimizer.load_state_dict(saved)
    except (
        OSError,
        RuntimeError,
        KeyError,
        ValueError,
        EOFError,
        pickle.UnpicklingError,
        team_lib.LoadError,
    ) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RunError(f"--resume {run_dir}: {os.path.basename(path)} cannot be read ({reason})") from None
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return team, state["records"]


def remove_partial(run_dir: str):
    """What a crash left half-written: checkpoint .tmp folders (called once a resume has read its "
    "checkpoint)."""
    for name in os.listdir(run_dir):
        if name.endswith(TMP):
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
