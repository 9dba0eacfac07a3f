"""The relay task: its arithmetic, the held-out split, answer extraction, the operation mix, and
the warm-up demonstrator with and without the codes of the coordination variant, and the
warm-up's accuracy target, the turn check behind the per-agent turn accuracy, and a one-operation
relay's few questions."""

import random

import pytest
import torch

import config
import eval as evaluation
import losses
import rollout
import tasks
import team as team_lib
import warmup
from tasks import base


def test_relay_questions_chain_their_steps_mod_the_modulus():
    task = tasks.Relay(4)
    for q in tasks.questions(task, 50, seed=1, heldout=False):
        value = int(q.text[0])
        for op, step in zip(q.ops, q.steps):
            value = tasks.apply(value, op) % 10
            assert str(value) == step
        assert q.answer == q.steps[-1] and len(q.ops) == 4
        assert task.reward(q, f"9;{q.answer}") == 1.0 and task.reward(q, str((int(q.answer) + 1) % 10)) == 0.0


def test_heldout_and_training_questions_are_disjoint():
    task = tasks.Relay(3)
    heldout = {q.text for q in tasks.heldout_set(task, 200)}
    train = {q.text for q in tasks.questions(task, 600, seed=5, heldout=False)}
    assert len(heldout) == 200 and not heldout & train


def test_the_relay_scores_the_last_value_of_its_final_message():
    q = tasks.Question("7+3-2+1", "9", ("0", "8", "9"), ("+3", "-2", "+1"))
    relay = tasks.Relay(3)
    assert relay.reward(q, "9") == 1.0 and relay.reward(q, "0;8;9") == 1.0
    assert relay.reward(q, "8") == 0.0 and relay.reward(q, "9;8") == 0.0 and relay.reward(q, "") == 0.0
    assert tasks.start_value(q) == "7" and relay.render(q, ["0"]) == "7+3-2+1|7;0|-2>"


def test_p_max_arg_sets_the_share_of_the_largest_operation():
    rng = random.Random(0)
    for p, task in ((0.1, tasks.Relay(8, p_max_arg=0.1)), (1 / 3, tasks.Relay(8))):
        ops = [op for _ in range(2000) for op in task.question(rng).ops]
        share = sum(op[1:] == "3" for op in ops) / len(ops)
        # 16,000 operations: the standard error is about 0.003
        assert abs(share - p) < 0.02
        assert {op[1:] for op in ops} == {"1", "2", "3"}


def test_the_demonstrator_writes_the_chain_plainly_without_codes():
    task, cfg = tasks.Relay(3), config.Config(demo_error=0.0)
    q = tasks.questions(task, 1, seed=3, heldout=False)[0]
    demos = warmup.demonstration(q, task, tasks.Relay(3, solo=True), cfg, random.Random(0))
    assert demos == [(task.render(q, list(q.steps[:t])), q.steps[t]) for t in range(3)] + [
        (f"{q.text}=", ";".join(q.steps))
    ]


def test_with_codes_the_demonstrator_mirrors_half_the_messages_but_never_the_last():
    task, cfg, rng = tasks.Relay(4), config.Config(demo_error=0.0, codes=True), random.Random(0)
    mirrored = [[], [], [], []]
    for q in tasks.questions(task, 500, seed=3, heldout=False):
        demos = warmup.demonstration(q, task, tasks.Relay(4, solo=True), cfg, rng)
        for t, (context, message) in enumerate(demos[:4]):
            # the true value, in one of two codes
            assert message in (q.steps[t], str(tasks.mirror(int(q.steps[t]), 10)))
            # the next context shows this message as it was written
            if t < 3:
                assert demos[t + 1][0].split("|")[1].split(";")[t + 1] == message
            mirrored[t].append(message != q.steps[t])
        # the solo format stays plain
        assert demos[4][1] == ";".join(q.steps)
    shares = [sum(m) / len(m) for m in mirrored]
    # a mirror equals the value only for 4.5 (never)
    assert shares[3] == 0.0 and all(0.4 < s < 0.6 for s in shares[:3])
    assert all(tasks.mirror(tasks.mirror(v, 10), 10) == v for v in range(10))


@pytest.mark.parametrize("fraction, free", [(1.0, [0, 1, 2, 3, 4, 5, 6]), (0.5, [1, 3, 5, 6]), (0.0, [])])
def test_code_links_leave_all_but_a_fraction_of_the_links_plain(fraction, free):
    task, solo = tasks.Relay(8), tasks.Relay(8, solo=True)
    cfg, rng = config.Config(demo_error=0.0, codes=True, code_links=fraction), random.Random(0)
    assert [t for t, c in enumerate(warmup.coupled_links(8, fraction)) if c] == free
    mirrored = set()
    for q in tasks.questions(task, 200, seed=3, heldout=False):
        demos = warmup.demonstration(q, task, solo, cfg, rng)
        mirrored |= {t for t, (_, message) in enumerate(demos[:8]) if message != q.steps[t]}
    # the free links are mirrored in some questions, the others never
    assert sorted(mirrored) == free


def test_a_turn_is_right_given_the_value_it_read():
    q = tasks.Question("7+3-2+1", "9", ("0", "8", "9"), ("+3", "-2", "+1"))
    relay = tasks.Relay(3)
    assert relay.turn_correct(q, ["0", "8", "9"]) == [True, True, True]
    # 9 + 1 = 0: right after a wrong turn
    assert relay.turn_correct(q, ["0", "9", "0"]) == [True, False, True]
    # nothing to compute from after a malformed one
    assert relay.turn_correct(q, ["x", "8"]) == [False, False]


def test_turn_accuracy_counts_each_agents_messages():
    q = tasks.Question("7+3-2+1", "9", ("0", "8", "9"), ("+3", "-2", "+1"))
    played = []
    for texts in (["0", "8", "9"], ["0", "9", "0"]):
        e = rollout.Episode(q, 0, 0, [0, 1, 2])
        e.steps = [rollout.Step(agent, [], [], [], text) for agent, text in enumerate(texts)]
        played.append(e)
    assert tasks.turn_accuracy(tasks.Relay(3), played, 3) == {
        "turn_acc/agent0": 1.0,
        "turn_acc/agent1": 0.5,
        "turn_acc/agent2": 1.0,
    }
    # one message: no turns to check
    assert tasks.turn_accuracy(tasks.Relay(3, solo=True), played, 3) == {}


@pytest.mark.parametrize("work", [0, 1])
def test_credit_sorts_sampled_messages_by_what_was_read_and_written(work):
    q = tasks.Question("7+3-2+1", "9", ("0", "8", "9"), ("+3", "-2", "+1"))
    # with --work each message first shows a work line (its copy does not matter): "1+1=9"
    shown = lambda text: "1+1=" * work + text
    played = []
    for texts, reward in (
        (["0", "8", "9"], 1.0),
        (["0", "9", "0"], 0.0),
        (["0", "9", "9"], 1.0),
        (["5", "3", "4"], 0.0),
    ):
        e = rollout.Episode(q, 0, len(played), [0, 1, 2], reward=reward)
        e.steps = [rollout.Step(agent, [], [], [], shown(text)) for agent, text in enumerate(texts)]
        played.append(e)
    # advantages +1, -1, +1, -1
    table = evaluation.credit(tasks.Relay(3, work=work), played, group=4, adv_max=3.0)
    assert [count for _, count in table.values()] == [5, 3, 3, 1, 0]
    assert [mean for mean, _ in table.values()] == pytest.approx([0.6, -1 / 3, -1.0, 1.0, 0.0], abs=1e-5)


def test_a_one_operation_relay_warms_up_on_all_its_questions_and_refuses_too_many():
    cfg = config.Config(agents=1, hidden=32, warmup_steps=2)
    tok = team_lib.char_tokenizer(tasks.CHARS)
    # 45 training questions, fewer than a warm-up batch
    warmup.warmup(team_lib.tiny_model(tok, 32, seed=0), tok, cfg)
    assert len(tasks.make(config.Config(agents=1, questions=45)).train_questions(45, seed=3)) == 45
    with pytest.raises(
        base.TaskError,
        match="--questions 46: the relay has only 45 distinct training questions at --agents 1",
    ):
        tasks.make(config.Config(agents=1, questions=46))


def test_eval_solo_baseline_gets_the_whole_chain_with_rounds():
    # 3 agents, 2 rounds: 6 operations per question, and agent0 alone must write all 6 values
    cfg = config.resolve(config.Config(agents=3, rounds=2))
    team_task = tasks.make(cfg)
    solo, _ = evaluation.solo_task(cfg)
    for q in team_task.heldout(8):
        answer = ";".join(q.steps)
        assert len(q.steps) == 6 and solo.reward(q, answer) == 1.0
        # one token per character, and EOS
        assert len(answer) + 1 <= solo.max_new_tokens


def test_with_work_a_message_shows_its_work_and_readers_read_only_its_value():
    q = tasks.Question("7+3-2+1", "9", ("0", "8", "9"), ("+3", "-2", "+1"))
    relay = tasks.Relay(3, work=2)
    # what a later agent reads is the chain of values, as in the plain relay
    assert relay.render(q, ["7+3=7+3=0"]) == "7+3-2+1|7;0|-2>" == tasks.Relay(3).render(q, ["0"])
    assert relay.value("8+1=8+1=9") == "9" and relay.deciding("8+1=8+1=9") == 1
    assert relay.reward(q, "8+1=8+1=9") == 1.0 and relay.reward(q, "8+1=8+1=8") == 0.0
    # a message cut before its value says nothing, not the operation's "1"; one without its work
    # lines neither; a long value is read as long as a plain relay message at most
    assert relay.value("8+1=") == "" and relay.reward(q, "8+1=") == 0.0 and relay.deciding("8+1=") == 0
    assert relay.value("9") == "" and relay.value("8+1=12345") == "123" and relay.deciding("8+1=12345") == 5
    # a miscopied work line does not change what the message says
    assert relay.turn_correct(q, ["5+3=0", "0-2=8", "8+1=9"]) == [True, True, True]
    # 2 work lines of 4 characters, the value, EOS and one token of slack
    assert relay.max_new_tokens == 2 * 4 + 3 and tasks.Relay(3, solo=True, work=2).max_new_tokens == 6
    # without --work a message is its value, whole
    assert tasks.Relay(3).value("8+1=9") == "8+1=9" and tasks.Relay(3).deciding("8+1=9") == 5


@pytest.mark.parametrize("codes", [False, True])
def test_with_work_the_demonstrator_copies_what_it_read_and_its_operation(codes):
    task, rng = tasks.Relay(4, work=3), random.Random(0)
    cfg = config.Config(demo_error=0.0, codes=codes, work=3)
    for q in tasks.questions(task, 50, seed=3, heldout=False):
        demos = warmup.demonstration(q, task, tasks.Relay(4, solo=True), cfg, rng)
        for t, (context, message) in enumerate(demos[:4]):
            # the last value of the chain it reads (as written, in its code), and its operation
            read, op = context.split("|")[1].split(";")[-1], q.ops[t]
            assert read == (tasks.start_value(q) if t == 0 else demos[t - 1][1].rsplit("=", 1)[-1])
            assert message == (read + op + "=") * 3 + task.value(message)
        # the solo format has no work lines
        assert demos[4][1] == ";".join(q.steps)


def test_the_deciding_tokens_of_a_played_message_are_its_value(make_team):
    team, relay = make_team(2), tasks.Relay(2, work=1)
    qs = tasks.questions(relay, 8, seed=0, heldout=False)
    played = rollout.play(
        team, relay, rollout.new_episodes(qs, 4, 2, 1, "fixed", 0), rollout.Settings(1.0, 0)
    )[0]
    for s in (s for e in played for s in e.steps):
        first, end = s.deciding
        # the tokens before EOS after the last "=" (the character tokenizer: one character each)
        assert end == len(s.tokens) - (not s.truncated)
        assert team[0].decode(s.tokens[first:end]) == relay.tail(s.text)
    # the update's mask of them, shifted as its loss mask is, holds exactly those tokens
    data = losses.agent_batch(played, 0, torch.zeros(len(played)), 0, torch.device("cpu"))
    spans = [s.tokens[s.deciding[0] : s.deciding[1]] for e in played for s in e.steps if s.agent == 0]
    assert data["ids"][:, 1:][data["decide"].bool()].tolist() == [x for span in spans for x in span]
    assert (data["decide"] <= data["mask"]).all()
    # a task that cannot tell gives none
    assert rollout.deciding_span(team[0], object(), [5, 1], "", False) is None
