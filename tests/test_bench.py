"""The benchmark's own counting (its timings are printed, never asserted)."""

import pytest

import rollout
from tools import bench


def test_prefilled_counts_shared_prefixes_and_distinct_tails(make_team, capsys):
    agent = make_team(1)[0]
    tok = agent.tokenizer
    sample = lambda prompts, **kw: rollout.sample(
        agent.model, prompts, rollout.Sampling(4, tok.eos_token_id, tok.pad_token_id), **kw
    )  # noqa: E731
    # one group: prefix 5 6 (short of the shortest prompt's last token), tails 7 | 7 8 | 7 9 10 once each
    prompts = [[5, 6, 7], [5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 9, 10]]
    assert bench.prefilled([agent], lambda: sample(prompts)) == 2 + (1 + 2 + 3)
    # three groups: the first two have prefix 5 6 (and tail 7) alike; the last, alone, prefix 5 6 7 9, tail 10
    assert bench.prefilled([agent], lambda: sample(prompts, groups=[0, 1, 1, 2])) == (2 + 4) + (1 + 2 + 1)
    bench.line("what", 298008, 367573, "tokens", 298008 / 367573)
    assert capsys.readouterr().out == "what: 298,008 vs 367,573 tokens, ratio 0.81x\n"


def test_bad_threads_give_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--threads", "0"])
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err.strip() == "python -m tools.bench: error: --threads must be at least 1, got 0"
    )
