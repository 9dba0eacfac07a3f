"""Behaviour of the stage loop: isolation, the radius, stale reuse, fresh resampling, turn counts."""

import dataclasses
import os
import zlib

import pytest
import torch
from chat_models import save_chat_model
from conftest import random_rewards

import config
import losses
import rollout
import tasks
import team as team_lib
import teamtr
from tasks import mathtask

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "math.jsonl")


def played_batch(team, cfg, seed=0, temperature=1.0):
    task = tasks.Relay(cfg.agents)
    qs = tasks.questions(task, cfg.questions, seed=seed, heldout=False)
    eps = rollout.new_episodes(qs, cfg.group, len(team), 1, "fixed", seed)
    return random_rewards(rollout.play(team, task, eps, rollout.Settings(temperature, seed))[0], seed)


def snapshot(agent):
    return [p.detach().clone() for p in agent.model.parameters()]


def test_only_the_updated_agent_changes(make_team, cfg):
    team = make_team(3, lr=1e-2)
    batch = played_batch(team, cfg)
    before = [snapshot(a) for a in team]
    stats = teamtr.update_agent(team[1], 1, batch, cfg, seed=0).metrics
    assert stats["steps"] > 0
    for i, agent in enumerate(team):
        same = all(torch.equal(a, b) for a, b in zip(before[i], snapshot(agent)))
        assert same == (i != 1), f"agent{i}"


@pytest.mark.parametrize("kl", ["kl_rev", "full"])
def test_every_update_ends_inside_the_radius(make_team, cfg, kl):
    cfg = dataclasses.replace(cfg, delta=0.002, kl=kl, epochs=4)
    # a large step, so that the radius has to stop and backtrack
    team = make_team(3, lr=3e-2)
    backtracks = 0
    for seed in range(3):
        for i in range(3):
            stats = teamtr.update_agent(team[i], i, played_batch(team, cfg, seed), cfg, seed=seed).metrics
            assert stats["kl_rev"] <= cfg.delta
            backtracks += stats["backtracks"]
    # the backtracking path was exercised, not only the early stop
    assert backtracks > 0


def test_backtracking_shortens_only_the_step_that_crossed_the_radius(make_team, cfg, monkeypatch):
    cfg = dataclasses.replace(cfg, delta=0.5, epochs=4, minibatch=4)
    team = make_team(2, lr=1e-2)
    batch = played_batch(team, cfg)
    measure, weights = teamtr.TrustRegion.measure, []

    # the first two steps end inside the radius and the third outside; the rest is measured
    def scripted(self, model):
        measured = measure(self, model)
        weights.append(snapshot(team[0]))
        return measured._replace(D=(0.1, 0.2, 0.9)[len(weights) - 1]) if len(weights) <= 3 else measured

    monkeypatch.setattr(teamtr.TrustRegion, "measure", scripted)
    stats = teamtr.update_agent(team[0], 0, batch, cfg, seed=0).metrics
    assert stats["steps"] == 3 and stats["backtracks"] == 1 and stats["kl_rev"] <= cfg.delta
    # halfway along the third step, from the weights after the second: their progress is kept
    inside, crossed = weights[1], weights[2]
    for p, a, b in zip(team[0].model.parameters(), inside, crossed):
        torch.testing.assert_close(p.detach(), a + 0.5 * (b - a), rtol=0, atol=1e-7)


def test_an_update_without_signal_takes_no_step(make_team, cfg):
    team = make_team(2, lr=1e-2)
    # a real update first, so that Adam's momentum would move the weights on a zero gradient
    assert teamtr.update_agent(team[0], 0, played_batch(team, cfg), cfg, seed=0).metrics["steps"] > 0
    batch, version = played_batch(team, cfg, seed=1), team[0].version
    # every sample of every question right: every advantage is 0
    for e in batch:
        e.reward = 1.0
    before = snapshot(team[0])
    stats = teamtr.update_agent(team[0], 0, batch, cfg, seed=1).metrics
    assert stats["no_signal"] == 1 and stats["steps"] == 0 and stats["kl_rev"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(team[0])))
    # its turns stay reusable by early exit
    assert team[0].version == version


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_the_measured_kl_is_the_kl_of_the_distribution_that_sampled(make_team, cfg, temperature):
    cfg = dataclasses.replace(cfg, questions=32, group=8, temperature=temperature)
    team = make_team(2)
    agent, batch = team[0], played_batch(team, cfg, temperature=temperature)
    data = teamtr.agent_data(agent, 0, batch, cfg)[0]
    kl = teamtr.TrustRegion(agent, data, cfg)
    # the sampler's log-probs are the policy's: the ratio is 1 before the update
    torch.testing.assert_close(kl.old * data["mask"], data["sampler_logp"], rtol=0, atol=1e-5)
    with torch.no_grad():
        old_logits = agent.model(input_ids=data["ids"], attention_mask=data["attn"]).logits[:, :-1]
        for p in agent.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
        new_logits = agent.model(input_ids=data["ids"], attention_mask=data["attn"]).logits[:, :-1]
    measured = kl.measure(agent)
    # the exact reverse KL of the tempered distributions, over the whole vocabulary, per token
    new, old = ((x.double() / temperature).log_softmax(-1) for x in (new_logits, old_logits))
    exact = (new.exp() * (new - old)).sum(-1)
    where = data["mask"].bool()
    # the estimate minus the exact KL, per sampled token: mean 0 when pi_old sampled
    error = (measured.kl_tok.double() - exact)[where]
    assert 0.005 < exact[where].mean() < 0.2
    assert abs(error.mean()) < 4 * error.std() / len(error) ** 0.5


def test_attention_dropout_is_off_in_the_losss_forward():
    tok = team_lib.char_tokenizer(tasks.CHARS)
    model = team_lib.tiny_model(tok, hidden=32)
    model.config.attention_dropout = 0.5
    # a model whose config sets attention dropout, as some pretrained ones do
    model = type(model)(model.config)
    agent = team_lib.make_agent("agent0", model, tok)
    ids = torch.tensor([tok.encode("7+3-2|7;0")])
    with torch.no_grad():
        eval_logits = agent.model(input_ids=ids).logits
        agent.model.train()
        train_logits = [agent.model(input_ids=ids).logits for _ in range(2)]
        agent.model.eval()
    assert all(torch.equal(x, eval_logits) for x in train_logits)


def test_without_trust_region_the_radius_is_not_enforced(make_team, cfg):
    cfg = dataclasses.replace(cfg, delta=0.002, trust_region="off", epochs=4)
    team = make_team(3, lr=3e-2)
    stats = teamtr.update_agent(team[0], 0, played_batch(team, cfg), cfg, seed=0).metrics
    assert stats["backtracks"] == 0 and stats["steps"] == cfg.epochs * 1 and stats["kl_rev"] > cfg.delta


def count_plays(monkeypatch):
    calls = []
    play = rollout.play

    def counting(team, task, episodes, *args, **kwargs):
        out = play(team, task, episodes, *args, **kwargs)
        calls.append((episodes, out[0]))
        return out

    monkeypatch.setattr(rollout, "play", counting)
    return calls


def test_stale_reuses_the_first_batch_and_fresh_resamples(make_team, cfg, monkeypatch):
    seen = []
    update = teamtr.update_agent
    monkeypatch.setattr(
        teamtr, "update_agent", lambda agent, i, eps, *rest: seen.append(eps) or update(agent, i, eps, *rest)
    )
    calls = count_plays(monkeypatch)
    task = tasks.Relay(3)
    teamtr.run_stage(make_team(3), task, dataclasses.replace(cfg, resample="stale"), 1, lambda r, line: None)
    assert len(calls) == 1 and all(eps is calls[0][1] for eps in seen)
    seen.clear(), calls.clear()
    teamtr.run_stage(make_team(3), task, dataclasses.replace(cfg, resample="fresh"), 1, lambda r, line: None)
    # B_1, then after updates 1 and 2
    assert len(calls) == 3
    assert seen == [c[1] for c in calls] and len({id(b) for b in seen}) == 3


def transcripts(episodes):
    return [[(s.agent, s.tokens) for s in e.steps] for e in episodes]


@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_fresh_batches_reuse_the_first_batchs_random_numbers(make_team, cfg, monkeypatch, lr):
    """Common random numbers: with no update in between, a fresh batch is the first batch; once
    the agents change, it differs only from the first updated agent's first turn on."""
    calls = count_plays(monkeypatch)
    teamtr.run_stage(
        make_team(3, lr=lr),
        tasks.Relay(3),
        dataclasses.replace(cfg, resample="fresh", temperature=1.0),
        1,
        lambda r, line: None,
    )
    first, *fresh = [out for _, out in calls]
    if lr == 0.0:
        assert all(transcripts(batch) == transcripts(first) for batch in fresh)
    # the updated agents changed a few choices; the other tokens repeat (by chance: about 1 in 20)
    else:
        pairs = [
            (a, b)
            for e, f in zip(fresh[-1], first)
            for s, t in zip(e.steps, f.steps)
            for a, b in zip(s.tokens, t.tokens)
        ]
        same = sum(a == b for a, b in pairs) / len(pairs)
        assert transcripts(fresh[-1]) != transcripts(first) and same > 0.8, same


@pytest.mark.parametrize("early_exit", [False, True])
@pytest.mark.parametrize("update_order,turns", [("turn", 8 + 8 * 9 // 2 - 1), ("reverse", 8 + 8 * 7 // 2)])
def test_suffix_resampling_turn_counts(make_team, cfg, update_order, turns, early_exit):
    cfg = dataclasses.replace(
        cfg,
        agents=8,
        resample="fresh",
        update_order=update_order,
        questions=2,
        group=2,
        epochs=1,
        no_early_exit=not early_exit,
    )
    logged = []
    record = teamtr.run_stage(make_team(8), tasks.Relay(8), cfg, 1, lambda r, line: logged.append(r))
    # 43 and 36 instead of 64 at n = 8: generated, or kept by early exit (which still generates
    # the first batch and each updated agent's turns again)
    generated, reused = record["stage/turns"], record["stage/reused_turns"]
    assert generated + reused == turns
    assert reused == 0 if not early_exit else (generated >= 8 + 7 and reused > 0)
    first = logged[0]
    assert len(logged) == 8 and first[f"agent{first['agent']}/stale_gap"] == 0.0
    assert all(r[f"agent{r['agent']}/stale_gap"] is not None for r in logged)


def test_update_metrics_have_the_names_of_the_design(make_team, cfg):
    """Every per-update metric that docs/design.md lists under "Metrics"."""
    logged = []
    teamtr.run_stage(make_team(3), tasks.Relay(3), cfg, 1, lambda r, line: logged.append(r))
    names = "kl_rev kl_k1 kl_k3 out_of_region clipfrac steps skipped_steps reverted backtracks surrogate"
    for name in [*names.split(), "penalty", "stale_gap", "adv_clipfrac", "logp_drift"]:
        assert all(f"agent{r['agent']}/{name}" in r for r in logged)


class CoinRelay(tasks.Relay):
    """The relay with a reward of 0 or 1 read off the final message's text, so that an untrained
    team's groups have advantages that are not all 0."""

    def reward(self, q, final_message: str) -> float:
        return float(zlib.crc32(final_message.encode()) % 2)


@pytest.mark.parametrize("resample, rounds", [("fresh", 1), ("fresh", 2), ("stale", 1), ("reweight", 1)])
def test_the_penalty_is_the_surrogate_error_of_the_batch_each_mode_trains_on(
    make_team, cfg, resample, rounds
):
    cfg = dataclasses.replace(cfg, resample=resample, rounds=rounds, measure_gap=True, happo_max_weight=1.05)
    logged = []
    # the relay has a step per turn
    record = teamtr.run_stage(make_team(3), CoinRelay(3 * rounds), cfg, 1, lambda r, line: logged.append(r))
    penalty, gap = ([r[f"agent{r['agent']}/{key}"] for r in logged] for key in ("penalty", "stale_gap"))
    assert record["stage/penalty"] == sum(penalty) and record["stage/stale_gap"] == sum(gap)
    # the first update of a stage trains on the intermediate team's batch in every mode
    assert gap[0] == 0.0 and max(gap) > 0
    if resample == "fresh":
        # one round: an agent's contexts hold none of its own turns, so its batch's occupancy is
        # exact; two rounds: its update shifts its own later turns' contexts
        assert all(p == 0.0 for p in penalty) if rounds == 1 else max(penalty) > 0
    elif resample == "stale":
        assert penalty == gap
    else:
        # happo pays its reweighted surrogate's error, not the plain stale gap
        assert penalty[0] == 0.0 and penalty[1:] != gap[1:]


def test_happo_weights_are_the_clipped_product_of_earlier_agents_sequence_ratios(make_team, cfg, monkeypatch):
    cfg = dataclasses.replace(cfg, resample="reweight", happo_max_weight=1.05)
    team, calls = make_team(3, lr=3e-2), []
    update = teamtr.update_agent

    def recording(agent, i, eps, c, seed, weights):
        out = update(agent, i, eps, c, seed, weights)
        # independent check: new log-probs against the behaviour log-probs in B_1
        with torch.no_grad():
            data = losses.agent_batch(eps, i, torch.zeros(len(eps)), agent.tokenizer.pad_token_id, "cpu")
            new = agent.token_logprobs(data)[0]
            expect = losses.sequence_log_ratio(
                new, data["sampler_logp"], data["mask"], data["episode"], len(eps)
            )
        torch.testing.assert_close(out.log_ratio, expect, atol=1e-5, rtol=0)
        calls.append((eps, weights, out.log_ratio.clone()))
        return out

    monkeypatch.setattr(teamtr, "update_agent", recording)
    teamtr.run_stage(team, tasks.Relay(3), cfg, 1, lambda r, line: None)
    # the stale batch throughout
    assert all(eps is calls[0][0] for eps, _, _ in calls)
    assert torch.equal(calls[0][1], torch.ones(len(calls[0][0])))
    for k in (1, 2):
        product = sum(c[2] for c in calls[:k]).exp()
        torch.testing.assert_close(calls[k][1], product.clamp(1 / 1.05, 1.05))
    # weights act, some clipped
    assert (calls[2][1] != 1).any() and ((calls[2][1] - 1.05).abs() < 1e-6).any()


def test_measure_gap_in_stale_mode_measures_without_training_on_it(make_team, cfg):
    logged = []
    cfg = dataclasses.replace(cfg, resample="stale", measure_gap=True)
    record = teamtr.run_stage(make_team(3), tasks.Relay(3), cfg, 1, lambda r, line: logged.append(r))
    gaps = [r[f"agent{r['agent']}/stale_gap"] for r in logged]
    assert gaps[0] == 0.0 and all(g is not None and g >= 0 for g in gaps[1:]) and max(gaps) > 0
    # diagnostic batches are not training compute
    assert record["stage/turns"] == 3


def test_a_non_finite_loss_skips_the_step_and_leaves_the_weights(make_team, cfg, monkeypatch):
    team = make_team(2, lr=1e-2)
    batch, before = played_batch(team, cfg), snapshot(team[0])
    ppo_loss = losses.ppo_loss
    monkeypatch.setattr(losses, "ppo_loss", lambda *args: ppo_loss(*args) * float("nan"))
    stats = teamtr.update_agent(team[0], 0, batch, cfg, seed=0).metrics
    assert stats["steps"] == 0 and stats["skipped_steps"] == cfg.epochs * -(-len(batch) // cfg.minibatch)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(team[0])))
    # no optimiser step was taken
    assert not team[0].optimizer.state


def test_a_non_finite_gradient_skips_only_that_step(make_team, cfg):
    team = make_team(2, lr=1e-2)
    batch = played_batch(team, cfg)
    faults = []

    # the first step's gradient of one tensor becomes non-finite
    def first_inf(grad):
        faults.append(grad)
        return grad * float("inf") if len(faults) == 1 else grad

    next(team[0].model.parameters()).register_hook(first_inf)
    stats = teamtr.update_agent(team[0], 0, batch, cfg, seed=0).metrics
    assert stats["skipped_steps"] == 1 and stats["steps"] > 0
    assert all(torch.isfinite(p).all() for p in team[0].model.parameters())


def test_a_non_finite_kl_reverts_the_update(make_team, cfg, monkeypatch):
    team = make_team(2, lr=1e-2)
    batch, before = played_batch(team, cfg), snapshot(team[0])
    measure, calls = teamtr.TrustRegion.measure, []

    # the first measurement after a step comes out NaN
    def faulty(self, model):
        measured = measure(self, model)
        calls.append(1)
        return measured._replace(D=float("nan")) if len(calls) == 1 else measured

    monkeypatch.setattr(teamtr.TrustRegion, "measure", faulty)
    stats = teamtr.update_agent(team[0], 0, batch, cfg, seed=0).metrics
    assert stats["reverted"] == 1 and stats["steps"] == 1 and stats["kl_rev"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(team[0])))


def test_shared_prefix_groups_share_everything_before_the_updated_agent(make_team, cfg, monkeypatch):
    """--shared-prefix: agent i's batch gives the G samples of a question one prefix (sample 0's
    turns before agent i, from the intermediate team's batch), and the samples differ after it."""
    seen = []
    update = teamtr.update_agent
    monkeypatch.setattr(
        teamtr,
        "update_agent",
        lambda agent, i, eps, *rest: seen.append((i, eps)) or update(agent, i, eps, *rest),
    )
    calls = count_plays(monkeypatch)
    teamtr.run_stage(
        make_team(3, lr=1e-2),
        tasks.Relay(3),
        dataclasses.replace(cfg, shared_prefix=True),
        1,
        lambda r, line: None,
    )
    # B_1; then for agents 1 and 2 the intermediate team's batch and its shared-prefix replay
    assert len(calls) == 5
    for i, batch in seen[1:]:
        intermediate = calls[2 * i - 1][1]
        leaders = {e.qid: e for e in intermediate if e.sample == 0}
        assert all(transcripts([e])[0][:i] == transcripts([leaders[e.qid]])[0][:i] for e in batch)
        assert transcripts([e for e in batch if e.sample == 0]) == transcripts(
            [e for e in intermediate if e.sample == 0]
        )
        # samples differ after the prefix
        assert len({tuple(map(tuple, (t for _, t in transcripts([e])[0]))) for e in batch}) > len(leaders)


def trained_batches(team, task, cfg, monkeypatch):
    """One fresh stage: the batches its updates trained on (writer, tokens, sampler log-probs per
    turn) and the stage's record."""
    seen = []
    update = teamtr.update_agent

    def recording(agent, i, eps, *rest):
        seen.append([[(s.agent, s.tokens, s.logprobs) for s in e.steps] for e in eps])
        return update(agent, i, eps, *rest)

    monkeypatch.setattr(teamtr, "update_agent", recording)
    record = teamtr.run_stage(team, task, cfg, 1, lambda r, line: None)
    monkeypatch.setattr(teamtr, "update_agent", update)
    return seen, record


def same_batches(a, b):
    assert [[[(w, t) for w, t, _ in e] for e in batch] for batch in a] == [
        [[(w, t) for w, t, _ in e] for e in batch] for batch in b
    ]
    logps = [
        torch.tensor([x for batch in run for e in batch for _, _, lp in e for x in lp]) for run in (a, b)
    ]
    torch.testing.assert_close(*logps, atol=1e-5, rtol=0)


def test_early_exit_trains_on_the_batches_of_suffix_resampling(make_team, cfg, monkeypatch):
    """Early exit keeps a turn only where its writer's weights, its context and its random numbers
    made it: the batches are token for token those of suffix resampling, with fewer turns
    generated, over every update of two stages."""
    monkeypatch.setattr(tasks.Relay, "reward", lambda self, q, message: float(len(message) % 2))
    cfg = dataclasses.replace(cfg, resample="fresh", delta=0.02)
    runs = {}
    for early_exit in (True, False):
        team = make_team(3, lr=1e-2)
        runs[early_exit] = [
            trained_batches(
                team, tasks.Relay(3), dataclasses.replace(cfg, no_early_exit=not early_exit), monkeypatch
            )
            for _ in range(2)
        ]
    for (a, kept), (b, full) in zip(runs[True], runs[False]):
        same_batches(a, b)
        # the updates changed some messages and kept others: both paths ran
        assert 0 < kept["stage/reused_turns"] and kept["stage/turns"] < full["stage/turns"]
        assert kept["stage/turns"] + kept["stage/reused_turns"] == full["stage/turns"]


def test_early_exit_is_exact_on_a_real_model_team_with_chat_templates(tmp_path, monkeypatch):
    monkeypatch.setattr(mathtask.MathTask, "reward", lambda self, q, message: float(len(message)))
    paths = [save_chat_model(tmp_path / arch, arch) for arch in ("llama", "qwen2")]
    base = config.Config(
        task=f"jsonl:{FIXTURE}",
        agents=2,
        questions=2,
        group=4,
        model="x",
        max_new_tokens=8,
        epochs=1,
        delta=0.05,
    )
    runs = {}
    for early_exit in (True, False):
        cfg = config.resolve(dataclasses.replace(base, no_early_exit=not early_exit))
        team = team_lib.load_team(paths, "cpu", torch.float32, team_lib.Training(lr=1e-4))
        runs[early_exit] = trained_batches(team, mathtask.make(cfg), cfg, monkeypatch)
    (a, kept), (b, full) = runs[True], runs[False]
    same_batches(a, b)
    assert kept["stage/turns"] + kept["stage/reused_turns"] == full["stage/turns"]
    assert kept["stage/reused_turns"] > 0


@pytest.mark.parametrize("radius", ["token", "message"])
def test_each_radius_unit_stops_where_its_own_mean_crosses_delta(make_team, cfg, monkeypatch, radius):
    # every token's KL is 0.004: the token mean is 0.004, and a message of m tokens moved 0.004 m
    cfg = dataclasses.replace(cfg, delta=0.006, radius=radius, epochs=2, minibatch=8, max_backtracks=2)
    team = make_team(2, lr=1e-2)
    batch = played_batch(team, cfg)
    monkeypatch.setattr(
        teamtr.TrustRegion, "token_kl", lambda self, logp, full, rows=slice(None): logp * 0 + 0.004
    )
    data = teamtr.agent_data(team[0], 0, batch, cfg)[0]
    tokens, messages = float(data["mask"].sum()), len(data["ids"])
    stats = teamtr.update_agent(team[0], 0, batch, cfg, seed=0).metrics
    assert stats["kl_rev"] == pytest.approx(0.004) and stats["kl_msg"] == pytest.approx(
        0.004 * tokens / messages
    )
    if radius == "token":
        # 0.004 <= 0.006: every minibatch step of both epochs, no backtracking
        assert stats["steps"] == 2 * -(-messages // 8) and stats["backtracks"] == 0
    else:
        # messages of more than 1.5 tokens on average: above 0.006 after the first step, so it
        # stops, and every halving stays outside, down to the weights before the step (alpha = 0)
        assert tokens / messages > 1.5 and stats["steps"] == 1 and stats["backtracks"] == 3


def test_the_stale_penalty_is_measured_against_the_fresh_batchs_own_shift_surrogate():
    # (L_hat, L_hat*) on the other batch differ once an agent speaks twice (--rounds 2): the stale
    # penalty compares with L_hat* (the occupancy its update gives its own later turns)
    m = lambda: teamtr.Update({"surrogate": 0.5}, None, own_surrogate=0.4, plain_surrogate=0.45)
    other = (0.3, 0.2)
    stale = teamtr.surrogate_errors(m(), other, True, trained_on_intermediate=False)
    assert stale == pytest.approx({"penalty": 0.3, "stale_gap": 0.15})
    fresh = teamtr.surrogate_errors(m(), other, True, trained_on_intermediate=True)
    assert fresh == pytest.approx({"penalty": 0.1, "stale_gap": 0.15})
    assert teamtr.surrogate_errors(m(), None, True, True) == pytest.approx({"penalty": 0.1, "stale_gap": 0.0})
    assert teamtr.surrogate_errors(m(), None, False, False) == {"penalty": None, "stale_gap": None}


@pytest.mark.parametrize("radius", ["token", "message"])
def test_the_penalty_is_in_the_radiuss_unit(make_team, cfg, monkeypatch, radius):
    cfg = dataclasses.replace(cfg, radius=radius, epochs=1, minibatch=6)
    team = make_team(2, lr=1e-2)
    batch = played_batch(team, cfg)
    seen, ppo_loss = [], losses.ppo_loss

    def spy(objective, kl_tok, mask, beta, average, penalty=None):
        seen.append((int(mask.sum()), int((mask.sum(1) > 0).sum()), penalty))
        return ppo_loss(objective, kl_tok, mask, beta, average, penalty)

    monkeypatch.setattr(losses, "ppo_loss", spy)
    teamtr.update_agent(team[0], 0, batch, cfg, seed=0)
    assert seen
    for tokens, messages, penalty in seen:
        # token: the surrogate's own mean; message: each message's sum over the minibatch's messages
        assert (
            penalty is None if radius == "token" else penalty[0] == "message" and int(penalty[1]) == messages
        )
