"""train.py's command line: one flag per field of config.Config, in its groups, and the checks of
every input. A bad input ends in one line on stderr and exit 2, before anything is written: the
values each field accepts are given beside it (config.flag); the combinations that cannot work
are checked here.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch

import config
import parallel
from config import Config
from plumbing import runs
from tasks import mathdata
from tasks.base import TaskError

# team modes level off by stage 10-12; 20 stages x 7 modes x 3 seeds took 16 min on 2 cores
COMPARE_STAGES = 15
RESUME_HELP = (
    "continue RUN_DIR from its last checkpoint, with its saved config (only --threads and --dist-timeout)"
)


def team_sizes(text: str) -> list[int]:
    """--agents: one team size, or a comma-separated list of them (compare)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        message = f"expected a number of agents or a list such as 2,4,6,8, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def per_agent(kind):
    """A per-agent flag: one value, or a comma-separated list of one value per agent (a list)."""

    def parse(text: str):
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {kind.__name__} or a list such as 1,2, got {text!r}"
            )
        return values[0] if len(values) == 1 else values

    parse.__name__ = kind.__name__
    return parse


def parser(description: str) -> argparse.ArgumentParser:
    """Every field of Config as a flag, grouped as in config.py; flags are matched exactly."""
    parser = runs.Parser(prog="train.py", description=description, allow_abbrev=False)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for group, docs in config.documented_groups().items():
        options = parser.add_argument_group(group)
        for name, doc in docs.items():
            f, flag = fields[name], "--" + name.replace("_", "-")
            if f.type is bool:
                options.add_argument(flag, action="store_true", help=doc)
                continue
            kind, default = (team_sizes, [f.default]) if name == "agents" else (f.type, f.default)
            kind = per_agent(kind) if f.metadata.get("per_agent") else kind
            options.add_argument(
                flag, type=kind, default=default, choices=f.metadata.get("choices"), help=doc
            )
    parser.add_argument("--resume", default="", metavar="RUN_DIR", help=RESUME_HELP)
    return parser


def parse(description: str, argv=None) -> tuple[Config, list[int], str]:
    """The config, the team sizes (more than one only with --mode compare) and the run to resume
    ('' for a new run; with --resume the config is the run's saved one)."""
    argv = sys.argv[1:] if argv is None else argv
    cli = parser(description)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if "--top-p" in given:
        cli.error(
            "--top-p: training samples the whole distribution at --temperature, because the trust "
            "region's KL and ratios need the log-probs of the distribution that sampled (a nucleus "
            "gives a token outside the old one an infinite KL); sharpen with --temperature, or use "
            "eval.py --top-p for sampled evaluation"
        )
    args = vars(cli.parse_args(argv))
    if resume := args.pop("resume"):
        return (*resumed(cli, resume, args, given), resume)
    sizes = args.pop("agents")
    cfg = Config(agents=sizes[0], **args)
    check_values(cli, cfg, sizes)
    check_combinations(cli, cfg, sizes, given)
    if cfg.mode == "compare" and "--stages" not in given:
        cfg.stages = COMPARE_STAGES
    make_paths_absolute(cfg)
    if cfg.init or cfg.replace:
        check_replacement(cli, cfg)
    check_names(cli, cfg)
    return (cfg if cfg.mode == "compare" else config.resolve(cfg)), sizes, ""


def resumed(cli, run_dir: str, args: dict, given: set) -> tuple[Config, list[int]]:
    """The saved config of the run to resume, with --threads and --dist-timeout if given."""
    if extra := given - {"--resume", "--threads", "--dist-timeout"}:
        cli.error(f"--resume continues a run with its saved config; drop {', '.join(sorted(extra))}")
    try:
        cfg, sizes = runs.read_config(run_dir)
    except runs.RunError as e:
        cli.error(str(e))
    # a run started before training refused --top-p < 1 (its KL was not of the distribution
    # that sampled); the saved config holds it, Config no longer does
    with open(os.path.join(run_dir, "config.json")) as f:
        top_p = json.load(f).get("top_p", 1.0)
    if top_p != 1.0:
        cli.error(
            f"--resume {run_dir}: the run samples with --top-p {top_p}, which training no longer "
            "takes (the trust region's KL would not be of the distribution that sampled); start it again"
        )
    # summary.md is written last, by a finished run (compare writes none)
    if os.path.exists(os.path.join(run_dir, "summary.md")):
        cli.error(f"--resume {run_dir}: the run is finished (its summary.md is written); nothing to resume")
    cfg.threads = args["threads"] if "--threads" in given else cfg.threads
    cfg.dist_timeout = args["dist_timeout"] if "--dist-timeout" in given else cfg.dist_timeout
    return cfg, sizes


def check_values(cli, cfg: Config, sizes: list[int]):
    """Each value against what its field accepts (config.flag); a per-agent list has one value
    per agent."""
    for f in dataclasses.fields(Config):
        checks, flag, value = f.metadata, "--" + f.name.replace("_", "-"), getattr(cfg, f.name)
        if isinstance(value, list) and len(sizes) > 1:
            cli.error(
                f"{flag} gives one value per agent: it needs one team size, not --agents {len(sizes)} sizes"
            )
        if isinstance(value, list) and len(value) != cfg.agents:
            cli.error(f"{flag} gives {len(value)} values, one per agent: needs --agents {len(value)}")
        values = sizes if f.name == "agents" else value if isinstance(value, list) else [value]
        for value in values:
            if checks.get("at_least") is not None and value < checks["at_least"]:
                cli.error(f"{flag} must be at least {checks['at_least']}, got {value}")
            if checks.get("positive") and not value > 0:
                cli.error(f"{flag} must be positive, got {value}")
            if checks.get("at_most") is not None and value > checks["at_most"]:
                cli.error(f"{flag} must be at most {checks['at_most']}, got {value}")


def check_combinations(cli, cfg: Config, sizes: list[int], given: set):
    """The flags that need or exclude others."""
    compare = cfg.mode == "compare"
    if cfg.questions < parallel.WORLD:
        cli.error(
            f"--questions {cfg.questions}: fewer than the {parallel.WORLD} processes, and each process "
            "plays whole questions"
        )
    # compare: checked for its fresh modes
    fresh = compare or (cfg.resample or config.MODES[cfg.mode][0]) == "fresh"
    needs_fresh = "it needs fresh resampling (--mode teamtr or fresh-no-tr)"
    if cfg.shared_prefix and not fresh:
        cli.error(f"--shared-prefix plays each agent's batch again from shared prefixes: {needs_fresh}")
    if cfg.no_early_exit and not fresh and not cfg.measure_gap:
        cli.error(f"--no-early-exit changes how suffix resampling plays: {needs_fresh} or --measure-gap")
    if cfg.temperature == 0 and cfg.mode != "none":
        cli.error(
            "--temperature 0 samples every group's messages alike, so every advantage is 0 and nothing "
            "is learned: train at a temperature above 0 (evaluation is greedy already)"
        )
    if cfg.p_max_arg and not (cfg.p_max_arg <= 1 and cfg.max_arg >= 2):
        cli.error(
            f"--p-max-arg must be at most 1 and needs --max-arg 2 or more, got {cfg.p_max_arg} with "
            f"--max-arg {cfg.max_arg}"
        )
    if len(sizes) > 1 and not compare:
        cli.error(f"--agents {','.join(map(str, sizes))}: a list of team sizes needs --mode compare")
    if not compare and given & {"--modes", "--seeds"}:
        cli.error("--modes and --seeds belong to --mode compare")
    if compare:
        check_compare(cli, cfg, given)
    # the relay's variants, learned in the tiny agents' warm-up
    variants = [name for name, on in (("--codes", cfg.codes), ("--work", cfg.work)) if on]
    if variants and (cfg.model or cfg.models):
        cli.error(f"{variants[0]} changes the warm-up of the tiny agents; --model/--models are not warmed up")
    if cfg.task != "relay" and not mathdata.is_math_task(cfg.task):
        tasks = f"relay, words, {', '.join(mathdata.HUB)}, jsonl:PATH or parquet:PATH"
        cli.error(f"--task: unknown task {cfg.task!r} ({tasks})")
    check_eval_tasks(cli, cfg)
    if cfg.task != "relay" and not (cfg.model or cfg.models or cfg.init):
        cli.error(
            f"--task {cfg.task} needs pretrained agents: pass --model, --models or --init RUN_DIR (the "
            "tiny agents only learn the relay)"
        )
    if variants and cfg.task != "relay":
        cli.error(f"{variants[0]} is a variant of the relay task")
    if "--code-links" in given and not cfg.codes:
        cli.error("--code-links sets how many links --codes leaves free; add --codes")
    if cfg.prompts and cfg.task == "relay":
        cli.error("--prompts gives the roles of a real task's agents; the relay has none")
    if cfg.lora_rank and cfg.models:
        cli.error("--lora-rank puts the team on one shared base model: use --model, not --models")
    if cfg.models and len(cfg.models.split(",")) != cfg.agents:
        cli.error(f"--models names {len(cfg.models.split(','))} models for --agents {cfg.agents}")
    if cfg.fsdp:
        check_fsdp(cli, cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        cli.error("--device cuda, but CUDA is not available")


def check_fsdp(cli, cfg: Config):
    """--fsdp: what it shards, and what it does not do yet."""
    if parallel.WORLD < 2:
        cli.error("--fsdp shards the team over processes: launch it with torchrun --nproc-per-node 2 or more")
    if cfg.mode == "compare" or cfg.lora_rank or cfg.replace:
        cli.error(
            "--fsdp trains whole agents of one run: not with --mode compare, --lora-rank or --replace yet"
        )


def check_eval_tasks(cli, cfg: Config):
    """--eval-tasks: benchmarks of a real task, each named once."""
    names = cfg.eval_tasks.split(",") if cfg.eval_tasks else []
    if names and cfg.task == "relay":
        cli.error(
            "--eval-tasks evaluates a real task's team on math benchmarks; the relay has its held-out set"
        )
    try:
        mathdata.check_names(names, "--eval-tasks")
    except TaskError as e:
        cli.error(str(e))


def check_compare(cli, cfg: Config, given: set):
    """--mode compare: its own flags."""
    if cfg.eval_every > 1:
        cli.error("--mode compare evaluates after every stage (its plots need it); drop --eval-every")
    if given & {"--resample", "--trust-region", "--models"}:
        cli.error(
            "--mode compare sets --resample and --trust-region from each of --modes and takes one --model"
        )
    modes = cfg.modes.split(",")
    for mode in modes:
        if mode not in config.MODES:
            cli.error(f"--modes: unknown mode {mode!r} (choose from {', '.join(config.MODES)})")
    if len(set(modes)) < len(modes):
        cli.error(f"--modes names a mode twice: {cfg.modes}")


def make_paths_absolute(cfg: Config):
    """Local files as absolute paths in config.json, so that eval.py and a resume find them from
    anywhere; hub names as they are."""
    cfg.task = mathdata.absolute(cfg.task)
    cfg.eval_tasks = ",".join(map(mathdata.absolute, cfg.eval_tasks.split(","))) if cfg.eval_tasks else ""
    cfg.prompts = cfg.prompts and os.path.abspath(cfg.prompts)
    cfg.model = local_path(cfg.model) if cfg.model else ""
    cfg.models = ",".join(map(local_path, cfg.models.split(","))) if cfg.models else ""


def local_path(name: str) -> str:
    """A model given as a local path, made absolute; a hub name as it is."""
    return os.path.abspath(name) if os.path.exists(name) else name


def check_replacement(cli, cfg: Config):
    """--init and --replace: what cannot work."""
    if cfg.mode == "compare" or cfg.model or cfg.models or cfg.lora_rank:
        cli.error(
            "--init starts one run from a saved team: not with --mode compare, --model, --models or "
            "--lora-rank"
        )
    if cfg.replace and not cfg.init:
        cli.error("--replace swaps an agent of a saved team: give the team with --init RUN_DIR")
    if not os.path.isdir(cfg.init):
        cli.error(f"--init {cfg.init}: no such run directory")
    try:
        saved = runs.read_config(cfg.init)[0]
    except runs.RunError as e:
        cli.error(f"--init {e}")
    if saved.lora_rank:
        cli.error(
            f"--init {cfg.init}: a LoRA team cannot start a new run yet (its adapters' base is not "
            "carried over)"
        )
    # the tiny agents know the relay's alphabet only
    if (saved.task == "relay") != (cfg.task == "relay"):
        agents = "tiny agents" if saved.task == "relay" else "pretrained models"
        cli.error(
            f"--init {cfg.init}: its team ({agents}) was trained on --task {saved.task}, and this run's "
            f"--task is {cfg.task}"
        )
    index, _, path = cfg.replace.partition("=")
    if cfg.replace and not (index.isdigit() and int(index) < cfg.agents and path):
        cli.error(f"--replace expects i=PATH with 0 <= i < --agents {cfg.agents}, got {cfg.replace!r}")
    cfg.init = os.path.abspath(cfg.init)
    if cfg.replace:
        cfg.replace = f"{index}={local_path(path)}"


def check_names(cli, cfg: Config):
    """--name: a new folder under --out-dir."""
    if cfg.name and (os.path.basename(cfg.name) != cfg.name or cfg.name in (".", "..")):
        cli.error(f"--name {cfg.name}: a folder name under --out-dir, not a path")
    if cfg.name and os.path.exists(os.path.join(cfg.out_dir, cfg.name)):
        cli.error(
            f"{os.path.join(cfg.out_dir, cfg.name)} exists; choose another --name (nothing was overwritten)"
        )
