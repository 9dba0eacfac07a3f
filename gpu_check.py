"""Moved: the GPU check lives in tools/gpu_check.py. This file only says the new command."""

import shlex
import sys

print(f"gpu_check.py moved: python -m tools.gpu_check {shlex.join(sys.argv[1:])}".rstrip(), file=sys.stderr)
sys.exit(2)
