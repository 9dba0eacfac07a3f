"""Component replacement: swap one agent of a trained team for another model, and align it first.

    python train.py --init runs/teamtr-n3-s0 --replace 1=runs/other/agent1 --stages 5
    python train.py --init runs/teamtr-n3-s0 --replace 1=runs/other/agent1 --stages 5 --align-steps 0

The paper's plug-and-play claim (docs/design.md, "Component replacement"). --init starts a run
from a saved team (its trained agents, or the last checkpoint of a run that did not finish). With
--replace i=PATH, agent i is swapped for the model at PATH, and a Stage-0 alignment runs before
the normal stages:
  1. imitation: the old team plays training questions; from the episodes it got right, the new
     agent learns to write what the replaced agent wrote there, read through its own tokenizer
     and chat template (--align-steps behaviour-cloning steps at --warmup-lr, as in warmup.py);
  2. one trust-region update of the new agent alone (teamtr.update_agent) on fresh rollouts of
     the new team, so it also learns from the team's reward before the others move.
Logged at stage 0: replace/before (the old team's held-out accuracy), replace/swapped (right after
the swap: the shock) and replace/imitated (after step 1); stage 0's evaluation follows step 2.
--align-steps 0 swaps without alignment. Unlike re-training the whole team, only the new agent
moves in Stage 0; every other agent stays bit-identical.
"""

import torch

import eval as evaluation
import rollout
import team as team_lib
import teamtr
import warmup
from config import Config, derive_seed
from parallel import fsdp
from plumbing import runs


def target(cfg: Config) -> tuple[int, str]:
    """(i, PATH) of --replace i=PATH."""
    index, _, path = cfg.replace.partition("=")
    return int(index), path


def load_init(cfg: Config, device, dtype) -> list:
    """The --init run's team: its trained agents, or the last checkpoint of a run that did not finish."""
    paths = runs.saved_team(cfg.init)[1]
    if len(paths) != cfg.agents:
        raise runs.RunError(f"--init {cfg.init}: its team has {len(paths)} agents, not --agents {cfg.agents}")
    team = team_lib.load_team(paths, device, dtype, team_lib.Training.of(cfg))
    if cfg.fsdp:
        fsdp.shard_team(team, device)
    return team


def swap_and_align(team, task, heldout, cfg: Config, log, device, dtype) -> list:
    """The team with agent i replaced (and aligned, unless --align-steps 0); logs the stage-0 record."""
    i, path = target(cfg)
    record = {"stage": 0, "replace/before": evaluation.accuracy(team, task, heldout, cfg)}
    new = team_lib.make_agent(
        f"agent{i}", *team_lib.load_model(path, device, dtype), team_lib.Training.of(cfg).agent(i)
    )
    # what the replaced agent wrote when the team was right
    pairs = successful_messages(team, i, task, cfg)
    team = [new if j == i else agent for j, agent in enumerate(team)]
    record["replace/swapped"] = evaluation.accuracy(team, task, heldout, cfg)
    if cfg.align_steps:
        imitate(new, pairs, cfg, task.chat)
        record["replace/imitated"] = evaluation.accuracy(team, task, heldout, cfg)
        qs = task.train_questions(cfg.questions, derive_seed(cfg.seed, "align"))
        # this rank's questions
        played = evaluation.play(team, task, qs, cfg, cfg.group, cfg.temperature, seed=(cfg.seed, "align"))
        update = teamtr.update_agent(new, i, played, cfg, (cfg.seed, "align"))
        record.update(
            {
                "replace/kl_rev": update.metrics["kl_rev"],
                "replace/steps": update.metrics["steps"],
                "replace/examples": len(pairs),
            }
        )
    log(
        record,
        f"stage 0: agent{i} replaced by {path}: held-out accuracy {record['replace/before']:.3f} before, "
        f"{record['replace/swapped']:.3f} right after the swap"
        + (
            f", {record['replace/imitated']:.3f} after imitating {len(pairs)} messages"
            if cfg.align_steps
            else " (no alignment)"
        ),
    )
    return team


def successful_messages(team, i: int, task, cfg: Config) -> list[tuple]:
    """(question, context, message) of every turn of agent i in the old team's correct episodes,
    sampled at the run's temperature on enough training questions that imitation sees each
    example about once (align_steps x minibatch episodes; imitating a few hundred examples
    for many passes overfits them and costs the new agent what it knew)."""
    count = max(cfg.questions, -(-cfg.align_steps * cfg.minibatch // cfg.group))
    qs = task.train_questions(count, derive_seed(cfg.seed, "imitate"))
    episodes = rollout.new_episodes(qs, cfg.group, len(team), cfg.rounds, cfg.order, (cfg.seed, "imitate"))
    played = rollout.play(team, task, episodes, rollout.Settings(cfg.temperature, (cfg.seed, "imitate")))[0]
    return [
        (e.question, task.context(e.question, e.steps[:t], i), s.text)
        for e in played
        if e.reward > 0
        for t, s in enumerate(e.steps)
        if s.agent == i
    ]


def imitate(agent, pairs, cfg: Config, chat=None):
    """--align-steps behaviour-cloning steps of --minibatch examples each, at --warmup-lr, with an
    optimiser of their own (the agent's RL optimiser starts fresh after them). Every rank takes
    the same steps on the same examples."""
    if not pairs:
        return
    optimizer = torch.optim.Adam([p for p in agent.model.parameters() if p.requires_grad], lr=cfg.warmup_lr)
    data = warmup.imitation_batch(agent, pairs, chat)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "imitate-batches"))
    for _ in range(cfg.align_steps):
        warmup.imitation_step(
            agent, optimizer, data, torch.randperm(len(pairs), generator=gen)[: cfg.minibatch]
        )
