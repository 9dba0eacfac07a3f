"""Estimators, advantages, masks and reductions against hand-computed values.

Every expected number below is plain arithmetic on Python floats (math.log, math.exp), written in
the test, never the function under test called another way. Tensors are float64 where the code
allows it, so the comparisons can be tight.
"""

import math

import pytest
import torch

import losses
import rollout
import team as team_lib

F64 = dict(dtype=torch.float64)


def ppo_loss(logp, logp_old, adv, mask, kl, clip_eps, beta, reduction, denom=None, penalty=None):
    """losses.ppo_loss of the clipped objective of these log-probs."""
    objective = losses.clipped_objective(logp, logp_old, adv, clip_eps)
    return losses.ppo_loss(objective, kl, mask, beta, (reduction, denom), penalty)


def values(means: dict) -> dict:
    """{name: float} from losses' {name: Mean} (one process)."""
    return {name: m.value() for name, m in means.items()}


def t(values):
    return torch.tensor(values, **F64)


def single_token_loss(ratio: float, adv: float, clip_eps: float = 0.2) -> float:
    """ppo_loss with beta = 0 on one message of one token whose ratio pi_new / pi_old is `ratio`."""
    logp, logp_old = t([[math.log(ratio)]]), t([[0.0]])
    mask, kl = t([[1.0]]), t([[0.0]])
    return float(ppo_loss(logp, logp_old, t([adv]), mask, kl, clip_eps, 0.0, "token"))


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators_are_unbiased_for_their_kl():
    p_old = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_new = torch.tensor([0.4, 0.4, 0.1, 0.1])
    # KL(new || old) and KL(old || new)
    kl_rev = float((p_new * (p_new / p_old).log()).sum())
    kl_fwd = float((p_old * (p_old / p_new).log()).sum())
    # every token of the vocabulary as one sample, (1, V)
    logp_new, logp_old = p_new.log()[None], p_old.log()[None]
    # the expectation over samples from pi_old
    expect = lambda per_token: float((p_old * per_token[0]).sum())
    assert expect(losses.token_kl(logp_new, logp_old, "kl_rev")) == pytest.approx(kl_rev, rel=1e-5)
    log_r = logp_new - logp_old
    # k1 and k3
    assert expect(-log_r) == pytest.approx(kl_fwd, rel=1e-5)
    assert expect((log_r.exp() - 1) - log_r) == pytest.approx(kl_fwd, rel=1e-5)
    assert (losses.token_kl(logp_new, logp_old, "kl_rev") >= 0).all()
    full = losses.token_kl(None, None, "full", p_new.log()[None, None], p_old.log()[None, None])
    assert float(full) == pytest.approx(kl_rev, rel=1e-5)


def test_the_sampled_reverse_kl_is_r_log_r_minus_r_plus_one_per_token():
    ratios = [[0.5, 1.0, 2.0], [0.1, 1.25, 4.0]]
    logp_old = t([[-1.0, -2.0, -0.5], [-3.0, -0.25, -2.0]])
    logp = logp_old + t(ratios).log()
    got = losses.token_kl(logp, logp_old, "kl_rev")
    want = [[r * math.log(r) - r + 1 for r in row] for row in ratios]
    torch.testing.assert_close(got, t(want), atol=1e-12, rtol=0)
    # the three values of the first row, written out
    assert want[0] == pytest.approx([0.5 - 0.5 * math.log(2), 0.0, 2 * math.log(2) - 1])
    assert float(got[0, 1]) == 0.0


def test_the_sampled_reverse_kl_is_zero_at_ratio_one_and_never_negative():
    log_r = t([[math.log(r) for r in (1e-3, 0.2, 0.5, 0.9, 1.0, 1.1, 2.0, 10.0, 100.0)]])
    kl = losses.token_kl(log_r, torch.zeros_like(log_r), "kl_rev")
    assert (kl >= 0).all()
    assert float(kl[0, 4]) == 0.0
    # away from r = 1 it is strictly positive
    assert (kl[0, [0, 1, 2, 3, 5, 6, 7, 8]] > 0).all()
    # the same token under identical policies, for any log-probability
    same = t([[-0.1, -2.0, -7.5]])
    assert torch.equal(losses.token_kl(same, same, "kl_rev"), torch.zeros_like(same))


def test_the_sampled_reverse_kl_is_never_nan_and_large_where_log_r_is():
    # fp32, as the update computes it: e^{log r} log r - e^{log r} + 1 is inf - inf = nan at
    # log r = 100, and an update measured nan is reverted instead of backtracked
    log_r = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 80.0, 100.0]])
    kl = losses.token_kl(log_r, torch.zeros_like(log_r), "kl_rev")
    assert not kl.isnan().any() and (kl >= 0).all()
    # finite wherever r (log r - 1) is, and +inf (the radius is crossed) where r is not
    assert kl[0, :5].isfinite().all() and kl[0, 5] == float("inf")
    assert float(kl[0, 4]) == pytest.approx(math.exp(80) * 79 + 1, rel=1e-5)
    assert float(kl[0, 0]) == 1.0


def test_the_full_kl_sums_p_new_times_the_log_ratio_over_the_vocabulary():
    p_new = [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]
    p_old = [[0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    # (S=1, L-1=2, V=3): two positions of one message
    full, full_old = t([p_new]).log(), t([p_old]).log()
    got = losses.token_kl(None, None, "full", full, full_old)
    # first position: 0.5 log 2 + 0.25 log 1 + 0.25 log(1/2) = 0.25 log 2
    first = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert first == pytest.approx(0.25 * math.log(2))
    # second position: against the uniform distribution, sum_v p log(3 p)
    second = 0.1 * math.log(0.3) + 0.6 * math.log(1.8) + 0.3 * math.log(0.9)
    assert got.shape == (1, 2)
    torch.testing.assert_close(got, t([[first, second]]), atol=1e-12, rtol=0)
    # the direction matters: KL(old || new) at the second position, sum_v (1/3) log(1 / (3 p)), is 0.240
    forward = -(math.log(0.3) + math.log(1.8) + math.log(0.9)) / 3
    assert abs(float(got[0, 1]) - forward) > 0.03


def test_the_full_kl_is_zero_for_identical_distributions():
    full = t([[[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]]]).log()
    torch.testing.assert_close(losses.token_kl(None, None, "full", full, full.clone()), t([[0.0, 0.0]]))


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_normalise_and_clip():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv, clipped = losses.group_advantages(rewards, group=4, a_max=1.5)
    std = math.sqrt(0.25 * 0.75)
    expected = [min(0.75 / std, 1.5), -0.25 / std, -0.25 / std, -0.25 / std, 1.0, 1.0, -1.0, -1.0]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-4, rtol=0)
    assert clipped == pytest.approx(1 / 8)
    adv, _ = losses.group_advantages(torch.ones(4), group=4, a_max=3.0)
    # a group that all succeeded carries no signal
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_divide_by_the_population_std_plus_eps():
    # mean 1; deviations 2, 0, -1, -1; population variance (4 + 0 + 1 + 1) / 4 = 1.5
    adv, clipped = losses.group_advantages(t([3.0, 1.0, 0.0, 0.0]), group=4, a_max=10.0, eps=0.5)
    scale = math.sqrt(1.5) + 0.5
    torch.testing.assert_close(adv, t([2 / scale, 0.0, -1 / scale, -1 / scale]), atol=1e-12, rtol=0)
    assert clipped == 0.0
    # the default eps (1e-6) is tiny: 2 / sqrt(1.5) = 1.633 (the sample std, sqrt(2), would give 1.414)
    adv, _ = losses.group_advantages(t([3.0, 1.0, 0.0, 0.0]), group=4, a_max=10.0)
    torch.testing.assert_close(adv[0], t(2 / (math.sqrt(1.5) + 1e-6)), atol=1e-12, rtol=0)


def test_group_advantages_are_clipped_to_a_max_on_both_sides_and_report_the_clipped_fraction():
    # group 1 as above: A = 2 / sqrt(1.5) = 1.633 for the first, -1 / sqrt(1.5) = -0.816 for the last two.
    # group 2: mean 1.5; deviations -1.5, 0.5, 0.5, 0.5; variance (2.25 + 3 * 0.25) / 4 = 0.75,
    # so A = -1.5 / sqrt(0.75) = -1.732 for the first and 0.5 / sqrt(0.75) = 0.577 for the others.
    rewards = t([3.0, 1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    adv, clipped = losses.group_advantages(rewards, group=4, a_max=1.5, eps=0.0)
    s1, s2 = math.sqrt(1.5), math.sqrt(0.75)
    want = [1.5, 0.0, -1 / s1, -1 / s1, -1.5, 0.5 / s2, 0.5 / s2, 0.5 / s2]
    torch.testing.assert_close(adv, t(want), atol=1e-12, rtol=0)
    # one episode clipped from above and one from below, out of eight
    assert clipped == pytest.approx(2 / 8)
    # a looser bound clips nothing and leaves the values as they are
    adv, clipped = losses.group_advantages(rewards, group=4, a_max=2.0, eps=0.0)
    assert float(adv[0]) == pytest.approx(2 / s1) and float(adv[4]) == pytest.approx(-1.5 / s2)
    assert clipped == 0.0
    # an advantage exactly at the bound is left as it is, so it is not counted as clipped:
    # rewards 1, 0 have mean 0.5 and population std 0.5, so A = +-0.5 / 0.5 = +-1 exactly
    adv, clipped = losses.group_advantages(t([1.0, 0.0]), group=2, a_max=1.0, eps=0.0)
    assert adv.tolist() == [1.0, -1.0] and clipped == 0.0


# ----------------------------------------------------------------------------- the loss mask


def test_loss_mask_covers_exactly_the_updated_agents_tokens():
    steps = [
        rollout.Step(0, [5, 6, 7], [8, 9, 1], [-1.0] * 3, "a"),
        rollout.Step(1, [5, 6, 7, 8, 9], [10, 1], [-2.0] * 2, "b"),
        rollout.Step(0, [5, 6, 7, 8, 9, 10], [11, 12, 13, 1], [-3.0] * 4, "c"),
    ]
    eps = [rollout.Episode(None, 0, 0, [0, 1, 0], steps), rollout.Episode(None, 0, 1, [0, 1, 0], steps[:2])]
    data = losses.agent_batch(eps, 0, torch.tensor([2.0, -1.0]), pad_id=0, device="cpu")
    # agent 0 wrote twice in episode 0 and once in episode 1
    assert data["ids"].shape[0] == 3
    targets = data["ids"][:, 1:]
    written = [targets[r][data["mask"][r].bool()].tolist() for r in range(3)]
    assert written == [[8, 9, 1], [11, 12, 13, 1], [8, 9, 1]]
    assert data["adv"].tolist() == [2.0, 2.0, -1.0]
    assert data["mask"].sum() == 10 and data["sampler_logp"][data["mask"].bool()].sum() == -3 - 12 - 3


# ----------------------------------------------------------------------------- reductions


def test_reductions_and_ppo_loss_at_ratio_one():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(losses.masked_mean(x, mask, "token")) == pytest.approx(10 / 4)
    assert float(losses.masked_mean(x, mask, "sequence")) == pytest.approx((2 + 4) / 2)
    logp = torch.log(torch.full((2, 3), 0.5))
    adv = torch.tensor([1.0, -2.0])
    kl = losses.token_kl(logp, logp, "kl_rev")
    loss = ppo_loss(logp, logp, adv, mask, kl, 0.2, 1.0, "token")
    assert float(loss) == pytest.approx(-(3 * 1 - 2) / 4)
    assert losses.surrogate(logp, logp, adv, mask).value() == 0.0


# three messages: two tokens, none, three; the masked-out entries are wild so that reading them shows
X = [[1.0, 3.0, 100.0], [50.0, 50.0, 50.0], [2.0, 4.0, 6.0]]
MASK = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


def test_the_token_mean_divides_the_masked_sum_by_the_number_of_tokens():
    assert float(losses.denominator(t(MASK), "token")) == 5
    # (1 + 3 + 2 + 4 + 6) / 5
    assert float(losses.masked_mean(t(X), t(MASK), "token")) == pytest.approx(16 / 5, abs=1e-12)


def test_the_sequence_mean_averages_each_message_then_the_messages_that_have_tokens():
    # the message without tokens is not counted
    assert int(losses.denominator(t(MASK), "sequence")) == 2
    # message means (1 + 3) / 2 = 2 and (2 + 4 + 6) / 3 = 4; the empty message adds 0
    assert float(losses.masked_mean(t(X), t(MASK), "sequence")) == pytest.approx((2 + 4) / 2, abs=1e-12)


def test_a_batch_without_tokens_has_mean_zero():
    empty = torch.zeros(2, 3, **F64)
    for reduction in ("token", "sequence"):
        assert float(losses.denominator(empty, reduction)) == 0
        assert float(losses.masked_mean(t(X[:2]), empty, reduction)) == 0.0


@pytest.mark.parametrize("reduction, whole", [("token", 16 / 5), ("sequence", (2 + 4) / 2)])
def test_halves_divided_by_the_whole_batch_denominator_sum_to_the_whole_batch_mean(reduction, whole):
    x, mask = t(X), t(MASK)
    denom = losses.denominator(mask, reduction)
    first = losses.masked_mean(x[:1], mask[:1], reduction, denom)
    second = losses.masked_mean(x[1:], mask[1:], reduction, denom)
    # token: 4 / 5 + 12 / 5; sequence: 2 / 2 + (0 + 4) / 2
    halves = {"token": (4 / 5, 12 / 5), "sequence": (2 / 2, 4 / 2)}[reduction]
    assert (float(first), float(second)) == pytest.approx(halves, abs=1e-12)
    assert float(first + second) == pytest.approx(whole, abs=1e-12)
    # each half's own mean would not add up: token 2 + 4, sequence 2 + 4
    assert float(
        losses.masked_mean(x[:1], mask[:1], reduction) + losses.masked_mean(x[1:], mask[1:], reduction)
    ) == pytest.approx(6.0)


# ----------------------------------------------------------------------------- the PPO loss

# (ratio, advantage, the surrogate by hand with clip_eps = 0.2)
CLIP_CASES = {
    # min(1.1 * 2, 1.1 * 2)
    "inside the region, A > 0": (1.1, 2.0, 2.2),
    # min(0.9 * -2, 0.9 * -2)
    "inside the region, A < 0": (0.9, -2.0, -1.8),
    # min(1.5 * 2, 1.2 * 2): clipped
    "above 1 + eps, A > 0": (1.5, 2.0, 2.4),
    # min(1.5 * -2, 1.2 * -2) = -3: not clipped, the pessimistic side
    "above 1 + eps, A < 0": (1.5, -2.0, -3.0),
    # min(0.5 * -2, 0.8 * -2): clipped
    "below 1 - eps, A < 0": (0.5, -2.0, -1.6),
    # min(0.5 * 2, 0.8 * 2) = 1: not clipped, the pessimistic side
    "below 1 - eps, A > 0": (0.5, 2.0, 1.0),
}


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_the_clipped_surrogate_takes_the_pessimistic_side_above_and_below_the_clip(case):
    ratio, adv, surrogate = CLIP_CASES[case]
    assert single_token_loss(ratio, adv, clip_eps=0.2) == pytest.approx(-surrogate, abs=1e-12)


def test_the_clip_bounds_are_one_plus_and_minus_clip_eps():
    # just outside and just inside each bound, with the advantage's sign that clips there
    assert single_token_loss(1.31, 1.0, clip_eps=0.3) == pytest.approx(-1.3, abs=1e-12)
    assert single_token_loss(1.29, 1.0, clip_eps=0.3) == pytest.approx(-1.29, abs=1e-12)
    assert single_token_loss(0.69, -1.0, clip_eps=0.3) == pytest.approx(0.7, abs=1e-12)
    assert single_token_loss(0.71, -1.0, clip_eps=0.3) == pytest.approx(0.71, abs=1e-12)
    # a wider region leaves a ratio of 1.5 unclipped: min(1.5 * 2, 1.5 * 2)
    assert single_token_loss(1.5, 2.0, clip_eps=0.6) == pytest.approx(-3.0, abs=1e-12)


def test_the_ppo_loss_is_the_masked_token_mean_of_the_clipped_surrogates():
    cases = list(CLIP_CASES.values())
    # one message per case: its token, then a masked-out token with a wild ratio
    logp = t([[math.log(r), math.log(50.0)] for r, _, _ in cases])
    logp_old = torch.zeros_like(logp)
    adv = t([a for _, a, _ in cases])
    mask = t([[1.0, 0.0]] * len(cases))
    kl = torch.zeros_like(logp)
    # (2.2 - 1.8 + 2.4 - 3.0 - 1.6 + 1.0) / 6 = -0.8 / 6
    want = -sum(s for _, _, s in cases) / len(cases)
    assert want == pytest.approx(0.8 / 6)
    for reduction in ("token", "sequence"):
        loss = ppo_loss(logp, logp_old, adv, mask, kl, 0.2, 0.0, reduction)
        assert float(loss) == pytest.approx(want, abs=1e-12)


def test_the_clipped_side_passes_no_gradient_and_the_unclipped_side_passes_minus_r_a_over_n():
    cases = list(CLIP_CASES.values())
    logp = t([[math.log(r)] for r, _, _ in cases]).requires_grad_()
    adv = t([a for _, a, _ in cases])
    mask = torch.ones(len(cases), 1, **F64)
    kl = torch.zeros(len(cases), 1, **F64)
    ppo_loss(logp, torch.zeros_like(logp), adv, mask, kl, 0.2, 0.0, "token").backward()
    # d(-r A / n) / d log r = -r A / n where r A is the minimum, 0 where the clipped term is
    n = len(cases)
    want = [[-2.2 / n], [1.8 / n], [0.0], [3.0 / n], [0.0], [-1.0 / n]]
    torch.testing.assert_close(logp.grad, t(want), atol=1e-12, rtol=0)


# a 2 x 3 batch whose second message's first token and first message's last token are masked out
KL_TOK = [[0.1, 0.2, 9.0], [9.0, 0.4, 0.6]]
KL_MASK = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
# token mean (0.1 + 0.2 + 0.4 + 0.6) / 4; sequence mean ((0.1 + 0.2) / 2 + (0.4 + 0.6) / 2) / 2
KL_MEANS = {"token": 1.3 / 4, "sequence": (0.15 + 0.5) / 2}


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.05, 2.0])
def test_the_kl_penalty_adds_plus_beta_times_the_mean_kl(reduction, beta):
    logp = t([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
    logp_old = t([[-1.2, -0.4, -1.0], [-0.3, -1.0, -0.9]])
    adv, mask, kl = t([1.5, -0.5]), t(KL_MASK), t(KL_TOK)
    loss = lambda b: float(ppo_loss(logp, logp_old, adv, mask, kl, 0.2, b, reduction))
    assert loss(beta) - loss(0.0) == pytest.approx(beta * KL_MEANS[reduction], abs=1e-12)
    # the penalty makes the loss larger, never smaller
    assert loss(beta) > loss(0.0)


def test_the_kl_penalty_alone_at_ratio_one_is_beta_times_the_token_mean_kl():
    logp = t([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
    loss = ppo_loss(logp, logp.clone(), t([1.5, -0.5]), t(KL_MASK), t(KL_TOK), 0.2, 0.5, "token")
    # surrogate at r = 1: (1.5 + 1.5 - 0.5 - 0.5) / 4 = 0.5; penalty 0.5 * 1.3 / 4
    assert float(loss) == pytest.approx(-0.5 + 0.5 * 1.3 / 4, abs=1e-12)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_the_ppo_loss_of_row_halves_over_the_batch_denominator_sums_to_the_batch_loss(reduction):
    ratios = [[1.1, 1.5, 1.0], [0.5, 0.9, 3.0]]
    logp = t(ratios).log()
    logp_old = torch.zeros_like(logp)
    adv, mask, kl = t([2.0, -2.0]), t(KL_MASK), t(KL_TOK)
    denom = losses.denominator(mask, reduction)
    part = lambda rows: ppo_loss(
        logp[rows], logp_old[rows], adv[rows], mask[rows], kl[rows], 0.2, 0.5, reduction, denom
    )
    # surrogates: row 0 min(1.1 * 2, 1.1 * 2) = 2.2 and min(1.5 * 2, 1.2 * 2) = 2.4;
    # row 1 min(0.9 * -2, 0.9 * -2) = -1.8 and min(3 * -2, 1.2 * -2) = -6
    surrogate = {"token": (2.2 + 2.4 - 1.8 - 6.0) / 4, "sequence": ((2.2 + 2.4) / 2 + (-1.8 - 6.0) / 2) / 2}
    whole = -surrogate[reduction] + 0.5 * KL_MEANS[reduction]
    assert float(part(slice(0, 1)) + part(slice(1, 2))) == pytest.approx(whole, abs=1e-12)
    assert float(part(slice(None))) == pytest.approx(whole, abs=1e-12)


# ----------------------------------------------------------------------------- update statistics


def test_update_stats_are_token_means_of_the_per_token_estimators():
    # ratios on the agent's tokens 2, 0.5 (A = 2) and 1.1, 0.9 (A = -1); masked-out ones 7 and 5
    ratios = [[2.0, 0.5, 7.0], [5.0, 1.1, 0.9]]
    logp_old = t([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    logp = logp_old + t(ratios).log()
    mask = t([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    kl_tok = t([[0.3, 0.05, 9.0], [9.0, 0.15, 0.1]])
    stats = values(
        losses.update_stats(
            logp, logp_old, kl_tok, {"adv": t([2.0, -1.0]), "mask": mask}, 0.2, (0.2, "token")
        )
    )
    logs = [math.log(2.0), math.log(0.5), math.log(1.1), math.log(0.9)]
    want = {
        # (0.3 + 0.05 + 0.15 + 0.1) / 4
        "kl_rev": 0.6 / 4,
        # per message: (0.3 + 0.05 + 0.15 + 0.1) / 2
        "kl_msg": 0.6 / 2,
        "kl_k1": -sum(logs) / 4,
        # sum of (r - 1) is 1 - 0.5 + 0.1 - 0.1 = 0.5
        "kl_k3": (0.5 - sum(logs)) / 4,
        # only 0.3 exceeds delta = 0.2
        "out_of_region": 1 / 4,
        # |r - 1| > 0.2 for 2 and 0.5, not for 1.1 and 0.9
        "clipfrac": 2 / 4,
        # ((2 - 1) * 2 + (0.5 - 1) * 2 + (1.1 - 1) * -1 + (0.9 - 1) * -1) / 4
        "surrogate": (2.0 - 1.0 - 0.1 + 0.1) / 4,
    }
    assert set(stats) == set(want)
    for key, value in want.items():
        assert stats[key] == pytest.approx(value, abs=1e-12), key


def test_the_surrogate_is_the_token_mean_of_r_minus_one_times_a():
    ratios = [[1.5, 0.8, 4.0], [1.0, 1.2, 0.6]]
    logp_old = t([[-0.7, -1.1, -2.0], [-0.2, -3.0, -1.0]])
    logp = logp_old + t(ratios).log()
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    got = losses.surrogate(logp, logp_old, t([3.0, -2.0]), mask).value()
    # (0.5 * 3 - 0.2 * 3 + 0 * -2 + 0.2 * -2 - 0.4 * -2) / 5 = (1.5 - 0.6 - 0.4 + 0.8) / 5
    assert got == pytest.approx(1.3 / 5, abs=1e-12)


def test_the_own_shift_surrogate_weights_later_messages_by_the_ratios_of_the_earlier_ones():
    # episode 0 has rows 0 and 2 (two turns of the agent), episode 1 has row 1
    ratios = [[2.0, 0.5], [1.5, 1.0], [3.0, 0.8]]
    logp_old = t([[-0.7, -1.1], [-0.2, -3.0], [-1.0, -0.4]])
    logp = logp_old + t(ratios).log()
    mask = t([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    adv = t([1.0, -2.0, 0.5])
    got = losses.own_shift_surrogate(logp, logp_old, adv, mask, torch.tensor([0, 1, 0])).value()
    # row 2's terms times row 0's sequence ratio, 2 * 0.5 = 1
    assert got == pytest.approx((1 * 1 - 0.5 * 1 + 0.5 * -2 + 2.0 * 0.5 - 0.2 * 0.5) / 5, abs=1e-12)
    # row 0's ratios 2 and 2: row 2's weight is 4
    logp[0, 1] = logp_old[0, 1] + math.log(2.0)
    got = losses.own_shift_surrogate(logp, logp_old, adv, mask, torch.tensor([0, 1, 0])).value()
    # row 0: (1 + 1) * 1; row 1: 0.5 * -2; row 2: 4 * (2 * 0.5 - 0.2 * 0.5)
    assert got == pytest.approx((2.0 - 1.0 + 4 * (1.0 - 0.1)) / 5, abs=1e-12)


def test_the_own_shift_surrogate_is_the_surrogate_bit_for_bit_when_the_agent_speaks_once():
    gen = torch.Generator().manual_seed(0)
    logp_old = -torch.rand(4, 5, generator=gen)
    logp = logp_old + 0.3 * torch.randn(4, 5, generator=gen)
    mask, adv = (torch.rand(4, 5, generator=gen) > 0.3).float(), torch.randn(4, generator=gen)
    own = losses.own_shift_surrogate(logp, logp_old, adv, mask, torch.arange(4))
    assert own.value() == losses.surrogate(logp, logp_old, adv, mask).value()


# ----------------------------------------------------------------------------- sequence ratios


def test_sequence_log_ratio_sums_each_episodes_tokens():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -1.0, 0.0]])
    old = torch.tensor([[-1.5, -2.5, -9.0], [-1.0, -9.0, 0.0], [-3.0, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # episode 0 has two rows (two turns), episode 1 none
    episode = torch.tensor([0, 0, 2])
    out = losses.sequence_log_ratio(logp, old, mask, episode, 3)
    torch.testing.assert_close(out, torch.tensor([0.5 + 0.5 + 0.5, 0.0, 2.0]))


def test_the_sequence_log_ratio_is_the_log_of_the_product_of_the_episodes_token_ratios():
    # episode 0: ratios 2 and 3 in row 0, 0.25 in row 2; episode 1: none; episode 2: 1.5, 0.5 in row 1;
    # episode 3: a row whose tokens are all masked out
    ratios = [[2.0, 3.0, 10.0], [1.5, 0.5, 10.0], [0.25, 10.0, 10.0], [10.0, 10.0, 10.0]]
    logp_old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3], [-2.0, -1.0, -4.0], [-1.0, -1.0, -1.0]])
    logp = logp_old + torch.tensor(ratios).log()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = losses.sequence_log_ratio(logp, logp_old, mask, torch.tensor([0, 2, 0, 3]), 4)
    want = [math.log(2.0 * 3.0 * 0.25), 0.0, math.log(1.5 * 0.5), 0.0]
    torch.testing.assert_close(out, torch.tensor(want), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- token log-probs


def test_token_logprobs_on_the_agents_tokens_equal_the_full_logits_and_their_gradients(tmp_path):
    from chat_models import save_chat_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_chat_model(tmp_path / "llama"))
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    # a right-padded row
    attn[2, 9:] = 0
    mask = torch.zeros(3, 11)
    mask[0, 4:9], mask[1, 2:11], mask[2, 5:8] = 1, 1, 1
    batch = dict(ids=ids, attn=attn, mask=mask)
    logp, _ = team_lib.Agent("a", model, None, None).token_logprobs(batch)
    logp.sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float().log_softmax(-1)
    reference = reference.gather(-1, ids[:, 1:, None])[..., 0] * mask
    reference.sum().backward()
    torch.testing.assert_close(logp, reference, atol=1e-6, rtol=0)
    assert (logp[mask == 0] == 0).all()
    for got, want in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_in_message_units_the_stats_sum_each_message_and_split_the_deciding_tokens():
    logp_old = t([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    mask = t([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    kl_tok = t([[0.3, 0.05, 9.0], [9.0, 0.15, 0.1]])
    # the first message's first token and the second message's last decide
    decide = t([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    rows = {"adv": t([2.0, -1.0]), "mask": mask, "decide": decide}
    stats = values(losses.update_stats(logp_old, logp_old, kl_tok, rows, 0.2, (0.3, "message")))
    # messages 0.35 and 0.25: one of the two is above delta = 0.3
    assert stats["kl_msg"] == pytest.approx(0.3, abs=1e-7) and stats["out_of_region"] == 0.5
    assert stats["kl_decide"] == pytest.approx(0.4 / 2, abs=1e-7)
    assert stats["kl_rest"] == pytest.approx(0.2 / 2, abs=1e-7)
    assert stats["kl_rev"] == pytest.approx(0.6 / 4, abs=1e-7)


def test_the_message_mean_sums_each_message_then_averages_the_messages_that_have_tokens():
    mask = t([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    x = t([[0.1, 0.2, 9.0], [9.0, 0.4, 0.6], [5.0, 5.0, 5.0]])
    assert losses.message_mean(x, mask).value() == pytest.approx((0.3 + 1.0) / 2, abs=1e-7)
    assert float(losses.masked_mean(x, mask, "message")) == pytest.approx(0.65, abs=1e-7)
    assert losses.radius_mean(x, mask, "token").value() == pytest.approx(1.3 / 4, abs=1e-7)


def test_with_a_message_radius_the_penalty_is_beta_times_the_mean_message_kl():
    logp = t([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
    adv, mask, kl = t([1.5, -0.5]), t(KL_MASK), t(KL_TOK)
    loss = lambda b, penalty: float(ppo_loss(logp, logp, adv, mask, kl, 0.2, b, "token", None, penalty))
    per_message = ("message", losses.denominator(mask, "message"))
    # messages 0.1 + 0.2 and 0.4 + 0.6
    assert loss(0.5, per_message) - loss(0.0, per_message) == pytest.approx(0.5 * 1.3 / 2, abs=1e-7)
    assert loss(0.5, None) - loss(0.0, None) == pytest.approx(0.5 * 1.3 / 4, abs=1e-7)
