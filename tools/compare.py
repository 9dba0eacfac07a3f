"""Side by side: several modes trained from the same warm-up team, with the same seeds.

    python train.py --mode compare                          # n = 3, all seven modes, 3 seeds
    python train.py --mode compare --agents 2,4,6,8 --modes teamtr,stale,naive --seeds 1

For every team size n and seed the starting model is built (and warmed up) once; every mode then
trains its own copy of it on the same training questions, with the same sampling seeds, and is
evaluated on the same held-out questions. Modes that train on the stale batch (stale, naive,
happo) also sample diagnostic fresh batches (--measure-gap), so the stale gap is measured in
every mode; those batches are neither trained on nor counted as generated tokens.

The table has, per n and mode (mean and standard deviation over seeds): held-out accuracy after
the last stage and its gain over the starting team; the best accuracy of any stage; the first
stage 10 points above the start (of the seeds that got there); accuracy at equal generated
tokens (at the last stage whose cumulative training tokens fit the cheapest mode's total); the
summed penalty per stage (the surrogate error of the batch the mode trained on: 0 for teamtr
with one round) and the summed stale gap (what training on the stage's first batch errs by,
measured in every mode); the out-of-region fraction (of tokens, or messages with --radius
message); the KL each message moved (its tokens' summed reverse KL, averaged over messages and
updates) and, where the task tells which tokens decide a message (the relay), the token KL on
those and on the rest; generated tokens; and seconds (stages and held-out evaluations; the
shared warm-up is reported once per n and seed). With `stale` among the modes a
second table gives every other mode's accuracy minus stale's, paired by seed (final, at equal
tokens, best), and difference.png draws the final difference against n.

runs/<name>/ gets <mode>-n<n>-s<seed>.jsonl (each run's metrics, as in train.py) and
<mode>-n<n>-s<seed>.transcripts.jsonl (its evaluations' transcripts; with --tracker, one tracker
run each, TensorBoard's in tensorboard/<mode>-n<n>-s<seed>/), results.json (one record per run),
compare.md (the table) and PNG plots (matplotlib): accuracy_n<n>.png (held-out accuracy per
stage), tokens_n<n>.png (accuracy against generated tokens: the equal-compute view) and
stale_gap.png and penalty.png (summed per stage against team size, log-log).
No checkpoints are saved; train one mode with train.py for those. results.json is rewritten after
every run, so `python train.py --resume RUN_DIR` skips the runs that finished and trains the rest.
"""

import dataclasses
import itertools
import json
import os
import statistics
import time

import matplotlib
from tqdm import tqdm

import config
import parallel
import tasks
import warmup
from plumbing import loop, runs, tracking
from tools import theory

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

# one per mode
COLORS = dict(
    zip(config.MODES, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"])
)


def run(
    cfg: config.Config, sizes: list[int], device, dtype, run_dir: str, resume: bool = False
) -> list[dict]:
    """Train every mode in cfg.modes for every team size and seed; write the table and plots.
    resume: keep the runs recorded in run_dir/results.json and train only the others."""
    start, results = time.time(), finished(run_dir) if resume else []
    done = {(r["n"], r["seed"], r["mode"]) for r in results}
    for n in sizes:
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            modes = [m for m in cfg.modes.split(",") if (n, seed, m) not in done]
            if not modes:
                continue
            base = dataclasses.replace(cfg, agents=n, seed=seed)
            t0 = time.time()
            model = warmup.starting_model(base, device, dtype)
            warmup_seconds = time.time() - t0
            # the same questions for `single`
            heldout = tasks.make(base).heldout(cfg.eval_size)
            for mode in modes:
                mode_cfg = config.resolve(dataclasses.replace(base, mode=mode, measure_gap=True))
                result = train_mode(mode_cfg, model, heldout, device, dtype, run_dir)
                results.append({**result, "warmup_seconds": warmup_seconds})
                # under torchrun rank 0 writes and prints
                if parallel.main():
                    # what a resume keeps
                    runs.write_atomic(os.path.join(run_dir, "results.json"), json.dumps(results))
                    accs, tokens = result["accs"], result["tokens"][-1]
                    held = f"held-out {accs[0]:.3f} -> {accs[-1]:.3f}"
                    tqdm.write(
                        f"n={n} seed {seed} {mode}: {held}, {tokens:,} tokens, {result['seconds']:.0f} s"
                    )
    if parallel.main():
        print(write_outputs(results, run_dir))
        print(f"{len(results)} runs in {time.time() - start:.0f} s; wrote {run_dir}")
    return results


def finished(run_dir: str) -> list[dict]:
    """The runs a compare directory has finished (none if it has no results.json yet)."""
    path = os.path.join(run_dir, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise runs.RunError(f"--resume {run_dir}: {path} cannot be read ({e})") from None


def train_mode(cfg: config.Config, model, heldout, device, dtype, run_dir: str) -> dict:
    """One mode from a copy of the starting model; its metrics go to <mode>-n<n>-s<seed>.jsonl (and
    its tracker run, closed at its end)."""
    t0 = time.time()
    team = warmup.build_team(cfg, model, device, dtype)
    name = f"{cfg.mode}-n{cfg.agents}-s{cfg.seed}"
    log = runs.Log(
        os.path.join(run_dir, f"{name}.jsonl"),
        tracker=tracking.start(cfg, run_dir, name),
        transcripts=os.path.join(run_dir, f"{name}.transcripts.jsonl"),
    )
    try:
        accs = loop.train_stages(team, tasks.make(cfg), heldout, cfg, log)
    finally:
        log.close()
    return {
        "mode": cfg.mode,
        "n": cfg.agents,
        "seed": cfg.seed,
        **summarize(log.records, accs),
        "seconds": time.time() - t0,
    }


def summarize(records: list[dict], accs: list[float]) -> dict:
    """accs and cumulative generated tokens per stage, the means over stages of the summed penalty
    and stale gap, the mean out-of-region fraction over updates, and the mean KLs over the updates
    that took a step (None where nothing was measured)."""
    updates = [r for r in records if "update" in r]
    # the KL each update moved: the updates that took a step (one without signal moves nothing)
    stepped = [r for r in updates if not r.get(f"agent{r['agent']}/no_signal")]
    return {
        "accs": accs,
        "tokens": list(
            itertools.accumulate([r["stage/tokens"] for r in records if "stage/tokens" in r], initial=0)
        ),
        "penalty": per_stage(updates, "penalty"),
        "stale_gap": per_stage(updates, "stale_gap"),
        "out_of_region": per_update(updates, "out_of_region"),
        # the KL each message moved, and the token KL on the tokens that decide and on the rest
        **{key: per_update(stepped, key) for key in ("kl_msg", "kl_decide", "kl_rest")},
    }


def per_update(updates: list[dict], key: str):
    """The mean over updates of agent{i}/<key> (None if never measured)."""
    values = [v for r in updates if (v := r.get(f"agent{r['agent']}/{key}")) is not None]
    return statistics.mean(values) if values else None


def per_stage(updates: list[dict], key: str):
    """The mean over stages of agent{i}/<key> summed over each stage's updates (None if never
    measured)."""
    sums = {}
    for r in updates:
        if (value := r.get(f"agent{r['agent']}/{key}")) is not None:
            sums[r["stage"]] = sums.get(r["stage"], 0.0) + value
    return statistics.mean(sums.values()) if sums else None


def at_budget(result: dict, budget: int) -> float:
    """Held-out accuracy at the last stage whose cumulative generated tokens are within budget."""
    return result["accs"][max(s for s, t in enumerate(result["tokens"]) if t <= budget)]


def spread(values, fmt: str) -> str:
    """'mean ± standard deviation' over seeds, in format fmt ('-' if nothing was measured)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return format(statistics.mean(values), fmt) + (
        f" ± {statistics.stdev(values):{fmt.lstrip('+')}}" if len(values) > 1 else ""
    )


PENALTY_NOTE = (
    "penalty: the surrogate error of the batch each mode trained on, against the intermediate "
    "team's (fresh resampling with one round: 0 by construction; with --rounds 2 and more, the "
    "within-agent shift). stale gap: what training on the stage's first batch errs by, measured "
    "in every mode (in teamtr it is the error teamtr avoided, not one it paid)."
)


def write_outputs(results: list[dict], run_dir: str) -> str:
    """compare.md and the plots; returns the table."""
    # (n, seed) -> the smallest total generated tokens of a mode that trained
    budgets = {}
    for r in results:
        if r["tokens"][-1] > 0:
            key = (r["n"], r["seed"])
            budgets[key] = min(budgets.get(key, r["tokens"][-1]), r["tokens"][-1])
    groups, diffs = {}, differences(results, budgets)
    for r in results:
        groups.setdefault((r["n"], r["mode"]), []).append(r)
    rows = [
        "| n | mode | held-out accuracy | gain (points) | best | stages to +10 points "
        "| accuracy at equal tokens | penalty / stage | stale gap / stage | out-of-region "
        "| KL / message | token KL deciding / rest | generated tokens | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, mode), rs in groups.items():
        reached = [to_gain(r["accs"], 0.10) for r in rs]
        cells = [
            spread((r["accs"][-1] for r in rs), ".3f"),
            spread((100 * (r["accs"][-1] - r["accs"][0]) for r in rs), "+.1f"),
            spread((max(r["accs"]) for r in rs), ".3f"),
            spread(reached, ".1f")
            + (f" ({len(rs) - reached.count(None)} of {len(rs)})" if None in reached else ""),
            spread((at_budget(r, budgets.get((n, r["seed"]), 0)) for r in rs), ".3f"),
            spread((r.get("penalty") for r in rs), ".4f"),
            spread((r["stale_gap"] for r in rs), ".4f"),
            spread((r["out_of_region"] for r in rs), ".3f"),
            spread((r.get("kl_msg") for r in rs), ".4f"),
            spread((r.get("kl_decide") for r in rs), ".5f")
            + " / "
            + spread((r.get("kl_rest") for r in rs), ".5f"),
            spread((r["tokens"][-1] for r in rs), ",.0f"),
            spread((r["seconds"] for r in rs), ".0f"),
        ]
        rows.append(f"| {n} | {mode} | " + " | ".join(cells) + " |")
    warmups = {(r["n"], r["seed"]): r["warmup_seconds"] for r in results}
    seeds = sorted({r["seed"] for r in results})
    table = (
        "\n".join(rows)
        + (
            f"\n\nseeds {', '.join(map(str, seeds))}; warm-up {statistics.mean(warmups.values()):.0f} s "
            f"per team size and seed, shared by the modes\n\n{PENALTY_NOTE}\n"
        )
        + gap_exponents(groups)
        + against_stale(diffs)
    )
    with open(os.path.join(run_dir, "compare.md"), "w") as f:
        f.write(table)
    write_plots(groups, run_dir, diffs)
    return table


def to_gain(accs: list[float], gain: float):
    """The first stage whose held-out accuracy is `gain` above the start (None if none is)."""
    return next((s for s, acc in enumerate(accs) if acc - accs[0] >= gain - 1e-9), None)


def differences(results: list[dict], budgets: dict) -> dict:
    """{(n, mode): [(final, at equal tokens, best) minus stale's, per seed with a stale run]} in
    points, for every trained mode but stale."""
    stale = {(r["n"], r["seed"]): r for r in results if r["mode"] == "stale"}
    out = {}
    for r in results:
        base = stale.get((r["n"], r["seed"]))
        if base is None or r["mode"] in ("stale", "none"):
            continue
        budget = budgets.get((r["n"], r["seed"]), 0)
        values = (
            r["accs"][-1] - base["accs"][-1],
            at_budget(r, budget) - at_budget(base, budget),
            max(r["accs"]) - max(base["accs"]),
        )
        out.setdefault((r["n"], r["mode"]), []).append([100 * v for v in values])
    return out


def against_stale(diffs: dict) -> str:
    """The table of each mode's accuracy minus stale's, paired by seed (empty without stale)."""
    if not diffs:
        return ""
    rows = [
        "\nagainst stale, paired by seed (points; mean ± std over seeds):\n",
        "| n | mode | final − stale | at equal tokens − stale | best − stale |",
        "|---|---|---|---|---|",
    ]
    for (n, mode), values in sorted(diffs.items()):
        cells = [spread((v[j] for v in values), "+.1f") for j in range(3)]
        rows.append(f"| {n} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def gap_curves(groups: dict, key: str = "stale_gap") -> dict:
    """{mode: (team sizes, mean per stage of the summed <key> at each)} for the modes that
    measured it (key: stale_gap or penalty)."""
    gaps = {}
    for (n, mode), rs in sorted(groups.items()):
        values = [r.get(key) for r in rs if r.get(key) is not None]
        if values and mode != "single":
            gaps.setdefault(mode, ([], []))
            gaps[mode][0].append(n)
            gaps[mode][1].append(statistics.mean(values))
    return gaps


def gap_exponents(groups: dict) -> str:
    """Lines with each mode's fitted exponent k of penalty ~ n^k and stale gap ~ n^k, for what
    was measured (and not 0) at two team sizes or more."""
    lines = ""
    for key, name in (("penalty", "penalty"), ("stale_gap", "stale gap")):
        curves = {
            mode: c for mode, c in gap_curves(groups, key).items() if len(c[0]) > 1 and min(c[1]) > 1e-12
        }
        fits = ", ".join(
            f"{mode} k = {theory.fit_slope(*c):.2f} (n = {', '.join(map(str, c[0]))})"
            for mode, c in curves.items()
        )
        lines += f"\nsummed {name} per stage ~ n^k (log-log least squares): {fits}\n" if curves else ""
    return lines


def write_plots(groups: dict, run_dir: str, diffs: dict):
    """Curves are means over seeds (stage by stage; tokens likewise); difference.png: each mode's
    final accuracy minus stale's against n, with its standard deviation over seeds."""

    def mean_curve(rs, key):
        return [statistics.mean(vals) for vals in zip(*(r[key] for r in rs))]

    for n in sorted({n for n, _ in groups}):
        modes = {mode: rs for (m, mode), rs in groups.items() if m == n}
        line_plot(
            os.path.join(run_dir, f"accuracy_n{n}.png"),
            f"held-out accuracy, n = {n}",
            "stage",
            "accuracy",
            {mode: (list(range(len(rs[0]["accs"]))), mean_curve(rs, "accs")) for mode, rs in modes.items()},
        )
        line_plot(
            os.path.join(run_dir, f"tokens_n{n}.png"),
            f"accuracy against generated tokens, n = {n}",
            "generated tokens (cumulative)",
            "accuracy",
            {mode: (mean_curve(rs, "tokens"), mean_curve(rs, "accs")) for mode, rs in modes.items()},
        )
    line_plot(
        os.path.join(run_dir, "stale_gap.png"),
        "summed stale gap per stage",
        "agents n",
        "stale gap",
        gap_curves(groups),
        log=True,
    )
    if diffs:
        curves = {}
        for (n, mode), values in sorted(diffs.items()):
            finals = [v[0] for v in values]
            xs, ys, errs = curves.setdefault(mode, ([], [], []))
            xs.append(n)
            ys.append(statistics.mean(finals))
            errs.append(statistics.stdev(finals) if len(finals) > 1 else 0.0)
        line_plot(
            os.path.join(run_dir, "difference.png"),
            "final held-out accuracy minus stale's (± std over seeds)",
            "agents n",
            "points",
            curves,
        )
    # a mode that pays nothing (fresh resampling, one round) is left out; a log scale needs every
    # value positive
    paid = {mode: c for mode, c in gap_curves(groups, "penalty").items() if max(c[1]) > 0}
    line_plot(
        os.path.join(run_dir, "penalty.png"),
        "summed penalty per stage (modes that pay none not drawn)",
        "agents n",
        "penalty",
        paid,
        log=True,
    )


def line_plot(path: str, title: str, xlabel: str, ylabel: str, series: dict, log: bool = False):
    """A PNG line plot, drawn by matplotlib (Agg: files only, no display). series: {name: (xs, ys)}
    or {name: (xs, ys, error bars)}; log: both axes logarithmic (a power law is a straight line),
    if every value is positive."""
    values = [v for xs, ys, *_ in series.values() for v in (*xs, *ys)]
    log = log and bool(values) and min(values) > 0
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (xs, ys, *errs) in series.items():
        style = dict(marker="o", markersize=3, label=name, color=COLORS.get(name))
        if errs:
            ax.errorbar(xs, ys, yerr=errs[0], capsize=3, **style)
        else:
            ax.plot(xs, ys, **style)
    # ticks at the x values drawn, written plainly
    if log:
        ax.set(xscale="log", yscale="log")
        ax.minorticks_off()
        ticks = sorted({x for xs, *_ in series.values() for x in xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
