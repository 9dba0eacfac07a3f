"""The exact testbed: stale versus intermediate occupancy, computed exactly (no sampling).

    python -m tools.theory            # exponents for n = 2..32, one and two rounds, and J curves (< 60 s)
    python -m tools.theory --map --stages 10 --seeds 3    # where stale occupancy changes the outcome
    python -m tools.theory --place runs/cmp 8:0.04 --stages 10 --seeds 3    # where measured runs fall

A team of n tabular softmax agents passes a message from an alphabet of M symbols: agent t
reads the question q and the previous message and writes the next one; a reward table scores the
final message. Occupancies (the distribution of each turn's context) and Q-values are computed by
dynamic programming, so J, every surrogate and every true improvement are exact.

One stage updates every agent once in turn order, each update a fixed KL size delta: the agent's
new policy is pi' ∝ pi exp(eta A) with eta found by bisection so that the occupancy-weighted mean
KL(pi' || pi) equals delta. The surrogate of update k is
    L_k = sum_t sum_c d_t^ref(c) sum_m (pi'(m|c) - pi(m|c)) Q_t^ref(c, m)
with the reference team either the stage-start team pi_hat^0 (`stale`) or the intermediate team
pi_hat^{k-1} (`intermediate`, TeamTR), and its error is |L_k - (J(pi_hat^k) - J(pi_hat^{k-1}))|.
With one round the intermediate surrogate is exact (its error is float round-off): upstream agents
are already updated in the reference and downstream ones do not change in this update. With two
rounds an agent's own earlier turn shifts its later occupancy, the intermediate mode's own
per-update penalty. The stale error compounds over the earlier updates of the stage.

Two starting teams: `random` (N(0, 1) logits: the message chain forgets quickly) and `relay`
(each agent mostly copies what it reads, as in the relay task, so upstream changes travel far).

`--map` asks whether the stale error changes the outcome: over 10 stages in both modes, per team
size, radius and coupling, the stale error as a fraction of the true improvement, the stale
updates that lowered J, and how far the intermediate team's J gets ahead. Coupling moves a share
of the reward from the final message to a convention (each turn earns coupling / turns for
writing sigma_q(message read)), so a turn's best message depends on what it read; `share` makes
part of every step generalise across the contexts an agent reads, as shared weights do.

`happo_surrogate` is the HAPPO-style correction (stale trajectories reweighted by the product of
the already-updated agents' sequence ratios), checked in tests to equal the intermediate surrogate.
"""

import argparse
import itertools
import json
import os
import re
import time
from collections import namedtuple

import numpy as np

# one stage of the testbed: the team after it, its summed surrogate error, J after it, and each
# update's (surrogate, true improvement)
Stage = namedtuple("Stage", "team error J updates")


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Testbed:
    """n agents, Q questions, M messages, `rounds` passes; policies pi[a] of shape (Q, M, M)."""

    def __init__(self, n, rounds=1, Q=3, M=4, init="random", seed=0, coupling=0.0):
        rng = np.random.default_rng(seed)
        self.n, self.rounds, self.Q, self.M = n, rounds, Q, M
        self.turns = n * rounds
        self.p_q = np.full(Q, 1 / Q)
        # R(q, final message)
        self.reward = rng.random((Q, M))
        logits = rng.normal(size=(n, Q, M, M))
        if init == "relay":
            # mostly copy the message read
            logits = 0.5 * logits + 3.0 * np.eye(M)
        # (n, Q, M, M): [agent, q, previous message, next message]
        self.pi = softmax(logits)
        # coupling: a share of the reward moves from the final message to a convention, each turn
        # earning coupling / turns for writing sigma_q(message read); then a turn's best message
        # depends on what it read (with coupling 0 it does not: Q_t(c, m) = V_{t+1}(m))
        sigma = np.stack([np.random.default_rng([seed, 1, q]).permutation(M) for q in range(Q)])
        self.coupling = coupling
        self.final_reward = (1 - coupling) * self.reward
        # (Q, M, M): [q, message read, message written]
        self.turn_reward = coupling / self.turns * (np.arange(M) == sigma[:, :, None])

    def agent(self, t):
        return t % self.n

    def occupancy(self, pi):
        """d[t, q, c]: probability that turn t acts in context (q, previous message c)."""
        d = np.zeros((self.turns, self.Q, self.M))
        # the first agent reads the question and a start symbol 0
        d[0, :, 0] = self.p_q
        for t in range(self.turns - 1):
            d[t + 1] = np.einsum("qc,qcm->qm", d[t], pi[self.agent(t)])
        return d

    def q_values(self, pi):
        """Qv[t, q, c, m]: expected reward after turn t writes m in context (q, c)."""
        Qv = np.zeros((self.turns, self.Q, self.M, self.M))
        # (Q, M): value of the message just written, after the last turn
        V_next = self.final_reward
        for t in reversed(range(self.turns)):
            Qv[t] = self.turn_reward + V_next[:, None, :]
            V_next = np.einsum("qcm,qcm->qc", pi[self.agent(t)], Qv[t])
        return Qv

    def J(self, pi):
        d = self.occupancy(pi)
        last = pi[self.agent(self.turns - 1)]
        final = (d[-1] * np.einsum("qcm,qm->qc", last, self.final_reward)).sum()
        # the conventions' rewards, turn by turn
        turns = sum((d[t][..., None] * pi[self.agent(t)] * self.turn_reward).sum() for t in range(self.turns))
        return float(final + turns)

    def surrogate(self, ref, a, new_policy):
        """L: sum over agent a's turns of d^ref sum_m (pi' - pi^ref) Q^ref."""
        d, Qv = self.occupancy(ref), self.q_values(ref)
        return float(
            sum(
                (d[t][..., None] * (new_policy - ref[a]) * Qv[t]).sum()
                for t in range(self.turns)
                if self.agent(t) == a
            )
        )

    def kl_step(self, ref, a, delta, share=0.0, samples=0, rng=None):
        """pi' ∝ pi exp(eta A^ref), with eta such that the occupancy-weighted mean KL(pi' || pi) = delta.
        share: the part of the step that generalises across contexts, as shared weights do: the
        agent moves by (1 - share) A(c, m) + share * A_bar(m), A_bar the mean of A over the
        contexts it reads under the reference occupancy (share 0: the tabular agent).
        samples > 0: A and the occupancy estimated from that many episodes of ref (sampled)."""
        if samples:
            adv, weight = self.sampled(ref, a, samples, rng)
        else:
            d, Qv = self.occupancy(ref), self.q_values(ref)
            mine = [t for t in range(self.turns) if self.agent(t) == a]
            # (Q, M): agent a's context distribution
            weight = sum(d[t] for t in mine) / len(mine)
            adv = sum(d[t][..., None] * (Qv[t] - (ref[a] * Qv[t]).sum(-1, keepdims=True)) for t in mine)
            # occupancy-weighted A(c, m)
            adv = adv / np.maximum(sum(d[t] for t in mine), 1e-300)[..., None]
        if share:
            pooled = (weight[..., None] * adv).sum((0, 1)) / weight.sum()
            adv = (1 - share) * adv + share * pooled
        # policies near convergence have exact zeros
        log_pi = np.log(np.maximum(ref[a], 1e-300))

        def step(eta):
            logits = log_pi + eta * adv
            log_new = logits - logits.max(-1, keepdims=True)
            # log-softmax, no log(0)
            log_new -= np.log(np.exp(log_new).sum(-1, keepdims=True))
            new = np.exp(log_new)
            return new, float((weight * (new * (log_new - log_pi)).sum(-1)).sum())

        lo, hi = 0.0, 1.0
        while step(hi)[1] < delta and hi < 1e6:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if step(mid)[1] < delta else (lo, mid)
        return step(lo)[0]

    def sampled(self, ref, a, samples, rng):
        """Agent a's advantages and context distribution estimated from `samples` episodes of the
        team ref, as a batch gives them: A(q, c, m) = mean reward-to-go after writing m in (q, c)
        minus the mean in (q, c), 0 where not sampled; (Q, M, M) and (Q, M)."""
        q, read = rng.choice(self.Q, size=samples, p=self.p_q), np.zeros(samples, dtype=int)
        # (turns + 1, samples): every turn's reward, then the final one
        rewards, visits = np.zeros((self.turns + 1, samples)), []
        for t in range(self.turns):
            probs = ref[self.agent(t)][q, read]
            written = (probs.cumsum(-1) > rng.random((samples, 1))).argmax(-1)
            rewards[t] = self.turn_reward[q, read, written]
            if self.agent(t) == a:
                visits.append((t, read, written))
            read = written
        rewards[-1] = self.final_reward[q, read]
        to_go = rewards[::-1].cumsum(0)[::-1]
        total, count = np.zeros((self.Q, self.M, self.M)), np.zeros((self.Q, self.M, self.M))
        for t, c, m in visits:
            np.add.at(total, (q, c, m), to_go[t])
            np.add.at(count, (q, c, m), 1)
        in_context = count.sum(-1)
        mean = total.sum(-1) / np.maximum(in_context, 1)
        adv = np.where(count > 0, total / np.maximum(count, 1) - mean[..., None], 0.0)
        return adv, in_context / in_context.sum()

    def stage(self, pi, mode, delta, share=0.0, samples=0, seed=(0,)):
        """One stage of sequential updates. Returns (new team, summed surrogate error, J after,
        [(surrogate, true improvement) of each update]). samples > 0: every update estimates its
        advantages from that many episodes of its reference team, the same random numbers in
        both modes (seed)."""
        start, current, updates = pi.copy(), pi.copy(), []
        for a in range(self.n):
            ref = start if mode == "stale" else current
            rng = np.random.default_rng([*seed, a])
            new_policy = self.kl_step(ref, a, delta, share, samples, rng)
            updated = current.copy()
            updated[a] = new_policy
            updates.append((self.surrogate(ref, a, new_policy), self.J(updated) - self.J(current)))
            current = updated
        return Stage(current, sum(abs(L - gain) for L, gain in updates), self.J(current), updates)

    def happo_surrogate(self, start, current, a, new_policy):
        """Stale (pi_hat^0) trajectories, reweighted by the product over the agents already updated
        this stage of their sequence ratios pi_hat^{k-1} / pi_hat^0, by exact enumeration; the
        return is used as the advantage (a baseline of q would add zero in expectation, since agent a
        is not yet updated and E[ratio - 1 | context] = 0); the weights are unclipped."""
        total = 0.0
        for q in range(self.Q):
            for msgs in itertools.product(range(self.M), repeat=self.turns):
                prob, weight, ratio = self.p_q[q], 1.0, 0.0
                prev = 0
                for t, m in enumerate(msgs):
                    b = self.agent(t)
                    prob *= start[b, q, prev, m]
                    weight *= current[b, q, prev, m] / start[b, q, prev, m]
                    if b == a:
                        ratio += new_policy[q, prev, m] / start[a, q, prev, m] - 1
                    prev = m
                total += prob * weight * ratio * self.episode_reward(q, msgs)
        return total

    def episode_reward(self, q, msgs):
        """The final message's reward and the conventions' rewards of every turn."""
        read = (0, *msgs[:-1])
        return self.final_reward[q, msgs[-1]] + sum(self.turn_reward[q, c, m] for c, m in zip(read, msgs))


def exponents(ns, rounds, init, delta, seeds):
    """Mean summed stage error per n for both modes, and the fitted log-log slopes."""
    errors = {"stale": [], "intermediate": []}
    for n in ns:
        beds = [Testbed(n, rounds, init=init, seed=s) for s in range(seeds)]
        for mode in errors:
            errors[mode].append(np.mean([bed.stage(bed.pi, mode, delta)[1] for bed in beds]))
    slopes = {mode: fit_slope(ns, e) for mode, e in errors.items()}
    return errors, slopes


# The regime map's grid: team size, radius, coupling; and its blocks, (share, samples): how much
# each step generalises, and how many episodes estimate its advantages (0: exact)
MAP_NS, MAP_DELTAS, MAP_COUPLINGS = [2, 4, 8], [0.005, 0.02, 0.08, 0.3], [0.0, 0.5, 1.0]
MAP_BLOCKS = [
    (0.0, 0, "tabular agents, exact advantages"),
    (0.9, 0, "steps generalise across contexts"),
    (0.0, 32, "advantages from 32 sampled episodes per update"),
]


def regime(n, delta, coupling, share, stages, seeds, samples=0):
    """Stale against intermediate occupancy over `stages` stages from the relay start, means over
    `seeds` teams: err, the stale surrogates' summed error as a fraction of the summed true
    improvements; flip, the fraction of stale updates predicted to improve J that lowered it;
    lead and end, J(intermediate) - J(stale) at its largest over the stages and after the last.
    samples > 0: advantages estimated from that many episodes per update (Testbed.sampled)."""
    err, flip, lead, end = [], [], [], []
    for seed in range(seeds):
        curves, stale_updates = {}, []
        for mode in ("stale", "intermediate"):
            bed = Testbed(n, 1, init="relay", seed=seed, coupling=coupling)
            pi, curves[mode] = bed.pi, [bed.J(bed.pi)]
            for stage in range(stages):
                pi, _, j, updates = bed.stage(pi, mode, delta, share, samples, seed=(seed, stage))
                curves[mode].append(j)
                stale_updates += updates if mode == "stale" else []
        err.append(sum(abs(L - gain) for L, gain in stale_updates) / sum(abs(g) for _, g in stale_updates))
        flip.append(np.mean([L > 0 > gain for L, gain in stale_updates]))
        difference = np.subtract(curves["intermediate"], curves["stale"])
        lead.append(difference.max())
        end.append(difference[-1])
    return {"err": np.mean(err), "flip": np.mean(flip), "lead": np.mean(lead), "end": np.mean(end)}


def regime_map(stages, seeds) -> str:
    """The map of regime() over MAP_* as markdown tables, one per block."""
    lines = [
        f"stale against intermediate occupancy: relay start, one round, {stages} stages, mean over "
        f"{seeds} teams (Q = 3, M = 4)",
        "err: summed |stale surrogate - true improvement| / summed |true improvement|; flip: stale "
        "updates predicted to raise J that lowered it; lead, end: J(intermediate) - J(stale) at its "
        "largest and after the last stage, in points (100 x J)",
    ]
    for share, samples, name in MAP_BLOCKS:
        lines += [
            "",
            f"share {share:g}, samples {samples} ({name})",
            "",
            "| delta | coupling | " + " | ".join(f"n = {n}" for n in MAP_NS) + " |",
            "|---|---|" + "---|" * len(MAP_NS),
        ]
        for delta, coupling in itertools.product(MAP_DELTAS, MAP_COUPLINGS):
            cells = [regime(n, delta, coupling, share, stages, seeds, samples) for n in MAP_NS]
            lines.append(f"| {delta:g} | {coupling:g} | " + " | ".join(map(map_cell, cells)) + " |")
    return "\n".join(lines)


def measured_radii(items: list[str]) -> list[tuple[str, int, float]]:
    """(name, n, per-message KL) of each item: "N:KL" given by hand, a compare directory (each run
    of its results.json), or a train.py run directory (its updates' mean agent{i}/kl_msg)."""
    out = []
    for item in items:
        if os.path.isfile(os.path.join(item, "results.json")):
            out += compare_radii(item)
        elif os.path.isfile(os.path.join(item, "config.json")):
            out.append(run_radius(item))
        elif re.fullmatch(r"\d+:[0-9.e-]+", item):
            n, kl = item.split(":")
            out.append((item, int(n), float(kl)))
        else:
            raise ValueError(f"{item}: not a run directory, a compare directory or N:KL")
    return out


def compare_radii(path: str) -> list[tuple[str, int, float]]:
    """Each run of a compare directory that logged the per-message KL."""
    with open(os.path.join(path, "results.json")) as f:
        runs = [r for r in json.load(f) if r.get("kl_msg") is not None]
    if not runs:
        raise ValueError(f"{path}: no run logged the per-message KL (kl_msg)")
    return [(f"{path} {r['mode']} n{r['n']} s{r['seed']}", r["n"], r["kl_msg"]) for r in runs]


def run_radius(path: str) -> tuple[str, int, float]:
    """A train.py run: its team size and the mean of agent{i}/kl_msg over the updates that took a
    step (an update without signal takes none, and moves no message)."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("rounds", 1) != 1:
        raise ValueError(f"{path}: --rounds {config['rounds']}; the map's testbed plays one round")
    with open(os.path.join(path, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    kls = [
        r[key]
        for r in records
        if (key := f"agent{r.get('agent')}/kl_msg") in r and not r.get(f"agent{r['agent']}/no_signal")
    ]
    if not kls:
        raise ValueError(f"{path}: no update logged agent{{i}}/kl_msg")
    return path, config["agents"], float(np.mean(kls))


def place(items: list[str], stages: int, seeds: int) -> str:
    """Where measured runs fall on the map: the testbed's stale error and lead (regime(), plain
    relay start, no coupling, exact advantages) at each run's team size and per-message KL. The
    testbed's radius is per turn, and a turn writes one message, so the per-message KL is the
    radius that places a run; its agents are tabular, so steps do not generalise across contexts."""
    lines = [
        f"each run at the testbed's delta = its per-message KL ({stages} stages, {seeds} teams, coupling 0, "
        "share 0, exact advantages)",
        "",
        "| run | n | KL per message | testbed: stale error, flip, lead, end |",
        "|---|---|---|---|",
    ]
    for name, n, kl in measured_radii(items):
        cell = map_cell(regime(n, kl, 0.0, 0.0, stages, seeds))
        lines.append(f"| {name} | {n} | {kl:.4f} | {cell} |")
    return "\n".join(lines)


def map_cell(c: dict) -> str:
    return f"err {c['err']:.2f} flip {c['flip']:.0%} lead {100 * c['lead']:+.1f} end {100 * c['end']:+.1f}"


def fit_slope(ns, errors):
    """Least-squares slope of log error on log n; None when the errors are float round-off."""
    if max(errors) < 1e-12:
        return None
    return float(np.polyfit(np.log(ns), np.log(errors), 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tools.theory",
        description="The exact testbed: stale vs intermediate occupancy.",
        # errors in one line; numpy only, no torch to import
        usage=argparse.SUPPRESS,
    )
    parser.add_argument("--delta", type=float, default=0.01, help="KL size of every update")
    parser.add_argument("--seeds", type=int, default=5, help="random teams averaged per n")
    parser.add_argument("--stages", type=int, default=15, help="stages of the J curves")
    parser.add_argument(
        "--map",
        action="store_true",
        help="instead: where stale occupancy changes the outcome, over n, the radius, the coupling "
        "and how much each step generalises (--stages 10 --seeds 3 in docs/results.md)",
    )
    parser.add_argument(
        "--place",
        nargs="+",
        metavar="RUN",
        help="instead: where measured runs fall on the map, each a train.py or compare run directory "
        "(their logged per-message KL) or N:KL (a team size and a per-message KL)",
    )
    args = parser.parse_args(argv)
    if not (args.delta > 0 and args.seeds >= 1 and args.stages >= 0):
        parser.error(
            f"--delta must be positive, --seeds at least 1, --stages at least 0; got {args.delta}, "
            f"{args.seeds}, {args.stages}"
        )
    start, ns = time.time(), [2, 4, 8, 16, 32]
    if args.place:
        try:
            print(place(args.place, args.stages, args.seeds))
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--place: {e}")
        print(f"\n{time.time() - start:.1f} s")
        return
    if args.map:
        print(regime_map(args.stages, args.seeds))
        print(f"\n{time.time() - start:.1f} s")
        return
    print(
        f"summed surrogate error per stage, delta = {args.delta}, mean over {args.seeds} teams (Q = 3, M = 4)"
    )
    print("paper's bounds: stale O(n^2), intermediate O(n)\n")
    print(f"{'init':7s} {'rounds':6s} {'mode':13s} " + " ".join(f"n={n:<8d}" for n in ns) + " exponent")
    for init in ["random", "relay"]:
        for rounds in [1, 2]:
            errors, slopes = exponents(ns, rounds, init, args.delta, args.seeds)
            for mode in errors:
                slope = "exact (error is round-off)" if slopes[mode] is None else f"{slopes[mode]:.2f}"
                print(
                    f"{init:7s} {rounds:<6d} {mode:13s} "
                    + " ".join(f"{e:<10.2e}" for e in errors[mode])
                    + f" {slope}"
                )
    print(f"\nJ after each stage, n = 8, relay init, one round (delta = {args.delta}):")
    for mode in ["stale", "intermediate"]:
        bed = Testbed(8, 1, init="relay", seed=0)
        pi, curve = bed.pi, [bed.J(bed.pi)]
        for _ in range(args.stages):
            pi, _, j, _ = bed.stage(pi, mode, args.delta)
            curve.append(j)
        print(f"  {mode:13s} " + " ".join(f"{j:.3f}" for j in curve))
    print(f"\n{time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
