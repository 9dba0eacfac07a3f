"""Train a team with TeamTR (or a baseline mode) and write a run directory.

    python train.py --agents 3 --mode teamtr        # the default: relay task, tiny CPU agents
    python train.py --agents 3 --mode stale         # same, evaluated on stale occupancy
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --grad-ckpt
    python train.py --mode compare                  # every mode side by side (compare.py)

What a run does: build the task; build the agents (tiny Qwen2 models with a character tokenizer,
warmed up by a short supervised phase to an imperfect start, then copied once per agent; or
Hugging Face models); evaluate the starting team on the held-out set; run the stages of
teamtr.py; save one Hugging Face checkpoint per agent; print held-out accuracy before and after.

runs/<name>/ holds config.json (the resolved config), metrics.jsonl (one JSON object per update
and per stage; names as in SPEC section 5), agent{i}/ (save_pretrained) and summary.md.
Every flag is a field of teamtr.Config; `python train.py --help` lists them with their docs.
"""
import argparse
import ast
import dataclasses
import inspect
import json
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import losses
import mathtask
import rollout
import tasks
import team as team_lib
import teamtr
from teamtr import Config

CHOICES = {
    "mode": [*teamtr.MODES, "compare"], "resample": ["", "fresh", "stale", "reweight"], "trust_region": ["", "on", "off"],
    "order": ["fixed", "random"], "update_order": ["turn", "reverse", "random"], "kl": ["kl_rev", "full"],
    "reduction": ["token", "sequence"], "optimizer": ["adam", "sgd"], "device": ["auto", "cpu", "cuda"], "dtype": ["auto", "fp32", "bf16"],
}
MINIMUM = {"agents": 1, "seeds": 1, "rounds": 1, "modulus": 2, "max_arg": 1, "p_max_arg": 0.0, "hidden": 8, "layers": 1,
           "warmup_steps": 0, "demo_error": 0.0, "demo_max_arg": 0, "stages": 0, "questions": 1, "group": 2, "eval_size": 1, "eval_every": 1,
           "epochs": 1, "minibatch": 1, "threads": 0, "max_backtracks": 0, "max_new_tokens": 0, "temperature": 0.0, "happo_max_weight": 1.0}
COMPARE_STAGES = 15  # team modes level off by stage 10-12; 20 stages x 7 modes x 3 seeds took 16 min on 2 cores
POSITIVE = ["lr", "warmup_lr", "delta", "clip_eps", "adv_max", "top_p", "max_grad_norm"]


def fail(message: str):
    """A bad input: one line on stderr, exit code 2 (callers make sure nothing was written yet)."""
    sys.stderr.write(f"train.py: error: {message}\n")
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def field_docs(cls) -> dict:
    """The docstring under each dataclass field, for --help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def team_sizes(text: str) -> list[int]:
    """--agents: one team size, or a comma-separated list of them (compare)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of agents or a list such as 2,4,6,8, got {text!r}") from None


def parse(argv=None) -> tuple[Config, list[int]]:
    """The config, and the team sizes (more than one only with --mode compare)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="train.py", description=__doc__.splitlines()[0], allow_abbrev=False)  # flags are matched exactly
    docs = field_docs(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=docs[f.name])
        else:
            kind, default = (team_sizes, [f.default]) if f.name == "agents" else (f.type, f.default)
            parser.add_argument(flag, type=kind, default=default, choices=CHOICES.get(f.name), help=docs[f.name])
    args = vars(parser.parse_args(argv))
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
    if cfg.top_p > 1:
        parser.error(f"--top-p must be at most 1, got {cfg.top_p}")
    if cfg.p_max_arg and not (cfg.p_max_arg <= 1 and cfg.max_arg >= 2):
        parser.error(f"--p-max-arg must be at most 1 and needs --max-arg 2 or more, got {cfg.p_max_arg} with --max-arg {cfg.max_arg}")
    if len(sizes) > 1 and not compare:
        parser.error(f"--agents {','.join(map(str, sizes))}: a list of team sizes needs --mode compare")
    given = {a.split("=")[0] for a in argv}
    if not compare and given & {"--modes", "--seeds"}:
        parser.error("--modes and --seeds belong to --mode compare")
    if compare and "--stages" not in given:
        cfg.stages = COMPARE_STAGES
    if compare and cfg.eval_every > 1:
        parser.error("--mode compare evaluates after every stage (its plots need it); drop --eval-every")
    if compare and given & {"--resample", "--trust-region", "--models"}:
        parser.error("--mode compare sets --resample and --trust-region from each of --modes and takes one --model")
    modes = cfg.modes.split(",") if compare else []
    for mode in modes:
        if mode not in teamtr.MODES:
            parser.error(f"--modes: unknown mode {mode!r} (choose from {', '.join(teamtr.MODES)})")
    if len(set(modes)) < len(modes):
        parser.error(f"--modes names a mode twice: {cfg.modes}")
    if cfg.codes and (cfg.model or cfg.models):
        parser.error("--codes changes the warm-up of the tiny agents; --model/--models are not warmed up")
    if cfg.task != "relay" and not mathtask.is_math_task(cfg.task):
        parser.error(f"--task: unknown task {cfg.task!r} (relay, words, {', '.join(mathtask.HUB)}, jsonl:PATH or parquet:PATH)")
    if cfg.task != "relay" and not (cfg.model or cfg.models):
        parser.error(f"--task {cfg.task} needs pretrained agents: pass --model or --models (the tiny agents only learn the relay)")
    if cfg.codes and cfg.task != "relay":
        parser.error("--codes is a variant of the relay task")
    kind, _, path = cfg.task.partition(":")
    if kind in mathtask.LOCAL:  # absolute paths in config.json, so eval.py finds them from anywhere
        cfg.task = f"{kind}:{os.path.abspath(path)}"
    cfg.prompts = cfg.prompts and os.path.abspath(cfg.prompts)
    if cfg.models and len(cfg.models.split(",")) != cfg.agents:
        parser.error(f"--models names {len(cfg.models.split(','))} models for --agents {cfg.agents}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    if cfg.name and os.path.exists(os.path.join(cfg.out_dir, cfg.name)):
        parser.error(f"{os.path.join(cfg.out_dir, cfg.name)} exists; choose another --name (nothing was overwritten)")
    return (cfg if compare else teamtr.resolve(cfg)), sizes


def run_directory(cfg: Config, sizes: list[int]) -> str:
    base = cfg.name or f"{cfg.mode}-n{'-'.join(map(str, sizes))}-s{cfg.seed}"
    path, suffix = os.path.join(cfg.out_dir, base), 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join(cfg.out_dir, f"{base}-{suffix}")
    os.makedirs(path)
    return path


def demonstration(q, task, solo, cfg: Config, rng: random.Random) -> list[tuple[str, str]]:
    """The demonstrator's (context, message) pairs for one question: every team turn of `task`,
    then the `solo` format.

    It is imperfect on purpose: on operations beyond +-demo_max_arg it writes the value one too
    high with probability demo_error. With --codes it also writes each message but the last
    mirrored (tasks.mirror) with probability 1/2, unmarked: a reader cannot tell which code it
    reads, so the agents learn to decode and encode both ways and must agree on a convention in RL.
    """
    n_ops, m = len(q.ops), task.modulus
    values = [(int(v) + (abs(int(op)) > cfg.demo_max_arg and rng.random() < cfg.demo_error)) % m for v, op in zip(q.steps, q.ops)]
    mirrored = [cfg.codes and t < n_ops - 1 and rng.random() < 0.5 for t in range(n_ops)]

    def code(chain):  # a chain of values as the demonstrator writes it
        return [str(tasks.mirror(int(v), m) if c else int(v)) for v, c in zip(chain, mirrored)]
    shown, written = code(q.steps), code(values)  # the true chain (what later turns read), its own messages
    return [(task.render(q, shown[:t]), written[t]) for t in range(n_ops)] + [(solo.render(q, []), ";".join(map(str, values)))]


def warmup(model, tokenizer, cfg: Config, batch: int = 64):
    """Behaviour cloning on the demonstrator's messages (demonstration), every team turn and the
    solo format. The agents learn its mixture, so they start greedy-wrong where it errs but give
    the right value real probability, whatever the seed: room that RL can only fill from the
    team reward. The agent_batch mask trains only the message (and EOS). The warm-up is the same
    in every mode, so `single` and the teams start from the same model.
    """
    task, solo = (tasks.Relay(cfg.agents * cfg.rounds, s, cfg.modulus, cfg.max_arg, cfg.p_max_arg) for s in (False, True))
    agent = team_lib.make_agent("warmup", model, tokenizer, cfg.warmup_lr)
    eos, device = tokenizer.eos_token_id, next(model.parameters()).device
    for step in tqdm(range(cfg.warmup_steps), desc="warm-up", unit="step"):
        rng = random.Random(rollout.derive_seed(cfg.seed, "demonstrator", step))
        qs = tasks.questions(task, batch, rollout.derive_seed(cfg.seed, "warmup", step), heldout=False)
        episodes = []
        for q in qs:
            for context, message in demonstration(q, task, solo, cfg, rng):
                ids = tokenizer(message, add_special_tokens=False)["input_ids"] + [eos]
                episodes.append(rollout.Episode(q, 0, 0, [0], [rollout.Step(0, agent.encode(context), ids, [0.0] * len(ids), "")]))
        data = losses.agent_batch(episodes, 0, torch.ones(len(episodes)), tokenizer.pad_token_id, device)
        model.train()
        loss = -losses.masked_mean(losses.token_logprobs(model, data)[0], data["mask"])
        agent.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        agent.optimizer.step()
    model.eval()
    return model


def starting_model(cfg: Config, device, dtype):
    """(model, tokenizer) that every agent starts as: --model, or a tiny agent after its warm-up.
    None for --models (a heterogeneous team is loaded agent by agent)."""
    if cfg.models:
        return None
    if cfg.model:
        return team_lib.load_model(cfg.model, device, dtype)
    tokenizer = team_lib.char_tokenizer(tasks.CHARS)
    model = team_lib.tiny_model(tokenizer, cfg.hidden, cfg.layers, seed=cfg.seed).to(device, dtype)
    return warmup(model, tokenizer, cfg), tokenizer


def build_team(cfg: Config, start, device, dtype):
    """The agents of a run: copies of the starting model (one in `single` mode), or --models."""
    n = 1 if cfg.mode == "single" else cfg.agents
    if cfg.models:
        return team_lib.load_team(cfg.models.split(",")[:n], device, dtype, cfg.lr, cfg.grad_ckpt, cfg.optimizer)
    return team_lib.clone_team(*start, n, cfg.lr, cfg.grad_ckpt, cfg.optimizer)


def train_logged(team, task, heldout, cfg: Config, path: str, echo: bool):
    """teamtr.train_stages, with every record appended to the JSON-lines file `path` (and its
    line printed if echo). Returns eval_acc per stage and the records."""
    records = []
    with open(path, "w") as metrics:
        def log(record, line):
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            records.append(record)
            if echo:
                tqdm.write(line)
        return teamtr.train_stages(team, task, heldout, cfg, log), records


def write_summary(run_dir, cfg: Config, accs, seconds):
    rows = "\n".join(f"| {s} | {a:.3f} |" for s, a in zip(teamtr.evaluated_stages(cfg), accs))
    text = (f"# {os.path.basename(run_dir)}\n\n`python train.py {' '.join(sys.argv[1:])}`\n\n"
            f"mode {cfg.mode} (resample {cfg.resample}, trust region {cfg.trust_region}), {cfg.agents} agents, seed {cfg.seed}\n\n"
            f"held-out accuracy: {accs[0]:.3f} -> {accs[-1]:.3f} ({100 * (accs[-1] - accs[0]):+.1f} points), {seconds:.0f} s\n\n"
            f"| stage | held-out accuracy |\n|---|---|\n{rows}\n")
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(text)


def checked_inputs(cfg: Config, sizes: list[int]):
    """The task (its data and prompts loaded), after the models' configs and tokenizers were
    checked: every bad input ends here in one line, exit 2, before anything is written."""
    try:
        for name in dict.fromkeys(filter(None, [cfg.model, *cfg.models.split(",")])):
            team_lib.check_model(name)
        return [tasks.make(dataclasses.replace(cfg, agents=n)) for n in sizes][0]
    except (mathtask.TaskError, team_lib.LoadError) as e:
        fail(str(e))


def main(argv=None):
    cfg, sizes = parse(argv)
    start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = torch.bfloat16 if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda") else torch.float32
    task = checked_inputs(cfg, sizes)
    run_dir = run_directory(cfg, sizes)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "agents": sizes if cfg.mode == "compare" else cfg.agents}, f, indent=2)
    print(f"run directory: {run_dir}")
    if cfg.mode == "compare":
        import compare  # compare.py builds on this file's warm-up and team building
        return compare.run(cfg, sizes, device, dtype, run_dir)
    team = build_team(cfg, starting_model(cfg, device, dtype), device, dtype)
    heldout = task.heldout(cfg.eval_size)
    try:
        accs, _ = train_logged(team, task, heldout, cfg, os.path.join(run_dir, "metrics.jsonl"), echo=True)
    except rollout.ContextTooLong as e:
        fail(str(e))
    team_lib.save_team(team, run_dir)
    seconds = time.time() - start
    write_summary(run_dir, cfg, accs, seconds)
    print(f"held-out accuracy ({len(heldout)} questions): starting team {accs[0]:.3f} -> trained team {accs[-1]:.3f} "
          f"({100 * (accs[-1] - accs[0]):+.1f} points) in {seconds:.0f} s; wrote {run_dir}")


if __name__ == "__main__":
    main()
