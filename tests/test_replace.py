"""Component replacement (replace.py): --init a saved team, --replace one agent, Stage-0 alignment."""

import json
import os

import pytest
from chat_models import save_chat_model
from safetensors.torch import load_file
from test_real_cli import FIXTURE
from test_train_cli import run

import train

BASE = "--agents 2 --warmup-steps 5 --questions 4 --group 2 --eval-size 8 --epochs 1".split()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained two-agent team, and a differently seeded warm-up to swap in."""
    cwd = tmp_path_factory.mktemp("replace")
    for args in (["--stages", "1", "--name", "team"], ["--mode", "none", "--seed", "1", "--name", "other"]):
        out = run("train.py", *BASE, *args, cwd=cwd)
        assert out.returncode == 0, out.stderr
    return cwd


def weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("align_steps", [5, 0])
def test_only_the_new_agent_moves_in_stage_0(saved, align_steps):
    name = f"swap{align_steps}"
    out = run(
        "train.py",
        *BASE,
        *"--stages 0 --init runs/team --replace 1=runs/other/agent1 --align-steps".split(),
        str(align_steps),
        "--name",
        name,
        cwd=saved,
    )
    assert out.returncode == 0, out.stderr
    runs = saved / "runs"
    record = json.loads((runs / name / "metrics.jsonl").read_text().splitlines()[0])
    assert {"replace/before", "replace/swapped"} <= set(record) and ("replace/imitated" in record) == (
        align_steps > 0
    )
    assert "agent1 replaced by" in out.stdout
    kept, new = weights(runs / name / "agent0"), weights(runs / name / "agent1")
    # agent0 is bit-identical
    assert all((kept[k] == weights(runs / "team" / "agent0")[k]).all() for k in kept)
    same = all((new[k] == weights(runs / "other" / "agent1")[k]).all() for k in new)
    # aligned, or swapped as it came
    assert same == (align_steps == 0)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--replace", "1=runs/other/agent1"],
            "--replace swaps an agent of a saved team: give the team with --init RUN_DIR",
        ),
        (["--init", "runs/nowhere"], "--init runs/nowhere: no such run directory"),
        (
            ["--init", "runs/team", "--replace", "2=runs/other/agent1"],
            "--replace expects i=PATH with 0 <= i < --agents 2, got '2=runs/other/agent1'",
        ),
        (["--init", "runs/team", "--replace", "1=runs/missing"], "runs/missing"),
        (["--init", "runs/team", "--agents", "3"], "--init"),
        (
            ["--init", "runs/team", "--task", "words"],
            "its team (tiny agents) was trained on --task relay, and this run's --task is words",
        ),
    ],
)
def test_bad_replacement_inputs_are_one_line_exit_2(saved, monkeypatch, capsys, args, message):
    before = sorted(p.name for p in (saved / "runs").iterdir())
    # in this process, as the command line runs it; a repeated flag takes its last value
    monkeypatch.chdir(saved)
    with pytest.raises(SystemExit) as stop:
        train.main([*BASE, *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in (saved / "runs").iterdir()) == before


def test_a_saved_real_model_team_continues_and_swaps_in_an_agent_of_another_family(tmp_path):
    models = [save_chat_model(tmp_path / arch, arch) for arch in ("llama", "qwen2", "gemma3")]
    real = f"--task jsonl:{FIXTURE} --max-new-tokens 8 --eval-size 4".split()
    out = run(
        "train.py",
        *BASE,
        *real,
        "--models",
        ",".join(models[:2]),
        "--stages",
        "1",
        "--name",
        "team",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    runs = tmp_path / "runs"
    trained = [json.loads(line) for line in (runs / "team" / "metrics.jsonl").read_text().splitlines()]
    # continued: the saved team itself, so its first evaluation is the one the saved run ended with
    out = run(
        "train.py", *BASE, *real, "--init", "runs/team", "--stages", "1", "--name", "more", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    first = json.loads((runs / "more" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["stage/eval_acc"] == [r for r in trained if "stage/eval_acc" in r][-1]["stage/eval_acc"]
    # agent1 (Qwen2, the ChatML tokenizer) swapped for a Gemma 3 with its own tokenizer and template
    swap = f"--init runs/team --replace 1={models[2]} --align-steps 3 --stages 1 --name swap".split()
    out = run("train.py", *BASE, *real, *swap, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    record = json.loads((runs / "swap" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"replace/before", "replace/swapped", "replace/imitated", "replace/steps"} <= set(record)
    with open(runs / "swap" / "agent1" / "config.json") as f:
        assert json.load(f)["model_type"] == "gemma3_text"
    assert os.path.exists(runs / "swap" / "agent1" / "tokenizer.json")
