"""tools/gpu_check.py's dry run: tiny sizes on CPU, run as a user runs it, with `datasets` and
`math_verify` made unimportable (a sitecustomize on PYTHONPATH, so the memory probes' own
processes are covered too)."""

import json
import os
import subprocess
import sys

from tools import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKER = '''
import os
import sys


class Blocked:
    """Fails every import of a module a GPU check must not need, and writes the name down."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "math_verify"):
            with open(os.environ["BLOCKED_LOG"], "a") as f:
                f.write(name + "\\n")
            raise ModuleNotFoundError(f"{name} is blocked by tests/test_gpu_check.py", name=name)
        return None


sys.meta_path.insert(0, Blocked())
'''


def blocking(tmp_path, log: str) -> dict:
    """An environment whose Python processes cannot import datasets or math_verify; each
    attempt is written to tmp_path/log."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "BLOCKED_LOG": str(tmp_path / log)}


def test_the_blocker_stops_an_import_of_datasets(tmp_path):
    # datasets is installed for the tests, so only the blocker can stop this
    done = subprocess.run(
        [sys.executable, "-c", "import datasets"], env=blocking(tmp_path, "control.log"), capture_output=True
    )
    assert done.returncode != 0
    assert (tmp_path / "control.log").read_text().split() == ["datasets"]


def test_the_dry_run_measures_everything_without_datasets_or_math_verify(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.gpu_check", "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=blocking(tmp_path, "blocked.log"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not (tmp_path / "blocked.log").exists()
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert list(checks) == list(gpu_check.CHECKS) and report["skipped"] == []
    assert report["unwanted_imports"] == [] and checks["lora_memory"]["unwanted_imports"] == []
    assert not [name for name, numbers in checks.items() if "error" in numbers]
    # bf16 rounding moves the log-probs a little, and the update ends inside its radius
    bf16 = checks["bf16"]
    assert 0 < bf16["mean_abs_logp_drift"] <= bf16["max_abs_logp_drift"] < 0.1
    assert bf16["sampler_vs_teacher_forced_bf16"] < 0.1
    assert bf16["radius_held"] and bf16["kl_rev"] <= bf16["delta"] and bf16["steps"] > 0
    assert 0 < bf16["weights_changed"] <= 1
    # in fp32 on CPU, recomputation gives the same gradient
    ckpt = checks["grad_ckpt"]
    assert ckpt["recomputed"] and ckpt["dtype"] == "float32"
    assert ckpt["max_rel_diff_ckpt"] < 1e-6 and ckpt["max_rel_diff_two_runs"] < 1e-6
    # greedy in fp32: the same tokens as model.generate on every row
    sampler = checks["sampler"]
    assert sampler["rows"] == 64 and sampler["fp32_token_agreement"] == sampler["fp32_row_agreement"] == 1.0
    assert 0 <= sampler["bf16_row_agreement"] <= sampler["bf16_token_agreement"] <= 1
    assert min(sampler[f"{d}_{k}"] for d in ("fp32", "bf16") for k in ("sampler_tokens_per_s", "speedup")) > 0
    memory = checks["lora_memory"]
    assert memory["agents"] == 8 and memory["one_agent_peak_mb"] > 0 and 0.5 < memory["ratio"] < 2
    stage = checks["stage"]
    assert stage["agents"] == 3 and stage["stage_seconds"] > 0 and stage["tokens"] > 0
    assert 0 <= stage["reward"] <= 1
    # the printed table has a row for every number
    assert "| check | measure | value |" in done.stdout
    assert "| sampler | fp32_token_agreement | 1 |" in done.stdout
    assert "| bf16 | radius_held | True |" in done.stdout


def test_past_the_budget_the_remaining_checks_are_skipped_and_reported(tmp_path, capsys, monkeypatch):
    # other tests imported datasets into this process; the dry run's own test checks the imports
    monkeypatch.setattr(gpu_check, "UNWANTED", ())
    out = tmp_path / "check.json"
    gpu_check.main(["--tiny", "--device", "cpu", "--budget", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["checks"] == {} and report["skipped"] == list(gpu_check.CHECKS)
    printed = capsys.readouterr().out
    assert all(f"| {name} | skipped | past the budget |" in printed for name in gpu_check.CHECKS)
