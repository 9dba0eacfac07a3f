"""A decoding step of a Llama-family model on a KV cache allocated once, in plain PyTorch.

The sampler's decode loop feeds one token per row per step. Through the model's own forward a
step also builds a 4D attention mask, concatenates every layer's cache and runs the fused
attention kernel, and on a small model that costs more than the arithmetic: on this project's
CPU the default tiny agent's forward calls alone ran at 1.25x `model.generate` over 32 tokens
(timed by forward hooks in a tools/bench.py run before this file), so no sampler calling that forward
could reach 1.5x. `Cache.step` is the same computation as the Hugging Face forward of Llama, Qwen2
and Qwen3 models, written out: the model's own modules (embedding, rotary embedding, projections,
Qwen3's per-head query and key norms, norms, MLP, output layer, and so LoRA layers too) around
attention as matmul, softmax, matmul over keys and values that are allocated once per sampler
call and written in place (as nanochat's engine does). A test checks its logits against the
model's forward. Other architectures (Gemma's scaled embeddings and extra norms, Mistral) and
any model with a sliding-window layer go through the model's forward: `supported` is False.
"""

import torch
from transformers import DynamicCache

# Qwen2's and Qwen3's are the same function
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

FAMILY = ("llama", "qwen2", "qwen3")


def positions(attn):
    """Position ids from an attention mask: real tokens count from 0; padding repeats the position
    before it (0 at the start), which no real token attends to."""
    return (attn.cumsum(-1) - 1).clamp(min=0)


def supported(model) -> bool:
    """Whether `Cache.step` computes this model's forward: a Llama, Qwen2 or Qwen3 model attending
    to every earlier position in every layer."""
    return model.config.model_type in FAMILY and not sliding(model)


def sliding(model) -> bool:
    """Whether a layer of the model attends to a sliding window: the cache its forward builds says."""
    return any(DynamicCache(config=model.config).is_sliding)


class Cache:
    """Keys and values per layer, each (rows, key heads, length, head dim), filled up to n."""

    def __init__(self, cache, rows, room: int):
        """A prefill's DynamicCache, its row rows[r] for row r, and room for `room` more positions."""
        self.n = cache.get_seq_length()
        self.layers = []
        for layer in cache.layers:
            keys, values = (
                t.new_empty(len(rows), t.shape[1], self.n + room, t.shape[3])
                for t in (layer.keys, layer.values)
            )
            keys[:, :, : self.n], values[:, :, : self.n] = layer.keys[rows], layer.values[rows]
            self.layers.append((keys, values))

    def step(self, model, ids, position_ids, attn):
        """Feeds ids (B, 1) at position_ids (B, 1); attn (B, n + 1) marks the positions each row
        attends to, this one included. Writes its keys and values and returns the logits (B, V)."""
        inner, n, B = model.model, self.n, ids.shape[0]
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, position_ids)
        # (B, 1, 1, n + 1)
        masked = ~attn.bool()[:, None, None, :]
        for layer, (K, V) in zip(inner.layers, self.layers):
            self_attn, x = layer.self_attn, layer.input_layernorm(h)
            q, k, v = (
                proj(x).view(B, 1, -1, self_attn.head_dim).transpose(1, 2)
                for proj in (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj)
            )
            # Qwen3: RMSNorm over each query and key head (the head dim), before the rotation
            if hasattr(self_attn, "q_norm"):
                q, k = self_attn.q_norm(q), self_attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            K[:, :, n], V[:, :, n] = k[:, :, 0], v[:, :, 0]
            # query heads grouped by the key head they read
            q = q.view(B, K.shape[1], -1, self_attn.head_dim)
            scores = (q @ K[:, :, : n + 1].transpose(-1, -2) * self_attn.scaling).masked_fill(
                masked, float("-inf")
            )
            # (B, key heads, group, head dim)
            out = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ V[:, :, : n + 1]
            h = h + self_attn.o_proj(out.reshape(B, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.n += 1
        return model.lm_head(inner.norm(h))[:, -1]
