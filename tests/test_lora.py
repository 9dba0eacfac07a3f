"""LoRA teams on one frozen base: isolation, a fresh adapter is the base, the sampler's
equivalences with adapters, the radius, the peft file format, and runs that save, evaluate and
resume adapters."""

import dataclasses
import json

import pytest
import torch
from chat_models import save_chat_model
from conftest import TORCH_SAVE, disk_full_at
from test_rollout import prompts_of, uncached_greedy
from test_teamtr import played_batch, snapshot
from transformers import AutoModelForCausalLM

import eval as evaluation
import lora
import losses
import rollout
import tasks
import team as team_lib
import teamtr
import train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_team(n, seed=0, lr=1e-3, rank=4, perturbed=False):
    """A LoRA team on a tiny relay model; perturbed=True gives the adapters random non-zero B, so
    they change the outputs (a fresh adapter does not)."""
    tok = team_lib.char_tokenizer(tasks.CHARS)
    base = team_lib.tiny_model(tok, hidden=32, seed=seed)
    team = team_lib.lora_team(
        base, tok, n, lora.spec(rank, 8.0, TARGETS), team_lib.Training(lr=lr), seed=seed
    )
    if perturbed:
        gen = torch.Generator().manual_seed(seed)
        for agent in team:
            for name, p in agent.model.named_parameters():
                if "lora_B" in name:
                    p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return team


def base_of(team):
    return [p for n, p in team[0].model.named_parameters() if ".lora_" not in n]


def test_the_team_shares_one_frozen_base_and_each_agent_trains_only_its_adapter(cfg):
    team = lora_team(3, lr=1e-2, perturbed=True)
    # the same tensors, not copies
    assert all(a is b for a, b in zip(base_of(team), base_of(team[1:])))
    assert all(not p.requires_grad for p in base_of(team))
    assert all(".lora_" in n for n, p in team[1].model.named_parameters() if p.requires_grad)
    batch = played_batch(team, cfg)
    before = [snapshot(a) for a in team]
    seen_grad = []
    for agent in team:
        for p in filter(lambda p: p.requires_grad, agent.model.parameters()):
            p.register_post_accumulate_grad_hook(lambda p, agent=agent: seen_grad.append(agent.name))
    stats = teamtr.update_agent(team[1], 1, batch, cfg, seed=0).metrics
    assert stats["steps"] > 0 and set(seen_grad) == {"agent1"}
    for i, agent in enumerate(team):
        changed = [
            not torch.equal(a, b)
            for (n, _), a, b in zip(agent.model.named_parameters(), before[i], snapshot(agent))
        ]
        names = [n for n, _ in agent.model.named_parameters()]
        # the base: bit-identical
        assert not any(c for c, n in zip(changed, names) if ".lora_" not in n)
        assert any(changed) == (i == 1), f"agent{i}"


def test_fresh_adapters_give_the_base_models_logprobs(cfg):
    tok = team_lib.char_tokenizer(tasks.CHARS)
    base = team_lib.tiny_model(tok, hidden=32, seed=2)
    reference = team_lib.clone_team(base, tok, 1, team_lib.Training(lr=1e-3))[0]
    team = team_lib.lora_team(base, tok, 2, lora.spec(4, 8.0, TARGETS), team_lib.Training(lr=1e-3), seed=2)
    data = losses.agent_batch(
        played_batch([reference] * 3, cfg), 0, torch.zeros(cfg.questions * cfg.group), tok.pad_token_id, "cpu"
    )
    with torch.no_grad():
        want = reference.token_logprobs(data)[0]
        for agent in team:
            assert torch.equal(agent.token_logprobs(data)[0], want)


def test_sampler_equivalences_hold_with_adapters(decoding):
    agent = lora_team(1, seed=3, perturbed=True)[0]
    tok, prompts = agent.tokenizer, prompts_of(agent)
    got, _ = rollout.sample(
        agent.model, prompts, rollout.Sampling(8, tok.eos_token_id, tok.pad_token_id, 0.0)
    )
    assert got == [uncached_greedy(agent.model, p, tok.eos_token_id, 8) for p in prompts]
    uniforms = torch.rand(len(prompts), 8, generator=torch.Generator().manual_seed(0))
    toks, logps = rollout.sample(
        agent.model, prompts, rollout.Sampling(8, tok.eos_token_id, tok.pad_token_id), uniforms
    )
    eps = [
        rollout.Episode(None, i, 0, [0], [rollout.Step(0, p, t, lp, "")])
        for i, (p, t, lp) in enumerate(zip(prompts, toks, logps))
    ]
    data = losses.agent_batch(eps, 0, torch.zeros(len(eps)), tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp = agent.token_logprobs(data)[0]
    mask = data["mask"].bool()
    torch.testing.assert_close(logp[mask], data["sampler_logp"][mask], atol=1e-5, rtol=0)


def test_every_lora_update_ends_inside_the_radius(cfg):
    cfg = dataclasses.replace(cfg, delta=0.002, epochs=4)
    team = lora_team(3, lr=3e-2, perturbed=True)
    backtracks = 0
    for i in range(3):
        stats = teamtr.update_agent(team[i], i, played_batch(team, cfg, i), cfg, seed=i).metrics
        assert stats["kl_rev"] <= cfg.delta
        backtracks += stats["backtracks"]
    assert backtracks > 0


def test_a_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base_dir = save_chat_model(tmp_path / "base", "llama")
    model, tok = team_lib.load_model(base_dir, "cpu", torch.float32)
    agent = team_lib.lora_team(model, tok, 1, lora.spec(4, 8.0, ["q_proj", "v_proj", "down_proj"]), seed=1)[0]
    for name, p in agent.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    team_lib.save_team([agent], tmp_path / "run", base_dir)
    saved = tmp_path / "run" / "agent0"
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == "../../base"
    ids = torch.tensor([tok("Mia has 7 apples. The answer is 12.")["input_ids"]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(saved)).eval()
    with torch.no_grad():
        ours, peft_logits = agent.model(input_ids=ids).logits, theirs(input_ids=ids).logits
        base_logits = model(input_ids=ids).logits
    # the adapter matters
    assert not torch.allclose(ours, base_logits, atol=1e-3)
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=1e-5)
    # and our own loader
    reloaded = team_lib.load_team([str(saved)], "cpu", torch.float32)[0]
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids).logits, ours)


def test_a_lora_run_checkpoints_adapters_resumes_to_the_same_metrics_and_evaluates(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = (
        "--agents 2 --stages 2 --warmup-steps 2 --questions 4 --group 2 --eval-size 4 --lora-rank 4 --lr 1e-2"
    ).split()
    train.main([*args, "--name", "straight"])
    monkeypatch.setattr(torch, "save", disk_full_at(2))
    with pytest.raises(SystemExit):
        train.main([*args, "--name", "stopped"])
    monkeypatch.setattr(torch, "save", TORCH_SAVE)
    stopped = tmp_path / "runs" / "stopped"
    checkpoint = stopped / "checkpoint-stage1" / "agent0"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    train.main(["--resume", str(stopped)])
    untimed = lambda path: [
        {
            k: v
            for k, v in json.loads(line).items()
            if not k.startswith(("stage/seconds", "rollout/tokens", "perf/"))
        }
        for line in path.read_text().splitlines()
    ]
    assert untimed(stopped / "metrics.jsonl") == untimed(tmp_path / "runs" / "straight" / "metrics.jsonl")
    capsys.readouterr()
    evaluation.main([str(stopped)])
    assert "heldout: " in capsys.readouterr().out
