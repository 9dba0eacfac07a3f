"""Moved: the exact testbed lives in tools/theory.py. This file only says the new command."""

import shlex
import sys

print(f"theory.py moved: python -m tools.theory {shlex.join(sys.argv[1:])}".rstrip(), file=sys.stderr)
sys.exit(2)
