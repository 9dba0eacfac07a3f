"""The exact testbed: exactness, the HAPPO identity, and stale error growing faster in n."""

import numpy as np
import pytest

import theory


def monte_carlo_J(bed, pi, episodes, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(bed.Q, size=episodes)
    msg = np.zeros(episodes, dtype=int)
    for t in range(bed.turns):
        # (episodes, M)
        probs = pi[bed.agent(t)][q, msg]
        msg = (probs.cumsum(-1) > rng.random((episodes, 1))).argmax(-1)
    rewards = bed.reward[q, msg]
    return rewards.mean(), rewards.std() / np.sqrt(episodes)


@pytest.mark.parametrize("rounds", [1, 2])
def test_exact_J_agrees_with_monte_carlo(rounds):
    bed = theory.Testbed(4, rounds, seed=3)
    mean, stderr = monte_carlo_J(bed, bed.pi, 40_000)
    assert abs(mean - bed.J(bed.pi)) < 4 * stderr


def test_intermediate_surrogate_is_the_true_improvement_with_one_round():
    bed = theory.Testbed(5, 1, init="relay", seed=1)
    current = bed.pi.copy()
    for a in range(bed.n):
        new_policy = bed.kl_step(current, a, delta=0.02)
        updated = current.copy()
        updated[a] = new_policy
        assert bed.surrogate(current, a, new_policy) == pytest.approx(
            bed.J(updated) - bed.J(current), abs=1e-12
        )
        current = updated


def test_kl_step_has_the_requested_size_and_improves():
    bed = theory.Testbed(3, 1, seed=2)
    new_policy = bed.kl_step(bed.pi, 1, delta=0.01)
    d = bed.occupancy(bed.pi)[1]
    kl = (d * (new_policy * np.log(new_policy / bed.pi[1])).sum(-1)).sum()
    assert kl == pytest.approx(0.01, rel=1e-6)
    assert bed.surrogate(bed.pi, 1, new_policy) > 0


def test_happo_reweighted_stale_surrogate_equals_the_intermediate_one():
    bed = theory.Testbed(3, 1, Q=2, M=3, seed=4)
    start, current = bed.pi.copy(), bed.pi.copy()
    for a in range(bed.n):
        new_policy = bed.kl_step(current, a, delta=0.05)
        reweighted = bed.happo_surrogate(start, current, a, new_policy)
        assert reweighted == pytest.approx(bed.surrogate(current, a, new_policy), abs=1e-12)
        # without the weights the stale surrogate is off
        if a > 0:
            assert abs(bed.surrogate(start, a, new_policy) - bed.surrogate(current, a, new_policy)) > 1e-6
        current[a] = new_policy


def test_stale_error_grows_faster_in_n_than_intermediate():
    for rounds in (1, 2):
        errors, slopes = theory.exponents([2, 4, 8], rounds, "relay", delta=0.01, seeds=2)
        assert errors["stale"][-1] > errors["stale"][0]
        if rounds == 1:
            assert max(errors["intermediate"]) < 1e-12 and slopes["intermediate"] is None
        else:
            assert slopes["stale"] > slopes["intermediate"]


@pytest.mark.parametrize("args", [["--seeds", "0"], ["--delta", "-1"], ["--stages", "-1"], ["--bogus"]])
def test_bad_flags_give_one_line_exit_2(args, capsys):
    with pytest.raises(SystemExit) as stop:
        theory.main(args)
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
