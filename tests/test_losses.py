"""Estimators, advantages, masks and reductions against hand-computed values."""
import math

import pytest
import torch

import losses
import rollout


def test_kl_estimators_are_unbiased_for_their_kl():
    p_old = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_new = torch.tensor([0.4, 0.4, 0.1, 0.1])
    kl_rev = float((p_new * (p_new / p_old).log()).sum())  # KL(new || old)
    kl_fwd = float((p_old * (p_old / p_new).log()).sum())  # KL(old || new)
    logp_new, logp_old = p_new.log()[None], p_old.log()[None]  # every token of the vocabulary, (1, V)
    expect = lambda per_token: float((p_old * per_token[0]).sum())  # E over samples from pi_old
    assert expect(losses.token_kl(logp_new, logp_old, "kl_rev")) == pytest.approx(kl_rev, rel=1e-5)
    log_r = logp_new - logp_old
    assert expect(-log_r) == pytest.approx(kl_fwd, rel=1e-5)  # k1
    assert expect((log_r.exp() - 1) - log_r) == pytest.approx(kl_fwd, rel=1e-5)  # k3
    assert (losses.token_kl(logp_new, logp_old, "kl_rev") >= 0).all()
    full = losses.token_kl(None, None, "full", p_new.log()[None, None], p_old.log()[None, None])
    assert float(full) == pytest.approx(kl_rev, rel=1e-5)


def test_group_advantages_normalise_and_clip():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv, clipped = losses.group_advantages(rewards, group=4, a_max=1.5)
    std = math.sqrt(0.25 * 0.75)
    expected = [min(0.75 / std, 1.5), -0.25 / std, -0.25 / std, -0.25 / std, 1.0, 1.0, -1.0, -1.0]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-4, rtol=0)
    assert clipped == pytest.approx(1 / 8)
    adv, _ = losses.group_advantages(torch.ones(4), group=4, a_max=3.0)
    assert torch.equal(adv, torch.zeros(4))  # a group that all succeeded carries no signal


def test_loss_mask_covers_exactly_the_updated_agents_tokens():
    steps = [rollout.Step(0, [5, 6, 7], [8, 9, 1], [-1.0] * 3, "a"), rollout.Step(1, [5, 6, 7, 8, 9], [10, 1], [-2.0] * 2, "b"),
             rollout.Step(0, [5, 6, 7, 8, 9, 10], [11, 12, 13, 1], [-3.0] * 4, "c")]
    eps = [rollout.Episode(None, 0, 0, [0, 1, 0], steps), rollout.Episode(None, 0, 1, [0, 1, 0], steps[:2])]
    data = losses.agent_batch(eps, 0, torch.tensor([2.0, -1.0]), pad_id=0, device="cpu")
    assert data["ids"].shape[0] == 3  # agent 0 wrote twice in episode 0 and once in episode 1
    targets = data["ids"][:, 1:]
    assert [targets[r][data["mask"][r].bool()].tolist() for r in range(3)] == [[8, 9, 1], [11, 12, 13, 1], [8, 9, 1]]
    assert data["adv"].tolist() == [2.0, 2.0, -1.0]
    assert data["mask"].sum() == 10 and data["sampler_logp"][data["mask"].bool()].sum() == -3 - 12 - 3


def test_reductions_and_ppo_loss_at_ratio_one():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(losses.masked_mean(x, mask, "token")) == pytest.approx(10 / 4)
    assert float(losses.masked_mean(x, mask, "sequence")) == pytest.approx((2 + 4) / 2)
    logp = torch.log(torch.full((2, 3), 0.5))
    adv = torch.tensor([1.0, -2.0])
    kl = losses.token_kl(logp, logp, "kl_rev")
    assert float(losses.ppo_loss(logp, logp, adv, mask, kl, 0.2, 1.0, "token")) == pytest.approx(-(3 * 1 - 2) / 4)
    assert float(losses.surrogate(logp, logp, adv, mask)) == 0.0


def test_sequence_log_ratio_sums_each_episodes_tokens():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -1.0, 0.0]])
    old = torch.tensor([[-1.5, -2.5, -9.0], [-1.0, -9.0, 0.0], [-3.0, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    episode = torch.tensor([0, 0, 2])  # episode 0 has two rows (two turns), episode 1 none
    out = losses.sequence_log_ratio(logp, old, mask, episode, 3)
    torch.testing.assert_close(out, torch.tensor([0.5 + 0.5 + 0.5, 0.0, 2.0]))


def test_token_logprobs_on_the_agents_tokens_equal_the_full_logits_and_their_gradients(tmp_path):
    from chat_models import save_chat_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(save_chat_model(tmp_path / "llama"))
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0  # a right-padded row
    mask = torch.zeros(3, 11)
    mask[0, 4:9], mask[1, 2:11], mask[2, 5:8] = 1, 1, 1
    batch = dict(ids=ids, attn=attn, mask=mask)
    logp, _ = losses.token_logprobs(model, batch)
    logp.sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float().log_softmax(-1)
    reference = reference.gather(-1, ids[:, 1:, None])[..., 0] * mask
    reference.sum().backward()
    torch.testing.assert_close(logp, reference, atol=1e-6, rtol=0)
    assert (logp[mask == 0] == 0).all()
    for got, want in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
