"""GPU path: bf16 weights, fp32 log-probs, gradient checkpointing. Skipped without CUDA."""

import dataclasses

import pytest
import torch
from conftest import random_rewards

import losses
import rollout
import tasks
import team as team_lib
import teamtr

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_bf16_team_with_checkpointing_keeps_fp32_logprobs_and_the_radius(cfg):
    tok = team_lib.char_tokenizer(tasks.CHARS)
    model = team_lib.tiny_model(tok, hidden=64, seed=0).to("cuda", torch.bfloat16)
    team = team_lib.clone_team(model, tok, 3, team_lib.Training(lr=1e-2, grad_ckpt=True))
    task = tasks.Relay(3)
    eps = rollout.new_episodes(tasks.questions(task, 4, 0, False), 4, 3, 1, "fixed", 0)
    played = random_rewards(rollout.play(team, task, eps, rollout.Settings(1.0, 0))[0])
    data = losses.agent_batch(played, 1, torch.ones(len(played)), tok.pad_token_id, "cuda")
    with torch.no_grad():
        logp = team[1].token_logprobs(data)[0]
    assert logp.dtype == torch.float32
    mask = data["mask"].bool()
    # bf16: batched vs teacher-forced
    assert (logp - data["sampler_logp"])[mask].abs().max() < 0.05
    stats = teamtr.update_agent(team[1], 1, played, dataclasses.replace(cfg, delta=0.005), seed=0).metrics
    assert stats["kl_rev"] <= 0.005 and stats["steps"] > 0
