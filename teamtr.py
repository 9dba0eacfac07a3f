"""TeamTR: trust-region fine-tuning of a team of LLM agents that share a context.

One stage updates every agent once, in an update order u_1..u_n. For k = 1..n, with i = u_k:
    1. batch: `fresh` (TeamTR) samples team rollouts of the *intermediate* team pi_hat^{k-1}, the
       team with this stage's earlier updates applied (exactly, by regenerating only the turns
       from the previous updated agent's first turn on); `stale` reuses the stage's first batch.
       Every batch of a stage draws the first batch's random numbers (common random numbers:
       the same derived uniforms per question, sample and turn), so a fresh batch differs from
       the first only where the updated agents now choose differently; each is still an exact
       sample of its team, and the stale gap between them is not sampling noise;
    2. bounded group-normalised advantages of the final reward, given to every token i wrote;
    3. old log-probs of i's tokens under i's weights before this update, in fp32;
    4. PPO-clip steps on i's tokens only, with a reverse-KL penalty, inside a hard trust region:
       after every optimiser step the reverse KL D is measured on i's whole batch (the token
       mean, or with --radius message each message's sum averaged over messages);
       the steps stop once D > delta and backtrack along the step that crossed it, from the last
       weights inside the radius, until D <= delta (an update whose advantages are all 0 carries
       no signal and takes no step);
    5. log the update's metrics.
Every other agent's weights stay bit-identical during agent i's update. docs/design.md gives the
algorithm and the metric names in full.

Unlike HAPPO, which reweights one stale buffer (our `happo` mode: each episode's advantage times
the product of the sequence ratios pi_new / pi_old of the agents already updated this stage,
clipped to [1/w, w]), TeamTR resamples after every agent's update; unlike GRPO, every step is
bounded by a KL radius (per token, the paper's, or per message). Updating all agents
simultaneously from one batch (MAGRPO-style "joint" training) is the same computation as
`stale`: each agent's loss involves only its own tokens and weights, and the batch and
advantages do not change between the updates.

Left out on purpose: evaluation, checkpoints and printing (plumbing/loop.py and train.py), and value
functions (the advantage is the group-normalised team reward). Run it through the CLI:
`python train.py --agents 3 --mode teamtr`. Under torchrun each process plays its block of the
questions and every number below is reduced over processes (parallel/__init__.py).
"""

import math
import random
import time
from collections import namedtuple
from typing import NamedTuple

import torch

import losses
import parallel
import rollout
import sharedprompt
import tasks
from config import Config, derive_seed, for_agent

# The trust region's measurement of the current weights: D (the reverse KL on the whole batch in
# the radius's unit), the fp32 log-probs and the per-token KL it was computed from
Measure = namedtuple("Measure", "D logp kl_tok")


class Update(NamedTuple):
    """What one agent's update returns: its metrics (logged as they are), and what the stage needs
    of it: the (E,) per-episode sequence log-ratio log pi_new / pi_old of its tokens (HAPPO's
    weights), and its surrogate under the occupancy the update gives its own later turns (L_hat*)
    and without HAPPO's weights, for the penalty and the stale gap (surrogate_errors)."""

    metrics: dict
    log_ratio: torch.Tensor
    own_surrogate: float
    plain_surrogate: float


class Seed(NamedTuple):
    """The seed of one update: the run's seed, the stage and the update's place in it. Every play
    of a stage uses update 0's (common random numbers)."""

    run: int
    stage: int
    update: int

    # derive_seed hashes repr(): the plain tuple's, so the numbers do not depend on these names
    __repr__ = tuple.__repr__


# ---------------------------------------------------------------------------------------------
# The algorithm: one stage, and one agent's trust-region update
# ---------------------------------------------------------------------------------------------


def run_stage(team, task, cfg: Config, stage: int, log) -> dict:
    """One stage: every agent updated once, in the update order. Returns the stage's metrics."""
    start, fresh = time.time(), cfg.resample == "fresh"
    # keep the intermediate team's rollouts: to train on (fresh) or to measure the stale gap
    intermediate = fresh or cfg.measure_gap
    plays = Plays(team, task, cfg, stage)
    # batch B_1: the stage's questions, G samples each, played by the team as the stage starts
    qs = task.train_questions(cfg.questions, derive_seed(cfg.seed, "train", stage))
    episodes = rollout.new_episodes(qs, cfg.group, len(team), cfg.rounds, cfg.order, (cfg.seed, stage))
    # this rank's questions, with all their samples
    first = plays.play([e for e in episodes if e.qid in parallel.shard(len(qs))])
    current, previous, log_w, updates = first, None, torch.zeros(len(first)), []
    for k, i in enumerate(update_order(cfg, len(team), stage)):
        # the intermediate team pi_hat^{k-1}: exact suffix resampling from the last updated agent's
        # first turn (a diagnostic with --measure-gap: not trained on, not counted)
        if k > 0 and intermediate:
            current = plays.play(current, [rollout.first_turn(e, previous) for e in current], counted=fresh)
        # the batch agent i trains on: the intermediate team's (fresh) or the stage's first (stale)
        batch = current if fresh else first
        if fresh and cfg.shared_prefix:
            batch = plays.from_shared_prefixes(batch, i)
        # the stale gap's other batch, where the updated agent's surrogate is measured too
        probe = StaleGap(team[i], i, first if fresh else current, cfg) if k > 0 and intermediate else None
        weights, clipfrac = happo_weights(log_w, cfg) if cfg.resample == "reweight" else (None, None)
        # the update of agent i alone
        update = update_agent(team[i], i, batch, cfg, Seed(cfg.seed, stage, k), weights)
        log_w += update.log_ratio.cpu()
        # what training on this batch costs: the penalty, and the stale gap (B_1 is the
        # intermediate team's batch at k = 0)
        other = probe.surrogates(team[i]) if probe else None
        m = update.metrics | surrogate_errors(update, other, intermediate, fresh or k == 0)
        if clipfrac is not None:
            m["weight_clipfrac"] = clipfrac
        # log
        updates.append(m)
        log_update(log, stage, k, i, batch, m)
        previous = i
    return stage_metrics(task, cfg, first, plays, updates, time.time() - start)


def update_agent(agent, i: int, episodes, cfg: Config, seed, weights=None) -> Update:
    """One trust-region update of agent i on its tokens in `episodes`. seed: what the minibatch
    order is derived from (a Seed in a stage). weights: (E,) HAPPO weights on the advantages
    (reweight mode)."""
    model = agent.model
    # agent i's own radius (--delta may give one per agent)
    cfg = for_agent(cfg, i)
    # advantages: each episode's group-normalised final reward, clipped, on every token i wrote
    data, adv_clipfrac = agent_data(agent, i, episodes, cfg, weights)
    # no signal (every sample of every question right, or every one wrong): no step is taken, so
    # Adam's momentum from earlier batches does not move the weights
    no_signal = parallel.all_sum(float(data["adv"].count_nonzero())) == 0
    # its weights change: turns and KV caches of earlier versions are not reused (rollout.play)
    if not no_signal:
        agent.changed()
    # old log-probs: fp32, of the policy that sampled (logits / temperature), before the update
    kl = TrustRegion(agent, data, cfg)
    drift = losses.token_mean((kl.old - data["sampler_logp"]).abs(), data["mask"])
    params = [p for p in model.parameters() if p.requires_grad]
    # theta_old: what a non-finite KL reverts to (none needed when no step is taken)
    theta_old = None if no_signal else [p.detach().clone() for p in params]
    # clipped steps inside the radius: D is measured after every step, and they stop once D > delta
    steps, skipped, measured, inside = (
        (0, 0, None, None) if no_signal else clipped_steps(agent, data, kl, params, cfg, seed)
    )
    # backtrack along the step that crossed the radius, from the weights before it, until D <= delta
    backtracks = 0
    if measured is not None and measured.D > cfg.delta:
        measured, backtracks = backtrack(agent, params, inside, kl, cfg)
    # without the trust region: measured once, at the end
    measured = measured or kl.measure(agent)
    # a non-finite KL is a fault: the update is undone
    reverted = not math.isfinite(measured.D)
    if reverted:
        copy_weights(params, theta_old)
        measured = kl.measure(agent)
    # log: each metric's mean over every process's rows
    radius = (cfg.delta, cfg.radius)
    stats = global_means(
        losses.update_stats(measured.logp, kl.old, measured.kl_tok, data, cfg.clip_eps, radius)
    )
    stats.update(steps=steps, skipped_steps=skipped, reverted=int(reverted), backtracks=backtracks)
    stats["no_signal"] = int(no_signal)
    logp, old, mask, episode = measured.logp, kl.old, data["mask"], data["episode"]
    # the surrogates the stage needs (the penalty, the stale gap) and the log-prob drift, in one
    # collective
    means = global_means(
        {
            "own": losses.own_shift_surrogate(logp, old, data["adv"], mask, episode),
            "plain": losses.surrogate(logp, old, data["plain_adv"], mask),
            "drift": drift,
        }
    )
    stats.update(adv_clipfrac=adv_clipfrac, logp_drift=means["drift"])
    log_ratio = losses.sequence_log_ratio(logp, old, mask, episode, len(episodes))
    return Update(stats, log_ratio, means["own"], means["plain"])


# ---------------------------------------------------------------------------------------------
# The pieces the update calls: the agent's rows, the KL measurement, the steps, backtracking
# ---------------------------------------------------------------------------------------------


def agent_data(agent, i: int, episodes, cfg: Config, weights=None):
    """Agent i's training rows (losses.agent_batch) with the advantages of their episodes'
    group-normalised rewards (times the HAPPO weights, if given), and the fraction of episodes
    whose advantage was clipped."""
    rewards = torch.tensor([e.reward for e in episodes])
    adv, clipped = losses.group_advantages(rewards, cfg.group, cfg.adv_max)
    device = next(agent.model.parameters()).device
    weighted = adv if weights is None else adv * weights
    data = losses.agent_batch(episodes, i, weighted, agent.tokenizer.pad_token_id, device)
    # --shared-prompt: each row's question and the prompt it shares with the question's other rows
    if cfg.shared_prompt:
        data |= sharedprompt.groups(episodes, data, cfg.shared_prompt)
    # each row's advantage without the weights (the stale gap's surrogate)
    data["plain_adv"] = adv.to(device)[data["episode"]].float()
    return data, global_mean(clipped * len(episodes), len(episodes))


def batch_logprobs(agent, data, full: bool, cfg: Config):
    """The agent's token_logprobs over all rows (the policy at the sampling temperature), in chunks
    of --minibatch rows, without gradients."""
    chunk = cfg.minibatch
    with torch.no_grad():
        parts = [
            agent.token_logprobs(data, slice(s, s + chunk), full, cfg.temperature)
            for s in range(0, agent.most_everywhere(len(data["ids"])), chunk)
        ]
    logp = torch.cat([p[0] for p in parts])
    return logp, torch.cat([p[1] for p in parts]) if full else None


class TrustRegion:
    """The trust region's measurement on one agent's batch: the old log-probs (fp32, under the
    weights before the update; with --kl full also the whole old distributions), and `measure`,
    D = the reverse KL of the current weights against them on every row, in the radius's unit
    (--radius: the token mean, or the mean over messages of each message's sum)."""

    def __init__(self, agent, data, cfg: Config):
        self.data, self.cfg, self.full = data, cfg, cfg.kl == "full"
        self.old, self.old_full = batch_logprobs(agent, data, self.full, cfg)

    def token_kl(self, logp, full, rows=slice(None)):
        """Per-token reverse KL(pi_new || pi_old) of `rows`, (S, L-1)."""
        old_full = self.old_full[rows] if self.full else None
        return losses.token_kl(logp, self.old[rows], self.cfg.kl, full, old_full)

    def measure(self, agent) -> Measure:
        logp, full = batch_logprobs(agent, self.data, self.full, self.cfg)
        kl_tok = self.token_kl(logp, full)
        D = global_means({"D": losses.radius_mean(kl_tok, self.data["mask"], self.cfg.radius)})["D"]
        return Measure(D, logp, kl_tok)


def clipped_steps(agent, data, kl: TrustRegion, params, cfg: Config, seed):
    """Up to --epochs passes of PPO-clip steps over minibatches of the agent's rows. With the
    trust region, D is measured on the whole batch after every step, and the steps stop once
    D > delta (a non-finite D stops them too). Returns (steps, skipped steps, the last
    measurement or None, the weights before the step that crossed the radius or None)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "minibatches"))
    steps, skipped, measured = 0, 0, None
    # the last weights inside the radius, where backtracking starts: one copy, refilled per step
    inside = [p.detach().clone() for p in params] if cfg.trust_region == "on" else None
    for _ in range(cfg.epochs):
        # this process's rows of each minibatch (one process: all of them)
        for rows in parallel.minibatches(len(data["ids"]), cfg.minibatch, gen):
            if inside is not None:
                copy_weights(inside, params)
            if not minibatch_step(agent, data, kl, rows, params, cfg):
                skipped += 1
                continue
            steps += 1
            if cfg.trust_region == "on":
                measured = kl.measure(agent)
                if not measured.D <= cfg.delta:
                    return steps, skipped, measured, inside
    return steps, skipped, measured, None


def minibatch_step(agent, data, kl: TrustRegion, rows, params, cfg: Config) -> bool:
    """One optimiser step on the loss of the minibatch `rows`: the PPO-clip surrogate with the
    reverse-KL penalty (beta = 0 without the trust region). False, with the weights untouched,
    if the loss or the gradient is not finite (a fault: the step is skipped; Agent.step)."""
    beta = cfg.beta if cfg.trust_region == "on" else 0.0
    denom = parallel.all_sum(losses.denominator(data["mask"][rows], cfg.reduction))
    # --radius message: the penalty is the minibatch's mean per-message KL, as the radius is
    penalty = None
    if cfg.radius == "message":
        penalty = ("message", parallel.all_sum(losses.denominator(data["mask"][rows], "message")))
    agent.optimizer.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=data["ids"].device)
    # a process without rows of this minibatch has nothing to add (--fsdp: it takes part anyway)
    if agent.most_everywhere(len(rows)):
        agent.model.train()
        logp, full = agent.token_logprobs(data, rows, kl.full, cfg.temperature)
        objective = losses.clipped_objective(logp, kl.old[rows], data["adv"][rows], cfg.clip_eps)
        kl_tok = kl.token_kl(logp, full, rows)
        loss = losses.ppo_loss(objective, kl_tok, data["mask"][rows], beta, (cfg.reduction, denom), penalty)
        loss.backward()
        agent.model.eval()
    # this process's share of the minibatch's gradient -> the whole gradient, clipped, one step
    return agent.step(params, loss, cfg.max_grad_norm)


def backtrack(agent, params, inside, kl: TrustRegion, cfg: Config) -> tuple[Measure, int]:
    """Along the step that crossed the radius, from `inside` (the weights before it, with D <=
    delta) to the weights now: theta = inside + alpha (theta - inside), alpha = 1/2, 1/4, ...,
    until D <= delta; after --max-backtracks halvings alpha = 0 (`inside` itself). The progress of
    the earlier steps is kept: only the last step is shortened. Returns the last measurement and
    the number of backtracks."""
    theta_new = [p.detach().clone() for p in params]
    backtracks, measured = 0, None
    with torch.no_grad():
        while measured is None or measured.D > cfg.delta:
            backtracks += 1
            alpha = 0.5**backtracks if backtracks <= cfg.max_backtracks else 0.0
            for p, p_in, p_new in zip(params, inside, theta_new):
                p.copy_(p_in + alpha * (p_new - p_in))
            measured = kl.measure(agent)
            if alpha == 0.0:
                break
    return measured, backtracks


def copy_weights(into, values):
    with torch.no_grad():
        for p, value in zip(into, values):
            p.copy_(value)


def global_mean(total, count) -> float:
    """total / count, each summed over ranks first."""
    return (parallel.all_sum(float(total)) / parallel.all_sum(float(count))).item()


def global_means(means: dict) -> dict:
    """{name: float}: each losses.Mean's sum and count summed over processes (one collective for
    all of them), then divided."""
    pairs = torch.stack([torch.stack([m.total, m.count.to(m.total.dtype)]) for m in means.values()])
    return {name: losses.Mean(*pair).value() for name, pair in zip(means, parallel.all_sum(pairs))}


# ---------------------------------------------------------------------------------------------
# The pieces the stage calls: its plays, the order, the stale-gap probe, HAPPO weights, the log
# ---------------------------------------------------------------------------------------------


class Plays:
    """The stage's plays (rollout.play). Every play draws the stage's random numbers (common
    random numbers: the same uniforms per question, sample and turn), so a batch played again
    differs from the first only where the agents now choose differently. Counts what training
    generates (turns, tokens, messages cut at max_new_tokens) and the turns early exit kept
    (rollout.Counts), and times all sampling."""

    def __init__(self, team, task, cfg: Config, stage: int):
        self.team, self.task, self.cfg, self.stage = team, task, cfg, stage
        self.counts = rollout.Counts()
        self.seconds = 0.0

    def play(self, episodes, keep=None, counted: bool = True):
        """Every episode played from turn keep[e] on (default 0); counted: training compute."""
        t0, cfg = time.time(), self.cfg
        how = rollout.Settings(cfg.temperature, Seed(cfg.seed, self.stage, 0), early_exit=cfg.early_exit)
        episodes, counts = rollout.play(self.team, self.task, episodes, how, keep)
        self.seconds += time.time() - t0
        if counted:
            self.counts.add(counts)
        return episodes

    def from_shared_prefixes(self, episodes, i: int):
        """--shared-prefix: every sample of a question played again from its sample 0's turn order
        and turns before agent i's first. Each is still a sample of the team (the prefix was one);
        within a group only agent i's turns and later ones differ, so upstream mistakes no longer
        enter agent i's group-normalised advantages."""
        if not any(rollout.first_turn(e, i) for e in episodes):
            return episodes
        leaders = {e.qid: e for e in episodes if e.sample == 0}
        shared = [
            rollout.Episode(e.question, e.qid, e.sample, leaders[e.qid].order, leaders[e.qid].steps)
            for e in episodes
        ]
        return self.play(shared, [rollout.first_turn(e, i) for e in shared])


def update_order(cfg: Config, n: int, stage: int) -> list[int]:
    order = list(range(n))
    if cfg.update_order == "reverse":
        order.reverse()
    elif cfg.update_order == "random":
        random.Random(derive_seed(cfg.seed, "update-order", stage)).shuffle(order)
    return order


class StaleGap:
    """Agent i's updated surrogate on the stage's other batch (fresh mode: the stage's first;
    stale with --measure-gap: the intermediate team's), for the stale gap and the penalty
    (surrogate_errors). The other batch's old log-probs are taken before the update."""

    def __init__(self, agent, i: int, other, cfg: Config):
        self.data, self.cfg = agent_data(agent, i, other, cfg)[0], cfg
        self.old = batch_logprobs(agent, self.data, False, cfg)[0]

    def surrogates(self, agent) -> tuple[float, float]:
        """(L_hat_i, L_hat*_i) on the other batch, under the agent's weights now."""
        logp = batch_logprobs(agent, self.data, False, self.cfg)[0]
        d = self.data
        surrogates = global_means(
            {
                "plain": losses.surrogate(logp, self.old, d["adv"], d["mask"]),
                "own": losses.own_shift_surrogate(logp, self.old, d["adv"], d["mask"], d["episode"]),
            }
        )
        return surrogates["plain"], surrogates["own"]


def surrogate_errors(update: Update, other, measured: bool, trained_on_intermediate: bool) -> dict:
    """What an update's batch costs it, from the update and other, (L_hat, L_hat*) on the stage's
    other batch (None if none):
    - penalty: |its surrogate on the batch it trained on - L_hat* on the intermediate team's
      batch|, L_hat* the surrogate under the occupancy the update itself gives the agent's later
      turns (losses.own_shift_surrogate). Trained on the intermediate team's batch (fresh, or
      the stage's first update) it is the within-agent shift |L_hat - L_hat*|: 0 exactly when
      the agent speaks once per episode. Stale: the stale gap (plus that shift); happo: its
      reweighted surrogate against the intermediate team's.
    - stale_gap: |L_hat_i(B_1) - L_hat_i(B_fresh)| without HAPPO's weights: what training on the
      stage's first batch would err by, in every mode that has both batches (0 where they are one).
    Both None where the intermediate team's batch is not sampled (stale without --measure-gap)."""
    surrogate, own, plain = update.metrics["surrogate"], update.own_surrogate, update.plain_surrogate
    if not measured:
        penalty = gap = None
    elif trained_on_intermediate:
        penalty = abs(surrogate - own)
        gap = abs(other[0] - plain) if other else 0.0
    else:
        penalty, gap = abs(surrogate - other[1]), abs(plain - other[0])
    return {"penalty": penalty, "stale_gap": gap}


def happo_weights(log_w, cfg: Config):
    """HAPPO's weights: exp(sum of the already-updated agents' sequence log-ratios), clipped to
    [1/w, w], (E,); and the fraction of episodes whose weight was clipped."""
    w = cfg.happo_max_weight
    clipfrac = global_mean((log_w.abs() > math.log(w)).sum(), len(log_w))
    return log_w.exp().clamp(1 / w, w), clipfrac


def stage_sum(updates, key: str):
    values = [m[key] for m in updates]
    return None if None in values else sum(values)


def log_update(log, stage: int, k: int, i: int, batch, m: dict):
    """One update's record and its line."""
    reward = global_mean(sum(e.reward for e in batch), len(batch))
    gap, penalty = ("-" if m[key] is None else f"{m[key]:.4f}" for key in ("stale_gap", "penalty"))
    record = {"stage": stage, "update": k + 1, "agent": i, "batch_reward": reward}
    record |= {f"agent{i}/{key}": v for key, v in m.items()}
    line = (
        f"stage {stage} update {k + 1} agent{i}: reward {reward:.3f} kl {m['kl_rev']:.4f} "
        f"per message {m['kl_msg']:.4f} steps {m['steps']} backtracks {m['backtracks']} "
        f"L {m['surrogate']:+.4f} penalty {penalty} gap {gap}"
    )
    log(record, line)


def stage_metrics(task, cfg: Config, first, plays: Plays, updates, seconds) -> dict:
    """The stage's record: its first batch's reward and turn accuracy, the certificate, what it
    generated and how long it took."""
    n_episodes = int(parallel.all_sum(len(first)))
    c = plays.counts
    turns, tokens, truncated, reused = (
        int(parallel.all_sum(x)) for x in (c.turns, c.tokens, c.truncated, c.reused)
    )
    # a conservative proxy of the per-stage lower bound: sum_k L_k - lambda sum_k sqrt(2 D_k),
    # lambda = adv_max (Pinsker: TV <= sqrt(D / 2), times 2 max |A|)
    surrogates = sum(m["surrogate"] for m in updates)
    radii = sum((2 * m["kl_rev"]) ** 0.5 for m in updates)
    certificate = surrogates - cfg.adv_max * radii
    return {
        "stage": plays.stage,
        # sampled, on the first batch
        "stage/reward": global_mean(sum(e.reward for e in first), len(first)),
        **{f"stage/sampled_{key}": v for key, v in tasks.turn_accuracy(task, first, len(plays.team)).items()},
        "stage/certificate": certificate,
        # summed over the stage's updates (None where not measured)
        **{f"stage/{key}": stage_sum(updates, key) for key in ("penalty", "stale_gap")},
        # generated turns per episode
        "stage/turns": turns / n_episodes,
        "stage/tokens": tokens,
        # turns per episode that early exit kept instead of generating them again
        "stage/reused_turns": reused / n_episodes,
        # fraction of generated messages cut at max_new_tokens
        "rollout/truncated": truncated / turns,
        "stage/seconds": seconds,
        "rollout/tokens_per_second": tokens / max(plays.seconds, 1e-9),
        "perf/sample_seconds": plays.seconds,
        "perf/update_seconds": seconds - plays.seconds,
    }
