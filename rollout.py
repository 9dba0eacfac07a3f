"""Rollouts: a KV-cached batched sampler (a reference, and the one the runs use: the same with its
fast paths), team episodes with a text handoff, suffix resampling.

An episode is a question played by the team in a turn order: at turn t the acting agent reads
the rendered shared context (question + messages so far), writes a message, and the next agent
reads that text with its own tokenizer. The task scores the final message.

Exact suffix resampling: after agent i is updated, only the turns from agent i's first turn on
change distribution. `play(..., keep=...)` keeps each episode's earlier turns and regenerates the
rest, which gives exact samples of the new intermediate team at about half the cost of
resampling everything (docs/design.md, "Suffix resampling"; counted in `turns` and `tokens`).
Early exit keeps, within that suffix too, every turn that would come out the same: its writer's
weights, its context and its random numbers unchanged (`same`, the one place of the rule).

Randomness is derived, not global: each (episode, turn) draws its uniforms from a generator
seeded by (run seed, stage, update, question, sample, turn), so a row samples the same tokens
whatever batch it is in, and a run reproduces.

Unlike `model.generate`, the sampler returns the fp32 log-probs of the tokens it drew under the
distribution that drew them (temperature is part of the policy: logits / T), which tests compare
with a teacher-forced forward at the same temperature (the ratio is 1 before an update). Sampling
runs in eval mode: gradient checkpointing in train mode turns the cache off.
"""

import os
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

import decode
from config import derive_seed, of_agent


@dataclass
class Step:
    agent: int
    # prompt token ids in the acting agent's tokenizer
    context: list
    # generated ids, ending with EOS unless cut at max_new_tokens
    tokens: list
    # sampler's fp32 log pi(token | context)
    logprobs: list
    # the message as written (other agents read it through the task's context)
    text: str
    # cut at max_new_tokens (no EOS)
    truncated: bool = False
    # what made it (Made): the writer's weights version, sampling settings, random numbers
    made: "Made | None" = None
    # (first, end): the tokens that decide what the message says, where the task can tell
    deciding: tuple | None = None


@dataclass
class Episode:
    question: object
    # index of the question in its batch; episodes of one question form a group
    qid: int
    # index within the group
    sample: int
    # acting agent at each turn
    order: list
    steps: list = field(default_factory=list)
    reward: float = 0.0


@dataclass(frozen=True)
class Sampling:
    """How one sampler call draws: rows of at most `new_tokens` tokens, each cut after its first
    `eos_id` and padded with `pad_id`, from the policy at `temperature` (the model's logits / T;
    0 is greedy) within the nucleus `top_p` (eval.py only)."""

    new_tokens: int
    eos_id: int
    pad_id: int
    temperature: float = 1.0
    top_p: float = 1.0


@torch.no_grad()
def reference_sample(model, prompts, how: Sampling, uniforms=None):
    """The sampler, plainly; `sample` adds its fast paths and is held to this by tests.
    prompts: lists of ids, of any lengths. uniforms: (B, how.new_tokens) in [0, 1), one row per
    prompt (inverse-CDF sampling; None draws with torch.multinomial).
      1. left padding: every prompt ends in the last column, and position ids count real tokens
         only, so a padded row sees the positions it would see alone;
      2. prefill: one forward over the prompts fills the KV cache, logits at the last position;
      3. decode (decode_loop): per step, the policy's fp32 log-probs, the next token of each row
         from its uniform (pick), and one forward of the new tokens on the cache.
    Returns per row (tokens, their fp32 log-probs under the policy that drew them: the model's
    logits / temperature, its own at temperature 0), each cut after the row's first EOS."""
    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, how.pad_id, device)
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=decode.positions(attn),
        use_cache=True,
        logits_to_keep=1,
    )
    return decode_loop(forward_step(model, out.past_key_values), out.logits[:, -1], attn, how, uniforms)


def forward_step(model, cache):
    """One decoding step through the model's forward: the next logits (B, V) of the new tokens
    (B, 1) at positions pos, the cache (updated in place) holding every earlier one."""

    def step(new, pos, attn):
        out = model(
            input_ids=new, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1]

    return step


def decode_loop(step, logits, attn, how: Sampling, uniforms):
    """Up to how.new_tokens tokens per row from the prefill's last logits (B, V): the policy's
    fp32 log-probs (logits / temperature), the next token (pick), then step(tokens, positions,
    mask) for the next logits. Returns (tokens, log-probs) per row, cut after the row's first
    EOS."""
    B, device = len(logits), logits.device
    pos = decode.positions(attn)[:, -1:]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for s in range(how.new_tokens):
        # (B, V), fp32: the policy at this temperature (logits / T; greedy reads the model's own)
        logits = logits.float() if how.temperature in (0, 1) else logits.float() / how.temperature
        logp = logits.log_softmax(-1)
        nxt = pick(logp, how.temperature, how.top_p, None if uniforms is None else uniforms[:, s].to(device))
        tokens.append(nxt)
        logps.append(logp.gather(-1, nxt[:, None])[:, 0])
        done |= nxt == how.eos_id
        if done.all() or s == how.new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        pos = pos + 1
        logits = step(nxt[:, None], pos, attn)
    # (B, T)
    tokens, logps = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
    cut = [row.index(how.eos_id) + 1 if how.eos_id in row else len(row) for row in tokens]
    return [t[:c] for t, c in zip(tokens, cut)], [lp[:c] for lp, c in zip(logps, cut)]


@torch.no_grad()
def sample(model, prompts, how: Sampling, uniforms=None, groups=None):
    """reference_sample with its fast paths, each a named piece that tests hold to the reference
    (tests/test_rollout.py, tests/test_decode.py):
      - prefix sharing (prefill_plan): rows of one group (groups[r]: the G samples of a
        question; default one group) share their longest common prefix, prefilled once; then
        each distinct prompt's own tail is prefilled on top of its prefix's KV-cache rows, and
        those rows are copied to the samples that read it;
      - the written decode step (decode.Cache) for Llama and Qwen models: a step written out, on
        a cache allocated once, instead of the model's forward.
    Returns (tokens, log-probs) as reference_sample does.

    A sliding window (Gemma 3, Mistral) counts cache slots, not positions (transformers' masks and
    its sliding cache layer), so padding between a prefix and its tail would take slots of the
    window: a model with a sliding-window layer samples with reference_sample.
    """
    if decode.sliding(model):
        return reference_sample(model, prompts, how, uniforms)
    device = next(model.parameters()).device
    # part 1: the shared prefixes
    unique, expand, cache, head_attn = prefill_prefixes(model, prompts, groups, how.pad_id)
    # part 2: each distinct prompt's own tail
    ids, attn = left_pad([tail for _, tail in unique], how.pad_id, device)
    # (U, prefix + tail)
    attn = torch.cat([head_attn, attn], dim=1)
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=decode.positions(attn)[:, -ids.shape[1] :],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    # (B,): each prompt's prefilled row
    expand = torch.tensor(expand, device=device)
    cache, logits = out.past_key_values, out.logits[expand, -1]
    # the prefill's cache lives on only as `cache`
    del out
    # decoding steps written out, on a cache allocated once (decode.py)
    written = decode.supported(model)
    if written:
        # every row gets its prompt's keys and values
        cache = decode.Cache(cache, expand, how.new_tokens - 1)
        step = lambda new, pos, attn: cache.step(model, new, pos, attn)
    else:
        if len(unique) < len(prompts):
            cache.reorder_cache(expand)
        step = forward_step(model, cache)
    return decode_loop(step, logits, attn[expand], how, uniforms)


def prefill_prefixes(model, prompts, groups, pad_id):
    """Part 1 of sample's prefill: each group's shared prefix (prefill_plan), computed once.
    Returns (the distinct (prefix, tail) rows, each prompt's row, the cache of their prefixes or
    None where every prefix is empty, its attention mask)."""
    device = next(model.parameters()).device
    unique, expand, heads, head_of = prefill_plan(prompts, groups)
    if max(map(len, heads)) == 0:
        return unique, expand, None, torch.zeros((len(unique), 0), dtype=torch.long, device=device)
    ids, attn = left_pad(heads, pad_id, device)
    cache = model(
        input_ids=ids, attention_mask=attn, position_ids=decode.positions(attn), use_cache=True
    ).past_key_values
    head_of = torch.tensor(head_of, device=device)
    # each distinct prompt gets its prefix's keys and values
    cache.reorder_cache(head_of)
    return unique, expand, cache, attn[head_of]


def prefill_plan(prompts, groups=None):
    """What the prefill computes: the distinct (shared prefix, own tail) rows, each prompt's row
    among them, the distinct prefixes, and each row's prefix among those."""
    # each distinct prompt prefilled once
    unique, expand = dedup(split_prompts(prompts, groups))
    heads, head_of = dedup(head for head, _ in unique)
    return unique, expand, heads, head_of


def split_prompts(prompts, groups=None) -> list[tuple[tuple, tuple]]:
    """Each prompt as (its group's shared prefix, its own tail). A group shares its longest common
    prefix, short of the shortest prompt's last token (every tail keeps one token to predict from)."""
    groups = [0] * len(prompts) if groups is None else groups
    members = {}
    for p, g in zip(prompts, groups):
        members.setdefault(g, []).append(p)
    # works on id lists
    cut = {g: min(len(os.path.commonprefix(ps)), min(map(len, ps)) - 1) for g, ps in members.items()}
    return [(tuple(p[: cut[g]]), tuple(p[cut[g] :])) for p, g in zip(prompts, groups)]


def dedup(items) -> tuple[list, list]:
    """(the distinct items in first-seen order, each item's index among them)."""
    first = {}
    index = [first.setdefault(item, len(first)) for item in items]
    return list(first), index


def left_pad(rows, pad_id, device):
    """(ids, attention mask), both (len(rows), longest row), padded on the left."""
    L = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (L - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    attn = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, attn


def pick(logp, temperature, top_p, u):
    """Next token from the policy's fp32 log-probs (B, V), already at the temperature: greedy
    (temperature 0), or inverse-CDF with uniforms u (B,)."""
    if temperature == 0:
        return logp.argmax(-1)
    probs = logp.softmax(-1)
    # nucleus: keep the smallest set of tokens whose mass reaches top_p
    if top_p < 1.0:
        sorted_p, index = probs.sort(-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, index, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    if u is None:
        return torch.multinomial(probs, 1)[:, 0]
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=probs.shape[-1] - 1)[:, 0]


def new_episodes(qs, group: int, n_agents: int, rounds: int, order: str, seed) -> list[Episode]:
    """`group` episodes per question; a turn order per episode (fixed, or a random permutation)."""
    episodes = []
    for qid, q in enumerate(qs):
        for s in range(group):
            perm = list(range(n_agents))
            if order == "random":
                random.Random(derive_seed(seed, qid, s)).shuffle(perm)
            episodes.append(Episode(q, qid, s, perm * rounds))
    return episodes


@dataclass(frozen=True)
class Settings:
    """How a play samples: the policy at `temperature` (0: greedy) within the nucleus `top_p`
    (eval.py only: training needs the log-probs of the distribution that sampled, and those stored
    are of the whole distribution at the temperature), with random numbers derived from `seed`;
    and its fast path, early exit (play)."""

    temperature: float
    seed: tuple | int
    top_p: float = 1.0
    early_exit: bool = True


class Made(NamedTuple):
    """What makes a turn, and so decides whether early exit may keep it (`same`): the writer's
    weights version, the sampling (temperature, nucleus, message length), and the random numbers'
    seed and row (question, sample, turn)."""

    version: int
    temperature: float
    top_p: float
    new_tokens: int
    seed: tuple | int
    qid: int
    sample: int
    turn: int


def play(team, task, episodes, how: Settings, keep=None):
    """Play every episode to the end, keeping the first keep[e] turns of episode e (default 0).

    how.early_exit: from there on, a turn is kept as it is where it would come out the same
    (`same`: its writer's weights, its full context and its sampling are the ones that made it);
    only the others are generated again, and counted as reused instead.

    Returns (new episodes, Counts of what it generated and reused). Inputs are not modified.
    """
    keep = keep or [0] * len(episodes)
    eps = [Episode(e.question, e.qid, e.sample, e.order, e.steps[:k]) for e, k in zip(episodes, keep)]
    turns = Turns(task, eps, episodes, how)
    # every process takes the same positions and the same writers (under --fsdp each writer's
    # weights are gathered, a collective); one agent is whole at a time
    for t in range(team[0].most_everywhere(max((len(e.order) for e in eps), default=0))):
        writing = {e.order[t] for e in eps if len(e.steps) == t and t < len(e.order)}
        for a in [a for a in range(len(team)) if team[a].anywhere(a in writing)]:
            with team[a].whole():
                turns.play(team[a], a, t)
    for e in eps:
        e.reward = task.reward(e.question, e.steps[-1].text)
    return eps, turns.counts


@dataclass
class Counts:
    """What a play generated (turns, tokens, messages cut at max_new_tokens) and the turns it kept
    by early exit."""

    turns: int = 0
    tokens: int = 0
    truncated: int = 0
    reused: int = 0

    def add(self, other: "Counts"):
        for key, value in vars(other).items():
            setattr(self, key, getattr(self, key) + value)


@dataclass
class Turns:
    """A play in progress: the episodes being played (eps), the ones played before (old: what
    their turns replace), how they are sampled, and what was generated so far."""

    task: object
    eps: list
    old: list
    how: Settings
    counts: Counts = field(default_factory=Counts)

    def play(self, agent, a: int, t: int):
        """Agent a's turns at position t, appended to the episodes whose turn t is agent a's."""
        task, eps, how = self.task, self.eps, self.how
        rows = [i for i, e in enumerate(eps) if len(e.steps) == t and t < len(e.order) and e.order[t] == a]
        # agent a's message length (--max-new-tokens may give one per agent)
        new_tokens = of_agent(task.max_new_tokens, a)
        encoded = {}

        def prompt(i):
            """Episode i's context in agent a's ids (encoded once, where needed)."""
            if i not in encoded:
                encoded[i] = agent.encode(task.context(eps[i].question, eps[i].steps, a), task.chat)
            return encoded[i]

        made = [
            Made(
                agent.version, how.temperature, how.top_p, new_tokens, how.seed, eps[i].qid, eps[i].sample, t
            )
            for i in rows
        ]
        old = [self.old[i] for i in rows]
        replaced = [e.steps[t] if t < len(e.steps) else None for e in old]
        # early exit: a turn that would come out the same is kept
        kept = [
            how.early_exit and same(s, m, eps[i].steps, e.steps[:t], lambda i=i: prompt(i))
            for i, e, s, m in zip(rows, old, replaced, made)
        ]
        for i, s, k in zip(rows, replaced, kept):
            if k:
                eps[i].steps.append(s)
        self.counts.reused += sum(kept)
        todo = [r for r, k in enumerate(kept) if not k]
        if not todo:
            return
        rows, made = ([x[r] for r in todo] for x in (rows, made))
        prompts = [prompt(i) for i in rows]
        check_length(agent, max(map(len, prompts)) + new_tokens)
        # each row's uniforms, derived from what made it: the same wherever the row is played
        uniforms = torch.stack(
            [
                torch.rand(
                    new_tokens,
                    generator=torch.Generator().manual_seed(derive_seed(how.seed, m.qid, m.sample, t)),
                )
                for m in made
            ]
        )
        tok = agent.tokenizer
        sampling = Sampling(new_tokens, tok.eos_token_id, tok.pad_token_id, how.temperature, how.top_p)
        outs, logps = sample(agent.model, prompts, sampling, uniforms, [eps[i].qid for i in rows])
        for i, p, o, lp, m in zip(rows, prompts, outs, logps, made):
            cut, text = o[-1] != tok.eos_token_id, agent.decode(o)
            eps[i].steps.append(Step(a, p, o, lp, text, cut, m, deciding_span(agent, task, o, text, cut)))
            self.counts.truncated += cut
        self.counts.turns += len(rows)
        self.counts.tokens += sum(map(len, outs))


def deciding_span(agent, task, tokens: list, text: str, cut: bool) -> tuple | None:
    """(first, end): the message's last tokens before its EOS that hold the characters the task
    says decide it (tasks.Relay.deciding), or None where the task cannot tell."""
    if not hasattr(task, "deciding"):
        return None
    end = len(tokens) - (not cut)
    first, chars = end, task.deciding(text)
    while chars > 0 and first > 0:
        first -= 1
        chars -= len(agent.decode(tokens[first : first + 1]))
    return first, end


def same(step, made: Made, steps: list, read: list, prompt) -> bool:
    """The reuse rule: a played turn `step` is what its writer would write now only if what made
    it (`made`: the writer's weights version, sampling settings and random numbers) and its full
    context are the ones that made it; the sampler is then deterministic. A task's context reads
    the earlier turns' writers and messages (tasks/__init__.py, tasks/mathtask.py), so it is the
    same where each earlier turn (`steps`) has the writer, tokens and text of the one it read
    (`read`); otherwise where prompt(), the context encoded again, gives its ids."""
    if step is None or step.made != made:
        return False
    unchanged = all(
        x is y or (x.agent, x.tokens, x.text) == (y.agent, y.tokens, y.text)
        for x, y in zip(steps, read, strict=True)
    )
    return unchanged or prompt() == step.context


class ContextTooLong(ValueError):
    """A prompt plus --max-new-tokens exceeds the model's context window."""


def check_length(agent, length: int):
    """A clear error before the model sees positions it was never built for."""
    limit = getattr(agent.model.config, "max_position_embeddings", None)
    if limit and length > limit:
        raise ContextTooLong(
            f"{agent.name}: a context of {length} tokens (prompt + --max-new-tokens) exceeds the model's "
            f"maximum of {limit}; lower --max-new-tokens or use shorter questions"
        )


def first_turn(episode: Episode, agent: int) -> int:
    """Index of the agent's first turn in the episode (where its suffix starts)."""
    return episode.order.index(agent) if agent in episode.order else len(episode.order)
