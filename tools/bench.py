"""Benchmarks of memory and speed, measured in one run; one line per measure, ending in `ratio R.RRx`.

    python -m tools.bench                  # every measure (about 45 minutes on 2 CPU cores)
    python -m tools.bench --only sampler   # one group: sampler, suffix, fresh, update, memory, fsdp or stages

- sampler: tokens per second of rollout.sample against `model.generate` on the same prompts and
  lengths (every row generates exactly as many tokens), 64 rows = 8 prompts x 8 samples as in
  training: on the default tiny agent at the relay's message length (3 tokens) and at 32, and on
  a 135M-parameter Llama built from a config (SmolLM2-135M's shape, random weights: no
  download; 120-148-token prompts) at 32.
- suffix: a fresh-mode stage's sampling time at n = 8 with exact suffix resampling against
  regenerating every turn after every update (the turn ratio is 43/64 in turn order), and the
  prompt tokens each prefills (suffix resampling regenerates the later turns, the long ones).
- fresh: a fresh-mode stage's sampling time against a stale stage's (one play: n turns per
  episode), with exact early exit and without it, and the turns per episode each generates: at
  n = 8 with the n = 8 recipe's warm-up and radius (0.005), and at n = 3 (the default run).
- update: one update of the 135M Llama on a batch shaped like GSM8K (8 questions of 150 prompt
  tokens, G = 8, 64-token messages), each question's prompt computed once in its forwards
  (--shared-prompt) against whole rows, for the first agent and the third.
- memory: peak resident memory of one update in an 8-agent LoRA team of the 135M Llama against
  one LoRA agent alone, and 8 full copies against one full agent (each measured in a fresh
  process; it includes the Python and torch runtime, about 0.3 GB here).
- fsdp: peak resident memory per process of one update of the 135M Llama under torchrun with 2
  processes (gloo), its parameters, gradients and Adam moments sharded (--fsdp) against a whole
  copy on each process (plain data parallelism), each process on half of an 8-row batch; with
  glibc's default allocator and with freed memory returned to the OS at once.
- stages: wall time of one `teamtr` stage of the default relay run at n = 2, 4, 8 (after the
  default warm-up), against n = 2.

Each timing is the fastest of a few runs, alternating between the two things compared, so a slow
spell of the machine falls on all; counting happens outside the timed runs.
"""

import argparse
import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora
import parallel
import rollout
import tasks
import team as team_lib
import teamtr
import warmup
from config import Config, resolve
from parallel import fsdp
from plumbing import runs

# the repository root: the probes run as python -m tools.bench from it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
# new tokens per row in the sampler measures
TOKENS = 32
TRAINING = team_lib.Training(lr=1e-4)
LORA = lora.spec(16, 32.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def line(what: str, ours: float, theirs: float, unit: str, ratio: float):
    number = "{:,}" if isinstance(ours, int) else "{:,.1f}"
    print(f"{what}: {number.format(ours)} vs {number.format(theirs)} {unit}, ratio {ratio:.2f}x", flush=True)


def timed(*fns, repeats: int = 2) -> list[float]:
    """The fastest of `repeats` runs of each fn after one warm-up run of each, in seconds. The runs
    alternate between the fns, so a slow spell of the machine falls on all of them alike."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best


def warmed_team(cfg: Config, n: int) -> list:
    """n copies of the tiny agent after its warm-up, as train.py builds the default team."""
    tok = team_lib.char_tokenizer(tasks.CHARS)
    model = warmup.warmup(team_lib.tiny_model(tok, cfg.hidden, cfg.layers, seed=cfg.seed), tok, cfg)
    return team_lib.clone_team(model, tok, n, team_lib.Training.of(cfg))


def smol_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOL)).eval()


def sampler_vs_generate(name: str, model, prompts: list[list[int]], pad_id: int, new_tokens: int):
    """Every row generates exactly new_tokens tokens in both (no EOS can end it early)."""
    group, qids = [p for p in prompts for _ in range(8)], [q for q in range(len(prompts)) for _ in range(8)]
    uniforms = torch.rand(len(group), new_tokens, generator=torch.Generator().manual_seed(0))
    L = max(map(len, group))
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in group])
    attn = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in group])[:, None]).long()

    def generate():
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                top_k=None,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad_id,
                eos_token_id=None,
            )

    ours, theirs = timed(
        lambda: rollout.sample(model, group, rollout.Sampling(new_tokens, -1, pad_id), uniforms, qids),
        generate,
    )
    n = len(group) * new_tokens
    line(
        f"sampler vs model.generate, {name}, {len(group)} rows x {new_tokens} tokens (tokens/s)",
        n / ours,
        n / theirs,
        "tokens/s",
        theirs / ours,
    )


def bench_sampler():
    agent = warmed_team(resolve(Config()), 1)[0]
    model, tok, task = agent.model, agent.tokenizer, tasks.Relay(3)
    prompts = [
        agent.encode(task.render(q, list(q.steps[: i % 3])))
        for i, q in enumerate(tasks.questions(task, 8, seed=0, heldout=False))
    ]
    # the relay's own message length, as in training, and a long one
    for tokens in (task.max_new_tokens, TOKENS):
        sampler_vs_generate("default tiny agent", model, prompts, tok.pad_token_id, tokens)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, SMOL["vocab_size"], (120 + 4 * i,), generator=gen).tolist() for i in range(8)]
    sampler_vs_generate("135M Llama", smol_llama(), prompts, 0, TOKENS)


def bench_suffix():
    """The sampling of one fresh-mode stage at n = 8: the first batch, then after each of the 8
    updates the suffix, or every turn again. Weights are unchanged here (the cost is the same), but
    each update raises its agent's weights version as a real one does, and each play draws its own
    random numbers, so early exit keeps no turn. Also counted: the prompt tokens the sampler
    prefills, which is where a stage's sampling time goes on the relay."""
    cfg = resolve(Config(agents=8, p_max_arg=0.12))
    team = warmed_team(cfg, 8)
    task = tasks.make(cfg)
    qs = task.train_questions(cfg.questions, 0)

    def stage(mode: str) -> int:
        """One stage's plays, as run_stage plays them; returns its generated turns per episode."""
        how = lambda k: rollout.Settings(1.0, (0, k))
        episodes, counts = rollout.play(
            team, task, rollout.new_episodes(qs, cfg.group, 8, 1, "fixed", 0), how(0)
        )
        turns = counts.turns
        for k in range(1, 8):
            # as its update would
            team[k - 1].changed()
            keep = [rollout.first_turn(e, k - 1) for e in episodes] if mode != "full" else [0] * len(episodes)
            episodes, counts = rollout.play(team, task, episodes, how(k), keep)
            turns += counts.turns
        return turns // len(episodes)

    modes = ("suffix", "full")
    seconds = dict(zip(modes, timed(*(lambda mode=mode: stage(mode) for mode in modes), repeats=3)))
    turns, tokens = {}, {}
    # once more, counted (outside the timing)
    for mode in modes:
        tokens[mode] = prefilled(team, lambda: turns.setdefault(mode, stage(mode)))
    line(
        f"fresh stage sampling at n = 8, suffix resampling vs full resampling ({turns['suffix']} vs "
        f"{turns['full']} turns per episode; seconds)",
        seconds["suffix"],
        seconds["full"],
        "s",
        seconds["suffix"] / seconds["full"],
    )
    line(
        "fresh stage at n = 8, prompt tokens prefilled, suffix resampling vs full resampling (tokens)",
        tokens["suffix"],
        tokens["full"],
        "tokens",
        tokens["suffix"] / tokens["full"],
    )


def bench_fresh():
    """A fresh-mode (teamtr) stage's sampling against a stale stage's, one stage each from copies of
    the same warmed team, with exact early exit (the default) and without it (--no-early-exit):
    at n = 8 with the n = 8 recipe (--p-max-arg 0.12, 800 warm-up steps, --delta 0.005) and at
    n = 3 (the default run). The sampling seconds are the stage's perf/sample_seconds, the
    fastest of 3 runs of each, alternating."""
    recipes = {8: dict(p_max_arg=0.12, warmup_steps=800, delta=0.005), 3: {}}
    kinds = {"early exit": dict(mode="teamtr"), "no early exit": dict(mode="teamtr", no_early_exit=True)}
    kinds["stale"] = dict(mode="stale")
    for n, recipe in recipes.items():
        team = warmed_team(resolve(Config(agents=n, **recipe)), n)
        seconds, records = {kind: float("inf") for kind in kinds}, {}
        for _ in range(3):
            for kind, how in kinds.items():
                cfg = resolve(Config(agents=n, **recipe, **how))
                record = teamtr.run_stage(copy.deepcopy(team), tasks.make(cfg), cfg, 1, lambda r, text: None)
                seconds[kind], records[kind] = min(seconds[kind], record["perf/sample_seconds"]), record
        turns = {kind: record["stage/turns"] for kind, record in records.items()}
        for kind in ("early exit", "no early exit"):
            line(
                f"fresh stage sampling at n = {n}, {kind} vs stale ({turns[kind]:.2f} vs "
                f"{turns['stale']:.0f} turns generated per episode; seconds)",
                seconds[kind],
                seconds["stale"],
                "s",
                seconds[kind] / seconds["stale"],
            )
        line(
            f"fresh stage at n = {n}, generated turns per episode, early exit vs stale "
            f"({records['early exit']['stage/reused_turns']:.2f} more kept by early exit)",
            turns["early exit"],
            turns["stale"],
            "turns",
            turns["early exit"] / turns["stale"],
        )


def prefilled(team, fn) -> int:
    """Runs fn; returns the prompt tokens the team's models were fed in the sampler's prefill
    (forwards without a cache: shared prefixes; or with logits_to_keep: the tails), padding and
    decoding steps not counted."""
    count = 0

    def hook(module, args, kwargs):
        nonlocal count
        if kwargs.get("past_key_values") is None or "logits_to_keep" in kwargs:
            count += int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1] :].sum())

    handles = [agent.model.register_forward_pre_hook(hook, with_kwargs=True) for agent in team]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return count


def update_batch() -> list:
    """8 episodes of one 40-token message after a 120-token prompt (random ids), random rewards."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMOL["vocab_size"], (8, 160), generator=gen)
    steps = [rollout.Step(0, row[:120].tolist(), row[120:].tolist(), [0.0] * 40, "") for row in ids]
    episodes = [rollout.Episode(None, q, 0, [0], [s]) for q, s in enumerate(steps)]
    for e, r in zip(episodes, torch.randn(8, generator=gen)):
        e.reward = float(r)
    return episodes


def gsm8k_batch(agent: int) -> list:
    """8 questions x G = 8 shaped like GSM8K: a 150-token prompt per question, then agent `agent`'s
    64-token message; before it, for a later agent, the earlier agents' 64-token messages, which
    differ per sample. Random ids and rewards."""
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, SMOL["vocab_size"], (n,), generator=gen).tolist()  # noqa: E731
    episodes = []
    for q in range(8):
        prompt = ids(150)
        for s in range(8):
            earlier = [rollout.Step(a, [], ids(64), [0.0] * 64, "") for a in range(agent)]
            context = prompt + [t for step in earlier for t in step.tokens]
            steps = [*earlier, rollout.Step(agent, context, ids(64), [0.0] * 64, "")]
            episodes.append(rollout.Episode(None, q, s, list(range(agent + 1)), steps))
            episodes[-1].reward = float(torch.rand(1, generator=gen))
    return episodes


def bench_update():
    """One update of the 135M Llama on a GSM8K-shaped batch (gsm8k_batch), its forwards computing
    each question's shared prompt once (--shared-prompt 32, the default) against whole rows (0):
    the first agent and the third. Gradient checkpointing on; one pass over one minibatch of the
    64 rows (--epochs 1: the old log-probs, a step, the KL after it); one run of each, minutes
    long. The two updates' metrics must agree."""
    tok, training = team_lib.char_tokenizer(tasks.CHARS), dataclasses.replace(TRAINING, grad_ckpt=True)
    for i in (0, 2):
        episodes, seconds, stats = gsm8k_batch(i), {}, {}
        for shared in (32, 0):
            agent = team_lib.make_agent("agent", smol_llama(), tok, training)
            cfg = resolve(Config(group=8, minibatch=64, epochs=1, shared_prompt=shared))
            t0 = time.perf_counter()
            stats[shared] = teamtr.update_agent(agent, i, episodes, cfg, seed=0).metrics
            seconds[shared] = time.perf_counter() - t0
        differ = max(abs(v - stats[32][k]) for k, v in stats[0].items() if isinstance(v, float))
        line(
            f"one update of the 135M Llama, GSM8K-shaped batch, agent {i + 1}, shared prompts vs whole "
            f"rows (metrics differ by {differ:.1e} at most; seconds)",
            seconds[32],
            seconds[0],
            "s",
            seconds[32] / seconds[0],
        )


def memory_probe(agents: int, lora_rank: int):
    """In this process: build the team, run one update of agent 0, print the peak RSS in MB."""
    # only its pad id is used here
    tok = team_lib.char_tokenizer(tasks.CHARS)
    if lora_rank:
        team = team_lib.lora_team(smol_llama(), tok, agents, {**LORA, "rank": lora_rank}, TRAINING)
    else:
        team = [team_lib.make_agent(f"agent{i}", smol_llama(), tok, TRAINING) for i in range(agents)]
    cfg = resolve(Config(group=2, minibatch=4, epochs=1))
    teamtr.update_agent(team[0], 0, update_batch(), cfg, seed=0)
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}))


def sharded_probe(sharded: int, grad_ckpt: int):
    """Under torchrun: one agent of the 135M Llama, whole on every process or sharded (--fsdp), and
    one update on this process's half of the batch; prints the largest peak resident memory of
    the update over the processes, in MB (the peak is reset after the agent is built, so the
    whole weights each process builds before sharding count only as far as they stay resident)."""
    parallel.init(torch.device("cpu"), 600)
    training = dataclasses.replace(TRAINING, grad_ckpt=bool(grad_ckpt))
    agent = team_lib.make_agent("agent0", smol_llama(), team_lib.char_tokenizer(tasks.CHARS), training)
    if sharded:
        (agent,) = fsdp.shard_team([agent], torch.device("cpu"))
    episodes = [e for e in update_batch() if e.qid in parallel.shard(8)]
    # Linux: writing 5 resets the process's peak resident memory (VmHWM)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    teamtr.update_agent(agent, 0, episodes, resolve(Config(group=2, minibatch=4, epochs=1)), seed=0)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**10
    peak = torch.tensor(peak)
    parallel.collective(torch.distributed.all_reduce, peak, torch.distributed.ReduceOp.MAX)
    parallel.print0(json.dumps({"peak_mb": float(peak)}))
    parallel.close()


def peak_mb(agents: int, lora_rank: int) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--probe", f"{agents},{lora_rank}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def bench_memory():
    one_lora, team_lora = peak_mb(1, LORA["rank"]), peak_mb(8, LORA["rank"])
    line(
        f"peak memory, 8-agent LoRA team (rank {LORA['rank']}) vs one LoRA agent, 135M Llama (MB)",
        team_lora,
        one_lora,
        "MB",
        team_lora / one_lora,
    )
    one_full, team_full = peak_mb(1, 0), peak_mb(8, 0)
    line(
        "peak memory, 8 full copies vs one full agent, 135M Llama (MB)",
        team_full,
        one_full,
        "MB",
        team_full / one_full,
    )
    line(
        "peak memory, 8-agent LoRA team vs one full agent, 135M Llama (MB)",
        team_lora,
        one_full,
        "MB",
        team_lora / one_full,
    )


# glibc: freed blocks from 64 KiB up go back to the OS at once (by default the threshold rises to
# the largest block freed, up to 32 MiB, and the freed gathering buffers stay resident)
RETURNED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def sharded_peak_mb(sharded: int, grad_ckpt: int, env: dict) -> float:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    probe = ["-m", "tools.bench", "--threads", "1", "--sharded-probe", f"{sharded},{grad_ckpt}"]
    out = subprocess.run(
        [*torchrun, *probe], capture_output=True, text=True, check=True, env={**os.environ, **env}, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def bench_fsdp():
    """Peak memory per process of one update, --fsdp against plain data parallelism, 2 processes,
    without and with gradient checkpointing (which leaves less of the peak to activations), with
    glibc's default allocator settings and with freed blocks returned to the OS at once (FSDP
    gathers and frees every layer's weights in every forward: by default glibc keeps them)."""
    for env in ({}, RETURNED):
        for grad_ckpt in (0, 1):
            peaks = [sharded_peak_mb(sharded, grad_ckpt, env) for sharded in (1, 0)]
            what = "--fsdp vs data parallel" + (", both with --grad-ckpt" if grad_ckpt else "")
            allocator = ", freed memory returned (MALLOC_MMAP_THRESHOLD_=65536)" if env else ""
            line(
                f"peak memory per process of one update, 135M Llama, {what}, 2 processes{allocator} (MB)",
                *peaks,
                "MB",
                peaks[0] / peaks[1],
            )


def bench_stages():
    seconds = {}
    for n in (2, 4, 8):
        cfg = resolve(Config(agents=n, p_max_arg=0.12 if n == 8 else 0.0))
        team = warmed_team(cfg, n)
        t0 = time.perf_counter()
        teamtr.run_stage(team, tasks.make(cfg), cfg, 1, lambda record, text: None)
        seconds[n] = time.perf_counter() - t0
        line(
            f"teamtr stage wall time, default relay run, n = {n} vs n = 2 (seconds)",
            seconds[n],
            seconds[2],
            "s",
            seconds[n] / seconds[2],
        )


GROUPS = {
    "sampler": bench_sampler,
    "suffix": bench_suffix,
    "fresh": bench_fresh,
    "update": bench_update,
    "memory": bench_memory,
    "fsdp": bench_fsdp,
    "stages": bench_stages,
}


def main(argv=None):
    parser = runs.Parser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(GROUPS), help="run one group of measures")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    # internal: one memory measurement in a fresh process
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--sharded-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.probe:
        return memory_probe(*map(int, args.probe.split(",")))
    if args.sharded_probe:
        return sharded_probe(*map(int, args.sharded_probe.split(",")))
    print(
        f"tools/bench.py on {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, fp32",
        flush=True,
    )
    for name, fn in GROUPS.items():
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
