"""Tools and experiments on top of the algorithm, each run from the repository root:
python -m tools.theory (the exact testbed), python -m tools.bench (CPU benchmarks),
python -m tools.gpu_check (the GPU check); tools.compare is train.py --mode compare."""
