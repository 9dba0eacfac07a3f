"""--fsdp: every agent's parameters, gradients and optimiser state sharded over torchrun's processes
with PyTorch's FSDP2 (`fully_shard`), the engine verl uses underneath. Only where the shards live
changes; the update is teamtr.update_agent, line for line.

    torchrun --standalone --nproc-per-node 8 train.py --fsdp --models A,B,C --agents 3 ...

What changes, all of it here. shard_team puts a `Sharded` agent in each agent's place: an adapter
with the agent's own methods (team.Agent) in their sharded form, so that the algorithm, the
sampler and the losses never ask where the weights live.
  - shard_team: each agent is sharded per decoder layer, then as a whole (the root holds the
    embedding, the final norm and the output layer, which may be tied), and its optimiser is
    built again over the sharded parameters. The gradient is summed over processes by FSDP's
    reduce-scatter (a divide factor of 1: each process's loss is its share of the global
    token mean, as in plain data parallelism, where parallel.sum_gradients sums them).
  - whole: the sampler runs on whole weights. Before an agent's turns at one position of the
    play its weights are gathered (unshard) and kept for every forward of them, and sharded
    again after: the sampler's written decoding step (decode.py) calls the model's modules one
    by one, which FSDP's hooks would not see. One agent is whole at a time; `anywhere` makes
    every process gather the same agents, in the same order.
  - decoder_output: the update's forwards go through the root's own forward, so that FSDP
    gathers its weights and reduce-scatters its gradients; the decoder's output is caught by a
    forward hook (the output layer then runs on the agent's tokens only, as without FSDP, and
    `release` shards the root again after a forward without gradients).
  - clip_grad_norm_: the norm of the whole gradient from every process's shards.
  - most_everywhere and token_logprobs: every process makes the same number of forward calls
    (FSDP's gathers are collectives), so a process with fewer rows runs a stand-in row.
  - full_state: whole weights and optimiser states, gathered for checkpoints and the saved
    team (Hugging Face folders loadable without torchrun); load_optimizer puts a saved state
    back on the shards.
"""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

import parallel
import team as team_lib

# whole states, on the CPU, of every process's shards
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def shard_team(team, device) -> list:
    """Shard every agent over all processes (after parallel.broadcast_team: each keeps its part of
    the same weights), rebuild its optimiser, with the same settings, over the shards, and put a
    Sharded agent in its place in `team` (which is returned too)."""
    mesh = init_device_mesh(device.type, (parallel.WORLD,))
    for j, agent in enumerate(team):
        model = agent.model
        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        # the root's weights stay gathered after its forward: the update applies the output layer
        # to the decoder's output after it (decoder_output); its backward shards them again
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        # summed, not averaged: each process's loss is already its share of the global mean (as
        # a plain sum, which gloo can reduce too)
        for unit in modules([agent]):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        # the same optimiser over the sharded parameters: its one parameter group (team.make_agent),
        # with every setting, holding the shards
        (group,) = agent.optimizer.param_groups
        shards = [p for p in model.parameters() if p.requires_grad]
        optimizer = type(agent.optimizer)([{**group, "params": shards}])
        team[j] = Sharded(**{**vars(agent), "optimizer": optimizer})
    return team


class Sharded(team_lib.Agent):
    """An agent whose weights, gradients and optimiser state are FSDP2 shards: team.Agent's methods
    in their sharded form (this module's docstring)."""

    def token_logprobs(self, batch, rows=slice(None), full: bool = False, temperature: float = 1.0):
        # whole rows: the shared-prompt forward calls the decoder's modules one by one, which
        # FSDP's hooks would not see
        batch = {key: value for key, value in batch.items() if key != "shared"}
        if len(batch["ids"][rows]):
            return super().token_logprobs(batch, rows, full, temperature)
        # every process runs every forward: one without rows here runs its first row, masked out
        standin = {**batch, "mask": batch["mask"] * 0}
        logp, logp_all = super().token_logprobs(standin, slice(0, 1), full, temperature)
        return logp[:0], None if logp_all is None else logp_all[:0]

    def decoder_output(self, ids, attn):
        """The root's forward (one position of logits), with the decoder's output caught by a hook."""
        caught = []
        hook = self.model.get_decoder().register_forward_hook(
            lambda m, args, out: caught.append(out.last_hidden_state)
        )
        try:
            self.model(input_ids=ids, attention_mask=attn, logits_to_keep=1)
        finally:
            hook.remove()
        return caught[0]

    def release(self):
        """After a forward without gradients, the root's weights are sharded again (a backward does
        it otherwise): kept gathered, they would go stale at the next optimiser step, and
        model.parameters() would list them instead of the shards."""
        if not torch.is_grad_enabled():
            self.model.reshard()

    def sum_gradients(self, params):
        """Nothing to do: FSDP's reduce-scatter has summed them."""

    def clip_grad_norm_(self, params, max_norm: float):
        """The norm of the whole gradient (every process's squared shard norms summed; torch's own
        function gave each process the norm of its shards alone, on torch 2.13 with gloo), then
        one coefficient."""
        shards = [p.grad.to_local() for p in params if p.grad is not None]
        total = torch.stack([s.float().square().sum() for s in shards]).sum()
        parallel.collective(dist.all_reduce, total)
        total = total.sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for s in shards:
            s.mul_(scale.to(s.dtype))
        return total

    def most_everywhere(self, count: int) -> int:
        most = torch.tensor(count, device=parallel.DEVICE)
        parallel.collective(dist.all_reduce, most, dist.ReduceOp.MAX)
        return int(most)

    def anywhere(self, writes: bool) -> bool:
        flag = torch.tensor(float(writes), device=parallel.DEVICE)
        parallel.collective(dist.all_reduce, flag, dist.ReduceOp.MAX)
        return bool(flag > 0)

    @contextlib.contextmanager
    def whole(self):
        """The whole weights for the block (the sampler); sharded again after it."""
        units = modules([self])
        for unit in units:
            unit.set_reshard_after_forward(False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                # as shard_team set them: layers shard again after their forward, the root does not
                unit.set_reshard_after_forward(unit is not self.model)


def modules(team):
    """The FSDP units of the team's sharded agents (decoder layers and roots)."""
    return [
        m
        for agent in team
        if is_sharded(agent.model)
        for m in agent.model.modules()
        if isinstance(m, FSDPModule)
    ]


def full_state(team) -> list:
    """Per agent (whole weights, whole optimiser state) on every process's CPU; None for an agent
    that is not sharded (its own state_dict serves). A collective: every process calls it. An
    optimiser that has not stepped yet is saved as it is (its state_dict): torch would first
    initialise its state with a step of learning rate 0, and Adam counts that step."""
    states = []
    for a in team:
        if not is_sharded(a.model):
            states.append(None)
            continue
        stepped = bool(a.optimizer.state)
        optimizer = (
            get_optimizer_state_dict(a.model, a.optimizer, options=FULL)
            if stepped
            else a.optimizer.state_dict()
        )
        states.append((get_model_state_dict(a.model, options=FULL), optimizer))
    return states


def load_optimizer(agent, state: dict):
    """A whole optimiser state (full_state) put back on the agent's shards; one that has not
    stepped yet leaves the new optimiser as it is."""
    if state["state"]:
        set_optimizer_state_dict(agent.model, agent.optimizer, optim_state_dict=state, options=FULL)
