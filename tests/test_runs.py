"""Run plumbing: determinism, resume after SIGKILL or Ctrl-C, atomic checkpoints, a failed
checkpoint write, compare resume, and bad run inputs as one line, exit 2, nothing written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TORCH_SAVE, disk_full_at
from test_train_cli import ROOT

import eval as evaluation
import train

RUN = "--agents 2 --stages 3 --warmup-steps 20 --questions 32 --group 8 --eval-size 16 --threads 1".split()
# timing and memory fields differ between runs
UNTIMED = ("stage/seconds", "rollout/tokens_per_second", "perf/")


def metrics(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in records]


def start(cwd, *args, preexec_fn=None):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def wait_for_update(run_dir, stage: int, proc):
    """Block until the run has logged an update of `stage` (so it is in the middle of that stage)."""
    path = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if path.exists() and any(
            f'"stage": {stage}, "update"' in line for line in path.read_text().splitlines()
        ):
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended before stage {stage}: {proc.stderr.read()}")


def test_same_seed_same_metrics_and_a_killed_run_resumes_to_them(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *RUN, "--name", "a"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    runs_dir = tmp_path / "runs"
    assert [p.name for p in (runs_dir / "a").iterdir() if p.name.startswith("checkpoint")] == [
        "checkpoint-stage3"
    ]

    proc = start(tmp_path, *RUN, "--name", "killed")
    killed = runs_dir / "killed"
    wait_for_update(killed, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # mid stage 2
    assert [p.name for p in killed.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-stage1"]
    # as if it had also died writing stage 2's checkpoint
    (killed / "checkpoint-stage2.tmp").mkdir()
    (killed / "checkpoint-stage2.tmp" / "state.pt").write_bytes(b"half")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(killed)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "resumed after stage 1" in out.stdout
    # not the whole run's time
    assert "since the resume after stage 1" in (killed / "summary.md").read_text()
    # determinism on one machine: the killed run played stage 1 afresh, the resumed one stages 2-3
    assert metrics(killed) == metrics(runs_dir / "a")
    assert not (killed / "checkpoint-stage2.tmp").exists()
    for i in range(2):
        resumed, straight = (
            (killed / f"agent{i}" / "model.safetensors").read_bytes(),
            (runs_dir / "a" / f"agent{i}" / "model.safetensors").read_bytes(),
        )
        assert resumed == straight
    summary = (runs_dir / "a" / "summary.md").read_text()
    again = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(runs_dir / "a")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        again.returncode == 2
        and "the run is finished" in again.stderr
        and len(again.stderr.strip().splitlines()) == 1
    )
    # a finished run is not rewritten
    assert (runs_dir / "a" / "summary.md").read_text() == summary


def ignore_sigint():
    """The child starts with SIGINT ignored, as a background job of a non-interactive shell does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_cleanly_and_print_the_resume_command(tmp_path, signum, code):
    # the disposition is set here, so the result cannot depend on how the suite was launched
    proc = start(tmp_path, *RUN, "--name", "stopped", preexec_fn=ignore_sigint)
    wait_for_update(tmp_path / "runs" / "stopped", 1, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert (
        err.strip().splitlines()[-1].endswith(f"python train.py --resume {os.path.join('runs', 'stopped')}")
    )


@pytest.mark.parametrize(
    "where, kept",
    [
        # the tracker's start and the stage-0 evaluation: before checkpoint-stage0 is written
        ("tracking.start", False),
        ("loop.evaluate", False),
        # the trained team's summary, after the last checkpoint
        ("train.write_summary", True),
    ],
)
def test_an_interrupt_keeps_the_run_only_where_a_checkpoint_holds_it(
    tmp_path, monkeypatch, capsys, where, kept
):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module, name = where.split(".")
    monkeypatch.setattr(train if module == "train" else getattr(train, module), name, interrupted)
    small = "--agents 2 --stages 1 --warmup-steps 2 --questions 4 --group 2 --eval-size 4".split()
    with pytest.raises(SystemExit) as stop:
        train.main([*small, "--name", "early"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 130
    if kept:
        command = f"python train.py --resume {os.path.join('runs', 'early')}"
        assert err.endswith(command)
        # a stop while that command loads the checkpoint prints it again
        monkeypatch.setattr(train.runs, "load_checkpoint", interrupted)
        with pytest.raises(SystemExit) as stop:
            train.main(command.split()[2:])
        assert stop.value.code == 130 and capsys.readouterr().err.strip().endswith(command)
        # and the command finishes the run
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
        train.main(["--resume", os.path.join("runs", "early")])
        assert (tmp_path / "runs" / "early" / "agent1" / "model.safetensors").exists()
    else:
        assert "--resume" not in err and "before the first checkpoint: nothing was kept" in err
        # the same --name is free again
        assert not (tmp_path / "runs" / "early").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "save", disk_full_at(2))
    small = "--agents 2 --stages 2 --warmup-steps 2 --questions 4 --group 2 --eval-size 4".split()
    with pytest.raises(SystemExit) as stop:
        train.main([*small, "--name", "full"])
    # after the progress bars
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 1 and err.startswith(
        "train.py: error: could not write the checkpoint of stage 2 (No space left on device)"
    )
    assert err.endswith(
        f"checkpoint-stage1 is intact; python train.py --resume {os.path.join('runs', 'full')}"
    )
    run_dir = tmp_path / "runs" / "full"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-stage1"
    ]
    monkeypatch.setattr(torch, "save", TORCH_SAVE)
    train.main(["--resume", str(run_dir)])
    assert [r["stage"] for r in metrics(run_dir) if "stage/certificate" in r] == [1, 2]
    assert (run_dir / "agent1" / "model.safetensors").exists()


def test_compare_resumes_skipping_the_runs_it_finished(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = (
        "--mode compare --modes none,teamtr --seeds 1 --agents 2 "
        "--stages 1 --warmup-steps 2 --questions 4 --group 2 --eval-size 4 --name cmp"
    ).split()
    train_mode, trained = train.compare.train_mode, []

    def interrupted_second(cfg, *rest):
        trained.append(cfg.mode)
        if len(trained) == 2:
            raise KeyboardInterrupt
        return train_mode(cfg, *rest)

    monkeypatch.setattr(train.compare, "train_mode", interrupted_second)
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    assert stop.value.code == 130 and "--resume" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "cmp"
    assert [r["mode"] for r in json.loads((run_dir / "results.json").read_text())] == ["none"]
    trained.clear()
    train.main(["--resume", str(run_dir)])
    # `none` finished before the interruption and is not trained again
    assert trained == ["teamtr"]
    assert [r["mode"] for r in json.loads((run_dir / "results.json").read_text())] == ["none", "teamtr"]
    assert "| 2 | teamtr |" in (run_dir / "compare.md").read_text()


def bad_run_inputs(tmp):
    (tmp / "afile").write_text("")
    (tmp / "notarun").mkdir()
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"mode": "teamtr", "agents": 2}))
    (broken / "checkpoint-stage1").mkdir()
    (broken / "checkpoint-stage1" / "state.pt").write_bytes(b"not a checkpoint")
    return {
        "out-dir under a file": (["--out-dir", str(tmp / "afile" / "runs")], "is a file, not a folder"),
        "out-dir not writable": (["--out-dir", "/proc/teamtr-runs"], "cannot write in /proc"),
        "resume a folder that is not a run": (["--resume", str(tmp / "notarun")], "not a run directory"),
        "resume a missing folder": (["--resume", str(tmp / "missing")], "not a run directory"),
        "resume an unreadable checkpoint": (["--resume", str(broken)], "checkpoint-stage1 cannot be read"),
        "resume with a flag that changes the run": (["--resume", str(broken), "--lr", "0.1"], "drop --lr"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "out-dir under a file",
        "out-dir not writable",
        "resume a folder that is not a run",
        "resume a missing folder",
        "resume an unreadable checkpoint",
        "resume with a flag that changes the run",
    ],
)
def test_bad_run_inputs_give_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    args, expected = bad_run_inputs(tmp_path)[case]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        train.main([*args, "--warmup-steps", "2"] if "--out-dir" in args else args)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "args, expected",
    [(["--samples", "-1"], "--samples and --size must be at least 0"), ([], "not a run directory")],
)
def test_eval_bad_inputs_give_one_line_exit_2(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as stop:
        evaluation.main([str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
