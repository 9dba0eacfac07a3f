"""Real math tasks: math-verify grading, answer extraction, data loading and splits, role prompts
rendered with each agent's chat template, truncation and context limits; tiny chat models."""

import json
import os

import pytest
from chat_models import save_chat_model

import config
import rollout
import tasks
import team as team_lib
from tasks import base, mathdata, mathtask

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "math.jsonl")


@pytest.mark.parametrize(
    "gold, message, right",
    [
        ("0.5", "so the answer is \\boxed{\\frac{1}{2}}", True),
        ("1000", "Answer: 1,000", True),
        ("3/4", "We get \\boxed{\\dfrac{3}{4}}.", True),
        ("\\frac{1}{2}", "it is 0.5", True),
        # a wrong answer
        ("18", "I think \\boxed{17}", False),
        # no answer at all
        ("7", "I do not know.", False),
        # malformed LaTeX: unbalanced, no box is closed
        ("2", "\\boxed{\\frac{1}{", False),
        # malformed LaTeX after Answer:
        ("2", "Answer: \\frac{", False),
    ],
)
def test_math_verify_grading(gold, message, right):
    assert mathtask.grade(gold, base.final_answer(message)) is right


def test_final_answer_prefers_the_last_box_then_answer_then_the_last_number():
    assert base.final_answer("\\boxed{1} then \\boxed{\\frac{2}{3}} Answer: 9") == "\\frac{2}{3}"
    assert base.final_answer("3 apples... Answer: 12.") == "12"
    assert base.final_answer("7 + 5 = 12, minus 3 is 9") == "9"
    assert base.final_answer("nothing here") == ""


def task_cfg(**kw):
    base = dict(task=f"jsonl:{FIXTURE}", agents=2, questions=4, model="x", max_new_tokens=8)
    return config.resolve(config.Config(**{**base, **kw}))


def test_a_local_file_is_split_by_hash_and_eval_size_is_respected():
    task = mathtask.make(task_cfg())
    train, held = {q.text for q in task.pool}, {q.text for q in task.heldout(1000)}
    assert len(train) + len(held) == 40 and not train & held and all(base.is_heldout(t) for t in held)
    assert len(task.heldout(3)) == 3 and task.heldout(3) == task.heldout(1000)[:3]
    # derived seeds reproduce
    assert task.train_questions(4, seed=1) == task.train_questions(4, seed=1)
    assert task.turns == 2 and task.max_new_tokens == 8


def test_words_task_is_generated_offline_and_graded():
    task = mathtask.make(task_cfg(task="words"))
    assert len(task.heldout(10**6)) >= 200 and len(task.pool) > 2000
    q = task.heldout(1)[0]
    assert task.reward(q, f"So the total is \\boxed{{{q.answer}}}.") == 1.0
    assert task.reward(q, f"\\boxed{{{int(q.answer) + 1}}}") == 0.0


def test_roles_come_from_the_prompts_file_and_label_the_transcript():
    task = mathtask.make(task_cfg(agents=3))
    assert [r["name"] for r in task.roles] == ["solver", "reviewer", "finalizer"]
    assert [r["name"] for r in mathtask.make(task_cfg(agents=2)).roles] == ["solver", "finalizer"]
    single = mathtask.make(task_cfg(mode="single"))
    assert single.turns == 1 and "alone" in single.context(single.heldout(1)[0], [], 0)[0]["content"]
    q = task.heldout(1)[0]
    # random order: agent 2 spoke first
    steps = [rollout.Step(2, [], [], [], "I say 5."), rollout.Step(0, [], [], [], "No, 6.")]
    system, user = task.context(q, steps, 1)
    assert (
        system["role"] == "system"
        and "reviewer" in system["content"]
        and task.roles[1]["instructions"] in system["content"]
    )
    assert (
        user["content"]
        == f"Problem: {q.text}\n\nThe team so far:\n\n[finalizer]:\nI say 5.\n\n[solver]:\nNo, 6."
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_agent_renders_with_its_own_chat_template_and_roles_follow_agents(tmp_path, arch):
    model, tok = team_lib.load_model(save_chat_model(tmp_path / arch, arch), "cpu", None)
    team = team_lib.clone_team(model, tok, 2, team_lib.Training(lr=1e-3))
    task = mathtask.make(task_cfg())
    eps = rollout.new_episodes(task.heldout(3), 2, 2, 1, "random", seed=0)
    played, counts = rollout.play(team, task, eps, rollout.Settings(1.0, 0))
    turns, cut = counts.turns, counts.truncated
    assert turns == 12 and cut == sum(s.truncated for e in played for s in e.steps)
    for e in played:
        for t, s in enumerate(e.steps):
            text = tok.decode(s.context)
            assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
            # the role belongs to the agent, not the turn
            assert f"You are the {task.roles[s.agent]['name']}" in text
            assert s.truncated == (len(s.tokens) == 8 and s.tokens[-1] != tok.eos_token_id)


def test_a_context_longer_than_the_model_is_a_clear_error(tmp_path):
    model, tok = team_lib.load_model(save_chat_model(tmp_path / "m"), "cpu", None)
    team = team_lib.clone_team(model, tok, 2, team_lib.Training(lr=1e-3))
    task = mathtask.make(task_cfg(max_new_tokens=1020))
    with pytest.raises(rollout.ContextTooLong, match="exceeds the model's maximum of 1024"):
        rollout.play(
            team, task, rollout.new_episodes(task.heldout(1), 1, 2, 1, "fixed", 0), rollout.Settings(1.0, 0)
        )


def test_prompts_need_enough_roles(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {"roles": [{"name": "a", "instructions": "x"}], "single": {"name": "s", "instructions": "y"}}
        )
    )
    with pytest.raises(base.TaskError, match="1 roles, fewer than --agents 2"):
        mathtask.make(task_cfg(prompts=str(path)))


def test_gsm8k_gold_is_after_the_hashes_and_parquet_files_load(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict(
        {
            "problem": [f"Add {i} and {i}." for i in range(40)],
            "answer": [f"{i} + {i} = {2 * i}\n#### {2 * i:,}" for i in range(40)],
        }
    )
    qs = mathdata.rows_to_questions(rows, "gsm8k")
    assert qs[7] == base.Question("Add 7 and 7.", "14") and mathtask.grade(qs[39].answer, "78")
    rows.to_parquet(tmp_path / "q.parquet")
    train, held = mathdata.load_questions(f"parquet:{tmp_path / 'q.parquet'}")
    assert sorted(q.text for q in train + held) == sorted(q.text for q in qs) and held


def test_roles_belong_to_agents_across_rounds():
    task = mathtask.make(task_cfg(rounds=2))
    assert task.turns == 4 and len(task.roles) == 2
    assert "team of 2" in task.context(task.heldout(1)[0], [], 1)[0]["content"]


def test_both_tasks_provide_what_the_task_protocol_lists():
    assert isinstance(mathtask.make(task_cfg()), tasks.Task)
    assert isinstance(mathtask.make(task_cfg(task="words")), tasks.Task)
    assert isinstance(tasks.make(config.Config()), tasks.Task)
    # a class without a reward is not a task
    assert not isinstance(object(), tasks.Task)
