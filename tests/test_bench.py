"""The benchmark's own counting (its timings are printed, never asserted)."""
import pytest

import bench
import rollout


def test_prompt_tokens_counts_each_distinct_prompt_of_a_generated_turn_once(capsys):
    def episode(*contexts):
        return rollout.Episode(None, 0, 0, [0] * len(contexts), [rollout.Step(0, list(c), [1], [0.0], "") for c in contexts])

    # turn 0: one shared prompt (3 tokens); turn 1: two distinct prompts (4 + 5 tokens)
    episodes = [episode([1, 2, 3], [1, 2, 3, 4]), episode([1, 2, 3], [1, 2, 3, 4]), episode([1, 2, 3], [1, 2, 3, 5, 6])]
    assert bench.prompt_tokens(episodes, [0, 0, 0]) == 3 + 4 + 5
    assert bench.prompt_tokens(episodes, [1, 1, 1]) == 4 + 5  # kept turns were not generated
    assert bench.prompt_tokens(episodes, [2, 2, 1]) == 5
    bench.line("what", 298008, 367573, "tokens", 298008 / 367573)
    assert capsys.readouterr().out == "what: 298,008 vs 367,573 tokens, ratio 0.81x\n"


def test_bad_threads_give_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--threads", "0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "bench.py: error: --threads must be at least 1, got 0"
