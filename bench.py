"""Moved: the memory and speed benchmarks live in tools/bench.py. This file only says the new command."""

import shlex
import sys

print(f"bench.py moved: python -m tools.bench {shlex.join(sys.argv[1:])}".rstrip(), file=sys.stderr)
sys.exit(2)
