"""Train a team with TeamTR (or a baseline mode) and write a run directory.

    python train.py --agents 3 --mode teamtr        # the default: relay task, tiny CPU agents
    python train.py --agents 3 --mode stale         # same, evaluated on stale occupancy
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --grad-ckpt
    python train.py --mode compare                  # every mode side by side (compare.py)
    python train.py --resume runs/teamtr-n3-s0      # continue a run that was stopped or crashed

What a run does: check every input; build the task; build the agents (warmup.py: tiny Qwen2
models warmed up to an imperfect start and copied once per agent, or Hugging Face models);
evaluate the starting team on the held-out set; run the stages of teamtr.py, with a checkpoint
after each (runs.py); save one Hugging Face checkpoint per agent; print held-out accuracy before
and after. A bad input ends in one line on stderr, exit 2, before anything is written; Ctrl-C
prints the command that resumes the run.

runs/<name>/ holds config.json (the resolved config), metrics.jsonl (one JSON object per update
and per stage; names as in SPEC section 5), checkpoint-stage<S>/ (the last stage's weights,
optimiser and RNG states), agent{i}/ (save_pretrained) and summary.md.
Every flag is a field of config.Config; `python train.py --help` lists them with their docs.
"""

import argparse
import ast
import contextlib
import dataclasses
import inspect
import os
import shutil
import signal
import sys
import time

import torch

import compare
import config
import mathtask
import parallel
import replace
import rollout
import runs
import tasks
import team as team_lib
import teamtr
import warmup
from config import Config

CHOICES = {
    "mode": [*config.MODES, "compare"],
    "resample": ["", "fresh", "stale", "reweight"],
    "trust_region": ["", "on", "off"],
    "order": ["fixed", "random"],
    "update_order": ["turn", "reverse", "random"],
    "kl": ["kl_rev", "full"],
    "reduction": ["token", "sequence"],
    "accept": ["always", "heldout"],
    "optimizer": ["adam", "sgd"],
    "device": ["auto", "cpu", "cuda"],
    "dtype": ["auto", "fp32", "bf16"],
}
MINIMUM = {
    "agents": 1,
    "seeds": 1,
    "rounds": 1,
    "modulus": 2,
    "max_arg": 1,
    "p_max_arg": 0.0,
    "hidden": 8,
    "layers": 1,
    "warmup_steps": 0,
    "warmup_target": 0.0,
    "align_steps": 0,
    "demo_error": 0.0,
    "demo_max_arg": 0,
    "stages": 0,
    "questions": 1,
    "group": 2,
    "eval_size": 1,
    "eval_every": 1,
    "epochs": 1,
    "minibatch": 1,
    "threads": 0,
    "lora_rank": 0,
    "max_backtracks": 0,
    "max_new_tokens": 0,
    "temperature": 0.0,
    "happo_max_weight": 1.0,
    "holdout": 0.0,
}
# team modes level off by stage 10-12; 20 stages x 7 modes x 3 seeds took 16 min on 2 cores
COMPARE_STAGES = 15
POSITIVE = [
    "lr",
    "warmup_lr",
    "delta",
    "clip_eps",
    "adv_max",
    "top_p",
    "max_grad_norm",
    "lora_alpha",
    "dist_timeout",
]


def fail(message: str, code: int = 2):
    """One line on stderr; exit 2 for a bad input (nothing written yet), 1 for a run that failed."""
    runs.fail("train.py", message, code)


def field_docs(cls) -> dict:
    """The docstring under each dataclass field, for --help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        a.target.id: b.value.value
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
    }


def team_sizes(text: str) -> list[int]:
    """--agents: one team size, or a comma-separated list of them (compare)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of agents or a list such as 2,4,6,8, got {text!r}"
        ) from None


def parse(argv=None) -> tuple[Config, list[int], str]:
    """The config, the team sizes (more than one only with --mode compare) and the run to resume
    ('' for a new run; then the config is its saved one)."""
    argv = sys.argv[1:] if argv is None else argv
    # flags are matched exactly
    parser = runs.Parser(prog="train.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    docs = field_docs(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=docs[f.name])
        else:
            kind, default = (team_sizes, [f.default]) if f.name == "agents" else (f.type, f.default)
            parser.add_argument(
                flag, type=kind, default=default, choices=CHOICES.get(f.name), help=docs[f.name]
            )
    parser.add_argument(
        "--resume",
        default="",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint, with its saved config (only --threads and --dist-timeout may be given too)",
    )
    args = vars(parser.parse_args(argv))
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if resume := args.pop("resume"):
        if extra := given - {"--resume", "--threads", "--dist-timeout"}:
            parser.error(f"--resume continues a run with its saved config; drop {', '.join(sorted(extra))}")
        try:
            cfg, sizes = runs.read_config(resume)
        except runs.RunError as e:
            parser.error(str(e))
        # written last, by a finished run (compare writes none)
        if os.path.exists(os.path.join(resume, "summary.md")):
            parser.error(
                f"--resume {resume}: the run is finished (its summary.md is written); nothing to resume"
            )
        cfg.threads = args["threads"] if "--threads" in given else cfg.threads
        cfg.dist_timeout = args["dist_timeout"] if "--dist-timeout" in given else cfg.dist_timeout
        return cfg, sizes, resume
    sizes = args.pop("agents")
    cfg = Config(agents=sizes[0], **args)
    compare = cfg.mode == "compare"
    for name, low in MINIMUM.items():
        for value in sizes if name == "agents" else [getattr(cfg, name)]:
            if value < low:
                parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    for name in POSITIVE:
        if not getattr(cfg, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.questions < parallel.WORLD:
        parser.error(
            f"--questions {cfg.questions}: fewer than the {parallel.WORLD} processes, and each process plays whole questions"
        )
    for name in ("top_p", "warmup_target"):
        if getattr(cfg, name) > 1:
            parser.error(f"--{name.replace('_', '-')} must be at most 1, got {getattr(cfg, name)}")
    # compare: checked for its fresh modes
    fresh = compare or (cfg.resample or config.MODES[cfg.mode][0]) == "fresh"
    if cfg.shared_prefix and not fresh:
        parser.error(
            "--shared-prefix plays each agent's batch again from shared prefixes: it needs fresh resampling (--mode teamtr or fresh-no-tr)"
        )
    if cfg.reuse_kv and not fresh and not cfg.measure_gap:
        parser.error(
            "--reuse-kv speeds up suffix resampling: it needs fresh resampling (--mode teamtr or fresh-no-tr) or --measure-gap"
        )
    if not cfg.holdout < 1:
        parser.error(f"--holdout must be below 1 (the update trains on the rest), got {cfg.holdout}")
    if cfg.accept == "heldout" and not cfg.holdout:
        parser.error("--accept heldout tests each update on held-out questions: give --holdout, e.g. 0.25")
    if cfg.p_max_arg and not (cfg.p_max_arg <= 1 and cfg.max_arg >= 2):
        parser.error(
            f"--p-max-arg must be at most 1 and needs --max-arg 2 or more, got {cfg.p_max_arg} with --max-arg {cfg.max_arg}"
        )
    if len(sizes) > 1 and not compare:
        parser.error(f"--agents {','.join(map(str, sizes))}: a list of team sizes needs --mode compare")
    if not compare and given & {"--modes", "--seeds"}:
        parser.error("--modes and --seeds belong to --mode compare")
    if compare and "--stages" not in given:
        cfg.stages = COMPARE_STAGES
    if compare and cfg.eval_every > 1:
        parser.error("--mode compare evaluates after every stage (its plots need it); drop --eval-every")
    if compare and given & {"--resample", "--trust-region", "--models"}:
        parser.error(
            "--mode compare sets --resample and --trust-region from each of --modes and takes one --model"
        )
    modes = cfg.modes.split(",") if compare else []
    for mode in modes:
        if mode not in config.MODES:
            parser.error(f"--modes: unknown mode {mode!r} (choose from {', '.join(config.MODES)})")
    if len(set(modes)) < len(modes):
        parser.error(f"--modes names a mode twice: {cfg.modes}")
    for flag, value in (("--codes", cfg.codes), ("--warmup-target", cfg.warmup_target)):
        if value and (cfg.model or cfg.models):
            parser.error(f"{flag} changes the warm-up of the tiny agents; --model/--models are not warmed up")
    if cfg.task != "relay" and not mathtask.is_math_task(cfg.task):
        parser.error(
            f"--task: unknown task {cfg.task!r} (relay, words, {', '.join(mathtask.HUB)}, jsonl:PATH or parquet:PATH)"
        )
    if cfg.task != "relay" and not (cfg.model or cfg.models):
        parser.error(
            f"--task {cfg.task} needs pretrained agents: pass --model or --models (the tiny agents only learn the relay)"
        )
    if cfg.codes and cfg.task != "relay":
        parser.error("--codes is a variant of the relay task")
    if cfg.prompts and cfg.task == "relay":
        parser.error("--prompts gives the roles of a real task's agents; the relay has none")
    kind, _, path = cfg.task.partition(":")
    # absolute paths in config.json, so eval.py finds them from anywhere
    if kind in mathtask.LOCAL:
        cfg.task = f"{kind}:{os.path.abspath(path)}"
    cfg.prompts = cfg.prompts and os.path.abspath(cfg.prompts)
    cfg.model, cfg.models = (
        local_path(cfg.model) if cfg.model else "",
        ",".join(map(local_path, cfg.models.split(","))) if cfg.models else "",
    )
    if cfg.init or cfg.replace:
        check_replacement(parser, cfg, compare)
    if cfg.lora_rank and cfg.models:
        parser.error("--lora-rank puts the team on one shared base model: use --model, not --models")
    if cfg.models and len(cfg.models.split(",")) != cfg.agents:
        parser.error(f"--models names {len(cfg.models.split(','))} models for --agents {cfg.agents}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    if cfg.name and (os.path.basename(cfg.name) != cfg.name or cfg.name in (".", "..")):
        parser.error(f"--name {cfg.name}: a folder name under --out-dir, not a path")
    if cfg.name and os.path.exists(os.path.join(cfg.out_dir, cfg.name)):
        parser.error(
            f"{os.path.join(cfg.out_dir, cfg.name)} exists; choose another --name (nothing was overwritten)"
        )
    return (cfg if compare else config.resolve(cfg)), sizes, ""


def local_path(name: str) -> str:
    """A model given as a local path, made absolute (a resume may start elsewhere); a hub name as it is."""
    return os.path.abspath(name) if os.path.exists(name) else name


def check_replacement(parser, cfg: Config, compare: bool):
    """--init and --replace: one line, exit 2, for what cannot work."""
    if compare or cfg.model or cfg.models or cfg.lora_rank:
        parser.error(
            "--init starts one run from a saved team: not with --mode compare, --model, --models or --lora-rank"
        )
    if cfg.replace and not cfg.init:
        parser.error("--replace swaps an agent of a saved team: give the team with --init RUN_DIR")
    if not os.path.isdir(cfg.init):
        parser.error(f"--init {cfg.init}: no such run directory")
    index, _, path = cfg.replace.partition("=")
    if cfg.replace and not (index.isdigit() and int(index) < cfg.agents and path):
        parser.error(f"--replace expects i=PATH with 0 <= i < --agents {cfg.agents}, got {cfg.replace!r}")
    cfg.init = os.path.abspath(cfg.init)
    if cfg.replace:
        cfg.replace = f"{index}={local_path(path)}"


def write_summary(run_dir, cfg: Config, accs, seconds, resumed_after=None):
    """summary.md; resumed_after: the checkpoint's stage when this process resumed the run (the
    command is then the resume's, and the seconds those since the resume)."""
    rows = "\n".join(f"| {s} | {a:.3f} |" for s, a in zip(teamtr.evaluated_stages(cfg), accs))
    since = (
        ""
        if resumed_after is None
        else f" since the resume after stage {resumed_after} (the run's config is in config.json)"
    )
    text = (
        f"# {os.path.basename(run_dir)}\n\n`python train.py {' '.join(sys.argv[1:])}`\n\n"
        f"mode {cfg.mode} (resample {cfg.resample}, trust region {cfg.trust_region}), {cfg.agents} agents, seed {cfg.seed}\n\n"
        f"held-out accuracy: {accs[0]:.3f} -> {accs[-1]:.3f} ({100 * (accs[-1] - accs[0]):+.1f} points), {seconds:.0f} s{since}\n\n"
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
        return [tasks.make(dataclasses.replace(cfg, agents=n)) for n in sizes][0]
    except (mathtask.TaskError, team_lib.LoadError) as e:
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
    error = ""
    if parallel.main():
        try:
            runs.save_checkpoint(run_dir, team, stage, log.records, base)
        except runs.RunError as e:
            error = str(e)
    if error := parallel.broadcast_object(error):
        raise runs.RunError(error)


@contextlib.contextmanager
def stops_cleanly(run_dir: str):
    """Ctrl-C (or torchrun's SIGTERM) and a lost process end in one line with the resume command."""
    try:
        yield
    except KeyboardInterrupt:
        # torchrun may signal again while this one ends
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fail(f"interrupted; continue with: {resume_command(run_dir)}", 130)
    except parallel.ProcessLost as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fail(
            f"another process of this run stopped or stopped answering ({e}); continue with: {resume_command(run_dir)}",
            1,
        )


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
    heldout = task.heldout(cfg.eval_size)
    log, base = (
        runs.Log(os.path.join(run_dir, "metrics.jsonl"), done, echo=True),
        runs.lora_base(cfg, run_dir),
    )
    try:
        with stops_cleanly(run_dir):
            if cfg.replace and not done:
                team = replace.swap_and_align(team, task, heldout, cfg, log, device, dtype)
            accs = teamtr.train_stages(
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
    parallel.check_identical(team)
    if parallel.main():
        team_lib.save_team(team, run_dir, base)
        write_summary(run_dir, cfg, accs, time.time() - began, done[-1]["stage"] if done else None)
    parallel.print0(
        f"held-out accuracy ({len(heldout)} questions): starting team {accs[0]:.3f} -> trained team {accs[-1]:.3f} "
        f"({100 * (accs[-1] - accs[0]):+.1f} points) in {time.time() - began:.0f} s; wrote {run_dir}"
    )


def main(argv=None):
    cfg, sizes, resume = parse(argv)
    began = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = runs.placement(cfg)
    parallel.init(device, cfg.dist_timeout)
    # torchrun ends the other processes with SIGTERM when one fails: stop as on Ctrl-C
    if parallel.WORLD > 1:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    task = checked_inputs(cfg, sizes)
    train(cfg, sizes, resume, device, dtype, task, began)
    parallel.close()


if __name__ == "__main__":
    main()
