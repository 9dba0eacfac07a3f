"""--tracker and transcripts: TensorBoard's event files and an offline wandb run hold what
metrics.jsonl holds, a missing package is one line, and every evaluation writes its transcripts."""

import glob
import json
import os
import subprocess
import sys
import zlib

import pytest

import tasks
import train
from plumbing import tracking
from rollout import Episode, Step
from tasks.base import Question, final_answer
from tasks.mathtask import MathTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--agents 2 --stages 2 --warmup-steps 2 --questions 4 --group 2 --eval-size 8 --epochs 1".split()


def run(*args, cwd, env=None):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return out


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def logged_as(record: dict) -> dict:
    """A record's metrics as the tracker should log them: the indices left out, an update's
    unprefixed keys under agent{i}/, nothing not measured."""
    return {
        key if "/" in key else f"agent{record['agent']}/{key}": v
        for key, v in record.items()
        if key not in ("stage", "update", "agent") and v is not None
    }


def expected_scalars(records: list[dict]) -> dict:
    """{(name, stage): value} over a run's records, each name once per stage."""
    out = {}
    for r in records:
        for name, v in logged_as(r).items():
            assert (name, r["stage"]) not in out, f"{name} logged twice at stage {r['stage']}"
            out[name, r["stage"]] = v
    return out


def test_tensorboard_holds_every_record_the_config_and_the_transcripts(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run("--name", "tb", "--tracker", "tensorboard", *TINY, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "tb"
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    expected = expected_scalars(read_jsonl(run_dir / "metrics.jsonl"))
    assert logged.keys() == expected.keys()
    # TensorBoard keeps float32
    assert all(logged[k] == pytest.approx(v, rel=1e-6, abs=1e-30) for k, v in expected.items())
    assert {("agent1/batch_reward", 1), ("stage/eval_acc", 2)} <= logged.keys()
    # the config in the HParams tab
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    saved = json.loads((run_dir / "config.json").read_text())
    assert hparams["mode"].string_value == "teamtr" and hparams["lr"].number_value == saved["lr"]
    # one text card per transcript episode, at every evaluation
    rows = read_jsonl(run_dir / "transcripts.jsonl")
    for j in range(tracking.TRANSCRIPTS):
        texts = events.Tensors(f"transcripts/episode{j}/text_summary")
        assert [t.step for t in texts] == [0, 1, 2]
        shown = texts[-1].tensor_proto.string_val[0].decode()
        row = next(r for r in rows if r["stage"] == 2 and r["episode"] == j)
        assert row["question"] in shown and f"(gold {row['gold']})" in shown


def test_compare_gives_each_of_its_runs_a_tracker_run_and_transcripts(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--mode", "compare", "--modes", "teamtr,stale", "--seeds", "1", "--tracker", "tensorboard"]
    run(*args, "--name", "cmp", *TINY, "--stages", "1", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "cmp"
    assert sorted(os.listdir(run_dir / "tensorboard")) == ["stale-n2-s0", "teamtr-n2-s0"]
    for name in ("stale-n2-s0", "teamtr-n2-s0"):
        events = EventAccumulator(str(run_dir / "tensorboard" / name))
        events.Reload()
        accs = [r["stage/eval_acc"] for r in read_jsonl(run_dir / f"{name}.jsonl") if "stage/eval_acc" in r]
        assert [e.value for e in events.Scalars("stage/eval_acc")] == pytest.approx(accs)
        assert len(read_jsonl(run_dir / f"{name}.transcripts.jsonl")) == 2 * tracking.TRANSCRIPTS


def wandb_records(path) -> list:
    """The records of an offline run's .wandb file: W&B's 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks, each with a CRC-32 seeded by its type, its length and its type: 1
    a whole record, 2, 3 and 4 its first, middle and last parts)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, records, pending = open(path, "rb").read(), 7, [], b""
    while pos + 7 <= len(data):
        # a block's tail too short for a chunk header is padding
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = (
            int.from_bytes(data[pos : pos + 4], "little"),
            int.from_bytes(data[pos + 4 : pos + 6], "little"),
            data[pos + 6],
        )
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pending, pos = pending + chunk, pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_run_holds_every_record_the_config_and_the_transcripts(tmp_path):
    # every folder wandb writes in, under tmp_path
    homes = {f"WANDB_{k}_DIR": str(tmp_path / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), **homes}
    run("--name", "wb", "--tracker", "wandb", *TINY, cwd=tmp_path, env=env)
    (folder,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    records = wandb_records(path)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    saved = json.loads((tmp_path / "runs" / "wb" / "config.json").read_text())
    assert start.display_name == "wb" and {k: config[k] for k in ("mode", "lr")} == {
        k: saved[k] for k in ("mode", "lr")
    }
    # one history row per record, and one per evaluation's transcripts: {"/".join(nested key): value}
    rows = [
        {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    metrics = read_jsonl(tmp_path / "runs" / "wb" / "metrics.jsonl")
    logged = [row for row in rows if "transcripts/path" not in row]
    assert len(logged) == len(metrics)
    for row, record in zip(logged, metrics):
        assert row["stage"] == record["stage"]
        assert {name: row[name] for name in logged_as(record)} == pytest.approx(logged_as(record))
    # the transcripts as a table per evaluation
    transcripts = read_jsonl(tmp_path / "runs" / "wb" / "transcripts.jsonl")
    tables = [row for row in rows if "transcripts/path" in row]
    assert [row["stage"] for row in tables] == [0, 1, 2]
    for row in tables:
        with open(os.path.join(folder, "files", row["transcripts/path"])) as f:
            table = json.load(f)
        assert [r[:3] for r in table["data"]] == [
            [t["stage"], t["episode"], t["question"]] for t in transcripts if t["stage"] == row["stage"]
        ]
    # the same run (one subprocess less) checks the transcripts file itself
    check_transcripts(tmp_path / "runs" / "wb")


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_line_exit_2_and_nothing_written(
    tmp_path, monkeypatch, capsys, name
):
    # the import fails as when the package is not installed
    monkeypatch.setitem(sys.modules, tracking.MODULES[name][0], None)
    with pytest.raises(SystemExit) as stop:
        train.main(["--tracker", name, "--out-dir", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert f"--tracker {name} needs the {name} package" in err and f"pip install {name}" in err
    assert not (tmp_path / "out").exists()


def check_transcripts(run_dir):
    """Every evaluation wrote its first greedy episodes as transcripts (the relay's roles and
    grading); without --tracker tensorboard, no tensorboard folder."""
    rows = read_jsonl(run_dir / "transcripts.jsonl")
    assert [(r["stage"], r["episode"]) for r in rows] == [(s, j) for s in range(3) for j in range(4)]
    assert not (run_dir / "tensorboard").exists()
    for r in rows:
        assert r.keys() == {"stage", "episode", "question", "messages", "answer", "gold", "reward"}
        assert [m["role"] for m in r["messages"]] == ["agent0", "agent1"]
        assert r["answer"] == final_answer(r["messages"][-1]["text"])
        # the relay's reward: the answer is the gold one
        assert r["reward"] == float(r["answer"] == r["gold"])
    # the same held-out questions at every evaluation
    assert [r["question"] for r in rows[:4]] == [r["question"] for r in rows[-4:]]
    assert len({r["question"] for r in rows}) == 4


def test_transcripts_name_a_math_task_role_and_grade_the_last_message():
    # a math task's roles and its answer: the last \boxed{...}
    roles = [{"name": "solver"}, {"name": "finalizer"}]
    task = type("Task", (), {"roles": roles, "answer": MathTask.answer})()
    steps = [Step(0, [], [], [], "It is 3."), Step(1, [], [], [], "No: \\boxed{4}")]
    played = [
        Episode(Question("2+2?", "4"), qid=q, sample=0, order=[0, 1], steps=steps, reward=1.0)
        for q in range(6)
    ]
    (row, *rest) = tracking.transcripts(task, played, stage=5)
    assert len(rest) == tracking.TRANSCRIPTS - 1
    assert row == {
        "stage": 5,
        "episode": 0,
        "question": "2+2?",
        "messages": [{"role": "solver", "text": "It is 3."}, {"role": "finalizer", "text": "No: \\boxed{4}"}],
        "answer": "4",
        "gold": "4",
        "reward": 1.0,
    }


def test_a_relay_transcript_grades_the_value_the_reward_reads():
    relay = tasks.Relay(2, work=1)
    for text, answer in (("4+1=5", "5"), ("4+1=", "")):
        steps = [Step(0, [], [], [], "3+1=4"), Step(1, [], [], [], text)]
        played = [Episode(Question("3+1+1", "5", ("4", "5"), ("+1", "+1")), 0, 0, [0, 1], steps)]
        # a message cut before its value says nothing, not the operation's "1"
        assert tracking.transcripts(relay, played, stage=0)[0]["answer"] == answer
