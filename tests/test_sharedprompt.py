"""The update's shared prompts (sharedprompt.py): the log-probs and the gradients of a batch equal
those of whole-row forwards within 1e-5, on tiny Llama and Qwen2 models, with LoRA adapters and
with gradient checkpointing, for a first agent (the whole prompt shared) and a later one (the
question shared, the messages before its own differing)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import lora
import losses
import rollout
import sharedprompt
import team as team_lib

SIZE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
HEADS = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def model_of(arch: str, adapters: bool, checkpointing: bool):
    config, model = ARCHS[arch]
    torch.manual_seed(0)
    m = model(config(**SIZE, **HEADS, tie_word_embeddings=False))
    if adapters:
        m = lora.adapted(m, 4, 8.0, ["q_proj", "v_proj", "down_proj"], seed=1)
        # non-zero adapters: their gradient flows through the shared prompt too
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def episodes(later: bool):
    """3 questions x 4 samples: a prompt per question (40-52 tokens), then for a later agent a
    message of another agent that differs per sample, then the agent's own message."""
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, SIZE["vocab_size"], (n,), generator=gen).tolist()  # noqa: E731
    eps = []
    for q in range(3):
        prompt = ids(40 + 6 * q)
        for s in range(4):
            before = rollout.Step(1, prompt, ids(3 + s), [0.0] * (3 + s), "")
            context = prompt + (before.tokens if later else [])
            own = ids(4 + (q + s) % 5)
            steps = [before] if later else []
            eps.append(
                rollout.Episode(
                    None, q, s, [0], [*steps, rollout.Step(0, context, own, [0.0] * len(own), "")]
                )
            )
    return eps


def logprobs_and_grads(model, data, rows):
    weights = torch.randn(data["mask"].shape, generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    model.train()
    logp, _ = team_lib.Agent("a", model, None, None).token_logprobs(data, rows)
    (logp * weights[rows]).sum().backward()
    model.eval()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), grads


@pytest.mark.parametrize("later", [False, True], ids=["first agent", "later agent"])
@pytest.mark.parametrize("adapters,checkpointing", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_shared_prompts_give_whole_row_logprobs_and_gradients(arch, adapters, checkpointing, later):
    model = model_of(arch, adapters, checkpointing)
    eps = episodes(later)
    whole = losses.agent_batch(eps, 0, torch.zeros(len(eps)), 0, "cpu")
    shared = whole | sharedprompt.groups(eps, whole, 8)
    # every question's rows share their prompt: 40, 46 and 52 tokens, or one token less where the
    # prompt is the whole context (its last token predicts the first loss token)
    assert sorted(set(shared["shared"].tolist())) == ([40, 46, 52] if later else [39, 45, 51])
    # the whole batch, and a minibatch with one row of a question (not shared) and two of another
    for rows in (slice(None), torch.tensor([0, 5, 6, 11])):
        logp, grads = logprobs_and_grads(model, whole, rows)
        logp_s, grads_s = logprobs_and_grads(model, shared, rows)
        torch.testing.assert_close(logp_s, logp, atol=1e-5, rtol=0)
        assert grads.keys() == grads_s.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads_s[name], grads[name], atol=1e-5, rtol=0, msg=name)


def test_a_short_prompt_is_not_shared():
    eps = episodes(False)
    whole = losses.agent_batch(eps, 0, torch.zeros(len(eps)), 0, "cpu")
    shared = sharedprompt.groups(eps, whole, 60)
    assert shared["shared"].eq(0).all()
