"""The real scripts as subprocesses, with tiny budgets."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import config
import train
from plumbing import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--stages 1 --warmup-steps 2 --questions 4 --group 2 --eval-size 8 --epochs 1".split()


def run(script, *args, cwd):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_writes_a_run_directory_and_eval_reads_it(tmp_path):
    out = run("train.py", "--agents", "2", "--mode", "teamtr", "--name", "tiny", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "config.json").read_text())["resample"] == "fresh"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "update" in r]
    stages = [r for r in records if "stage/certificate" in r]
    assert len(updates) == 2 and {"agent0/kl_rev", "agent0/stale_gap"} <= set(updates[0])
    assert len(stages) == 1 and {
        "stage/eval_acc",
        "stage/realized_gain",
        "stage/turns",
        "stage/tokens",
    } <= set(stages[0])
    for agent in ("agent0", "agent1"):
        assert (run_dir / agent / "config.json").exists() and (run_dir / agent / "model.safetensors").exists()
    assert "held-out accuracy" in (run_dir / "summary.md").read_text()
    assert "starting team" in out.stdout and "trained team" in out.stdout
    evaluated = run("eval.py", str(run_dir), "--samples", "2", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "heldout: 8 questions" in evaluated.stdout and "pass@2" in evaluated.stdout


@pytest.mark.parametrize("mode", ["stale", "naive", "fresh-no-tr", "happo", "single", "none"])
def test_every_mode_runs(tmp_path, monkeypatch, mode):
    # in this process (train.main), as the command line runs it
    monkeypatch.chdir(tmp_path)
    train.main(["--agents", "2", "--mode", mode, *TINY])
    (run_dir,) = (tmp_path / "runs").iterdir()
    agents = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("agent"))
    assert agents == (["agent0"] if mode == "single" else ["agent0", "agent1"])


@pytest.mark.parametrize(
    "args",
    [
        ["--agents", "0"],
        ["--mode", "bogus"],
        ["--delta", "-1"],
        ["--group", "1"],
        ["--agents", "x"],
        ["--agents", "2,4"],
        ["--seeds", "2"],
        ["--mode", "compare", "--modes", "teamtr,bogus"],
        ["--mode", "compare", "--modes", "stale,stale"],
        ["--codes", "--model", "some/model"],
        ["--code-links", "0.5"],
        ["--codes", "--code-links", "1.5"],
        ["--work", "2", "--model", "some/model"],
        ["--work", "2", "--task", "words", "--init", "runs/x"],
        ["--work", "-1"],
        ["--radius", "sentence"],
        ["--top-p", "0.9"],
        ["--temperature", "0"],
        ["--lr", "0"],
        ["--mode", "naive", "--shared-prefix"],
        ["--mode", "stale", "--no-early-exit"],
        ["--shared-prompt", "-1"],
        ["--name", "../elsewhere"],
        ["--prompts", "roles.json"],
        ["--lora-rank", "2", "--lora-targets", "zzz"],
    ],
)
def test_bad_flags_give_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, args):
    # in this process (train.main), as a subprocess would run it: the suite's time goes to training
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert not (tmp_path / "runs").exists()


def test_an_existing_run_is_never_overwritten(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "keep.txt").write_text("mine")
    out = run("train.py", "--name", "taken", *TINY, cwd=tmp_path)
    assert out.returncode == 2 and "exists" in out.stderr
    assert os.listdir(tmp_path / "runs" / "taken") == ["keep.txt"]


@pytest.mark.parametrize("tool", ["theory", "bench", "gpu_check"])
def test_a_tool_moved_into_tools_says_its_new_command_in_one_line(tmp_path, tool):
    out = run(f"{tool}.py", "--stages", "2", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == "" and not os.listdir(tmp_path)
    assert out.stderr == f"{tool}.py moved: python -m tools.{tool} --stages 2\n"


def test_every_flag_has_a_doc_a_help_group_and_its_checks_beside_its_field():
    groups = config.documented_groups()
    assert list(groups) == [
        "run",
        "team and task",
        "tiny agents and the relay",
        "rollouts",
        "update",
        "diagnostics",
    ]
    named = [name for docs in groups.values() for name in docs]
    fields = [f.name for f in dataclasses.fields(config.Config)]
    assert sorted(named) == sorted(fields) and len(set(named)) == len(named)
    assert all(doc and "  " not in doc for docs in groups.values() for doc in docs.values())
    help_text = cli.parser("train").format_help()
    assert all(f"\n{group}:\n" in help_text for group in groups)
    assert help_text.index("--mode") < help_text.index("--hidden") < help_text.index("--delta")


def test_a_value_outside_what_its_field_accepts_is_refused(capsys):
    for argv, message in [
        (["--temperature", "-1"], "--temperature must be at least 0.0, got -1.0"),
        (["--top-p", "0.9"], "--top-p: training samples the whole distribution at --temperature"),
        (["--top-p=0.9"], "--top-p: training samples the whole distribution at --temperature"),
        (["--temperature", "0"], "--temperature 0 samples every group's messages alike"),
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--agents", "2,0", "--mode", "compare"], "--agents must be at least 1, got 0"),
        (["--kl", "forward"], "argument --kl: invalid choice: 'forward'"),
    ]:
        with pytest.raises(SystemExit) as stop:
            cli.parse("train", argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_run_saved_with_top_p_below_1_is_not_resumed(tmp_path, capsys):
    # a run started before training refused --top-p: its config.json still holds it
    saved = {**dataclasses.asdict(config.Config()), "top_p": 0.9}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as stop:
        cli.parse("train", ["--resume", str(tmp_path)])
    assert (
        stop.value.code == 2
        and "samples with --top-p 0.9, which training no longer takes" in capsys.readouterr().err
    )
