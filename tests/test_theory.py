"""The exact testbed: exactness, the HAPPO identity, and stale error growing faster in n."""

import json

import numpy as np
import pytest

from tools import theory


def monte_carlo_J(bed, pi, episodes, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(bed.Q, size=episodes)
    msg, rewards = np.zeros(episodes, dtype=int), np.zeros(episodes)
    for t in range(bed.turns):
        # (episodes, M)
        probs = pi[bed.agent(t)][q, msg]
        read, msg = msg, (probs.cumsum(-1) > rng.random((episodes, 1))).argmax(-1)
        # each turn's convention reward
        rewards += bed.turn_reward[q, read, msg]
    rewards += bed.final_reward[q, msg]
    return rewards.mean(), rewards.std() / np.sqrt(episodes)


@pytest.mark.parametrize("rounds, coupling", [(1, 0.0), (2, 0.0), (1, 0.6), (2, 0.6)])
def test_exact_J_agrees_with_monte_carlo(rounds, coupling):
    bed = theory.Testbed(4, rounds, seed=3, coupling=coupling)
    mean, stderr = monte_carlo_J(bed, bed.pi, 40_000)
    assert abs(mean - bed.J(bed.pi)) < 4 * stderr


@pytest.mark.parametrize("coupling", [0.0, 0.7])
def test_intermediate_surrogate_is_the_true_improvement_with_one_round(coupling):
    bed = theory.Testbed(5, 1, init="relay", seed=1, coupling=coupling)
    current = bed.pi.copy()
    for a in range(bed.n):
        new_policy = bed.kl_step(current, a, delta=0.02)
        updated = current.copy()
        updated[a] = new_policy
        assert bed.surrogate(current, a, new_policy) == pytest.approx(
            bed.J(updated) - bed.J(current), abs=1e-12
        )
        current = updated


def test_with_coupling_a_turns_best_message_depends_on_the_message_it_read():
    for coupling, depends in ((0.0, False), (1.0, True)):
        bed = theory.Testbed(3, 1, seed=5, coupling=coupling)
        # (Q, M): agent 1's best message in each context
        best = bed.q_values(bed.pi)[1].argmax(-1)
        assert (best != best[:, :1]).any() == depends


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_a_step_that_generalises_moves_every_context_alike(share):
    bed = theory.Testbed(3, 1, seed=2, coupling=0.5)
    new_policy = bed.kl_step(bed.pi, 1, delta=0.01, share=share)
    # log pi' - log pi per context, up to its normaliser
    move = np.log(new_policy / bed.pi[1])
    move -= move[..., :1]
    same = np.allclose(move, move[:1, :1], atol=1e-9)
    assert same == (share == 1.0)
    assert bed.surrogate(bed.pi, 1, new_policy) > 0


def test_one_agent_has_no_stale_occupancy_and_the_map_names_every_cell(monkeypatch):
    one = theory.regime(1, 0.02, 0.5, 0.9, stages=3, seeds=2)
    assert one["err"] < 1e-9 and one["flip"] == 0 and one["lead"] == one["end"] == 0
    two = theory.regime(2, 0.08, 0.0, 0.0, stages=3, seeds=1)
    assert two["err"] > 1e-3 and two["lead"] >= two["end"]
    monkeypatch.setattr(theory, "MAP_NS", [1, 2])
    monkeypatch.setattr(theory, "MAP_DELTAS", [0.02])
    table = theory.regime_map(stages=1, seeds=1)
    rows = [line for line in table.splitlines() if line.startswith("| 0.02 |")]
    assert len(rows) == len(theory.MAP_COUPLINGS) * len(theory.MAP_BLOCKS)
    assert all(row.count("err ") == 2 for row in rows)


def test_sampled_advantages_approach_the_exact_ones():
    bed = theory.Testbed(3, 1, init="relay", seed=1, coupling=0.5)
    d, Qv = bed.occupancy(bed.pi), bed.q_values(bed.pi)
    exact = Qv[2] - (bed.pi[2] * Qv[2]).sum(-1, keepdims=True)
    adv, weight = bed.sampled(bed.pi, 2, 400_000, np.random.default_rng(0))
    np.testing.assert_allclose(weight, d[2], atol=3e-3)
    # where the context and the message are both common enough to be estimated
    common = (d[2][..., None] * bed.pi[2]) > 0.02
    np.testing.assert_allclose(adv[common], exact[common], atol=0.02)


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


def test_measured_runs_are_placed_at_their_team_size_and_per_message_kl(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"agents": 2}))
    records = [
        {"stage": 0},
        {"agent": 0, "agent0/kl_msg": 0.01},
        {"agent": 1, "agent1/kl_msg": 0.03},
        # an update without signal took no step: it does not place the run
        {"agent": 1, "agent1/kl_msg": 0.0, "agent1/no_signal": 1},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert theory.measured_radii([str(run), "4:0.05"]) == [(str(run), 2, 0.02), ("4:0.05", 4, 0.05)]
    table = theory.place([str(run)], stages=2, seeds=1)
    assert (
        table.splitlines()[-1]
        == f"| {run} | 2 | 0.0200 | " + theory.map_cell(theory.regime(2, 0.02, 0.0, 0.0, 2, 1)) + " |"
    )
    # a compare directory: each run that logged it
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    runs = [
        {"mode": "stale", "n": 8, "seed": 0, "kl_msg": 0.04},
        {"mode": "none", "n": 8, "seed": 0, "kl_msg": None},
    ]
    (cmp / "results.json").write_text(json.dumps(runs))
    assert theory.measured_radii([str(cmp)]) == [(f"{cmp} stale n8 s0", 8, 0.04)]
    with pytest.raises(SystemExit) as stop:
        theory.main(["--place", str(tmp_path)])
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
