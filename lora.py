"""LoRA in plain PyTorch: a homogeneous team on one frozen base model.

Each agent gets its own module tree whose base weights are the *same tensors* as every other
agent's (frozen), with a LoRALinear in place of each target linear layer that holds that agent's
A and B: h = W x + (alpha / r) B A x. So agent i's forward applies agent i's adapter and no
other; there is no shared "active adapter" that a sampling call could switch while another agent
trains. The team's memory is one base, n small adapters and n optimisers over adapters only.

A is initialised as in peft (Kaiming uniform), B = 0, so a fresh adapter leaves the base model's
outputs unchanged. Adapters are saved in the peft format (adapter_config.json,
adapter_model.safetensors), so peft, vLLM and the hub load them onto the same base.
"""

import copy
import itertools
import json
import math
import os

import torch
from safetensors.torch import load_file, save_file

# peft's key prefix for a causal LM
PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update (alpha / r) B A."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator=None):
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        kwargs = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = torch.nn.Linear(base.in_features, rank, **kwargs)
        self.lora_B = torch.nn.Linear(rank, base.out_features, **kwargs)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def spec(rank: int, alpha: float, targets) -> dict:
    """A team's adapters: their rank r, scale alpha and target layers (by last name)."""
    return {"rank": rank, "alpha": alpha, "targets": list(targets)}


def adapted(base: torch.nn.Module, rank: int, alpha: float, targets: list[str], seed: int) -> torch.nn.Module:
    """A new module tree sharing every parameter and buffer of `base` (frozen), with LoRALinear
    layers on the linear layers whose last name is in `targets`. ValueError if none matches."""
    base.requires_grad_(False)
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    # new modules, the same tensors
    model = copy.deepcopy(base, memo=shared)
    generator = torch.Generator().manual_seed(seed)
    names = target_layers(model, targets)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha, generator))
    model.lora = {"rank": rank, "alpha": alpha, "targets": sorted({n.rsplit(".", 1)[-1] for n in names})}
    return model


def target_layers(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The names of the linear layers whose last name is in `targets`. ValueError if none is."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    ]
    if not names:
        raise ValueError(
            f"--lora-targets {','.join(targets)}: no linear layer of the model has one of these names"
        )
    return names


def is_adapted(model) -> bool:
    return hasattr(model, "lora")


def save_adapter(model, path: str, base_path: str):
    """The adapter in the peft format; base_path (the base model's folder or hub name) is written
    relative to `path` when it is a local folder, so a run directory can be moved."""
    os.makedirs(path, exist_ok=True)
    weights = {PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
    save_file(weights, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    base = os.path.relpath(base_path, path) if os.path.isdir(base_path) else base_path
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": model.lora["rank"],
        "lora_alpha": model.lora["alpha"],
        "target_modules": model.lora["targets"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base,
        "inference_mode": True,
    }
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read_config(path: str) -> dict:
    """An adapter's config, with base_model_name_or_path resolved against its folder."""
    with open(os.path.join(path, CONFIG)) as f:
        config = json.load(f)
    base = os.path.normpath(os.path.join(path, config["base_model_name_or_path"]))
    return {
        **config,
        "base_model_name_or_path": base if os.path.exists(base) else config["base_model_name_or_path"],
    }


def load_adapter(model, path: str):
    """Load a saved adapter into an adapted model of the same shape (every key must match)."""
    weights = {k[len(PREFIX) :]: v for k, v in load_file(os.path.join(path, WEIGHTS)).items()}
    own = {k for k in model.state_dict() if ".lora_" in k}
    if set(weights) != own:
        raise ValueError(
            f"{path}: the adapter does not fit the model ({len(set(weights) ^ own)} keys differ)"
        )
    model.load_state_dict(weights, strict=False)
