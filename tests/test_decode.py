"""The written-out decoding step (decode.py) against the model's own forward."""

import pytest
import torch
from chat_models import gemma3_config, gemma_tokenizer
from transformers import (
    Gemma3ForCausalLM,
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


FAMILIES = [
    (LlamaConfig, LlamaForCausalLM),
    (Qwen2Config, Qwen2ForCausalLM),
    (Qwen3Config, Qwen3ForCausalLM),
]


@pytest.mark.parametrize("family", FAMILIES, ids=["llama", "qwen2", "qwen3"])
@torch.no_grad()
def test_written_steps_give_the_models_logits(family):
    """Left-padded prompts of different lengths, rows repeated (a group's samples), GQA, Qwen2's
    projection biases, and Qwen3's query and key norms and head dim of 128 (not hidden / heads):
    each step's logits equal a full forward on the unpadded sequence."""
    config, lm = family
    torch.manual_seed(0)
    model = lm(config(**SHAPE)).eval()
    # Qwen2's biases and Qwen3's norm weights, away from their initial 0 and 1
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            if proj.bias is not None:
                proj.bias.normal_()
        for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
            if norm is not None:
                norm.weight.uniform_(0.5, 2.0)
    assert decode.supported(model)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    ids, attn = rollout.left_pad(prompts, 0, "cpu")
    out = model(input_ids=ids, attention_mask=attn, position_ids=decode.positions(attn), use_cache=True)
    rows = torch.tensor([0, 1, 1, 2])
    cache, attn, seqs = decode.Cache(out.past_key_values, rows, 3), attn[rows], [prompts[r] for r in rows]
    for new in ([13, 14, 15, 16], [17, 18, 19, 20], [21, 22, 23, 24]):
        attn = torch.cat([attn, torch.ones(4, 1, dtype=attn.dtype)], dim=1)
        logits = cache.step(model, torch.tensor(new)[:, None], decode.positions(attn)[:, -1:], attn)
        seqs = [s + [t] for s, t in zip(seqs, new)]
        for row, seq in zip(logits, seqs):
            torch.testing.assert_close(
                row, model(input_ids=torch.tensor([seq])).logits[0, -1], atol=1e-5, rtol=1e-5
            )
    assert cache.n == attn.shape[1]


@pytest.mark.parametrize("family", FAMILIES[1:], ids=["qwen2", "qwen3"])
def test_a_sliding_window_layer_goes_through_the_models_forward(family):
    config, lm = family
    # layer 0 attends to everything, layer 1 to a window
    windowed = config(**SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert windowed.layer_types == ["full_attention", "sliding_attention"]
    assert not decode.supported(lm(windowed))


def test_other_architectures_go_through_the_models_forward():
    # Gemma 3: scaled embeddings, four norms per layer, a sliding window
    assert not decode.supported(Gemma3ForCausalLM(gemma3_config(gemma_tokenizer())))
