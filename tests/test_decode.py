"""The written-out decoding step (decode.py) against the model's own forward."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import decode
import rollout

SHAPE = dict(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize(
    "family", [(LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM)], ids=["llama", "qwen2"]
)
@torch.no_grad()
def test_written_steps_give_the_models_logits(family):
    """Left-padded prompts of different lengths, rows repeated (a group's samples), GQA, and
    Qwen2's projection biases: each step's logits equal a full forward on the unpadded sequence."""
    config, lm = family
    torch.manual_seed(0)
    model = lm(config(**SHAPE)).eval()
    # Qwen2's biases, non-zero
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            if proj.bias is not None:
                proj.bias.normal_()
    assert decode.supported(model)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    ids, attn = rollout.left_pad(prompts, 0, "cpu")
    out = model(input_ids=ids, attention_mask=attn, position_ids=rollout.positions(attn), use_cache=True)
    rows = torch.tensor([0, 1, 1, 2])
    cache, attn, seqs = decode.Cache(out.past_key_values, rows, 3), attn[rows], [prompts[r] for r in rows]
    for new in ([13, 14, 15, 16], [17, 18, 19, 20], [21, 22, 23, 24]):
        attn = torch.cat([attn, torch.ones(4, 1, dtype=attn.dtype)], dim=1)
        logits = cache.step(model, torch.tensor(new)[:, None], rollout.positions(attn)[:, -1:], attn)
        seqs = [s + [t] for s, t in zip(seqs, new)]
        for row, seq in zip(logits, seqs):
            torch.testing.assert_close(
                row, model(input_ids=torch.tensor([seq])).logits[0, -1], atol=1e-5, rtol=1e-5
            )
    assert cache.n == attn.shape[1] and all(k.shape[2] == attn.shape[1] for k, _ in cache.filled())


def test_other_attention_goes_through_the_models_forward():
    assert not decode.supported(
        Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=0))
    )
    # query and key norms
    assert not decode.supported(Qwen3ForCausalLM(Qwen3Config(**SHAPE)))
