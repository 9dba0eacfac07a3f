"""The sampler against uncached references; team rollouts; exact suffix resampling."""

import pytest
import torch
from chat_models import gemma3_config, gemma_tokenizer
from transformers import Gemma3ForCausalLM, MistralConfig, MistralForCausalLM

import decode
import losses
import rollout
import tasks
import team as team_lib


def uncached_greedy(model, prompt, eos_id, max_new_tokens):
    """Reference: one full forward per step on the unpadded sequence, argmax."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] == eos_id:
            break
    return ids[len(prompt) :]


def prompts_of(agent, n=6):
    task = tasks.Relay(3)
    qs = tasks.questions(task, n, seed=1, heldout=False)
    # varied lengths
    return [agent.encode(task.render(q, list(q.steps[: i % 3]))) for i, q in enumerate(qs)]


@pytest.mark.parametrize("sampler", ["reference", "fast"])
def test_greedy_sampler_matches_uncached_argmax(make_team, decoding, sampler):
    agent = make_team(1, seed=3)[0]
    tok, prompts = agent.tokenizer, prompts_of(agent)
    # left padding is exercised
    assert len({len(p) for p in prompts}) > 1
    how = rollout.Sampling(8, tok.eos_token_id, tok.pad_token_id, 0.0)
    sample = rollout.reference_sample if sampler == "reference" else rollout.sample
    got = sample(agent.model, prompts, how)[0]
    for p, g in zip(prompts, got):
        assert g == uncached_greedy(agent.model, p, tok.eos_token_id, 8)


def test_sampler_logprobs_match_teacher_forced_forward(make_team, decoding):
    agent = make_team(1, seed=4)[0]
    tok, prompts = agent.tokenizer, prompts_of(agent)
    uniforms = torch.rand(len(prompts), 8, generator=torch.Generator().manual_seed(0))
    toks, logps = rollout.sample(
        agent.model, prompts, rollout.Sampling(8, tok.eos_token_id, tok.pad_token_id), uniforms
    )
    steps = [rollout.Step(0, p, t, lp, "") for p, t, lp in zip(prompts, toks, logps)]
    eps = [rollout.Episode(None, i, 0, [0], [s]) for i, s in enumerate(steps)]
    data = losses.agent_batch(eps, 0, torch.zeros(len(eps)), tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp = agent.token_logprobs(data)[0]
    mask = data["mask"].bool()
    assert mask.sum() == sum(map(len, toks))
    torch.testing.assert_close(logp[mask], data["sampler_logp"][mask], atol=1e-5, rtol=0)
    ratio = (logp - data["sampler_logp"])[mask].exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_shared_prefix_sampling_equals_prefilling_every_row(make_team, decoding):
    agent = make_team(1, seed=6)[0]
    tok, task = agent.tokenizer, tasks.Relay(3)
    qs = tasks.questions(task, 3, seed=1, heldout=False)
    # a group per question: its prompts share the question and differ in the messages after it,
    # and some repeat (samples whose transcripts coincide)
    prompts = [agent.encode(task.render(q, list(q.steps[:k]))) for q in qs for k in (0, 1, 1, 2, 2, 2)]
    # and a group with a shorter prefix (left padding in both parts)
    prompts += [p[4:] for p in prompts[:6]]
    groups = [g for g in range(4) for _ in range(6)]
    heads = {head for head, _ in rollout.split_prompts(prompts, groups)}
    # a real shared prefix per group
    assert len(heads) == 4 and min(map(len, heads)) > 3 and len(set(map(len, heads))) > 1
    uniforms = torch.rand(len(prompts), 8, generator=torch.Generator().manual_seed(2))
    shared = rollout.sample(
        agent.model, prompts, rollout.Sampling(8, tok.eos_token_id, tok.pad_token_id), uniforms, groups
    )
    each = rollout.reference_sample(
        agent.model, prompts, rollout.Sampling(8, tok.eos_token_id, tok.pad_token_id), uniforms
    )
    # the same tokens, and not one per prompt
    assert shared[0] == each[0] and len({tuple(t) for t in shared[0]}) > 12
    for a, b in zip(shared[1], each[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    greedy, _ = rollout.sample(
        agent.model, prompts, rollout.Sampling(8, tok.eos_token_id, tok.pad_token_id, 0.0), groups=groups
    )
    for p, g in zip(prompts, greedy):
        assert g == uncached_greedy(agent.model, p, tok.eos_token_id, 8)


def test_tiny_top_p_is_greedy_and_uniforms_make_rows_reproducible(make_team):
    agent = make_team(1, seed=5)[0]
    tok, prompts = agent.tokenizer, prompts_of(agent)
    greedy, _ = rollout.sample(
        agent.model, prompts, rollout.Sampling(6, tok.eos_token_id, tok.pad_token_id, 0.0)
    )
    u = torch.rand(len(prompts), 6, generator=torch.Generator().manual_seed(1))
    nucleus, _ = rollout.sample(
        agent.model, prompts, rollout.Sampling(6, tok.eos_token_id, tok.pad_token_id, 1.0, 1e-6), u
    )
    assert nucleus == greedy
    full, _ = rollout.sample(agent.model, prompts, rollout.Sampling(6, tok.eos_token_id, tok.pad_token_id), u)
    alone, _ = rollout.sample(
        agent.model, prompts[2:3], rollout.Sampling(6, tok.eos_token_id, tok.pad_token_id), u[2:3]
    )
    # a row samples the same tokens whatever batch it is in
    assert alone[0] == full[2]


def test_team_rollout_passes_text_and_follows_the_order(make_team):
    team, task = make_team(3), tasks.Relay(3)
    qs = tasks.questions(task, 4, seed=0, heldout=False)
    eps = rollout.new_episodes(qs, 2, 3, 1, "random", seed=0)
    assert all(sorted(e.order) == [0, 1, 2] for e in eps) and len({tuple(e.order) for e in eps}) > 1
    played, counts = rollout.play(team, task, eps, rollout.Settings(1.0, 0))
    turns, tokens = counts.turns, counts.tokens
    assert turns == 3 * len(eps) and tokens == sum(len(s.tokens) for e in played for s in e.steps)
    for e in played:
        assert [s.agent for s in e.steps] == e.order
        # each context is the rendered text of the earlier messages
        for t, s in enumerate(e.steps):
            assert s.context == team[s.agent].encode(task.render(e.question, [x.text for x in e.steps[:t]]))


def test_suffix_resampling_keeps_prefix_and_regenerates_exactly_the_suffix(make_team):
    team, task = make_team(3), tasks.Relay(3)
    qs = tasks.questions(task, 4, seed=0, heldout=False)
    first, _ = rollout.play(
        team, task, rollout.new_episodes(qs, 4, 3, 1, "fixed", 0), rollout.Settings(1.0, (0, 0))
    )
    keep = [rollout.first_turn(e, 1) for e in first]
    assert keep == [1] * len(first)
    again, counts = rollout.play(team, task, first, rollout.Settings(1.0, (0, 1)), keep)
    turns = counts.turns
    assert turns == 2 * len(first)
    # the prefix is kept, not resampled
    assert all(a.steps[0] is b.steps[0] for a, b in zip(again, first))
    # inputs untouched
    assert all(len(a.steps) == 3 for a in again) and all(len(b.steps) == 3 for b in first)
    # the suffix is a fresh draw: with a changed seed some messages differ
    assert any(a.steps[1].tokens != b.steps[1].tokens for a, b in zip(again, first))


# ----------------------------------------------------------------------------- sliding windows

WINDOW = 4


@pytest.fixture(scope="module", params=["gemma3", "mistral"])
def windowed(request):
    """(model, tokenizer): a tiny Gemma 3 (layer 0 a window of 4 tokens, layer 1 full attention) or
    Mistral (a window of 4 in both layers), on the Gemma tokenizer's ids."""
    tok = gemma_tokenizer()
    torch.manual_seed(0)
    if request.param == "gemma3":
        model = Gemma3ForCausalLM(gemma3_config(tok))
    else:
        config = MistralConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=WINDOW,
        )
        model = MistralForCausalLM(config)
    assert decode.sliding(model) and model.config.sliding_window == WINDOW
    return model.eval(), tok


def windowed_prompts():
    """Two groups: prompts sharing 9 tokens with own tails of 1 to 5 (so a shared-prefix prefill
    would pad between prefix and tail), the same 3 tokens shorter, and a prompt of 2 tokens (left
    padding past the window). (prompts, groups)."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, 300, (n,), generator=g).tolist()  # noqa: E731
    head = ids(9)
    prompts = [head + ids(k) for k in (1, 3, 5, 2)]
    prompts += [p[3:] for p in prompts] + [ids(2)]
    return prompts, [0] * 4 + [1] * 4 + [2]


def test_sliding_window_sampler_matches_uncached_argmax(windowed):
    model, tok = windowed
    prompts, groups = windowed_prompts()
    # longer than the window, of different lengths, and groups a prefix sharing would split
    assert min(map(len, prompts[:8])) > WINDOW and len({len(p) for p in prompts}) > 5
    assert min(len(head) for head, _ in rollout.split_prompts(prompts[:8], groups[:8])) > WINDOW
    eos, pad = tok.eos_token_id, tok.pad_token_id
    got, _ = rollout.sample(model, prompts, rollout.Sampling(8, eos, pad, 0.0), groups=groups)
    for p, g in zip(prompts, got):
        assert g == uncached_greedy(model, p, eos, 8)
    # every row decodes past the window, the short one too
    assert min(len(p) + len(g) for p, g in zip(prompts, got)) > WINDOW


def test_sliding_window_logprobs_match_teacher_forced_forward(windowed):
    model, tok = windowed
    prompts, groups = windowed_prompts()
    uniforms = torch.rand(len(prompts), 8, generator=torch.Generator().manual_seed(1))
    toks, logps = rollout.sample(
        model, prompts, rollout.Sampling(8, tok.eos_token_id, tok.pad_token_id), uniforms, groups
    )
    # right-padded rows, no cache
    steps = [rollout.Step(0, p, t, lp, "") for p, t, lp in zip(prompts, toks, logps)]
    eps = [rollout.Episode(None, i, 0, [0], [s]) for i, s in enumerate(steps)]
    data = losses.agent_batch(eps, 0, torch.zeros(len(eps)), tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp = team_lib.Agent("a", model, None, None).token_logprobs(data)[0]
    mask = data["mask"].bool()
    assert mask.sum() == sum(map(len, toks)) > 4 * len(prompts)
    torch.testing.assert_close(logp[mask], data["sampler_logp"][mask], atol=1e-5, rtol=0)
