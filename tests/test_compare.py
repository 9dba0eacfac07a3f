"""tools/compare.py: modes side by side from one warm-up; the table, the results, the plots."""

import json
import os

import matplotlib.pyplot as plt
import pytest
from test_train_cli import TINY, run

from tools import compare


def test_compare_trains_every_mode_from_the_same_start_and_writes_table_and_plots(tmp_path, monkeypatch):
    out = run(
        *"train.py --mode compare --agents 2,3 --seeds 2 --modes teamtr,stale,none --name cmp".split(),
        *TINY,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "cmp"
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted((r["n"], r["seed"], r["mode"]) for r in results) == sorted(
        (n, s, m) for n in (2, 3) for s in (0, 1) for m in ("teamtr", "stale", "none")
    )
    for n in (2, 3):
        for seed in (0, 1):
            runs = {r["mode"]: r for r in results if (r["n"], r["seed"]) == (n, seed)}
            # one starting team per n and seed
            assert len({r["accs"][0] for r in runs.values()}) == 1
            assert runs["none"]["tokens"] == [0] and runs["none"]["stale_gap"] is None
            # resampling costs tokens once an agent before the last has moved; an update without
            # signal moves none
            log = [
                json.loads(line) for line in (run_dir / f"teamtr-n{n}-s{seed}.jsonl").read_text().splitlines()
            ]
            moved = any(r.get("update", n) < n and r[f"agent{r['agent']}/no_signal"] == 0 for r in log[1:])
            paid = runs["teamtr"]["tokens"][-1] - runs["stale"]["tokens"][-1]
            assert paid > 0 if moved else paid == 0
            # measured with diagnostic batches; what stale errs by is what it pays (one round), and
            # teamtr pays nothing
            assert runs["stale"]["stale_gap"] is not None
            assert runs["stale"]["penalty"] == runs["stale"]["stale_gap"] and runs["teamtr"]["penalty"] == 0
            first = [
                json.loads((run_dir / f"{m}-n{n}-s{seed}.jsonl").read_text().splitlines()[1])
                for m in ("teamtr", "stale")
            ]
            # the first update of a stage sees the same batch in both modes
            assert first[0] == first[1]
    table = (run_dir / "compare.md").read_text()
    assert table.strip() in out.stdout
    # three modes, and teamtr against stale
    assert sum(line.startswith("| 3 | ") for line in table.splitlines()) == 4
    assert "penalty / stage" in table and compare.PENALTY_NOTE in table
    names = ("accuracy_n2", "accuracy_n3", "tokens_n2", "tokens_n3", "stale_gap", "penalty")
    for name in names:
        # a PNG that matplotlib reads back, not blank
        image = plt.imread(run_dir / f"{name}.png")
        assert image.shape[0] > 100 and image[..., :3].min() < 0.5
    drawn = {}
    monkeypatch.setattr(
        compare,
        "line_plot",
        lambda path, title, x, y, series, log=False: drawn.update({os.path.basename(path): series}),
    )
    compare.write_outputs(results, str(tmp_path))
    assert {name: len(series) for name, series in drawn.items()} == {
        f"{name}.png": {"stale_gap": 2, "penalty": 1, "difference": 1}.get(name, 3)
        for name in (*names, "difference")
    }
    # one point per team size; teamtr's penalty, 0, is not drawn on a log scale
    assert drawn["stale_gap.png"]["teamtr"][0] == [2, 3] and list(drawn["penalty.png"]) == ["stale"]


def test_summary_sums_the_gap_and_penalty_per_stage_and_reads_accuracy_at_a_token_budget():
    def update(stage, k, agent, gap, penalty, out):
        return {"stage": stage, "update": k, "agent": agent} | {
            f"agent{agent}/{key}": v
            for key, v in (("stale_gap", gap), ("penalty", penalty), ("out_of_region", out))
        }

    records = [
        update(1, 1, 0, 0.0, 0.0, 0.1),
        update(1, 2, 1, 0.3, 0.5, 0.3),
        {"stage": 1, "stage/tokens": 100},
        update(2, 1, 1, 0.0, 0.1, 0.0),
        update(2, 2, 0, 0.1, 0.0, 0.2),
        {"stage": 2, "stage/tokens": 50},
    ]
    result = compare.summarize(records, [0.2, 0.5, 0.7])
    assert result["tokens"] == [0, 100, 150]
    # stages sum to 0.3 and 0.1; penalties to 0.5 and 0.1
    assert abs(result["stale_gap"] - 0.2) < 1e-12 and abs(result["penalty"] - 0.3) < 1e-12
    assert abs(result["out_of_region"] - 0.15) < 1e-12
    # not logged by these updates
    assert result["kl_msg"] is None and result["kl_decide"] is None
    assert [compare.at_budget(result, b) for b in (0, 99, 100, 149, 150, 10**6)] == [
        0.2,
        0.2,
        0.5,
        0.5,
        0.7,
        0.7,
    ]
    assert compare.spread([0.5, 0.7], ".3f") == "0.600 ± 0.141" and compare.spread([None], ".3f") == "-"


def test_the_summary_averages_the_per_message_and_deciding_token_kl_over_updates_that_stepped():
    records = [
        {
            "stage": 1,
            "update": 1,
            "agent": 0,
            "agent0/kl_msg": 0.02,
            "agent0/kl_decide": 0.01,
            "agent0/kl_rest": 0.001,
        },
        {
            "stage": 1,
            "update": 2,
            "agent": 1,
            "agent1/kl_msg": 0.04,
            "agent1/kl_decide": 0.03,
            "agent1/kl_rest": 0.003,
        },
        # an update without signal took no step: it moved no message
        {"stage": 1, "update": 3, "agent": 1, "agent1/kl_msg": 0.0, "agent1/no_signal": 1},
        {"stage": 1, "stage/tokens": 10},
    ]
    result = compare.summarize(records, [0.2, 0.5])
    assert result["kl_msg"] == pytest.approx(0.03) and result["kl_decide"] == pytest.approx(0.02)
    assert result["kl_rest"] == pytest.approx(0.002)


def test_the_table_gives_best_accuracy_stages_to_ten_points_and_differences_to_stale_by_seed():
    def result(mode, seed, accs, tokens):
        return dict(mode=mode, n=4, seed=seed, accs=accs, tokens=tokens, penalty=None, stale_gap=None)

    results = [
        result("stale", 0, [0.5, 0.55, 0.62, 0.60], [0, 10, 20, 30]),
        result("teamtr", 0, [0.5, 0.65, 0.70, 0.66], [0, 20, 40, 60]),
        result("stale", 1, [0.4, 0.45, 0.46, 0.47], [0, 10, 20, 30]),
        result("teamtr", 1, [0.4, 0.52, 0.41, 0.50], [0, 20, 40, 60]),
    ]
    assert [compare.to_gain(r["accs"], 0.10) for r in results] == [2, 1, None, 1]
    diffs = compare.differences(results, {(4, 0): 30, (4, 1): 30})
    # final, at stale's 30 tokens (teamtr's stage 1), best; per seed
    want = [[6.0, 5.0, 8.0], [3.0, 5.0, 5.0]]
    assert [[round(v, 9) for v in seed] for seed in diffs[(4, "teamtr")]] == want
    table = compare.against_stale(diffs)
    assert "| 4 | teamtr | +4.5 ± 2.1 | +5.0 ± 0.0 | +6.5 ± 2.1 |" in table
