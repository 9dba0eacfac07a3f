"""Shared fixtures: tiny agents built from a config and a character tokenizer (no download)."""

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import decode  # noqa: E402
import tasks  # noqa: E402
import team as team_lib  # noqa: E402

torch.set_num_threads(2)
TORCH_SAVE = torch.save


def disk_full_at(stage: int):
    """A torch.save that fails for checkpoint-stage<stage>, as on a full disk."""

    def save(obj, path, *args, **kwargs):
        if f"checkpoint-stage{stage}" in str(path):
            raise OSError(28, "No space left on device")
        return TORCH_SAVE(obj, path, *args, **kwargs)

    return save


@pytest.fixture
def make_team():
    def make(n=3, seed=0, lr=1e-3):
        tok = team_lib.char_tokenizer(tasks.CHARS)
        return team_lib.clone_team(
            team_lib.tiny_model(tok, hidden=32, seed=seed), tok, n, team_lib.Training(lr=lr)
        )

    return make


@pytest.fixture(params=["written step", "model forward"])
def decoding(request, monkeypatch):
    """Runs a test with each of the sampler's two decoding paths (decode.py, or the model's forward)."""
    if request.param == "model forward":
        monkeypatch.setattr(decode, "supported", lambda model: False)
    return request.param


@pytest.fixture
def cfg():
    return config.resolve(
        config.Config(agents=3, questions=4, group=4, eval_size=8, minibatch=16, epochs=2, warmup_steps=0)
    )


def random_rewards(episodes, seed=0):
    """Random 0/1 rewards so that advantages are non-zero for a random-init team."""
    rng = random.Random(seed)
    for e in episodes:
        e.reward = float(rng.random() < 0.5)
    return episodes
