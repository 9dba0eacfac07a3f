"""The starting team: tiny agents warmed up on an imperfect demonstrator, or pretrained models.

The tiny agents learn nothing but the relay, so a short supervised phase (warmup) teaches them its
format and leaves them an imperfect start that RL can improve; then one warmed-up model is copied
once per agent. --model and --models load Hugging Face models instead, with no warm-up.
"""

import random

import torch
from tqdm import tqdm

import eval as evaluation
import losses
import parallel
import rollout
import tasks
import team as team_lib
from config import Config

# warm-up steps between checks of --warmup-target
CHECK_EVERY = 25


def demonstration(q, task, solo, cfg: Config, rng: random.Random) -> list[tuple[str, str]]:
    """The demonstrator's (context, message) pairs for one question: every team turn of `task`,
    then the `solo` format.

    It is imperfect on purpose: on operations beyond +-demo_max_arg it writes the value one too
    high with probability demo_error. With --codes it also writes each message but the last
    mirrored (tasks.mirror) with probability 1/2, unmarked: a reader cannot tell which code it
    reads, so the agents learn to decode and encode both ways and must agree on a convention in RL.
    """
    n_ops, m = len(q.ops), task.modulus
    values = [
        (int(v) + (abs(int(op)) > cfg.demo_max_arg and rng.random() < cfg.demo_error)) % m
        for v, op in zip(q.steps, q.ops)
    ]
    mirrored = [cfg.codes and t < n_ops - 1 and rng.random() < 0.5 for t in range(n_ops)]

    # a chain of values as the demonstrator writes it
    def code(chain):
        return [str(tasks.mirror(int(v), m) if c else int(v)) for v, c in zip(chain, mirrored)]

    # the true chain (what later turns read), its own messages
    shown, written = code(q.steps), code(values)
    return [(task.render(q, shown[:t]), written[t]) for t in range(n_ops)] + [
        (solo.render(q, []), ";".join(map(str, values)))
    ]


def warmup(model, tokenizer, cfg: Config, batch: int = 64):
    """Behaviour cloning on the demonstrator's messages (demonstration), every team turn and the
    solo format. The agents learn its mixture, so they start greedy-wrong where it errs but give
    the right value real probability, whatever the seed: room that RL can only fill from the
    team reward. The agent_batch mask trains only the message (and EOS). The warm-up is the same
    in every mode, so `single` and the teams start from the same model. With --warmup-target it
    stops at the first check (every CHECK_EVERY steps) where n copies reach that greedy accuracy
    on training-side questions: the start is then set by the recipe, not by where one machine's
    floating point lands after a fixed number of steps.
    """
    task, solo = (
        tasks.Relay(cfg.agents * cfg.rounds, s, cfg.modulus, cfg.max_arg, cfg.p_max_arg)
        for s in (False, True)
    )
    agent = team_lib.make_agent("warmup", model, tokenizer, cfg.warmup_lr)
    check = (
        tasks.questions(task, 256, rollout.derive_seed(cfg.seed, "warmup-check"), heldout=False, partial=True)
        if cfg.warmup_target
        else []
    )
    for step in tqdm(range(cfg.warmup_steps), desc="warm-up", unit="step", disable=not parallel.main()):
        if (
            check
            and step
            and step % CHECK_EVERY == 0
            and (acc := copies_accuracy(agent, cfg, task, check)) >= cfg.warmup_target
        ):
            parallel.print0(
                f"warm-up: stopped after {step} steps, at greedy accuracy {acc:.3f} on {len(check)} training "
                f"questions (--warmup-target {cfg.warmup_target})"
            )
            break
        rng = random.Random(rollout.derive_seed(cfg.seed, "demonstrator", step))
        # a short chain has fewer
        qs = tasks.questions(
            task, batch, rollout.derive_seed(cfg.seed, "warmup", step), heldout=False, partial=True
        )
        pairs = [
            (q, context, message) for q in qs for context, message in demonstration(q, task, solo, cfg, rng)
        ]
        imitation_step(agent, agent.optimizer, imitation_batch(agent, pairs))
    else:
        # the target was not reached: say where the start is instead
        if check:
            parallel.print0(
                f"warm-up: --warmup-target {cfg.warmup_target} not reached in {cfg.warmup_steps} steps (greedy accuracy "
                f"{copies_accuracy(agent, cfg, task, check):.3f} on {len(check)} training questions); raise --warmup-steps"
            )
    model.eval()
    return model


def imitation_batch(agent, pairs) -> dict:
    """Teacher-forcing rows for the agent to learn to write `message` (then EOS) after `context`,
    for each (question, context, message); the mask covers the message and EOS only."""
    eos, device = agent.tokenizer.eos_token_id, next(agent.model.parameters()).device
    episodes = []
    for q, context, message in pairs:
        ids = agent.tokenizer(message, add_special_tokens=False)["input_ids"] + [eos]
        episodes.append(
            rollout.Episode(q, 0, 0, [0], [rollout.Step(0, agent.encode(context), ids, [0.0] * len(ids), "")])
        )
    return losses.agent_batch(episodes, 0, torch.ones(len(episodes)), agent.tokenizer.pad_token_id, device)


def imitation_step(agent, optimizer, data, rows=slice(None)):
    """One behaviour-cloning step: maximise the log-likelihood of the masked tokens of `rows`."""
    agent.model.train()
    loss = -losses.masked_mean(losses.token_logprobs(agent.model, data, rows)[0], data["mask"][rows])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    agent.model.eval()


def copies_accuracy(agent, cfg: Config, task, qs) -> float:
    """Greedy accuracy of a team of n copies of the agent being warmed up (one model, no copy made)."""
    agent.model.eval()
    return evaluation.accuracy([agent] * cfg.agents, task, qs, cfg)


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
    n = 1 if cfg.mode == "single" else cfg.agents
    if cfg.models:
        team = team_lib.load_team(
            cfg.models.split(",")[:n], device, dtype, cfg.lr, cfg.grad_ckpt, cfg.optimizer
        )
    elif cfg.lora_rank:
        team = team_lib.lora_team(
            *start,
            n,
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.lora_targets.split(","),
            cfg.lr,
            cfg.grad_ckpt,
            cfg.optimizer,
            cfg.seed,
        )
    else:
        team = team_lib.clone_team(*start, n, cfg.lr, cfg.grad_ckpt, cfg.optimizer)
    parallel.broadcast_team(team)
    return team
