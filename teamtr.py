"""TeamTR: trust-region fine-tuning of a team of LLM agents that share a context.

One stage updates every agent once, in an update order u_1..u_n. For k = 1..n, with i = u_k:
    1. batch: `fresh` (TeamTR) samples team rollouts of the *intermediate* team pi_hat^{k-1}, the
       team with this stage's earlier updates applied (exactly, by regenerating only the turns
       from the previous updated agent's first turn on); `stale` reuses the stage's first batch.
       Every batch of a stage draws the first batch's random numbers (common random numbers:
       the same derived uniforms per question, sample and turn), so a fresh batch differs from
       the first only where the updated agents now choose differently; each is still an exact
       sample of its team, and the stale gap between them is not sampling noise.
       With --shared-prefix (for large teams) agent i's batch is played once more so that the G
       samples of a question share one prefix, sample 0's turns before agent i: its advantages
       then compare only what agent i and the agents after it wrote, not upstream mistakes;
    2. bounded group-normalised advantages of the final reward, given to every token i wrote;
    3. old log-probs of i's tokens under i's weights before this update, in fp32;
    4. a PPO-clip step on i's tokens only, with a reverse-KL penalty, inside a hard trust
       region: after every optimiser step the mean token reverse KL D is measured on i's batch;
       the update stops once D > delta and backtracks toward the old weights until D <= delta;
       optionally (--accept heldout) an acceptance test: the update is kept only if its surrogate
       on questions held out of it is positive, as TRPO's line search checks its surrogate;
    5. log the update's metrics.
Every other agent's weights stay bit-identical during agent i's update.

Unlike HAPPO, which reweights one stale buffer (our `happo` mode: each episode's advantage times
the product of the sequence ratios pi_new / pi_old of the agents already updated this stage,
clipped to [1/w, w]), TeamTR resamples after every agent's update; unlike GRPO, every step is
bounded by a token-level KL radius.
Updating all agents simultaneously from one batch (MAGRPO-style "joint" training) is the same
computation as `stale`: each agent's loss involves only its own tokens and weights, and the batch
and advantages do not change between the updates.

Run it through the CLI: `python train.py --agents 3 --mode teamtr`. Under torchrun each process
plays its block of the questions and every number below is reduced over processes (parallel.py).
"""

import math
import random
import resource
import time

import torch
from tqdm import tqdm

import eval as evaluation
import losses
import parallel
import rollout
from config import Config


def update_order(cfg: Config, n: int, stage: int) -> list[int]:
    order = list(range(n))
    if cfg.update_order == "reverse":
        order.reverse()
    elif cfg.update_order == "random":
        random.Random(rollout.derive_seed(cfg.seed, "update-order", stage)).shuffle(order)
    return order


def batch_logprobs(model, data, full: bool, chunk: int):
    """token_logprobs over all rows, in chunks, without gradients."""
    with torch.no_grad():
        parts = [
            losses.token_logprobs(model, data, slice(s, s + chunk), full)
            for s in range(0, len(data["ids"]), chunk)
        ]
    logp = torch.cat([p[0] for p in parts])
    return logp, torch.cat([p[1] for p in parts]) if full else None


def mean_kl(model, data, old, old_full, cfg: Config):
    """D: the mean token reverse KL of the agent's current weights against its old ones on its batch."""
    logp, full = batch_logprobs(model, data, cfg.kl == "full", cfg.minibatch)
    kl_tok = losses.token_kl(logp, old, cfg.kl, full, old_full)
    return losses.token_mean(kl_tok, data["mask"]), logp, kl_tok


def shared_prefixes(episodes, i: int):
    """(episodes, keep) for rollout.play: every sample of a question given its sample 0's turn
    order and turns before agent i's first (--shared-prefix). Each is still a sample of the team
    (the prefix was one); within a group only agent i's turns and later ones differ, so upstream
    mistakes no longer enter agent i's group-normalised advantages."""
    leaders = {e.qid: e for e in episodes if e.sample == 0}
    shared = [
        rollout.Episode(e.question, e.qid, e.sample, leaders[e.qid].order, leaders[e.qid].steps)
        for e in episodes
    ]
    return shared, [rollout.first_turn(e, i) for e in shared]


def update_agent(agent, i: int, episodes, gap_episodes, cfg: Config, seed, weights=None) -> dict:
    """One trust-region update of agent i on its tokens in `episodes`. Returns its metrics, and
    under "log_ratio" the (E,) per-episode sequence log-ratio log pi_new / pi_old of its tokens.

    gap_episodes: the other batch of the stale gap (fresh mode: the stage's first batch; stale
    with --measure-gap: a fresh one), where the updated agent's surrogate is measured too;
    stale_gap = |L_hat_i(B_1) - L_hat_i(B_fresh)|. weights: (E,) HAPPO weights on the advantages.
    --holdout F keeps F of the questions out of the update and measures its surrogate there
    (heldout_surrogate: does the update's direction carry signal beyond its own samples?);
    --accept heldout then keeps the update only if that estimate is positive.
    """
    model, device = agent.model, next(agent.model.parameters()).device
    pad, full = agent.tokenizer.pad_token_id, cfg.kl == "full"
    trust_region = cfg.trust_region == "on"
    beta = cfg.beta if trust_region else 0.0
    data, adv_clipped = agent_data(episodes, i, pad, device, cfg, weights)
    # rows of the questions held out of this update: its improvement is estimated on them
    if cfg.holdout:
        is_held = held_out(episodes, cfg.holdout, seed).to(device)[data["episode"]]
        data, held = ({key: v[rows] for key, v in data.items()} for rows in (~is_held, is_held))
        held_old = batch_logprobs(model, held, False, cfg.minibatch)[0]
    # its weights change: KV caches of earlier versions are not reused (rollout.play)
    agent.version += 1
    # no Adam moments from the agent's previous update (an older batch)
    if cfg.reset_optimizer:
        agent.optimizer.state.clear()
    # step 3: fp32, weights before the update
    old, old_full = batch_logprobs(model, data, full, cfg.minibatch)
    drift = losses.token_mean((old - data["sampler_logp"]).abs(), data["mask"])
    if gap_episodes is not None:
        gap_data = agent_data(gap_episodes, i, pad, device, cfg)[0]
        gap_old = batch_logprobs(model, gap_data, False, cfg.minibatch)[0]

    params = [p for p in model.parameters() if p.requires_grad]
    theta_old = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(rollout.derive_seed(seed, "minibatches"))
    # measured: mean_kl of the current weights
    steps, skipped, D, stop, measured = 0, 0, 0.0, False, None
    # this rank's rows among every rank's (one process: all)
    first, total = parallel.row_block(len(data["ids"]))
    for _ in range(cfg.epochs):
        for rows in torch.randperm(total, generator=gen).split(cfg.minibatch):
            # the minibatch's rows on this rank
            rows = rows[(rows >= first) & (rows < first + len(data["ids"]))] - first
            denom = parallel.all_sum(losses.denominator(data["mask"][rows], cfg.reduction))
            agent.optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            if len(rows):
                model.train()
                logp, full_new = losses.token_logprobs(model, data, rows, full)
                kl_tok = losses.token_kl(logp, old[rows], cfg.kl, full_new, old_full[rows] if full else None)
                loss = losses.ppo_loss(
                    logp,
                    old[rows],
                    data["adv"][rows],
                    data["mask"][rows],
                    kl_tok,
                    cfg.clip_eps,
                    beta,
                    cfg.reduction,
                    denom,
                )
                loss.backward()
                model.eval()
            # this rank's share of the minibatch's gradient -> the whole gradient
            parallel.sum_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            # a fault: skip the step, weights untouched
            if not (torch.isfinite(parallel.all_sum(loss.detach())) and torch.isfinite(grad_norm)):
                skipped += 1
                continue
            agent.optimizer.step()
            steps += 1
            # the trust region, measured after every step on the whole batch
            if trust_region:
                measured = mean_kl(model, data, old, old_full, cfg)
                # a non-finite D stops too
                if stop := not (D := measured[0]) <= cfg.delta:
                    break
        if stop:
            break

    backtracks = 0
    # backtrack: theta_old + alpha (theta - theta_old), alpha = 1/2, 1/4, ...
    if trust_region and D > cfg.delta:
        theta_new = [p.detach().clone() for p in params]
        with torch.no_grad():
            while D > cfg.delta:
                backtracks += 1
                # 0: revert
                alpha = 0.5**backtracks if backtracks <= cfg.max_backtracks else 0.0
                for p, p_old, p_new in zip(params, theta_old, theta_new):
                    p.copy_(p_old + alpha * (p_new - p_old))
                measured = mean_kl(model, data, old, old_full, cfg)
                D = measured[0]
                if alpha == 0.0:
                    break

    # trust region off: measure once
    measured = measured or mean_kl(model, data, old, old_full, cfg)
    reverted = not math.isfinite(measured[0])
    # a fault in the KL measurement: the update is undone
    if reverted:
        restore(params, theta_old)
        measured = mean_kl(model, data, old, old_full, cfg)
    held_stats = {}
    # the improvement estimate on questions the update did not train on
    if cfg.holdout:
        held_logp = batch_logprobs(model, held, False, cfg.minibatch)[0]
        held_stats["heldout_surrogate"] = losses.surrogate(held_logp, held_old, held["adv"], held["mask"])
        held_stats["rejected"] = int(cfg.accept == "heldout" and not held_stats["heldout_surrogate"] > 0)
        # the acceptance test failed: the old weights, bit for bit
        if held_stats["rejected"]:
            restore(params, theta_old)
            measured, held_logp = mean_kl(model, data, old, old_full, cfg), held_old
    D, logp, kl_tok = measured
    stats = losses.update_stats(logp, old, data["adv"], data["mask"], kl_tok, cfg.clip_eps, cfg.delta)
    stats.update(
        steps=steps,
        skipped_steps=skipped,
        reverted=int(reverted),
        backtracks=backtracks,
        adv_clipfrac=adv_clipped,
        logp_drift=drift,
        stale_gap=None,
        **held_stats,
    )
    stats["log_ratio"] = losses.sequence_log_ratio(logp, old, data["mask"], data["episode"], len(episodes))
    if cfg.holdout:
        stats["log_ratio"] += losses.sequence_log_ratio(
            held_logp, held_old, held["mask"], held["episode"], len(episodes)
        )
    if gap_episodes is not None:
        gap_logp = batch_logprobs(model, gap_data, False, cfg.minibatch)[0]
        gap_surrogate = losses.surrogate(gap_logp, gap_old, gap_data["adv"], gap_data["mask"])
        stats["stale_gap"] = abs(gap_surrogate - stats["surrogate"])
    return stats


def restore(params, values):
    with torch.no_grad():
        for p, value in zip(params, values):
            p.copy_(value)


def held_out(episodes, fraction: float, seed) -> torch.Tensor:
    """(E,) bool: the episodes of `fraction` of the batch's questions, drawn from the update's
    seed (every rank draws the same question ids; each holds its own block of them)."""
    count = int(parallel.all_sum(len({e.qid for e in episodes})))
    held = set(
        random.Random(rollout.derive_seed(seed, "holdout")).sample(range(count), round(fraction * count))
    )
    return torch.tensor([e.qid in held for e in episodes])


def agent_data(episodes, i, pad, device, cfg: Config, weights=None):
    """Agent i's training rows with the advantages of their episodes' group-normalised rewards
    (times the HAPPO weights, if given)."""
    rewards = torch.tensor([e.reward for e in episodes])
    adv, clipped = losses.group_advantages(rewards, cfg.group, cfg.adv_max)
    return losses.agent_batch(
        episodes, i, adv if weights is None else adv * weights, pad, device
    ), global_mean(clipped * len(episodes), len(episodes))


def global_mean(total, count) -> float:
    """total / count, each summed over ranks first."""
    return (parallel.all_sum(float(total)) / parallel.all_sum(float(count))).item()


def happo_weights(log_w, max_weight: float):
    """exp(sum of the already-updated agents' sequence log-ratios), clipped to [1/w, w]. (E,)"""
    return log_w.exp().clamp(1 / max_weight, max_weight)


def run_stage(team, task, cfg: Config, stage: int, log) -> dict:
    """One stage: every agent updated once, in the update order. Returns the stage's metrics."""
    start, fresh, reweight = time.time(), cfg.resample == "fresh", cfg.resample == "reweight"
    # keep rollouts of the intermediate team pi_hat^{k-1}
    measure = fresh or cfg.measure_gap
    qs = task.train_questions(cfg.questions, rollout.derive_seed(cfg.seed, "train", stage))
    episodes = rollout.new_episodes(qs, cfg.group, len(team), cfg.rounds, cfg.order, (cfg.seed, stage))
    # this rank's questions, with all their samples
    episodes = [e for e in episodes if e.qid in parallel.shard(len(qs))]
    reuse_kv = cfg.reuse_kv and measure
    first, turns, tokens, truncated = rollout.play(
        team, task, episodes, cfg.temperature, cfg.top_p, (cfg.seed, stage, 0), reuse_kv=reuse_kv
    )
    current, sample_s, surrogates, radii = first, time.time() - start, [], []
    # reweight: sum of the updated agents' sequence log-ratios on B_1
    log_w = torch.zeros(len(first))

    def replay(episodes, keep, training: bool = True):
        """play from turn keep[e] on, with the stage's random numbers; timed, and counted if training compute."""
        nonlocal sample_s, turns, tokens, truncated
        t0 = time.time()
        played, new_turns, new_tokens, new_cut = rollout.play(
            team, task, episodes, cfg.temperature, cfg.top_p, (cfg.seed, stage, 0), keep, reuse_kv
        )
        sample_s += time.time() - t0
        if training:
            turns, tokens, truncated = turns + new_turns, tokens + new_tokens, truncated + new_cut
        return played

    # the agent updated just before
    previous = None
    for k, i in enumerate(update_order(cfg, len(team), stage)):
        # exact suffix resampling of the intermediate team pi_hat^{k-1}
        if k > 0 and measure:
            # --measure-gap: diagnostic only
            current = replay(current, [rollout.first_turn(e, previous) for e in current], training=fresh)
        # what agent i trains on
        batch = current if fresh else first
        if fresh and cfg.shared_prefix and any(rollout.first_turn(e, i) for e in current):
            # each group again from its sample 0's prefix
            batch = replay(*shared_prefixes(current, i))
        # the stale gap's other batch
        other = None if k == 0 or not measure else (first if fresh else current)
        weights = happo_weights(log_w, cfg.happo_max_weight) if reweight else None
        m = update_agent(team[i], i, batch, other, cfg, (cfg.seed, stage, k), weights)
        # fraction of episodes whose weight was clipped in this update
        if reweight:
            m["weight_clipfrac"] = global_mean(
                (log_w.abs() > math.log(cfg.happo_max_weight)).sum(), len(log_w)
            )
        log_w += m.pop("log_ratio").cpu()
        if measure and k == 0:
            # B_1 is the intermediate team's batch
            m["stale_gap"] = 0.0
        surrogates.append(m["surrogate"])
        radii.append(m["kl_rev"])
        gap = "-" if m["stale_gap"] is None else f"{m['stale_gap']:.4f}"
        reward = global_mean(sum(e.reward for e in batch), len(batch))
        log(
            {
                "stage": stage,
                "update": k + 1,
                "agent": i,
                "batch_reward": reward,
                **{f"agent{i}/{key}": v for key, v in m.items()},
            },
            f"stage {stage} update {k + 1} agent{i}: reward {reward:.3f} "
            f"kl {m['kl_rev']:.4f} steps {m['steps']} backtracks {m['backtracks']} L {m['surrogate']:+.4f} gap {gap}"
            + (
                f" held-out L {m['heldout_surrogate']:+.4f}{' rejected' * m['rejected']}"
                if cfg.holdout
                else ""
            ),
        )
        previous = i
    seconds, n_episodes = time.time() - start, int(parallel.all_sum(len(first)))
    turns, tokens, truncated = (int(parallel.all_sum(x)) for x in (turns, tokens, truncated))
    return {
        "stage": stage,
        # sampled, on the first batch
        "stage/reward": global_mean(sum(e.reward for e in first), len(first)),
        **{f"stage/sampled_{key}": v for key, v in evaluation.turn_accuracy(task, first, len(team)).items()},
        # a conservative proxy of the per-stage lower bound: sum_k L_k - lambda sum_k sqrt(2 D_k),
        # lambda = adv_max (Pinsker: TV <= sqrt(D / 2), times 2 max |A|)
        "stage/certificate": sum(surrogates) - cfg.adv_max * sum((2 * d) ** 0.5 for d in radii),
        # generated turns per episode
        "stage/turns": turns / n_episodes,
        "stage/tokens": tokens,
        # fraction of generated messages cut at max_new_tokens
        "rollout/truncated": truncated / turns,
        "stage/seconds": seconds,
        "rollout/tokens_per_second": tokens / max(sample_s, 1e-9),
        "perf/sample_seconds": sample_s,
        "perf/update_seconds": seconds - sample_s,
        "perf/peak_memory_mb": peak_memory_mb(next(team[0].model.parameters()).device),
    }


def turns_line(record: dict) -> str:
    """ ", turn accuracy 0.98 0.91 ..." from a record's per-agent held-out turn accuracies (if any)."""
    turn = [v for key, v in record.items() if key.startswith("stage/eval_turn_acc/")]
    return f", turn accuracy {' '.join(f'{v:.2f}' for v in turn)}" if turn else ""


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux: KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def evaluated_stages(cfg: Config) -> list[int]:
    """The stages after which the held-out set is evaluated (0: before training)."""
    return [s for s in range(cfg.stages + 1) if s % cfg.eval_every == 0 or s == cfg.stages]


def train_stages(team, task, heldout, cfg: Config, log, done=(), checkpoint=None) -> list[float]:
    """The stage loop, with a held-out evaluation before training and after every --eval-every
    stages (and the last). Returns eval_acc per evaluation (with --eval-every 1, index s is stage
    s). log(record, line) receives every update's and stage's metrics; checkpoint(stage), if
    given, is called after stage 0's evaluation and after every stage. done: the records of a
    resumed run, up to its checkpoint; the loop goes on from the stage after it."""
    accs = [r["stage/eval_acc"] for r in done if r.get("stage/eval_acc") is not None]
    evaluate = lambda: {
        f"stage/{key}": v for key, v in evaluation.heldout_metrics(team, task, heldout, cfg).items()
    }
    if not done:
        record = {"stage": 0, **evaluate()}
        accs = [record["stage/eval_acc"]]
        log(record, f"stage 0: held-out accuracy {accs[0]:.3f}{turns_line(record)}")
        checkpoint and checkpoint(0)
    first = done[-1]["stage"] + 1 if done else 1
    stages = tqdm(
        range(first, cfg.stages + 1),
        desc="stages",
        unit="stage",
        initial=first - 1,
        total=cfg.stages,
        disable=not parallel.main(),
    )
    for stage in stages:
        record, acc = run_stage(team, task, cfg, stage, log), ""
        if stage in evaluated_stages(cfg):
            record.update(evaluate())
            accs.append(record["stage/eval_acc"])
            record["stage/realized_gain"] = accs[-1] - accs[-2]
            acc = f"held-out accuracy {accs[-1]:.3f} (gain {accs[-1] - accs[-2]:+.3f}){turns_line(record)} "
        log(
            record,
            f"stage {stage}: {acc}certificate {record['stage/certificate']:+.4f} turns {record['stage/turns']:.0f} "
            f"{record['stage/seconds']:.1f}s",
        )
        checkpoint and checkpoint(stage)
    return accs
