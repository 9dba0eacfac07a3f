"""The update's forwards, with each question's shared prompt computed once (--shared-prompt).

The G samples of a question are G rows of an agent's batch that begin with the same tokens: the
whole prompt for the first agent, the question and the system text for a later one. The decoder
runs in two parts. First the distinct shared prompts, one row each; then every row's own rest,
reading its prompt's keys and values from a cache that the rows read and never extend. The
gradient of the loss flows into the shared prompt once, from all of its rows. The hidden states
equal a whole-row forward's up to float round-off (tests/test_sharedprompt.py).

A row shares its group's prompt up to the last token before its first loss position, so every
token the agent wrote is computed in the second part. Not used with --kl full, under --fsdp, or
on a model with a sliding-window layer (whose cache slots are not positions; rollout.sample).
"""

import contextlib

import torch
from transformers import DynamicCache

import decode


class ReadOnly(DynamicCache):
    """Keys and values that every forward reads as they are: a gradient-checkpointed layer that is
    computed again in the backward reads the same cache."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)


def lengths(ids, attn, mask, group, at_least: int):
    """(S,): how many leading tokens each row shares with every row of its group (group[r]: its
    question), at most up to its first loss position; 0 for a group whose shared part is shorter
    than at_least tokens (not worth a second forward) or that has one row."""
    shared = torch.zeros(len(ids), dtype=torch.long)
    for g in group.unique():
        rows = (group == g).nonzero()[:, 0]
        if len(rows) < 2:
            continue
        same = ((ids[rows] == ids[rows[0]]) & attn[rows].bool()).long().cumprod(1).sum(1)
        # mask[r, p] = 1 where position p predicts a token the agent wrote: p >= first
        first = mask[rows].argmax(1)
        n = int(torch.minimum(same, first).min())
        shared[rows] = n if n >= at_least else 0
    return shared


def groups(episodes, data: dict, at_least: int) -> dict:
    """For an agent's rows (losses.agent_batch of `episodes`): each row's question ("group") and
    how many tokens it shares with the question's other rows ("shared", lengths)."""
    group = torch.tensor([episodes[e].qid for e in data["episode"].tolist()])
    ids, attn, mask = (data[key].cpu() for key in ("ids", "attn", "mask"))
    shared = lengths(ids, attn, mask, group, at_least)
    return {"group": group.to(data["ids"].device), "shared": shared.to(data["ids"].device)}


def applies(model, batch) -> bool:
    """Whether the rows share prompts (and the model has no sliding-window layer)."""
    shares = "shared" in batch and bool(batch["shared"].any())
    return shares and not decode.sliding(model)


def decoder_output(model, ids, attn, group, shared):
    """The decoder's last hidden states (S, L, H) of right-padded rows, each group's shared prompt
    (shared[r] tokens of row r) computed once; positions inside the prompt are 0."""
    S, L = ids.shape
    heads = {}
    # one row per group that shares (and has two rows here)
    for r in range(S):
        g = int(group[r])
        if shared[r] > 0:
            heads.setdefault(g, []).append(r)
    heads = {g: rows for g, rows in heads.items() if len(rows) > 1}
    decoder = model.get_decoder()
    if not heads:
        return decoder(input_ids=ids, attention_mask=attn).last_hidden_state
    # part 1: the shared prompts, left-padded
    leaders = [rows[0] for rows in heads.values()]
    P = int(shared[leaders].max())
    head_ids = torch.zeros((len(leaders), P), dtype=ids.dtype, device=ids.device)
    head_attn = torch.zeros_like(head_ids)
    for h, r in enumerate(leaders):
        n = int(shared[r])
        head_ids[h, P - n :], head_attn[h, P - n :] = ids[r, :n], 1
    with checkpointing(decoder, False):
        cache = decoder(
            input_ids=head_ids,
            attention_mask=head_attn,
            position_ids=decode.positions(head_attn),
            use_cache=True,
        ).past_key_values
    # each row's prompt among the heads (a row that shares nothing reads head 0, masked out)
    head_of = torch.zeros(S, dtype=torch.long, device=ids.device)
    own = torch.zeros(S, dtype=torch.long, device=ids.device)
    for h, rows in enumerate(heads.values()):
        head_of[rows], own[rows] = h, int(shared[rows[0]])
    layers = [(layer.keys[head_of], layer.values[head_of]) for layer in cache.layers]
    prompt_attn = head_attn[head_of] * (own > 0)[:, None]
    # part 2: every row's rest, right-padded, at its own positions after its prompt
    rest = (attn.sum(1) - own).clamp(min=1)
    R = int(rest.max())
    cols = own[:, None] + torch.arange(R, device=ids.device)[None]
    inside = cols < L
    rest_ids = ids.gather(1, cols.clamp(max=L - 1)) * inside
    rest_attn = attn.gather(1, cols.clamp(max=L - 1)) * inside
    with checkpointing(decoder, True):
        hidden = decoder(
            input_ids=rest_ids,
            attention_mask=torch.cat([prompt_attn, rest_attn], 1),
            position_ids=cols,
            past_key_values=ReadOnly(layers, config=model.config),
            use_cache=False,
        ).last_hidden_state
    # back at each row's positions (S, L, H): the rest's, past L dropped
    out = hidden.new_zeros(S, L + R, hidden.shape[-1])
    out = out.scatter(1, cols[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
    return out[:, :L]


@contextlib.contextmanager
def checkpointing(decoder, on: bool):
    """Gradient checkpointing of the decoder's layers turned off for the block (the prompts' part:
    a cache that is written must not be written again by the backward's recomputation; its
    activations are one row per question), or left as it is for a forward that only reads a
    cache: transformers drops a layer's cache under checkpointing unless the layer says it only
    reads it (_can_checkpoint_with_cache), which is true of ReadOnly."""
    modules = [decoder, *decoder.layers]
    layers = [
        m for m in modules if getattr(m, "gradient_checkpointing", False) and (m is not decoder or not on)
    ]
    for layer in layers:
        if on:
            layer._can_checkpoint_with_cache = True
        else:
            layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            if on:
                del layer._can_checkpoint_with_cache
            else:
                layer.gradient_checkpointing = True
