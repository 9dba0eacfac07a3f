"""train.py with a real task's reward replaced by the final message's length (odd: 1, even: 0), so
that tiny random chat models, which never answer right, still get advantages to learn from. Run
as train.py is, with one process or under torchrun (tests/test_parallel.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from tasks import mathtask  # noqa: E402

mathtask.MathTask.reward = lambda self, q, final_message: float(len(final_message) % 2)

if __name__ == "__main__":
    train.main()
