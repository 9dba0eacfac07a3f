"""A team of two model families with two tokenizers: a tiny Llama with the ChatML template, and a
tiny Gemma 3 (a sliding-window layer) with its own BPE vocabulary, BOS and Gemma template. Text is
the interface: each agent encodes the shared transcript with its own tokenizer and template, and a
real-task stage trains the pair end to end through train.py."""

import json
import os

import pytest
import torch
from chat_models import save_chat_model

import config
import rollout
import team as team_lib
import train
from tasks import mathtask

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "math.jsonl")
TINY = "--stages 1 --questions 2 --group 2 --eval-size 2 --epochs 1 --max-new-tokens 8".split()
# how each family's prompt opens: Gemma has no system role, so its system message opens the user turn
OPENING = {
    "llama": "<|im_start|>system\nYou are the solver",
    "gemma3": "<bos><start_of_turn>user\nYou are the",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    return [save_chat_model(base / arch, arch) for arch in ("llama", "gemma3")]


def test_each_family_reads_the_transcript_with_its_own_tokenizer_and_template(models):
    team = team_lib.load_team(models, "cpu", torch.float32)
    # two tokenizer families: the same text, other ids
    text = "Problem: Mia has 7 apples."
    assert team[0].tokenizer(text)["input_ids"] != team[1].tokenizer(text)["input_ids"]
    assert len(team[0].tokenizer) != len(team[1].tokenizer)
    cfg = config.Config(task=f"jsonl:{FIXTURE}", agents=2, questions=2, model="x", max_new_tokens=8)
    task = mathtask.make(config.resolve(cfg))
    eps = rollout.new_episodes(task.heldout(2), 2, 2, 1, "fixed", seed=0)
    played, counts = rollout.play(team, task, eps, rollout.Settings(1.0, 0))
    turns = counts.turns
    assert turns == 2 * len(eps)
    for e in played:
        first, second = e.steps
        llama, gemma = (team[s.agent].tokenizer.decode(s.context) for s in e.steps)
        assert llama.startswith(OPENING["llama"]) and gemma.startswith(OPENING["gemma3"])
        assert gemma.endswith("<end_of_turn>\n<start_of_turn>model\n")
        # the Llama's message, as text, re-encoded by the Gemma tokenizer
        assert first.text.strip() and first.text.strip() in gemma
        assert max(second.context) < len(team[1].tokenizer)


def test_a_mixed_family_team_trains_a_real_task_stage_end_to_end(tmp_path, models, monkeypatch):
    """Random weights never solve a problem: the reward is the final message's length instead, so
    that advantages are non-zero and both agents' updates move their weights."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(mathtask.MathTask, "reward", lambda self, q, message: float(len(message)))
    args = ["--task", f"jsonl:{FIXTURE}", "--models", ",".join(models), "--agents", "2"]
    train.main([*args, "--name", "mixed", *TINY])
    run_dir = tmp_path / "runs" / "mixed"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "stage/certificate" in r][0]["stage/eval_acc"] is not None
    for i, path in enumerate(models):
        update = [r for r in records if r.get("agent") == i][0]
        # the sampler's log-probs are the trainer's (the ratio is 1 before the update), and it moved
        assert update[f"agent{i}/logp_drift"] < 1e-5 and update[f"agent{i}/kl_rev"] > 0
        # saved as its own family, with its own tokenizer
        (model, tok), (start, start_tok) = (
            team_lib.load_model(p, "cpu", torch.float32) for p in (str(run_dir / f"agent{i}"), path)
        )
        assert type(model) is type(start) and tok.get_vocab() == start_tok.get_vocab()
        assert tok.chat_template == start_tok.chat_template and tok.bos_token == start_tok.bos_token
        # trained: the saved weights are not the starting ones
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))


def test_the_qwen3_template_closes_an_empty_thinking_block_when_thinking_is_off(tmp_path):
    model, tok = team_lib.load_model(save_chat_model(tmp_path, "qwen3"), "cpu", torch.float32)
    messages = [{"role": "user", "content": "Problem: 1 + 1?"}]
    render = lambda **chat: tok.apply_chat_template(  # noqa: E731
        messages, add_generation_prompt=True, tokenize=False, **chat
    )
    # as Qwen3's own: thinking is on unless switched off
    assert render().endswith("<|im_start|>assistant\n") and render(enable_thinking=True) == render()
    assert render(enable_thinking=False) == render() + "<think>\n\n</think>\n\n"
    # the tags are added tokens, not special ones: a message's text keeps them
    think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert tok.decode(think, skip_special_tokens=True) == "<think></think>"
