"""Experiment tracking and transcripts: what a run records besides metrics.jsonl.

    python train.py --tracker tensorboard     # then: tensorboard --logdir runs
    WANDB_MODE=offline python train.py --tracker wandb

--tracker mirrors every metrics.jsonl record to TensorBoard or Weights & Biases, with the run's
config as its hyperparameters; metrics.jsonl stays the record (a resume rewrites it, the tracker
only follows). The x-axis is the stage: a stage's updates and its own record share it, so a key
without an agent prefix in an update record (batch_reward) is logged as agent{i}/batch_reward,
and the indices (stage, update, agent) are not logged as metrics. Both packages are optional, imported only
when asked for. Every held-out evaluation also keeps its first greedy episodes as transcripts
(runs.Log writes them to transcripts.jsonl), as TRL's log_completions does, and the tracker shows
them: TensorBoard's text tab, a wandb.Table.

TensorBoard writes into the run directory (tensorboard/, or tensorboard/<run>/ for each run of a
--mode compare directory); wandb into ./wandb (or $WANDB_DIR), project teamtr (or
$WANDB_PROJECT), one wandb run per run, compare's grouped by their directory.
"""

import dataclasses
import hashlib
import importlib
import os

import parallel

# the held-out episodes kept per evaluation
TRANSCRIPTS = 4
# --tracker -> (the module it imports, the package that provides it)
MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
# a record's indices, the step and its place in it, not metrics
INDICES = ("stage", "update", "agent")


class TrackerError(Exception):
    """--tracker names a package that cannot be imported (one line naming what to install)."""


def check(name: str):
    """TrackerError unless --tracker's package imports ('' asks for none)."""
    if not name:
        return
    module, package = MODULES[name]
    try:
        importlib.import_module(module)
    except ImportError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackerError(f"--tracker {name} needs the {package} package ({reason}): pip install {package}")


def start(cfg, run_dir: str, sub: str = "", done=()):
    """The tracker of a run (None without --tracker, and on every rank but 0). sub: one run of a
    --mode compare directory (its name there); done: a resumed run's records."""
    if not cfg.tracker or not parallel.main():
        return None
    # a per-agent list (--lr 1e-5,2e-5) as its text: hyperparameters are numbers, strings or bools
    config = {
        k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in dataclasses.asdict(cfg).items()
    }
    if cfg.tracker == "wandb":
        try:
            return WandB(config, run_dir, sub)
        # not logged in, or the service did not start: one line, as a bad input
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise TrackerError(
                f"--tracker wandb could not start a run ({type(e).__name__}: {reason})"
            ) from None
    # a resumed run goes on from the stage after its checkpoint
    first_step = done[-1]["stage"] + 1 if done else 0
    return TensorBoard(config, os.path.join(run_dir, "tensorboard", sub), first_step)


def scalars(record: dict) -> dict:
    """A record's metrics as the tracker logs them: an update's own keys under agent{i}/, no
    indices, no None (not measured)."""
    prefix = f"agent{record['agent']}/" if "agent" in record else ""
    return {
        key if "/" in key else prefix + key: v
        for key, v in record.items()
        if key not in INDICES and v is not None
    }


def transcripts(task, played: list, stage: int) -> list[dict]:
    """The first TRANSCRIPTS of this rank's greedy held-out episodes, one row each: every message
    with its writer's role (a math task's role name, agent{i} on the relay), the answer graded
    from the last message, the gold answer and the reward."""
    return [
        {
            "stage": stage,
            "episode": j,
            "question": e.question.text,
            "messages": [{"role": role(task, s.agent), "text": s.text} for s in e.steps],
            # graded as the reward reads it (the relay's value, with --work)
            "answer": task.answer(e.steps[-1].text) if e.steps else "",
            "gold": e.question.answer,
            "reward": e.reward,
        }
        for j, e in enumerate(played[:TRANSCRIPTS])
    ]


def role(task, agent: int) -> str:
    roles = getattr(task, "roles", None)
    return roles[agent]["name"] if roles else f"agent{agent}"


def markdown(row: dict) -> str:
    """One transcript as TensorBoard's text tab renders it."""
    messages = "\n\n".join(f"**{m['role']}**: {m['text']}" for m in row["messages"])
    return (
        f"**question**: {row['question']}\n\n{messages}\n\n"
        f"**answer** {row['answer']} (gold {row['gold']}), reward {row['reward']}"
    )


class TensorBoard:
    """Scalars (step: the stage), the config in the HParams tab (against the final stage/eval_acc)
    and one text card per transcript episode. first_step: the stage it starts at; TensorBoard hides
    what an earlier process logged in the folder from there on (purge_step): a resumed run's
    interrupted stage, or a restarted compare run's earlier try."""

    def __init__(self, config: dict, folder: str, first_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(folder, purge_step=first_step)
        if not first_step:
            experiment, session_start = hparams(config, {"stage/eval_acc": None})[:2]
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(session_start)

    def metrics(self, record: dict):
        for key, v in scalars(record).items():
            self.writer.add_scalar(key, v, record["stage"])
        self.writer.flush()

    def transcripts(self, rows: list[dict]):
        for row in rows:
            self.writer.add_text(f"transcripts/episode{row['episode']}", markdown(row), row["stage"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """One wandb run per run, with the config; its x-axis is the stage (define_metric), one history
    row per record; transcripts as a wandb.Table per evaluation. A train.py run's id comes from its
    directory (its path and when its config.json was written), so a resume continues the same
    wandb run: rows are only added, so the interrupted stage's records are there twice, as the
    same numbers (a resume reproduces them). A compare run is trained again from its start on
    --resume, so each try is a new wandb run."""

    def __init__(self, config: dict, run_dir: str, sub: str):
        import wandb

        self.wandb = wandb
        created = os.stat(os.path.join(run_dir, "config.json")).st_mtime_ns
        key = repr((os.path.abspath(run_dir), created)).encode()
        name = os.path.basename(run_dir)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "teamtr"),
            name=sub or name,
            group=name if sub else None,
            id=None if sub else hashlib.blake2b(key, digest_size=8).hexdigest(),
            resume=None if sub else "allow",
            config=config,
        )
        self.run.define_metric("stage")
        self.run.define_metric("*", step_metric="stage")

    def metrics(self, record: dict):
        self.run.log({"stage": record["stage"], **scalars(record)})

    def transcripts(self, rows: list[dict]):
        columns = ["stage", "episode", "question", "transcript", "answer", "gold", "reward"]
        data = [
            [
                *(row[c] for c in columns[:3]),
                "\n".join(f"[{m['role']}]: {m['text']}" for m in row["messages"]),
                *(row[c] for c in columns[4:]),
            ]
            for row in rows
        ]
        if data:
            table = self.wandb.Table(columns=columns, data=data)
            self.run.log({"stage": rows[0]["stage"], "transcripts": table})

    def close(self):
        self.run.finish()
