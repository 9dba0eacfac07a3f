"""The real-model path through the CLI: a real-task stage end to end (JSONL fixture, prompts file,
chat templates, math-verify) in a subprocess, and every bad input as one line, exit 2, nothing written."""

import json
import os

import pytest
import torch
from chat_models import bpe_tokenizer, save_chat_model
from test_train_cli import ROOT, run
from transformers import Gemma2Config, Gemma2ForCausalLM, ViTConfig

import team
import train

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "math.jsonl")
TINY = "--stages 1 --questions 4 --group 2 --eval-size 4 --epochs 1 --max-new-tokens 8".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    ViTConfig().save_pretrained(base / "vit")
    (base / "empty").mkdir()
    return {
        "llama": save_chat_model(base / "llama", "llama"),
        "qwen2": save_chat_model(base / "qwen2", "qwen2"),
        "no_eos": save_chat_model(base / "no_eos", "llama", eos=False),
        "vit": str(base / "vit"),
        "empty": str(base / "empty"),
    }


def test_a_real_task_stage_runs_end_to_end_and_eval_reads_it(tmp_path, models):
    out = run(
        "train.py",
        "--task",
        f"jsonl:{FIXTURE}",
        "--models",
        f"{models['llama']},{models['qwen2']}",
        "--agents",
        "2",
        "--prompts",
        os.path.join(ROOT, "tasks", "prompts", "team.json"),
        "--name",
        "real",
        *TINY,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "real"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stage = [r for r in records if "stage/certificate" in r][0]
    assert 0 <= stage["rollout/truncated"] <= 1 and stage["stage/eval_acc"] is not None
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("agent")) == ["agent0", "agent1"]
    evaluated = run("eval.py", str(run_dir), "--samples", "2", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "agent0 alone" in evaluated.stdout and "pass@2" in evaluated.stdout


def bad_inputs(tmp, models):
    (tmp / "bad.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": oops}\n')
    (tmp / "fields.jsonl").write_text('{"q": "1+1?", "a": "2"}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "prompts.txt").write_text("roles: [solver]")
    (tmp / "one_role.json").write_text(
        json.dumps(
            {"roles": [{"name": "a", "instructions": "b"}], "single": {"name": "a", "instructions": "b"}}
        )
    )
    llama = ["--model", models["llama"]]
    return {
        "unknown task": (["--task", "bogus", *llama], "unknown task"),
        "real task without a model": (["--task", "words"], "--model"),
        "hub dataset offline": (["--task", "gsm8k", *llama], "pass a local file"),
        "missing model path": (["--model", "/nonexistent/model"], "no such file"),
        "hub model offline": (["--model", "someone/some-model"], "hub cannot be reached"),
        "folder without a model": (["--model", models["empty"]], "not a Hugging Face model folder"),
        "not a causal LM": (["--model", models["vit"]], "not a causal LM"),
        "tokenizer without EOS": (["--model", models["no_eos"]], "no EOS token"),
        "malformed JSONL line": (["--task", f"jsonl:{tmp / 'bad.jsonl'}", *llama], "bad.jsonl, line 2"),
        "missing fields": (["--task", f"jsonl:{tmp / 'fields.jsonl'}", *llama], "'question' (or 'problem')"),
        "empty data file": (["--task", f"jsonl:{tmp / 'empty.jsonl'}", *llama], "empty.jsonl"),
        "missing data file": (["--task", "parquet:/nonexistent.parquet", *llama], "no such file"),
        "prompts do not parse": (
            ["--task", "words", "--prompts", str(tmp / "prompts.txt"), *llama],
            "not a prompts file",
        ),
        "too few roles": (
            ["--task", "words", "--agents", "3", "--prompts", str(tmp / "one_role.json"), *llama],
            "fewer than --agents 3",
        ),
        "codes on a real task": (["--task", "words", "--codes", *llama], "--codes"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown task",
        "real task without a model",
        "hub dataset offline",
        "missing model path",
        "hub model offline",
        "folder without a model",
        "not a causal LM",
        "tokenizer without EOS",
        "malformed JSONL line",
        "missing fields",
        "empty data file",
        "missing data file",
        "prompts do not parse",
        "too few roles",
        "codes on a real task",
    ],
)
def test_bad_real_inputs_give_one_line_exit_2_and_write_nothing(tmp_path, models, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    # as on a machine without network, and fast
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, expected = bad_inputs(tmp_path, models)[case]
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_eval_on_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path):
    out = run("eval.py", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and "run directory" in out.stderr.strip().splitlines()[-1]


def test_a_model_with_post_processed_logits_is_refused(tmp_path):
    tok = bpe_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=0.01,
        eos_token_id=tok.eos_token_id,
    )
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(team.LoadError, match="post-processed"):
        team.load_model(str(tmp_path), "cpu", torch.float32)
