"""Losses: bounded group-normalised advantages, the loss mask, the PPO surrogate, KL estimators
and reductions. Tensors in, tensors out: the log-probs come from the agent (team.Agent.token_logprobs)
and nothing here runs a model or talks to another process.

Which KL is which. Rollouts are sampled from pi_old (the agent before its update), and
r = pi_new / pi_old is the per-token ratio. The policy pi is the model's logits divided by the
sampling temperature (team.Agent.token_logprobs), so pi_old is exactly the distribution that
sampled, at any temperature > 0, and the estimators below are unbiased for it.
  - Trust-region measurement and penalty: the token-level *reverse* KL(pi_new || pi_old).
    `kl_rev` estimates it from behaviour samples as r log r - r + 1 (unbiased, since
    E_old[r log r] = KL(new || old) and E_old[r] = 1; and >= 0 for every token).
    `full` computes it exactly, sum_v pi_new(v) (log pi_new(v) - log pi_old(v)), from the whole
    next-token distributions (exact and cheap for small vocabularies, memory-heavy for 150k).
  - Logged only: k1 = -log r and k3 = (r - 1) - log r (Schulman, 2020), both estimators of the
    forward KL(pi_old || pi_new), the direction PPO/TRPO usually report.

Reductions (named, and chosen by `--reduction`): "token" averages over all of the agent's tokens
in the batch, so long messages weigh more (a length bias toward long messages); "sequence"
averages within each message first, then over messages, so every message weighs the same (a bias
toward short messages per token). The trust-region measurement D is in the radius's unit
(--radius): the token mean of the reverse KL (the paper's), or the message mean, each message's
summed KL averaged over messages, which bounds what one message may move whatever its length.

Under torch.distributed (parallel/__init__.py) each rank holds some of the batch's rows: the loss
divides this rank's sum by the denominator of every rank's rows together (`denominator`, summed by
the caller), so the gradients summed over ranks are those of the whole batch. The logged means are
`Mean`s, a sum and a count, which the caller sums over ranks before it divides (teamtr.global_means).
With one process both are the plain means.
"""

from typing import NamedTuple

import torch


class Mean(NamedTuple):
    """A mean over some tokens or messages, kept as its sum and count so that the sums of several
    processes' rows can be added before dividing."""

    total: torch.Tensor
    count: torch.Tensor

    def value(self) -> float:
        return (self.total / self.count.clamp(min=1)).item()


def group_advantages(rewards, group: int, a_max: float, eps: float = 1e-6):
    """A = (R - mean_group) / (std_group + eps), clipped to [-a_max, a_max].

    rewards: (E,) with the `group` samples of a question adjacent. std is the population std.
    Returns (advantages (E,), fraction of episodes whose advantage was clipped).
    """
    # (Q, G)
    r = rewards.view(-1, group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)).view(-1)
    return adv.clamp(-a_max, a_max), (adv.abs() > a_max).float().mean().item()


def agent_batch(episodes, agent: int, advantages, pad_id: int, device) -> dict:
    """Every message agent `agent` wrote, as right-padded teacher-forcing rows.

    One row per (episode, turn) of the agent. Shapes are (S, L-1): position p predicts token p+1.
    mask is 1 exactly on the tokens the agent wrote (its EOS included) and 0 on the prompt, on
    other agents' tokens and on padding; it is built from lengths, never from pad_token_id.
    """
    rows = [(e_idx, s) for e_idx, e in enumerate(episodes) for s in e.steps if s.agent == agent]
    L = max(len(s.context) + len(s.tokens) for _, s in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn, mask = torch.zeros_like(ids), torch.zeros((len(rows), L), dtype=torch.float)
    sampler_logp = torch.zeros((len(rows), L))
    for r, (_, s) in enumerate(rows):
        c, t = len(s.context), len(s.tokens)
        ids[r, : c + t] = torch.tensor(s.context + s.tokens)
        attn[r, : c + t] = 1
        mask[r, c : c + t] = 1
        sampler_logp[r, c : c + t] = torch.tensor(s.logprobs)
    # (S,): the episode of each row
    episode = torch.tensor([e_idx for e_idx, _ in rows])
    # (S,): the episode's A on each of its rows
    adv = advantages[episode].float()
    batch = dict(
        ids=ids, attn=attn, mask=mask[:, 1:], adv=adv, sampler_logp=sampler_logp[:, 1:], episode=episode
    )
    # where the task tells which tokens decide a message (rollout.Step.deciding): those, masked
    if all(s.deciding is not None for _, s in rows):
        decide = torch.zeros_like(mask)
        for r, (_, s) in enumerate(rows):
            decide[r, len(s.context) + s.deciding[0] : len(s.context) + s.deciding[1]] = 1
        batch["decide"] = decide[:, 1:]
    return {k: v.to(device) for k, v in batch.items()}


def denominator(mask, reduction: str = "token"):
    """What a mean over mask == 1 divides by: the agent's tokens ("token") or its rows (messages)
    that have any ("sequence", "message")."""
    return mask.sum() if reduction == "token" else (mask.sum(1) > 0).sum()


def masked_mean(x, mask, reduction: str = "token", denom=None):
    """Mean of x over mask == 1: over all tokens ("token"), per row then over rows ("sequence"),
    or each row's sum averaged over rows ("message": the per-message KL of --radius message).
    denom: the denominator of the whole batch when these rows are part of it (default: theirs)."""
    denom = denominator(mask, reduction) if denom is None else denom
    if reduction == "sequence":
        # a row without tokens adds 0
        total = ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
    else:
        total = (x * mask).sum()
    return total / denom.clamp(min=1)


def token_mean(x, mask) -> Mean:
    """The token mean of x over mask == 1."""
    return Mean((x * mask).sum(), mask.sum())


def message_mean(x, mask) -> Mean:
    """The mean over messages (rows with tokens) of x summed over each message's tokens: the
    per-message KL, and the measure of --radius message."""
    return Mean((x * mask).sum(), denominator(mask, "message"))


def radius_mean(x, mask, radius: str) -> Mean:
    """x in the radius's unit (--radius): its token mean, or its message mean."""
    return token_mean(x, mask) if radius == "token" else message_mean(x, mask)


def token_kl(logp, logp_old, kind: str, full=None, full_old=None):
    """Per-token reverse KL(pi_new || pi_old), (S, L-1)."""
    if kind == "full":
        return (full.exp() * (full - full_old)).sum(-1)
    log_r = logp - logp_old
    # reverse KL from behaviour samples: r log r - r + 1, written as r (log r - 1) + 1 so that a
    # large log r gives a large KL (inf where r is), never inf - inf
    return log_r.exp() * (log_r - 1) + 1


def clipped_objective(logp, logp_old, adv, clip_eps: float):
    """PPO clip per token, (S, L-1): min(r A, clip(r, 1-eps, 1+eps) A), every token of a message
    with its episode's advantage A."""
    ratio = (logp - logp_old).exp()
    # (S, 1)
    a = adv[:, None]
    return torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)


def ppo_loss(objective, kl_tok, mask, beta: float, average=("token", None), penalty=None):
    """-objective + beta * KL, each a masked mean. average: the objective's (reduction,
    denominator), the denominator that of the minibatch's rows on every process (None: these
    rows'); penalty: the KL's (reduction, denominator) where it is not the objective's (--radius
    message)."""
    reduction, denom = average
    kl_reduction, kl_denom = penalty or average
    return -masked_mean(objective, mask, reduction, denom) + beta * masked_mean(
        kl_tok, mask, kl_reduction, kl_denom
    )


def surrogate(logp, logp_old, adv, mask) -> Mean:
    """L_hat = token mean of (r - 1) A: the first-order estimate of the improvement."""
    return token_mean(((logp - logp_old).exp() - 1) * adv[:, None], mask)


def own_shift_surrogate(logp, logp_old, adv, mask, episode) -> Mean:
    """L_hat* = token mean of w (r - 1) A, where a message's w is the product of the ratios of the
    agent's earlier messages in its episode: the surrogate under the occupancy its own update gives
    its later turns (those contexts hold its earlier messages; --rounds 2 and more). Where the agent
    speaks once in an episode w = 1 exactly, and L_hat* is L_hat bit for bit."""
    # (S,): log pi_new / pi_old of each row's message
    per_row = ((logp - logp_old) * mask).sum(1)
    # rows of an episode are in turn order (agent_batch): row b is earlier than row a of its episode
    order = torch.arange(len(per_row), device=per_row.device)
    earlier = (episode[:, None] == episode[None, :]) & (order[None, :] < order[:, None])
    w = (earlier.to(per_row.dtype) @ per_row).exp()
    return surrogate(logp, logp_old, w * adv, mask)


def sequence_log_ratio(logp, logp_old, mask, episode, n_episodes: int):
    """Per episode, log pi_new / pi_old of all the tokens the agent wrote in it (0 where it wrote
    none): the log of HAPPO's sequence ratio. (E,)"""
    # (S,)
    per_row = ((logp - logp_old) * mask).sum(1)
    return torch.zeros(n_episodes, device=per_row.device).index_add(0, episode, per_row)


def out_of_region(kl_tok, mask, delta: float, radius: str) -> Mean:
    """The fraction of the radius's units whose own KL is above delta: tokens, or messages (one
    per row, each its tokens' sum; rows without tokens not counted)."""
    if radius == "token":
        return token_mean((kl_tok > delta).float(), mask)
    # (S, 1): each message's summed KL above delta, and whether the row holds a message
    above = ((kl_tok * mask).sum(1, keepdim=True) > delta).float()
    return token_mean(above, (mask.sum(1, keepdim=True) > 0).float())


def update_stats(logp, logp_old, kl_tok, batch: dict, clip_eps: float, radius: tuple) -> dict:
    """The per-update metrics (docs/design.md, "Metrics"), each a Mean: token means over the
    agent's tokens, the per-message KL, and where the task tells which tokens decide (batch's
    "decide"), the token KL on those and on the rest. batch: agent_batch's (its "adv" and "mask").
    radius: (delta, its unit); out_of_region is the fraction of the radius's units (tokens, or
    messages) whose own KL is above delta."""
    adv, mask, decide = batch["adv"], batch["mask"], batch.get("decide")
    log_r = logp - logp_old
    ratio = log_r.exp()
    mean = lambda x: token_mean(x, mask)
    stats = {
        "kl_rev": mean(kl_tok),
        # each message's summed KL, averaged over messages
        "kl_msg": message_mean(kl_tok, mask),
        # k1 = -log r
        "kl_k1": mean(-log_r),
        # k3 = (r - 1) - log r (Schulman, 2020)
        "kl_k3": mean((ratio - 1) - log_r),
        "out_of_region": out_of_region(kl_tok, mask, *radius),
        "clipfrac": mean(((ratio - 1).abs() > clip_eps).float()),
        "surrogate": surrogate(logp, logp_old, adv, mask),
    }
    if decide is not None:
        stats["kl_decide"] = token_mean(kl_tok, decide * mask)
        stats["kl_rest"] = token_mean(kl_tok, (1 - decide) * mask)
    return stats
