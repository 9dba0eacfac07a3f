"""Data parallel over questions on torch.distributed: every process holds the whole team, the
questions of a batch are split across processes, and the numbers are those of one process.

    torchrun --standalone --nproc-per-node 2 train.py --agents 3 --mode teamtr --threads 1

Without torchrun the same code runs as one process (RANK 0 of WORLD 1, every function below a
no-op). Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous):
  - each rank plays a contiguous block of the batch's questions (`shard`), all G samples of a
    question on one rank, so group advantages stay local and message text never leaves its rank;
    the derived per-(question, sample, turn) seeds make a rank sample what one process would;
  - agent i's update: each rank computes its share of the token-mean loss (its tokens' sum over
    the global token count), and the gradients are summed across ranks before every optimiser
    step (`sum_gradients`), so every rank takes the same step;
  - every number a decision or a log reads (the measured KL, the stop, each backtracking step,
    rewards, held-out counts) is summed across ranks first (`all_sum`), so all ranks take the
    same branch and keep identical weights (`check_identical` verifies it at every checkpoint);
  - rank 0 alone prints, logs and writes; checkpoints are written once and read by every rank.

Unlike DistributedDataParallel, whose gradient hooks fire only through the wrapped module's own
forward, the gradient sum is one visible all_reduce: an update calls the decoder and the output
layer separately (team.Agent.token_logprobs) and measures the KL between steps. gloo on CPU; NCCL for
tensors on GPU, with object messages on a gloo group. A rank that dies or hangs ends the others
within --dist-timeout seconds (not the 30-minute default) with a one-line error.
"""

import datetime
import os
import re
import traceback

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
# where reductions run; the group for object messages
DEVICE, OBJECTS = torch.device("cpu"), None


class ProcessLost(Exception):
    """A collective failed: another process died, or did not answer within --dist-timeout."""


def collective(op, *args, **kwargs):
    """Run a torch.distributed collective; its failure is ProcessLost, with the backend's first line."""
    try:
        return op(*args, **kwargs)
    # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError)
    except RuntimeError as e:
        raise ProcessLost(first_line(e)) from None


def first_line(e: Exception) -> str:
    """A backend error's first sentence, without gloo's source location."""
    line = re.sub(r"^\[[^\]]*\] ", "", str(e).strip().splitlines()[0])
    return line.split(". ")[0][:200]


def lost(e: Exception):
    """ProcessLost for a collective that failed inside torch (--fsdp: FSDP's own gathers and
    reduce-scatters, which collective() does not wrap), None for any other error."""
    frames = traceback.extract_tb(e.__traceback__)
    if (
        WORLD > 1
        and isinstance(e, RuntimeError)
        and frames
        and frames[-1].filename.endswith("distributed_c10d.py")
    ):
        return ProcessLost(first_line(e))
    return None


def init(device, timeout_s: float):
    """Join the process group when launched by torchrun (nothing to do for one process)."""
    global DEVICE, OBJECTS
    if WORLD == 1 or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        # "cuda" is this rank's GPU from here on
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    DEVICE = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
    # on CPU the default group (None) carries them
    OBJECTS = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None


def main() -> bool:
    """Rank 0: the process that prints, logs and writes."""
    return RANK == 0


def print0(*args, **kwargs):
    if main():
        print(*args, **kwargs)


def shard(n: int) -> range:
    """This rank's contiguous block of range(n) (blocks differ in size by at most one)."""
    return range(RANK * n // WORLD, (RANK + 1) * n // WORLD)


def all_sum(x) -> torch.Tensor:
    """x (a tensor or a number) summed over ranks; every rank gets the same bits."""
    # Python floats in float64
    x = torch.as_tensor(x, dtype=torch.float64 if isinstance(x, float) else None)
    x = x.to(DEVICE, copy=True) if WORLD > 1 else x
    if WORLD > 1:
        collective(dist.all_reduce, x)
    return x


def row_block(count: int) -> tuple[int, int]:
    """(first, total): where this rank's `count` rows start in the ranks' rows laid end to end
    (rank 0's first), and how many rows all ranks hold."""
    if WORLD == 1:
        return 0, count
    counts = [torch.zeros((), dtype=torch.long, device=DEVICE) for _ in range(WORLD)]
    collective(dist.all_gather, counts, torch.tensor(count, device=DEVICE))
    counts = [int(c) for c in counts]
    return sum(counts[:RANK]), sum(counts)


def minibatches(count: int, size: int, generator):
    """This rank's rows of each minibatch, as indices into its own `count` rows: a random order of
    every rank's rows laid end to end (rank 0's first, row_block), cut into minibatches of `size`.
    With one process: torch.randperm(count).split(size)."""
    first, total = row_block(count)
    for rows in torch.randperm(total, generator=generator).split(size):
        yield rows[(rows >= first) & (rows < first + count)] - first


def sum_gradients(params):
    """Sum every parameter's gradient over ranks, as one flat all_reduce (a missing one is 0)."""
    if WORLD == 1:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    collective(dist.all_reduce, flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def unique_parameters(team) -> list:
    """The team's parameters, each once (a LoRA team's agents share their base tensors)."""
    return list({p.data_ptr(): p for agent in team for p in agent.model.parameters()}.values())


def broadcast_team(team):
    """Every rank starts from rank 0's weights, whatever each rank's loading or warm-up did."""
    if WORLD > 1:
        with torch.no_grad():
            for p in unique_parameters(team):
                collective(dist.broadcast, p.data, 0)


def broadcast_object(obj):
    """Rank 0's obj on every rank (a run directory, an error message)."""
    if WORLD == 1:
        return obj
    box = [obj]
    collective(dist.broadcast_object_list, box, 0, group=OBJECTS)
    return box[0]


def check_identical(team):
    """RuntimeError unless every rank holds the same weights (compared by float64 checksums)."""
    # --fsdp: each process holds its own shard of a parameter, compared by FSDP's own gathers
    whole = [p for p in unique_parameters(team) if not isinstance(p, DTensor)]
    if WORLD == 1 or not whole:
        return
    sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in whole])
    low, high = sums.clone(), sums.clone()
    collective(dist.all_reduce, low, dist.ReduceOp.MIN)
    collective(dist.all_reduce, high, dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            "the ranks' weights differ; a collective was skipped or a decision was taken on local values"
        )


def close():
    """Leave the process group together, and free it while Python still runs. gloo's worker thread
    drops its last collectives' tensors, which needs the interpreter: a group still referenced
    at exit lets that thread race the interpreter's shutdown and abort the process ("terminate
    called without an active exception")."""
    global OBJECTS
    if dist.is_initialized():
        collective(dist.barrier)
        # the last reference to the groups goes here, so their threads are joined now
        OBJECTS = None
        dist.destroy_process_group()
