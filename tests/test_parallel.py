"""Scale-out on torch.distributed (CPU, gloo, one thread per process): two processes, with whole or
sharded agents, write the metrics and weights of one, a killed or hung process ends the other in
one line, and the run resumes. Each torchrun launch is a few seconds of start-up on top of its
work, so each test launches as few as it can: the killed-and-resumed runs are the two-process runs
compared with one process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from test_runs import UNTIMED, wait_for_update
from test_train_cli import ROOT

RUN = (
    "--agents 3 --stages 3 --warmup-steps 30 "
    "--questions 12 --group 4 --minibatch 8 --eval-size 40 --threads 1"
).split()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def launch(cwd, *args, processes=2, **kwargs):
    command = (TORCHRUN if processes == 2 else [sys.executable]) + [os.path.join(ROOT, "train.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def numbers(path) -> list[dict]:
    """The records of a metrics file (or a run directory's metrics.jsonl), timing and memory aside."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in records]


def assert_close(a: list[dict], b: list[dict], tol: float = 1e-4):
    assert len(a) == len(b) and all(ra.keys() == rb.keys() for ra, rb in zip(a, b))
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            vb = rb[key]
            assert (va is None) == (vb is None), key
            assert va is None or abs(va - vb) <= tol, (ra["stage"], key, va, vb)


def weights_close(a_dir, b_dir, agents: int, tol: float = 1e-5):
    for i in range(agents):
        a, b = (load_file(d / f"agent{i}" / "model.safetensors") for d in (a_dir, b_dir))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < tol for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run in one process, uninterrupted."""
    cwd = tmp_path_factory.mktemp("straight")
    out = launch(cwd, *RUN, "--name", "p1", processes=1)
    assert out.returncode == 0, out.stderr
    return cwd / "runs"


def test_the_parallel_pieces_equal_their_one_process_values():
    out = subprocess.run(
        [*TORCHRUN, os.path.join(ROOT, "tests", "parallel_worker.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout


def test_eval_under_torchrun_prints_what_one_process_prints(straight):
    evaluate = [os.path.join(ROOT, "eval.py"), str(straight / "p1")]
    one = subprocess.run([sys.executable, *evaluate], capture_output=True, text=True, timeout=120)
    two = subprocess.run([*TORCHRUN, *evaluate], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "  greedy " in one.stdout and two.stdout == one.stdout


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of one worker process of a torchrun launcher (read from /proc: Linux)."""
    for pid in open(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read().split():
        if f"RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no rank {rank} under torchrun")


def start(cwd, name, *extra):
    return subprocess.Popen(
        [*TORCHRUN, os.path.join(ROOT, "train.py"), *RUN, "--name", name, *extra],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["data parallel", "fsdp"])
def test_a_killed_process_ends_the_other_and_the_resumed_run_writes_what_one_process_writes(
    tmp_path, straight, extra
):
    launcher = start(tmp_path, "killed", *extra)
    wait_for_update(tmp_path / "runs" / "killed", 2, launcher)
    os.kill(rank_pid(launcher, 1), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert len(ours) == 1 and ours[0].endswith("torchrun --nproc-per-node 2 train.py --resume runs/killed"), (
        err[-3000:]
    )
    # no traceback from the surviving process (torchrun's own report follows)
    assert "[rank0]" not in err
    out = launch(tmp_path, "--resume", "runs/killed")
    assert out.returncode == 0, out.stderr[-3000:]
    # stages 0-3, the metrics of one process; every checkpoint and the end checked that the ranks
    # agree, and the saved team is whole Hugging Face folders (gathered from the shards under
    # --fsdp), loadable without torchrun
    run_dir = tmp_path / "runs" / "killed"
    one = numbers(straight / "p1")
    assert len([r for r in one if "stage/eval_acc" in r]) == 4
    assert_close(numbers(run_dir), one)
    weights_close(straight / "p1", run_dir, 3)
    assert json.loads((run_dir / "agent0" / "config.json").read_text())["architectures"] == [
        "Qwen2ForCausalLM"
    ]


def test_a_hung_process_ends_the_other_within_the_timeout(tmp_path):
    launcher = start(tmp_path, "hung", "--dist-timeout", "5")
    wait_for_update(tmp_path / "runs" / "hung", 1, launcher)
    hung = rank_pid(launcher, 1)
    os.kill(hung, signal.SIGSTOP)
    stopped, line = time.time(), ""
    while "error:" not in line and launcher.poll() is None:
        line = launcher.stderr.readline()
    waited = time.time() - stopped
    os.kill(hung, signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert "stopped answering (Timed out" in line and "--resume runs/hung" in line, line
    # gloo's default would wait 30 minutes
    assert waited < 60


def test_compare_under_torchrun_trains_every_mode_as_one_process(tmp_path):
    tiny = (
        "--mode compare --agents 2 --modes teamtr,naive,single --seeds 1 "
        "--stages 2 --warmup-steps 20 --questions 8 --group 4 --eval-size 32 --threads 1"
    ).split()
    for processes in (1, 2):
        out = launch(tmp_path, *tiny, "--name", f"p{processes}", processes=processes)
        assert out.returncode == 0, out.stderr[-3000:]
    for mode in ("teamtr", "naive", "single"):
        assert_close(*(numbers(tmp_path / "runs" / name / f"{mode}-n2-s0.jsonl") for name in ("p1", "p2")))


def test_fewer_questions_than_processes_is_one_line_exit_2(tmp_path):
    out = launch(tmp_path, "--questions", "1", "--stages", "1")
    assert out.returncode != 0 and not (tmp_path / "runs").exists()
    ours = [line for line in out.stderr.splitlines() if line.startswith("train.py: error:")]
    assert ours == [
        "train.py: error: --questions 1: fewer than the 2 processes, and each process plays whole questions"
    ]


def test_fsdp_on_a_real_task_with_chat_templates_writes_what_one_process_writes(tmp_path):
    from chat_models import save_chat_model
    from test_real_cli import FIXTURE

    models = ",".join(save_chat_model(tmp_path / arch, arch) for arch in ("llama", "qwen2"))
    real = f"--task jsonl:{FIXTURE} --models {models} --agents 2 --stages 1 --questions 4 --group 2"
    real += " --minibatch 2 --eval-size 4 --max-new-tokens 6 --threads 1"
    script = os.path.join(ROOT, "tests", "length_reward_train.py")
    for launcher, extra in (([sys.executable], []), (TORCHRUN, ["--fsdp"])):
        command = [*launcher, script, *real.split(), *extra, "--name", f"r{len(extra) + 1}"]
        out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    one = numbers(tmp_path / "runs" / "r1")
    # both agents moved
    assert all(r[f"agent{r['agent']}/kl_rev"] > 0 for r in one if "agent" in r)
    assert_close(one, numbers(tmp_path / "runs" / "r2"))
    weights_close(tmp_path / "runs" / "r1", tmp_path / "runs" / "r2", 2)


def test_fsdp_needs_torchrun_and_whole_agents(capsys, monkeypatch):
    import parallel
    from plumbing import cli

    for world, argv, message in [
        (1, "--fsdp", "launch it with torchrun"),
        (2, "--fsdp --lora-rank 4", "not with --mode compare, --lora-rank or --replace"),
    ]:
        monkeypatch.setattr(parallel, "WORLD", world)
        with pytest.raises(SystemExit) as stop:
            cli.parse("train", argv.split())
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1
