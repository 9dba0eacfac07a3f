"""The config of a run: every flag of train.py is a field of Config, with its doc under it and the
values it accepts beside it (`flag`); MODES are the presets of the two switches that define the
methods (resampling and the trust region). `python train.py --help` lists the fields in the groups
below, each group opened by a comment line.

One seed is given (--seed); every other seed is derived from it and from what it is for
(`derive_seed`), so a run, its resume and a run on several processes draw the same numbers.
"""

import ast
import dataclasses
import hashlib
import inspect
from dataclasses import dataclass, field, fields

# mode -> (resample, trust_region); `single` and `none` are set up by train.py
MODES = {
    # the method
    "teamtr": ("fresh", "on"),
    # isolates the occupancy effect
    "stale": ("stale", "on"),
    # naive sequential fine-tuning
    "naive": ("stale", "off"),
    # ablation: resampling without the trust region
    "fresh-no-tr": ("fresh", "off"),
    # the stale batch, reweighted by earlier agents' ratios (HAPPO-style)
    "happo": ("reweight", "on"),
    # one agent, the whole task in one message (one update per stage)
    "single": ("stale", "on"),
    # no training: the warm-up team, for reference
    "none": ("stale", "on"),
}
ALL_MODES = ",".join(MODES)


def flag(default, choices=None, at_least=None, positive=False, at_most=None, per_agent=False):
    """A field's default, and what train.py accepts for it: one of `choices`, at least `at_least`,
    more than 0 (`positive`), at most `at_most`; per_agent: one value, or a comma-separated list
    of one value per agent (see of_agent)."""
    checks = dict(choices=choices, at_least=at_least, positive=positive, at_most=at_most, per_agent=per_agent)
    return field(default=default, metadata=checks)


@dataclass
class Config:
    # run
    mode: str = flag("teamtr", choices=[*MODES, "compare"])
    """teamtr, stale, naive, fresh-no-tr, happo, single or none (presets of --resample and
    --trust-region), or compare (several modes side by side, tools/compare.py)"""
    agents: int = flag(3, at_least=1)
    """number of agents n (compare: a list such as 2,4,6,8 sweeps team sizes)"""
    task: str = "relay"
    """relay (built in); words (generated word problems, offline); gsm8k, math500, aime24, aime25
    (hub datasets); or jsonl:PATH / parquet:PATH (question or problem, and answer fields). Real
    tasks need --model or --models"""
    model: str = ""
    """Hugging Face name or local path for every agent (default: tiny agents built in code)"""
    seed: int = 0
    """the one seed; every other seed is derived from it"""
    stages: int = flag(20, at_least=0)
    """number of stages (one update of every agent each); --mode compare: 15 unless given"""
    device: str = flag("auto", choices=["auto", "cpu", "cuda"])
    """cpu, cuda, or auto (cuda when available)"""
    dtype: str = flag("auto", choices=["auto", "fp32", "bf16"])
    """fp32 or bf16 weights; auto = bf16 on CUDA, fp32 on CPU (log-probs are fp32 either way)"""
    name: str = ""
    """run directory name under --out-dir (default: <mode>-n<agents>-s<seed>, with a suffix if taken)"""
    out_dir: str = "runs"
    """where run directories are written"""
    modes: str = ALL_MODES
    """compare: the modes trained side by side from the same warm-up team"""
    seeds: int = flag(3, at_least=1)
    """compare: the seeds --seed, --seed + 1, ... (mean and spread over them)"""
    threads: int = flag(2, at_least=0)
    """torch CPU threads (0 = torch's default)"""
    dist_timeout: float = flag(600.0, positive=True)
    """under torchrun: seconds a process waits for the others (a rank that died or hangs) before
    it ends with an error"""
    fsdp: bool = False
    """under torchrun: shard every agent's parameters, gradients and optimiser state over the
    processes (FSDP2, parallel/fsdp.py) instead of a whole copy of the team on each"""
    tracker: str = flag("", choices=["", "tensorboard", "wandb"])
    """also mirror every metrics.jsonl record (and the evaluations' transcripts) to tensorboard or
    wandb (optional packages; metrics.jsonl stays the record)"""
    # team and task
    models: str = ""
    """comma-separated names or paths, one per agent (a heterogeneous team)"""
    prompts: str = ""
    """real tasks: the roles file (default tasks/prompts/team.json)"""
    thinking: str = flag("off", choices=["off", "on"])
    """real tasks: enable_thinking for chat templates that take it (Qwen3's thinking mode)"""
    max_new_tokens: int = flag(0, at_least=0, per_agent=True)
    """tokens per message at most (0: the task's default, 256 for real tasks), or one value per
    agent (256,1024,...); messages cut there are counted in rollout/truncated"""
    order: str = flag("fixed", choices=["fixed", "random"])
    """turn order: fixed (agent 1..n) or random (a permutation per episode, the router)"""
    rounds: int = flag(1, at_least=1)
    """the turn order is repeated this many times (agents speak `rounds` times)"""
    init: str = ""
    """a saved run directory whose trained team (or last checkpoint) starts this run instead of a
    warm-up (replace.py)"""
    replace: str = ""
    """with --init: i=PATH swaps agent i for the model at PATH, aligned first (Stage 0; replace.py)"""
    align_steps: int = flag(50, at_least=0)
    """with --replace: behaviour-cloning steps of the Stage-0 alignment (0: swap without alignment)"""
    lora_rank: int = flag(0, at_least=0)
    """LoRA rank r (0: full fine-tuning): one frozen base model shared by the team, one adapter and
    optimiser per agent (lora.py); not with --models"""
    lora_alpha: float = flag(16.0, positive=True)
    """LoRA scale: an adapter adds (alpha / r) B A to its layer"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """the linear layers (by name) that get adapters"""
    grad_ckpt: bool = False
    """gradient checkpointing during updates (for large models on GPU)"""
    # tiny agents and the relay
    hidden: int = flag(128, at_least=8)
    """width of the tiny agents (128: about 0.4M parameters)"""
    layers: int = flag(2, at_least=1)
    """layers of the tiny agents"""
    warmup_steps: int = flag(250, at_least=0)
    """supervised steps on demonstrations before RL"""
    warmup_lr: float = flag(1e-3, positive=True)
    """learning rate of the warm-up (and of the Stage-0 imitation of --replace)"""
    demo_error: float = flag(0.6, at_least=0.0)
    """the demonstrator is wrong (one too high) this often on operations beyond +-demo_max_arg"""
    demo_max_arg: int = flag(2, at_least=0)
    """operations up to +-this are always demonstrated correctly"""
    modulus: int = flag(10, at_least=2)
    """relay arithmetic is mod this (10: one digit per message)"""
    max_arg: int = flag(3, at_least=1)
    """relay operations are +a or -a with a in 1..max_arg (larger is much slower to learn)"""
    p_max_arg: float = flag(0.0, at_least=0.0)
    """probability of a +-max_arg operation, the kind the demonstrator gets wrong (0: a uniform in
    1..max_arg); lower it to start larger teams near the accuracy of small ones"""
    codes: bool = False
    """coordination variant: the warm-up demonstrator writes each message but the last plainly or
    mirrored (modulus - 1 - v) at random, unmarked, so the team starts without a shared convention"""
    code_links: float = flag(1.0, at_least=0.0, at_most=1)
    """with --codes, the coupling knob: the fraction of links (messages but the last, evenly
    spread) written in either code; the others are always plain (0: the plain relay's start)"""
    work: int = flag(0, at_least=0)
    """relay messages show their work this many times before their value: what the agent read, its
    operation and "=" ("8+1=8+1=9" at 2). A message is then about 4 x work + 2 tokens (modulus 10),
    and only the value's decide: readers and the reward read what follows the last "=" """
    # rollouts
    questions: int = flag(32, at_least=1)
    """questions per batch"""
    group: int = flag(8, at_least=2)
    """samples per question (the GRPO group G)"""
    temperature: float = flag(1.0, at_least=0.0)
    """sampling temperature T of training rollouts, part of the policy: the sampler, the old and new
    log-probs, the ratio and the KL all use the logits / T (0, greedy, is refused for training)"""
    shared_prefix: bool = False
    """fresh resampling (compare: its fresh modes): before agent i's update, the G samples of each
    question are played again from one shared prefix (sample 0's turns before agent i's first),
    so the group-normalised advantage compares only what agent i and the agents after it wrote"""
    no_early_exit: bool = False
    """fresh resampling generates every turn from the updated agent's first on again, instead of
    keeping those whose writer, context and random numbers are unchanged (the same samples, more
    turns; for comparisons)"""
    # update
    shared_prompt: int = flag(32, at_least=0)
    """the update's forwards compute a question's shared prompt once for its G rows where it is at
    least this many tokens (0: never; the same log-probs and gradients up to float round-off;
    the relay's prompts are shorter)"""
    resample: str = flag("", choices=["", "fresh", "stale", "reweight"])
    """fresh (intermediate occupancy), stale (the stage's first batch) or reweight (stale, HAPPO
    weights); default: from --mode"""
    trust_region: str = flag("", choices=["", "on", "off"])
    """on (KL penalty + radius) or off (beta = 0, no radius); default: from --mode"""
    delta: float = flag(0.01, positive=True, per_agent=True)
    """trust-region radius: the reverse KL of an update in --radius units (a token's mean, or a
    message's sum), in nats (trust region on only), or one value per agent (0.01,0.005,...)"""
    lr: float = flag(3e-4, positive=True, per_agent=True)
    """learning rate of the RL updates, or one value per agent (1e-5,5e-6,...)"""
    optimizer: str = flag("adam", choices=["adam", "sgd"])
    """optimiser of the RL updates: adam or sgd"""
    epochs: int = flag(4, at_least=1)
    """passes over the batch per update (at most; the radius may stop it earlier)"""
    minibatch: int = flag(64, at_least=1)
    """messages per optimiser step"""
    clip_eps: float = flag(0.2, positive=True)
    """PPO ratio clip"""
    adv_max: float = flag(3.0, positive=True)
    """advantages are clipped to [-adv_max, adv_max] (bounded group-normalised advantages)"""
    beta: float = 0.1
    """weight of the reverse-KL penalty (trust region on only)"""
    radius: str = flag("token", choices=["token", "message"])
    """the unit of the radius and the penalty: token (the mean token reverse KL of the agent's
    batch) or message (the mean over its messages of each message's summed token KL)"""
    kl: str = flag("kl_rev", choices=["kl_rev", "full"])
    """trust-region KL: kl_rev (sample estimate r log r - r + 1) or full (exact over the vocabulary)"""
    reduction: str = flag("token", choices=["token", "sequence"])
    """loss reduction: token or sequence (see losses.py for the length bias)"""
    update_order: str = flag("turn", choices=["turn", "reverse", "random"])
    """update order within a stage: turn, reverse or random"""
    max_backtracks: int = flag(10, at_least=0)
    """halvings of the step that crossed the radius before it is dropped (the weights before it)"""
    max_grad_norm: float = flag(1.0, positive=True)
    """gradient clipping"""
    happo_max_weight: float = flag(2.0, at_least=1.0)
    """reweight: HAPPO importance weights are clipped to [1/w, w]"""
    # diagnostics
    eval_size: int = flag(512, at_least=1)
    """held-out questions for eval_acc (greedy)"""
    eval_tasks: str = ""
    """real tasks: also evaluate on the whole benchmark set of each named task (aime24, aime25,
    math500, gsm8k's test split, words, jsonl:PATH or parquet:PATH), logged as eval_acc/<task>;
    their questions are removed from the training pool"""
    eval_every: int = flag(1, at_least=1)
    """held-out evaluation after every this many stages (and always after the last)"""
    measure_gap: bool = False
    """stale/reweight: also sample diagnostic-only fresh batches, so stale_gap is measured (not
    trained on, not counted)"""

    @property
    def early_exit(self) -> bool:
        """Whether plays keep the turns that would come out the same (--no-early-exit: not)."""
        return not self.no_early_exit


def resolve(cfg: Config) -> Config:
    """Fill --resample and --trust-region from the mode preset where they were not given."""
    resample, trust_region = MODES[cfg.mode]
    cfg.resample = cfg.resample or resample
    cfg.trust_region = cfg.trust_region or trust_region
    if cfg.mode == "none":
        cfg.stages = 0
    return cfg


def of_agent(value, i: int):
    """Agent i's value of a per-agent field (config.flag(per_agent=True)): the value itself, or
    the i-th of a list of one value per agent."""
    return value[i] if isinstance(value, (list, tuple)) else value


def or_default(value, default):
    """A per-agent field with 0 meaning the default (--max-new-tokens), 0s replaced by it."""
    return [v or default for v in value] if isinstance(value, (list, tuple)) else value or default


def for_agent(cfg: Config, i: int) -> Config:
    """The config as agent i's update reads it: its own radius, learning rate and message length."""
    return dataclasses.replace(
        cfg,
        **{f.name: of_agent(getattr(cfg, f.name), i) for f in fields(Config) if f.metadata.get("per_agent")},
    )


def derive_seed(*parts) -> int:
    """A 63-bit seed from the run seed and what it is for, e.g. (seed, "train", stage)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def documented_groups() -> dict[str, dict[str, str]]:
    """{group: {field name: its doc}} in the order of Config: a group opens at a comment line,
    and a field's doc is the string under it."""
    source = inspect.getsource(Config)
    body = ast.parse(source).body[0].body
    docs = {
        a.target.id: " ".join(b.value.value.split())
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
    }
    groups, group = {}, ""
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("# "):
            group = text[2:]
        elif (name := text.split(":")[0]) in docs:
            groups.setdefault(group, {})[name] = docs[name]
    return groups
