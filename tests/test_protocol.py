"""The paper's protocol, offline: a training set apart from the benchmarks (read by their columns,
hub names that fail in one line without network), the benchmarks evaluated whole during training
and by eval.py (avg@K, pass@k with standard errors), per-agent learning rates, radii and message
lengths, and the plain format of a base model (BOS first)."""

import dataclasses
import json

import pytest
import torch
from chat_models import save_chat_model
from conftest import random_rewards
from test_real_cli import FIXTURE, TINY
from test_train_cli import run

import config
import eval as evaluation
import rollout
import tasks
import team as team_lib
import teamtr
from plumbing import cli
from tasks import base, mathdata, mathtask
from tasks.base import Question, TaskError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def bench(tmp_path):
    """A benchmark of 6 questions, 2 of them training questions of the fixture (other case, spacing)."""
    rows = [r for r in map(json.loads, open(FIXTURE)) if not base.is_heldout(r["question"])][:2]
    rows = [{"problem": "  " + r["question"].upper(), "answer": r["answer"]} for r in rows]
    rows += [{"problem": f"What is {a} times 3?", "answer": str(3 * a)} for a in range(4)]
    return write_jsonl(tmp_path / "bench.jsonl", rows)


def task_cfg(**kw):
    base = dict(task=f"jsonl:{FIXTURE}", agents=2, questions=4, model="x", max_new_tokens=8)
    return config.resolve(config.Config(**{**base, **kw}))


def test_a_benchmark_never_contributes_training_questions(bench):
    alone, with_bench = mathtask.make(task_cfg()), mathtask.make(task_cfg(eval_tasks=f"jsonl:{bench}"))
    benchmark = with_bench.benchmarks["bench"]
    assert len(benchmark) == 6
    keys = {mathdata.key(q.text) for q in benchmark}
    # the two shared questions were training questions before, and no longer are
    assert len([q for q in alone.pool if mathdata.key(q.text) in keys]) == 2
    assert not [q for q in with_bench.pool if mathdata.key(q.text) in keys]
    assert len(with_bench.pool) == len(alone.pool) - 2 and with_bench.held == alone.held
    # every stage's draw comes from the pool
    drawn = {q.text for s in range(20) for q in with_bench.train_questions(4, s)}
    assert not {mathdata.key(t) for t in drawn} & keys


def test_training_on_a_benchmark_itself_is_refused(bench):
    with pytest.raises(TaskError, match="0 training questions without the --eval-tasks questions"):
        mathtask.make(task_cfg(task=f"jsonl:{bench}", eval_tasks=f"jsonl:{bench}"))


def test_rows_are_read_by_their_columns_dapo_prompts_and_gsm8k_golds(tmp_path):
    import datasets

    prompt = (
        "Solve the following math problem step by step. The last line of your response should be of "
        "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        'What is 6 times 7?\n\nRemember to put your answer on its own line after "Answer:".'
    )
    dapo = [{"prompt": [{"role": "user", "content": prompt}], "reward_model": {"ground_truth": "42"}}] * 3
    datasets.Dataset.from_list(dapo).to_parquet(str(tmp_path / "dapo.parquet"))
    assert mathdata.local_file(f"parquet:{tmp_path / 'dapo.parquet'}") == [
        Question("What is 6 times 7?", "42")
    ]
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "3 + 4 = 7\n#### 7"}])
    aime = write_jsonl(tmp_path / "a.jsonl", [{"problem": "P?", "answer": 204, "id": 1}])
    assert mathdata.benchmark(f"jsonl:{gsm}") == [Question("Q?", "7")]
    assert mathdata.benchmark(f"jsonl:{aime}") == [Question("P?", "204")]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "Q?"}])
    with pytest.raises(TaskError, match="'prompt' and 'reward_model'"):
        mathdata.local_file(f"jsonl:{bad}")


@pytest.mark.parametrize("name", ["dapo17k", "deepscaler", "gsm8k", "aime24", "math500"])
def test_hub_names_fail_offline_in_one_line_naming_the_local_file(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError) as e:
        mathdata.load_questions(name)
    assert "\n" not in str(e.value) and "pass a local file" in str(e.value) and "parquet:PATH" in str(e.value)
    assert mathdata.HUB[name][0] in str(e.value)


def test_bad_eval_tasks_and_per_agent_lists_are_refused_in_one_line(capsys):
    for argv, message in [
        ("--eval-tasks aime24", "the relay has its held-out set"),
        ("--model M --task words --eval-tasks dapo17k", "'dapo17k' is not a benchmark"),
        ("--model M --task words --eval-tasks words,words", "names a task twice"),
        ("--agents 3 --lr 1e-3,2e-3", "--lr gives 2 values, one per agent: needs --agents 2"),
        ("--agents 2 --delta 0.01,-1", "--delta must be positive, got -1.0"),
        (
            "--mode compare --agents 2,3 --max-new-tokens 4,4",
            "--max-new-tokens gives one value per agent: it needs one team size",
        ),
    ]:
        with pytest.raises(SystemExit) as stop:
            cli.parse("train", argv.split())
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1


def test_ks_pass_at_k_and_standard_errors():
    assert (
        evaluation.ks(16) == [1, 2, 4, 8, 16] and evaluation.ks(6) == [1, 2, 4, 6] and evaluation.ks(1) == [1]
    )
    # 4 samples, 1 correct: pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert evaluation.pass_at_k(4, 1, 2) == 0.5 and evaluation.pass_at_k(4, 3, 2) == 1.0
    mean, se = evaluation.mean_se([0.0, 1.0, 1.0, 0.0])
    # sample standard deviation sqrt(1/3), over sqrt(4)
    assert mean == 0.5 and abs(se - (1 / 3) ** 0.5 / 2) < 1e-12


def test_benchmarks_are_logged_during_training_and_eval_prints_each_table(tmp_path, bench):
    models = [save_chat_model(tmp_path / a, a) for a in ("llama", "qwen2")]
    args = (
        f"--task jsonl:{FIXTURE} --eval-tasks jsonl:{bench} --models {','.join(models)} --agents 2 --name r"
    )
    out = run("train.py", *args.split(), *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    records = [
        json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    evaluated = [r for r in records if "stage/eval_acc" in r]
    assert [r["stage"] for r in evaluated] == [0, 1] and all("stage/eval_acc/bench" in r for r in evaluated)
    printed = run(
        "eval.py",
        str(tmp_path / "runs" / "r"),
        "--tasks",
        f"heldout,jsonl:{bench}",
        "--samples",
        "4",
        cwd=tmp_path,
    )
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert "bench: 6 questions, 4 samples each (temperature 1.0, top-p 1.0)" in lines
    table = lines[lines.index("bench: 6 questions, 4 samples each (temperature 1.0, top-p 1.0)") + 1 :][:6]
    assert table[0].split() == ["metric", "team", "of", "2", "agent0", "alone"]
    assert [row.split()[0] for row in table[1:6]] == ["greedy", "avg@4", "pass@1", "pass@2", "pass@4"]
    # the team's greedy accuracy is the one training logged after its last stage
    greedy = float(table[1].split()[1])
    assert abs(greedy - evaluated[-1]["stage/eval_acc/bench"]) < 1e-4
    # avg@4 is pass@1, and pass@k grows with k
    cells = {row.split()[0]: float(row.split()[1]) for row in table[1:6]}
    assert cells["avg@4"] == cells["pass@1"] <= cells["pass@2"] <= cells["pass@4"]


def test_per_agent_learning_rates_radii_and_message_lengths(cfg):
    training = team_lib.Training.of(config.Config(lr=[1e-3, 2e-3, 5e-4]))
    tok = team_lib.char_tokenizer(tasks.CHARS)
    team = team_lib.clone_team(team_lib.tiny_model(tok, hidden=32), tok, 3, training)
    assert [a.optimizer.param_groups[0]["lr"] for a in team] == [1e-3, 2e-3, 5e-4]
    relay = tasks.Relay(3)
    relay.max_new_tokens = [1, 3, 2]
    eps = rollout.new_episodes(tasks.questions(relay, 4, 0, False), 4, 3, 1, "fixed", 0)
    played = rollout.play(team, relay, eps, rollout.Settings(1.0, 0))[0]
    assert max(len(e.steps[t].tokens) for e in played for t in range(3)) <= 3
    assert [max(len(e.steps[t].tokens) for e in played) for t in range(3)] == [1, 3, 2]
    # each agent's update stays inside its own radius
    rewarded, radii = random_rewards(played), [0.002, 0.05, 0.01]
    per_agent = dataclasses.replace(cfg, delta=radii)
    kls = [teamtr.update_agent(team[i], i, rewarded, per_agent, seed=0).metrics["kl_rev"] for i in range(3)]
    assert all(kl <= d for kl, d in zip(kls, radii)) and kls[1] > radii[0]


def test_a_tokenizer_without_a_chat_template_gets_bos_then_the_plain_format(tmp_path):
    tok = team_lib.char_tokenizer("abc ")
    agent = team_lib.Agent("a", torch.nn.Linear(1, 1), tok, None)
    messages = [{"role": "system", "content": "ab"}, {"role": "user", "content": "c"}]
    assert agent.encode(messages) == tok("ab\n\nc\n\n", add_special_tokens=False)["input_ids"]
    tok.add_special_tokens({"bos_token": "<s>"})
    assert agent.encode(messages)[0] == tok.bos_token_id
    assert agent.encode(messages)[1:] == tok("ab\n\nc\n\n", add_special_tokens=False)["input_ids"]


def test_thinking_switches_a_qwen3_templates_rendering(tmp_path):
    model, tok = team_lib.load_model(save_chat_model(tmp_path, "qwen3"), "cpu", torch.float32)
    agent = team_lib.make_agent("agent0", model, tok)
    rendered = {}
    for thinking in ("off", "on"):
        task = mathtask.make(task_cfg(thinking=thinking))
        rendered[thinking] = tok.decode(agent.encode(task.context(task.pool[0], [], 0), task.chat))
    assert rendered["on"].endswith("<|im_start|>assistant\n")
    assert rendered["off"] == rendered["on"] + "<think>\n\n</think>\n\n"


def test_a_per_agent_list_is_a_tensorboard_hyperparameter(tmp_path):
    from plumbing import tracking

    tracker = tracking.start(config.Config(tracker="tensorboard", agents=2, lr=[1e-3, 2e-3]), str(tmp_path))
    tracker.metrics({"stage": 0, "stage/eval_acc": 0.5})
    tracker.close()
    assert list((tmp_path / "tensorboard").iterdir())


def test_a_verl_prompt_gives_its_user_message_and_keeps_a_problems_own_paragraphs():
    prompt = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": "Solve the following math problem step by step.\n\nLine one.\n\nLine two.",
        },
    ]
    assert mathdata.dapo_problem(prompt) == "Line one.\n\nLine two."


def test_eval_tasks_naming_the_training_set_scores_only_its_held_out_part():
    cfg = task_cfg()
    task = tasks.make(cfg)
    sets = evaluation.benchmark_sets(f"jsonl:{FIXTURE},heldout", cfg, task, 4)
    part = sets["math (held-out part)"]
    # the questions training never drew, and all of them
    assert part and all(base.is_heldout(q.text) for q in part)
    assert len(part) == len(mathdata.load_questions(cfg.task)[1])
    assert not {q.text for q in part} & {q.text for q in task.pool}
