"""The benchmark's own counting (its timings are printed, never asserted)."""
import pytest

import bench
import rollout


def test_prompt_tokens_counts_shared_prefixes_and_distinct_tails_once(capsys):
    def episode(qid, *contexts):
        return rollout.Episode(None, qid, 0, [0] * len(contexts), [rollout.Step(0, list(c), [1], [0.0], "") for c in contexts])

    # question 0, turn 0: one prompt three times (prefix 1 2, tail 3); turn 1: prefix 1 2 3, tails 4 and 5 6
    episodes = [episode(0, [1, 2, 3], [1, 2, 3, 4]), episode(0, [1, 2, 3], [1, 2, 3, 4]), episode(0, [1, 2, 3], [1, 2, 3, 5, 6])]
    assert bench.prompt_tokens(episodes, [0, 0, 0]) == (2 + 1) + (3 + 1 + 2)
    assert bench.prompt_tokens(episodes, [1, 1, 1]) == 3 + 1 + 2  # kept turns were not generated
    assert bench.prompt_tokens(episodes, [2, 2, 1]) == 4 + 1  # one prompt alone: all but its last token is the prefix
    episodes.append(episode(1, [7, 8, 9], [7, 8, 9, 4]))  # another question: its own group
    assert bench.prompt_tokens(episodes, [1, 1, 1, 1]) == (3 + 1 + 2) + (3 + 1)
    bench.line("what", 298008, 367573, "tokens", 298008 / 367573)
    assert capsys.readouterr().out == "what: 298,008 vs 367,573 tokens, ratio 0.81x\n"


def test_bad_threads_give_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--threads", "0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "bench.py: error: --threads must be at least 1, got 0"
