"""The config of a run: every flag of train.py is a field of Config, documented under it, and
MODES are the presets of the two switches that define the methods (resampling and the trust region).
"""

from dataclasses import dataclass

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


@dataclass
class Config:
    # run
    name: str = ""
    """run directory name under --out-dir (default: <mode>-n<agents>-s<seed>, with a suffix if taken)"""
    out_dir: str = "runs"
    """where run directories are written"""
    seed: int = 0
    """the one seed; every other seed is derived from it"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    dtype: str = "auto"
    """fp32 or bf16 weights; auto = bf16 on CUDA, fp32 on CPU (log-probs are fp32 either way)"""
    threads: int = 2
    """torch CPU threads (0 = torch's default)"""
    dist_timeout: float = 600.0
    """under torchrun: seconds a process waits for the others (a rank that died or hangs) before it ends with an error"""
    # team and task
    agents: int = 3
    """number of agents n (compare: a list such as 2,4,6,8 sweeps team sizes)"""
    mode: str = "teamtr"
    """teamtr, stale, naive, fresh-no-tr, happo, single or none (presets of --resample and --trust-region), or compare"""
    modes: str = "teamtr,stale,naive,fresh-no-tr,happo,single,none"
    """compare: the modes trained side by side from the same warm-up team"""
    seeds: int = 3
    """compare: the seeds --seed, --seed + 1, ... (mean and spread over them)"""
    resample: str = ""
    """fresh (intermediate occupancy), stale (the stage's first batch) or reweight (stale, HAPPO weights); default: from --mode"""
    measure_gap: bool = False
    """stale/reweight: also sample diagnostic-only fresh batches, so stale_gap is measured (not trained on, not counted)"""
    happo_max_weight: float = 2.0
    """reweight: HAPPO importance weights are clipped to [1/w, w]"""
    trust_region: str = ""
    """on (KL penalty + radius) or off (beta = 0, no radius); default: from --mode"""
    order: str = "fixed"
    """turn order: fixed (agent 1..n) or random (a permutation per episode, the router)"""
    update_order: str = "turn"
    """update order within a stage: turn, reverse or random"""
    rounds: int = 1
    """the turn order is repeated this many times (agents speak `rounds` times)"""
    task: str = "relay"
    """relay (built in); words (generated word problems, offline); gsm8k, math500, aime24, aime25 (hub datasets); or jsonl:PATH / parquet:PATH (question or problem, and answer fields). Real tasks need --model or --models"""
    prompts: str = ""
    """real tasks: the roles file (default prompts/team.json)"""
    max_new_tokens: int = 0
    """tokens per message at most (0: the task's default, 256 for real tasks); messages cut there are counted in rollout/truncated"""
    modulus: int = 10
    """relay arithmetic is mod this (10: one digit per message)"""
    max_arg: int = 3
    """relay operations are +a or -a with a in 1..max_arg (larger is much slower to learn)"""
    p_max_arg: float = 0.0
    """probability of a +-max_arg operation, the kind the demonstrator gets wrong (0: a uniform in 1..max_arg); lower it to start larger teams near the accuracy of small ones"""
    codes: bool = False
    """coordination variant: the warm-up demonstrator writes each message but the last plainly or mirrored (modulus - 1 - v) at random, unmarked, so the team starts without a shared convention"""
    model: str = ""
    """Hugging Face name or local path for every agent (default: tiny agents built in code)"""
    models: str = ""
    """comma-separated names or paths, one per agent (a heterogeneous team)"""
    init: str = ""
    """a saved run directory whose trained team (or last checkpoint) starts this run instead of a warm-up (replace.py)"""
    replace: str = ""
    """with --init: i=PATH swaps agent i for the model at PATH, aligned first (Stage 0; replace.py)"""
    align_steps: int = 50
    """with --replace: behaviour-cloning steps of the Stage-0 alignment (0: swap without alignment)"""
    grad_ckpt: bool = False
    """gradient checkpointing during updates (for large models on GPU)"""
    lora_rank: int = 0
    """LoRA rank r (0: full fine-tuning): one frozen base model shared by the team, one adapter and optimiser per agent (lora.py); not with --models"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapter adds (alpha / r) B A to its layer"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """the linear layers (by name) that get adapters"""
    # tiny agents and their warm-up
    hidden: int = 128
    """width of the tiny agents (128: about 0.4M parameters)"""
    layers: int = 2
    """layers of the tiny agents"""
    warmup_steps: int = 250
    """supervised steps on demonstrations before RL"""
    warmup_lr: float = 1e-3
    """learning rate of the warm-up"""
    warmup_target: float = 0.0
    """stop the warm-up once the team of copies reaches this greedy accuracy on 256 training-side questions (fewer if the task has fewer) (checked every 25 steps; 0: all --warmup-steps): a start set by the recipe, not by a machine's floating point"""
    demo_error: float = 0.6
    """the demonstrator is wrong (one too high) this often on operations beyond +-demo_max_arg"""
    demo_max_arg: int = 2
    """operations up to +-this are always demonstrated correctly"""
    # rollouts
    stages: int = 20
    """number of stages (one update of every agent each); --mode compare: 15 unless given"""
    questions: int = 32
    """questions per batch"""
    group: int = 8
    """samples per question (the GRPO group G)"""
    temperature: float = 1.0
    """sampling temperature of training rollouts (1.0: behaviour = policy)"""
    top_p: float = 1.0
    """nucleus sampling mass of training rollouts"""
    eval_size: int = 512
    """held-out questions for eval_acc (greedy)"""
    eval_every: int = 1
    """held-out evaluation after every this many stages (and always after the last)"""
    # update
    optimizer: str = "adam"
    """optimiser of the RL updates: adam or sgd"""
    lr: float = 3e-4
    """learning rate of the RL updates"""
    epochs: int = 4
    """passes over the batch per update (at most; the radius may stop it earlier)"""
    minibatch: int = 64
    """messages per optimiser step"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    adv_max: float = 3.0
    """advantages are clipped to [-adv_max, adv_max] (bounded group-normalised advantages)"""
    beta: float = 0.1
    """weight of the reverse-KL penalty (trust region on only)"""
    delta: float = 0.02
    """trust-region radius: mean token reverse KL of an update, in nats (trust region on only)"""
    kl: str = "kl_rev"
    """trust-region KL: kl_rev (sample estimate r log r - r + 1) or full (exact over the vocabulary)"""
    reduction: str = "token"
    """loss reduction: token or sequence (see losses.py for the length bias)"""
    shared_prefix: bool = False
    """fresh resampling (compare: its fresh modes): before agent i's update, the G samples of each question are played again from one shared prefix (sample 0's turns before agent i's first), so the group-normalised advantage compares only what agent i and the agents after it wrote"""
    reuse_kv: bool = False
    """fresh resampling: keep each turn's KV cache, so that suffix resampling prefills only what the kept turns' contexts did not hold (the same samples, faster; memory: about two plays' KV caches, small for tiny agents, gigabytes for LLM teams)"""
    holdout: float = 0.0
    """fraction of an update's questions (with all their samples) held out of its training; its surrogate on them is logged as heldout_surrogate (0: train on all)"""
    accept: str = "always"
    """always, or heldout: keep an update only if its surrogate on the held-out questions is positive, else restore the old weights (needs --holdout)"""
    reset_optimizer: bool = False
    """clear an agent's optimiser state (Adam moments) at the start of each of its updates"""
    max_backtracks: int = 10
    """halvings toward the old weights before an update is reverted"""
    max_grad_norm: float = 1.0
    """gradient clipping"""


def resolve(cfg: Config) -> Config:
    """Fill --resample and --trust-region from the mode preset where they were not given."""
    resample, trust_region = MODES[cfg.mode]
    cfg.resample = cfg.resample or resample
    cfg.trust_region = cfg.trust_region or trust_region
    if cfg.mode == "none":
        cfg.stages = 0
    return cfg
