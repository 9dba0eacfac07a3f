"""Run by test_parallel.py under torchrun (2 processes, gloo): parallel/__init__.py's pieces against their
one-process values. Exits non-zero (with the failed assertion) if any differs."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import parallel  # noqa: E402
import teamtr  # noqa: E402
from team import Agent  # noqa: E402

torch.set_num_threads(1)
# this process's threads before the group exists: close() must leave no more
threads = len(os.listdir("/proc/self/task"))
parallel.init(torch.device("cpu"), timeout_s=60)
assert parallel.WORLD == 2

# shard: contiguous blocks that cover every index once
hits = torch.zeros(9, dtype=torch.long)
hits[list(parallel.shard(9))] = 1
assert parallel.all_sum(hits).tolist() == [1] * 9, parallel.all_sum(hits)
assert parallel.row_block(parallel.RANK + 2) == ([0, 2][parallel.RANK], 5)

# the whole batch, the same on every rank; each rank keeps its block of rows
gen = torch.Generator().manual_seed(0)
x, mask = torch.randn(6, 5, generator=gen), (torch.rand(6, 5, generator=gen) > 0.4).float()
# a row without tokens
mask[3] = 0
mine = list(parallel.shard(6))
mean = teamtr.global_means({"x": losses.token_mean(x[mine], mask[mine])})["x"]
assert abs(mean - losses.token_mean(x, mask).value()) < 1e-6
for reduction in ("token", "sequence"):
    denom = parallel.all_sum(losses.denominator(mask[mine], reduction))
    share = parallel.all_sum(losses.masked_mean(x[mine], mask[mine], reduction, denom))
    assert torch.allclose(share, losses.masked_mean(x, mask, reduction)), reduction

    # the summed gradient of the shares is the whole batch's gradient
    torch.manual_seed(1)
    layer = torch.nn.Linear(5, 5)
    params = list(layer.parameters())
    losses.masked_mean(layer(x), mask, reduction).backward()
    whole = [p.grad.clone() for p in params]
    layer.zero_grad(set_to_none=True)
    losses.masked_mean(layer(x[mine]), mask[mine], reduction, denom).backward()
    parallel.sum_gradients(params)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(params, whole)), reduction

# check_identical: quiet on equal weights, an error once one rank's weights differ
team = [Agent("a", layer, None, None)]
parallel.check_identical(team)
if parallel.RANK == 1:
    with torch.no_grad():
        layer.bias[0] += 1e-6
try:
    parallel.check_identical(team)
    raise AssertionError("check_identical missed a difference")
except RuntimeError as e:
    assert "differ" in str(e)
parallel.close()
assert len(os.listdir("/proc/self/task")) == threads, "close() left gloo's threads running"
print(f"rank {parallel.RANK} ok")
