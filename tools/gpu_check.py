"""The GPU check: what the CPU tests cannot measure, in one run of at most 8 minutes on one GPU.

    python -m tools.gpu_check                                # one CUDA GPU, a Qwen2.5-0.5B-shaped model
    python -m tools.gpu_check --tiny --device cpu            # the dry run the tests do (tiny sizes)

Five checks, each on a model built from a config with random weights and random token ids, so
nothing is downloaded and neither `datasets` nor `math_verify` is imported (the tests fail if
either is):
  - bf16: the same weights in fp32 and bf16 score the same tokens (fp32 log-softmax in both);
    then one trust-region update (teamtr.update_agent) of the bf16 model must end inside its radius;
  - grad_ckpt: one update's gradient with gradient checkpointing against without it, beside the
    difference between two runs without it (the floor the kernels' own nondeterminism sets);
  - sampler: rollout.sample against `model.generate`, greedy, 64 rows (8 prompts x 8 samples, as
    in training), in fp32 and bf16: the tokens that agree, and the speed;
  - lora_memory: the peak GPU memory of one update in an 8-agent LoRA team against one LoRA
    agent, each in a fresh process;
  - stage: the default relay run (3 tiny agents, as `train.py --device cuda` places them): its
    warm-up, then one `teamtr` stage's wall time.
--tiny runs the same code at tiny sizes. Each check reports in one line as it ends; a check that
fails is recorded and the others still run, and once --budget seconds have passed the remaining
checks are skipped and reported as such. The numbers go to a JSON file and a printed markdown
table. Exit 1 if a check failed, the radius did not hold, or `datasets` or `math_verify` was
imported.

Unlike tools/bench.py, which times the CPU path against references, this measures what only a GPU run
can show: bf16 rounding, CUDA kernels under checkpointing, and GPU memory and speed.
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

import losses
import rollout
import tasks
import team as team_lib
import teamtr
import warmup
from config import Config, resolve
from plumbing import loop, runs
from tools import bench

# Qwen2.5-0.5B's shape (about 0.49B parameters)
QWEN_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
TINY_QWEN = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
# 64 rows: 8 prompts x 8 samples, as a training batch
PROMPTS, GROUP = 8, 8
# the LoRA team's size
AGENTS = 8
# the modules no run of this project may import
UNWANTED = ("datasets", "math_verify")
BUDGET = 480.0
# the repository root: the memory probes run as python -m tools.gpu_check from it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
# seconds one memory probe may take, past the budget at most
PROBE_TIMEOUT = 150.0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures on: a GPU's (the default) or --tiny's."""

    # Qwen2Config fields
    model: dict
    # tokens of the shortest prompt; prompt i has prompt // 8 * i more
    prompt: int
    # new tokens per row
    tokens: int
    # learning rate of the bf16 update, large enough that the radius stops it
    lr: float
    # Config fields of the timed stage (beyond the default run's)
    stage: dict


FULL = Sizes(QWEN_05B, prompt=64, tokens=64, lr=1e-4, stage={})
TINY = Sizes(
    TINY_QWEN,
    prompt=8,
    tokens=8,
    lr=1e-2,
    stage=dict(hidden=32, warmup_steps=2, questions=4, group=4, minibatch=16, epochs=1),
)


# ---------------------------------------------------------------------------------------------
# Models, rows and episodes built in code
# ---------------------------------------------------------------------------------------------


def tokenizer():
    """The relay's character tokenizer: only its pad id (0) is used, as every id here is random."""
    return team_lib.char_tokenizer(tasks.CHARS)


def qwen(sizes: Sizes, device, dtype, seed: int = 0) -> Qwen2ForCausalLM:
    """A Qwen2 model of the sizes' shape with random weights, built on `device`. No EOS: every
    row generates exactly the tokens asked for, in the sampler and in model.generate alike."""
    config = Qwen2Config(**sizes.model, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype).eval()


def rows(sizes: Sizes, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(PROMPTS x GROUP = 64 prompts of random ids, each one's question): PROMPTS prompts of
    different lengths, GROUP samples each, adjacent, as in a training batch."""
    gen = torch.Generator().manual_seed(seed)
    vocab = sizes.model["vocab_size"]
    lengths = [sizes.prompt + sizes.prompt // 8 * i for i in range(PROMPTS)]
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]
    return [p for p in prompts for _ in range(GROUP)], [q for q in range(PROMPTS) for _ in range(GROUP)]


def sampled_episodes(model, sizes: Sizes, seed: int = 0) -> list:
    """One single-message episode per row, its message sampled by `model` at temperature 1 (with
    the sampler's log-probs), and a random 0/1 reward, so that advantages are not zero."""
    prompts, qids = rows(sizes, seed)
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(len(prompts), sizes.tokens, generator=gen)
    # eos -1: no row ends early
    tokens, logps = rollout.sample(model, prompts, rollout.Sampling(sizes.tokens, -1, 0), uniforms, qids)
    rewards = torch.randint(0, 2, (len(prompts),), generator=gen).tolist()
    episodes = []
    for r, (p, t, lp, q) in enumerate(zip(prompts, tokens, logps, qids)):
        step = rollout.Step(0, p, t, lp, "", truncated=True)
        episodes.append(rollout.Episode(None, q, r % GROUP, [0], [step], float(rewards[r])))
    return episodes


def update_config() -> Config:
    """The updates' config: the defaults (radius 0.01, Adam) on 64 rows, 16 rows a step, 2 epochs."""
    return resolve(Config(group=GROUP, minibatch=16, epochs=2))


# ---------------------------------------------------------------------------------------------
# The checks: each returns its numbers by name
# ---------------------------------------------------------------------------------------------


def check_bf16(sizes: Sizes, device, dtype) -> dict:
    """bf16 against fp32 on the same tokens, and a bf16 update that must end inside its radius."""
    fp32 = qwen(sizes, device, torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    agent = team_lib.make_agent("agent0", bf16, tokenizer(), team_lib.Training(lr=sizes.lr))
    cfg = update_config()
    episodes = sampled_episodes(bf16, sizes)
    data = teamtr.agent_data(agent, 0, episodes, cfg)[0]
    # the same tokens, scored by the same weights in each dtype, log-softmax in fp32 in both
    scorers = (team_lib.Agent("fp32", fp32, None, None), agent)
    exact, rounded = (teamtr.batch_logprobs(a, data, False, cfg)[0] for a in scorers)
    drift = (rounded - exact)[data["mask"].bool()].abs()
    before = [p.detach().clone() for p in bf16.parameters()]
    # one trust-region update of the bf16 model: D is measured in fp32 log-probs after every step
    m = teamtr.update_agent(agent, 0, episodes, cfg, seed=0).metrics
    changed = sum(int((p != q).sum()) for p, q in zip(bf16.parameters(), before))
    return {
        "max_abs_logp_drift": drift.max().item(),
        "mean_abs_logp_drift": drift.mean().item(),
        "sampler_vs_teacher_forced_bf16": m["logp_drift"],
        "kl_rev": m["kl_rev"],
        "delta": cfg.delta,
        "radius_held": m["kl_rev"] <= cfg.delta,
        "steps": m["steps"],
        "backtracks": m["backtracks"],
        "reverted": m["reverted"],
        # bf16 rounds away steps much smaller than a weight
        "weights_changed": changed / sum(p.numel() for p in before),
    }


def gradient(agent, data) -> tuple[list, int]:
    """The gradient of an update's first loss (PPO clip and the KL penalty at ratio 1) on every
    row, and how often the first layer's attention ran: twice when checkpointing recomputes it.
    (A hook on the layer itself may sit outside the checkpointed forward and run once either way.)"""
    calls = []
    attention = agent.model.get_decoder().layers[0].self_attn
    hook = attention.register_forward_pre_hook(lambda module, args: calls.append(1))
    agent.model.train()
    logp = agent.token_logprobs(data)[0]
    old = logp.detach()
    kl_tok = losses.token_kl(logp, old, "kl_rev")
    objective = losses.clipped_objective(logp, old, data["adv"], 0.2)
    loss = losses.ppo_loss(objective, kl_tok, data["mask"], 0.1)
    agent.model.zero_grad(set_to_none=True)
    loss.backward()
    agent.model.eval()
    hook.remove()
    return [p.grad.float() for p in agent.model.parameters()], len(calls)


def relative_difference(grads, reference) -> float:
    """max over parameter tensors of |g - g_ref| / |g_ref| (Frobenius norms)."""
    return max(((g - r).norm() / r.norm().clamp(min=1e-30)).item() for g, r in zip(grads, reference))


def check_grad_ckpt(sizes: Sizes, device, dtype) -> dict:
    """One gradient with --grad-ckpt against without, beside two runs without (the floor)."""
    model = qwen(sizes, device, dtype)
    plain, checkpointed = (
        team_lib.make_agent(name, copy.deepcopy(model), tokenizer(), team_lib.Training(grad_ckpt=on))
        for name, on in (("plain", False), ("checkpointed", True))
    )
    data = teamtr.agent_data(plain, 0, sampled_episodes(model, sizes), update_config())[0]
    reference, once = gradient(plain, data)
    again = gradient(plain, data)[0]
    grads, twice = gradient(checkpointed, data)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "max_rel_diff_ckpt": relative_difference(grads, reference),
        "max_rel_diff_two_runs": relative_difference(again, reference),
        # the first layer's attention ran once without checkpointing and twice with it
        "recomputed": once == 1 and twice == 2,
    }


def greedy_against_generate(model, sizes: Sizes) -> dict:
    """rollout.sample at temperature 0 against model.generate(do_sample=False) on the same 64
    left-padded rows, each generating sizes.tokens tokens; each timed as in tools/bench.py."""
    prompts, qids = rows(sizes)
    ids, attn = rollout.left_pad(prompts, 0, next(model.parameters()).device)
    out = {}

    def ours():
        how = rollout.Sampling(sizes.tokens, -1, 0, temperature=0.0)
        out["ours"] = rollout.sample(model, prompts, how, groups=qids)[0]

    def theirs():
        with torch.no_grad():
            ids_out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=False,
                max_new_tokens=sizes.tokens,
                pad_token_id=0,
            )
        out["theirs"] = ids_out[:, ids.shape[1] :].tolist()

    seconds, seconds_generate = bench.timed(ours, theirs)
    same = [a == b for x, y in zip(out["ours"], out["theirs"]) for a, b in zip(x, y)]
    n = len(prompts) * sizes.tokens
    return {
        "token_agreement": sum(same) / n,
        "row_agreement": sum(x == y for x, y in zip(out["ours"], out["theirs"])) / len(prompts),
        "sampler_tokens_per_s": n / seconds,
        "generate_tokens_per_s": n / seconds_generate,
        "speedup": seconds_generate / seconds,
    }


def check_sampler(sizes: Sizes, device, dtype) -> dict:
    """The sampler against model.generate in fp32 and in bf16."""
    numbers = {"rows": PROMPTS * GROUP, "tokens": sizes.tokens}
    for name, weights in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        found = greedy_against_generate(qwen(sizes, device, weights), sizes)
        numbers |= {f"{name}_{key}": x for key, x in found.items()}
    return numbers


def memory_probe(sizes: Sizes, device, dtype, agents: int):
    """In this process: an `agents`-agent LoRA team on one base, one update of agent 0; prints
    its peak memory (loop.peak_memory_mb: allocated on CUDA, resident on CPU) as JSON."""
    team = team_lib.lora_team(qwen(sizes, device, dtype), tokenizer(), agents, bench.LORA, bench.TRAINING)
    episodes = sampled_episodes(team[0].model, sizes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    teamtr.update_agent(team[0], 0, episodes, update_config(), seed=0)
    print(json.dumps({"peak_mb": loop.peak_memory_mb(device), "unwanted_imports": unwanted_imports()}))


def probe_peak(sizes: Sizes, device, agents: int) -> dict:
    """memory_probe in a fresh process, so that each peak is its own."""
    command = [
        sys.executable,
        "-m",
        "tools.gpu_check",
        "--probe-memory",
        str(agents),
        "--device",
        device.type,
    ]
    command += ["--tiny"] * (sizes is TINY)
    done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"the {agents}-agent memory probe failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_lora_memory(sizes: Sizes, device, dtype) -> dict:
    """The peak memory of one update: an 8-agent LoRA team against one LoRA agent."""
    one, team = (probe_peak(sizes, device, n) for n in (1, AGENTS))
    return {
        "agents": AGENTS,
        "rank": bench.LORA["rank"],
        "one_agent_peak_mb": one["peak_mb"],
        "team_peak_mb": team["peak_mb"],
        "ratio": team["peak_mb"] / one["peak_mb"],
        "unwanted_imports": sorted(set(one["unwanted_imports"] + team["unwanted_imports"])),
    }


def check_stage(sizes: Sizes, device, dtype) -> dict:
    """The default relay run on this device as train.py builds it (warm-up, 3 copies), then one
    teamtr stage, its update lines printed."""
    cfg = resolve(Config(device=device.type, **sizes.stage))
    t0 = time.perf_counter()
    team = warmup.build_team(cfg, warmup.starting_model(cfg, device, dtype), device, dtype)
    t1 = time.perf_counter()
    m = teamtr.run_stage(team, tasks.make(cfg), cfg, 1, lambda record, line: print(f"  {line}", flush=True))
    return {
        "agents": cfg.agents,
        "dtype": str(dtype).removeprefix("torch."),
        "warmup_seconds": t1 - t0,
        "stage_seconds": time.perf_counter() - t1,
        "sample_seconds": m["perf/sample_seconds"],
        "update_seconds": m["perf/update_seconds"],
        "tokens": m["stage/tokens"],
        "reward": m["stage/reward"],
    }


# each takes (sizes, device, the weight dtype train.py picks on that device)
CHECKS = {
    "bf16": check_bf16,
    "grad_ckpt": check_grad_ckpt,
    "sampler": check_sampler,
    "lora_memory": check_lora_memory,
    "stage": check_stage,
}


# ---------------------------------------------------------------------------------------------
# The run: every check within the budget, the JSON and the table
# ---------------------------------------------------------------------------------------------


def unwanted_imports() -> list[str]:
    return [name for name in UNWANTED if name in sys.modules]


def run_checks(args, sizes: Sizes, device, dtype) -> tuple[dict, list]:
    """Every check, one after another, until the budget is spent; returns (numbers or an error
    per check that ran, the checks skipped)."""
    start, results, skipped = time.perf_counter(), {}, []
    for k, name in enumerate(CHECKS, 1):
        if time.perf_counter() - start >= args.budget:
            skipped.append(name)
            print(f"[{k}/{len(CHECKS)}] {name}: skipped, past the {args.budget:.0f} s budget", flush=True)
            continue
        print(f"[{k}/{len(CHECKS)}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = CHECKS[name](sizes, device, dtype)
            status = "done"
        # the other checks still run, and this one's error is reported
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            status = "FAILED: " + results[name]["error"]
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"[{k}/{len(CHECKS)}] {name}: {status} in {results[name]['seconds']:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, skipped


def environment(device, sizes: Sizes) -> dict:
    """The machine, the versions, and the model's size (counted on the meta device)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    config = Qwen2Config(**sizes.model)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model_parameters": parameters,
    }


def failures(report: dict) -> list[str]:
    """What makes the run fail: a check's error, a radius that did not hold, checkpointing that
    recomputes nothing, an unwanted import."""
    found = [f"{name}: {r['error']}" for name, r in report["checks"].items() if "error" in r]
    if report["checks"].get("bf16", {}).get("radius_held") is False:
        found.append("bf16: the update ended outside its radius")
    if report["checks"].get("grad_ckpt", {}).get("recomputed") is False:
        found.append("grad_ckpt: checkpointing did not recompute the layers")
    if report["unwanted_imports"]:
        found.append(f"imported {', '.join(report['unwanted_imports'])}")
    return found


def value(x) -> str:
    """A number as the table prints it: 4 significant digits, thousands whole and with commas."""
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    return str(x)


def table(report: dict) -> str:
    """The numbers as a markdown table, one row per number."""
    lines = [f"GPU check on {report['environment']['device']}{' (--tiny)' * report['tiny']}", ""]
    lines += ["| check | measure | value |", "|---|---|---|"]
    for name, numbers in report["checks"].items():
        lines += [
            f"| {name} | {key} | {value(x)} |" for key, x in numbers.items() if key != "unwanted_imports"
        ]
    lines += [f"| {name} | skipped | past the budget |" for name in report["skipped"]]
    lines.append(f"| all | seconds | {report['seconds']:.1f} |")
    return "\n".join(lines)


def parse(argv):
    parser = runs.Parser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU dry run of the same code")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if any")
    parser.add_argument(
        "--out", help="the JSON written (default results/gpu-check.json, or gpu-check-tiny.json with --tiny)"
    )
    parser.add_argument(
        "--budget", type=float, default=BUDGET, help="seconds after which the remaining checks are skipped"
    )
    # internal: one memory measurement in a fresh process
    parser.add_argument("--probe-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    return args


def main(argv=None):
    args = parse(argv)
    sizes = TINY if args.tiny else FULL
    # the device and weight dtype train.py would pick: bf16 on CUDA, fp32 on CPU
    device, dtype = runs.placement(Config(device=args.device))
    if args.probe_memory:
        return memory_probe(sizes, device, dtype, args.probe_memory)
    started = time.perf_counter()
    env = environment(device, sizes)
    print(
        f"tools/gpu_check.py on {env['device']}, torch {env['torch']}, "
        f"{env['model_parameters']:,}-parameter model"
    )
    results, skipped = run_checks(args, sizes, device, dtype)
    probes = results.get("lora_memory", {}).get("unwanted_imports", [])
    report = {
        "tiny": args.tiny,
        "environment": env,
        "checks": results,
        "skipped": skipped,
        "seconds": time.perf_counter() - started,
        "unwanted_imports": sorted(set(unwanted_imports() + probes)),
    }
    out = args.out or os.path.join(RESULTS, "gpu-check-tiny.json" if args.tiny else "gpu-check.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{table(report)}\n\nwrote {out}", flush=True)
    if found := failures(report):
        runs.fail("python -m tools.gpu_check", "; ".join(found), 1)


if __name__ == "__main__":
    main()
