"""The starting team: tiny agents warmed up on an imperfect demonstrator, or pretrained models.

The tiny agents learn nothing but the relay, so a short supervised phase (warmup) teaches them its
format and leaves them an imperfect start that RL can improve; then one warmed-up model is copied
once per agent. --model and --models load Hugging Face models instead, with no warm-up.
"""

import math
import random

import torch
from tqdm import tqdm

import lora
import losses
import parallel
import rollout
import tasks
import team as team_lib
from config import Config, derive_seed
from parallel import fsdp


def demonstration(q, task, solo, cfg: Config, rng: random.Random) -> list[tuple[str, str]]:
    """The demonstrator's (context, message) pairs for one question: every team turn of `task`,
    then the `solo` format.

    It is imperfect on purpose: on operations beyond +-demo_max_arg it writes the value one too
    high with probability demo_error. With --codes it also writes each message but the last
    mirrored (tasks.mirror) with probability 1/2, unmarked: a reader cannot tell which code it
    reads, so the agents learn to decode and encode both ways and must agree on a convention in RL.
    --code-links f < 1 leaves all but a fraction f of those links plain (coupled_links). With
    --work K each message first copies what it read and its operation, K times, without error.
    """
    n_ops, m = len(q.ops), task.modulus
    values = [
        (int(v) + (abs(int(op)) > cfg.demo_max_arg and rng.random() < cfg.demo_error)) % m
        for v, op in zip(q.steps, q.ops)
    ]
    coupled = coupled_links(n_ops, cfg.code_links)
    mirrored = [cfg.codes and coupled[t] and rng.random() < 0.5 for t in range(n_ops)]

    # a chain of values as the demonstrator writes it
    def code(chain):
        return [str(tasks.mirror(int(v), m) if c else int(v)) for v, c in zip(chain, mirrored)]

    # the true chain (what later turns read), its own messages
    shown, written = code(q.steps), code(values)
    # --work: each message first shows what it read and its operation, copied without error
    read = [tasks.start_value(q), *shown[:-1]]
    work = [(read[t] + q.ops[t] + "=") * task.work for t in range(n_ops)]
    shown = [w + v for w, v in zip(work, shown)]
    return [(task.render(q, shown[:t]), work[t] + written[t]) for t in range(n_ops)] + [
        (solo.render(q, []), ";".join(map(str, values)))
    ]


def coupled_links(n_ops: int, fraction: float) -> list[bool]:
    """Per message, whether --codes may mirror it: k = round(fraction * (n_ops - 1)) of the
    messages before the last, spread evenly (message t is one if (t + 1) k / (n_ops - 1) passes an
    integer that t k / (n_ops - 1) does not); never the last, which is scored plainly."""
    links = n_ops - 1
    k = math.floor(fraction * links + 0.5)
    return [(t + 1) * k // links > t * k // links for t in range(links)] + [False]


def warmup(model, tokenizer, cfg: Config, batch: int = 64):
    """Behaviour cloning on the demonstrator's messages (demonstration), every team turn and the
    solo format, for --warmup-steps steps. The agents learn its mixture, so they start
    greedy-wrong where it errs but give the right value real probability, whatever the seed:
    room that RL can only fill from the team reward. The agent_batch mask trains only the
    message (and EOS). The warm-up is the same in every mode, so `single` and the teams start
    from the same model.
    """
    n_ops = cfg.agents * cfg.rounds
    task, solo = (
        tasks.Relay(n_ops, s, cfg.modulus, cfg.max_arg, cfg.p_max_arg, cfg.work) for s in (False, True)
    )
    agent = team_lib.make_agent("warmup", model, tokenizer, team_lib.Training(lr=cfg.warmup_lr))
    for step in tqdm(range(cfg.warmup_steps), desc="warm-up", unit="step", disable=not parallel.main()):
        rng = random.Random(derive_seed(cfg.seed, "demonstrator", step))
        # a short chain has fewer questions than the batch
        qs = tasks.questions(task, batch, derive_seed(cfg.seed, "warmup", step), heldout=False, partial=True)
        pairs = [(q, *pair) for q in qs for pair in demonstration(q, task, solo, cfg, rng)]
        imitation_step(agent, agent.optimizer, imitation_batch(agent, pairs))
    model.eval()
    return model


def imitation_batch(agent, pairs, chat=None) -> dict:
    """Teacher-forcing rows for the agent to learn to write `message` (then EOS) after `context`,
    for each (question, context, message); the mask covers the message and EOS only. chat: the
    task's chat template options."""
    eos, device = agent.tokenizer.eos_token_id, next(agent.model.parameters()).device
    episodes = []
    for q, context, message in pairs:
        ids = agent.tokenizer(message, add_special_tokens=False)["input_ids"] + [eos]
        episodes.append(
            rollout.Episode(
                q, 0, 0, [0], [rollout.Step(0, agent.encode(context, chat), ids, [0.0] * len(ids), "")]
            )
        )
    return losses.agent_batch(episodes, 0, torch.ones(len(episodes)), agent.tokenizer.pad_token_id, device)


def imitation_step(agent, optimizer, data, rows=slice(None)):
    """One behaviour-cloning step: maximise the log-likelihood of the masked tokens of `rows`."""
    agent.model.train()
    loss = -losses.masked_mean(agent.token_logprobs(data, rows)[0], data["mask"][rows])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    agent.changed()
    optimizer.step()
    agent.model.eval()


def starting_model(cfg: Config, device, dtype):
    """(model, tokenizer) that every agent starts as: --model, or a tiny agent after its warm-up.
    None for --models (a heterogeneous team is loaded agent by agent)."""
    if cfg.models:
        return None
    if cfg.model:
        return team_lib.load_model(cfg.model, device, dtype)
    tokenizer = team_lib.char_tokenizer(tasks.CHARS)
    model = team_lib.tiny_model(tokenizer, cfg.hidden, cfg.layers, seed=cfg.seed).to(device, dtype)
    # a bad --lora-targets ends here, not after the warm-up
    if cfg.lora_rank:
        team_lib.check_lora_targets(model, cfg.lora_targets.split(","))
    return warmup(model, tokenizer, cfg), tokenizer


def build_team(cfg: Config, start, device, dtype):
    """The agents of a run: copies of the starting model (one in `single` mode), LoRA adapters on
    it (--lora-rank), or --models. Under torchrun every rank builds them (each warms up the same
    tiny model) and then takes rank 0's weights."""
    n, training = 1 if cfg.mode == "single" else cfg.agents, team_lib.Training.of(cfg)
    if cfg.models:
        team = team_lib.load_team(cfg.models.split(",")[:n], device, dtype, training)
    elif cfg.lora_rank:
        spec = lora.spec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
        team = team_lib.lora_team(*start, n, spec, training, cfg.seed)
    else:
        team = team_lib.clone_team(*start, n, training)
    parallel.broadcast_team(team)
    if cfg.fsdp:
        fsdp.shard_team(team, device)
    return team
