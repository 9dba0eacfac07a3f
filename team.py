"""The team: one causal LM, tokenizer and optimiser per agent; the agent's forward to fp32
log-probs and its optimiser step; building, loading and saving.

Agents may be different models: text is the interface between them, and each agent keeps its
own tokenizer (and chat template, if it has one). The default agents are tiny Qwen2 models built
from a config with a character tokenizer built in code, so nothing is downloaded. `--model`
loads a Hugging Face model (hub name, local folder or .gguf file) for every agent, `--models
A,B,C` one each; check_model rejects an unusable one in one line before a run writes anything.

Pitfalls designed out here: dropout is off (it would make the KL non-zero before any update),
the tokenizer pads on the left for the batched sampler, and a missing pad token falls back to
EOS (safe, because no mask in this project is built from pad_token_id).
"""

import contextlib
import copy
import itertools
import os
from dataclasses import dataclass, field, replace

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

import hub
import lora
import parallel
import sharedprompt
from config import derive_seed, of_agent

# a bar per checkpoint written or read would bury the training log
hf_logging.disable_progress_bar()

# weights versions, never given twice in a process (a new or loaded agent draws a new one too)
VERSIONS = itertools.count()


@dataclass
class Agent:
    name: str
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    # the weights' version: a played turn or its KV cache is reused only by the version that made
    # it (rollout.play); whatever changes the weights calls changed()
    version: int = field(default_factory=lambda: next(VERSIONS))

    def changed(self):
        """The weights are about to change (an update, a warm-up step): a new version."""
        self.version = next(VERSIONS)

    def encode(self, context, chat: dict | None = None) -> list[int]:
        """Prompt ids for a context: a rendered string (relay), or chat messages (a real task's
        role and transcript). Chat models apply their own template, with the task's `chat`
        options (enable_thinking; a template that does not read one ignores it). Without a
        template, the plain format: the tokenizer's BOS token where it has one, then each
        message's content followed by a blank line."""
        tok = self.tokenizer
        messages = [{"role": "user", "content": context}] if isinstance(context, str) else context
        if tok.chat_template:
            return tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, **(chat or {})
            )
        text = context if isinstance(context, str) else "".join(m["content"] + "\n\n" for m in messages)
        # a base model was trained on documents that start with BOS; without it some write nonsense
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        return bos + tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_logprobs(self, batch, rows=slice(None), full: bool = False, temperature: float = 1.0):
        """fp32 log pi(token_{p+1} | tokens_<=p) for the selected rows of a losses.agent_batch:
        (S, L-1), 0 where mask is 0; with full=True also the whole next-token log-distributions
        (S, L-1, V). The policy is the model's logits / temperature: the distribution the sampler
        drew from (rollout.sample).

        Without full, the output layer and the log-softmax run only on the agent's own tokens
        (mask 1): the decoder reads every token, but the (tokens, vocabulary) logits of the prompt,
        which no loss uses, are never built. On a 49k vocabulary that halves the time and memory
        of an update. With --shared-prompt each question's shared prompt is computed once.
        """
        model = self.model
        ids, attn, mask = batch["ids"][rows], batch["attn"][rows], batch["mask"][rows]
        targets = ids[:, 1:]
        if full:
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            # the policy at the temperature (no copy at T = 1)
            logp_all = (logits if temperature == 1 else logits / temperature).log_softmax(-1)
            self.release()
            return logp_all.gather(-1, targets[..., None])[..., 0] * mask, logp_all
        if sharedprompt.applies(model, batch):
            hidden = sharedprompt.decoder_output(
                model, ids, attn, batch["group"][rows], batch["shared"][rows]
            )
        else:
            hidden = self.decoder_output(ids, attn)
        hidden = hidden[:, :-1]
        where = mask.bool()
        # (T, V): the agent's tokens only
        logits = model.get_output_embeddings()(hidden[where]).float()
        self.release()
        logp = torch.zeros(mask.shape, device=logits.device)
        logits = logits if temperature == 1 else logits / temperature
        logp[where] = logits.log_softmax(-1).gather(-1, targets[where][:, None])[:, 0]
        return logp, None

    def step(self, params, loss, max_grad_norm: float) -> bool:
        """One optimiser step on the gradient of `loss` (its backward done on every process): the
        gradient summed over processes, clipped to max_grad_norm. False, with the weights
        untouched, if the loss or the gradient is not finite (a fault: the step is skipped)."""
        self.sum_gradients(params)
        grad_norm = self.clip_grad_norm_(params, max_grad_norm)
        if not (torch.isfinite(parallel.all_sum(loss.detach())) and torch.isfinite(grad_norm)):
            return False
        self.optimizer.step()
        return True

    # Where the weights live. These are for whole weights on every process; under --fsdp
    # (parallel/fsdp.py) a sharded agent takes this one's place and gives each its sharded form.

    def decoder_output(self, ids, attn):
        """The decoder's last hidden states (B, L, H)."""
        return self.model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state

    def release(self):
        """After a forward: nothing to give back (a sharded agent shards its weights again)."""

    def sum_gradients(self, params):
        parallel.sum_gradients(params)

    def clip_grad_norm_(self, params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def most_everywhere(self, count: int) -> int:
        """How many rows or turns this process's loops cover: its own `count` (a sharded agent:
        the most any process has, since each of its forwards is a collective)."""
        return count

    def anywhere(self, writes: bool) -> bool:
        """Whether this process plays the agent's turns at a position: `writes` (a sharded agent:
        whether any process does, since gathering its weights is a collective)."""
        return writes

    def whole(self):
        """Its whole weights for a block of sampling: they are whole already."""
        return contextlib.nullcontext()


def char_tokenizer(chars: str) -> PreTrainedTokenizerFast:
    """One token per character, plus <pad> (0) and <eos> (1); saves and loads like any HF tokenizer."""
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # join characters without spaces
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def tiny_model(tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    """A Qwen2-architecture LM built from a config (no download): about 0.4M parameters at the
    runs' width (--hidden 128), 0.1M at this function's default of 64."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


class LoadError(ValueError):
    """A model that cannot be used: the CLI prints it as one line and exits 2, before writing."""


def source(name: str) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name or None): a path ending in .gguf is one GGUF file,
    which transformers de-quantises to ordinary weights (needs the gguf package)."""
    return (os.path.dirname(name) or ".", os.path.basename(name)) if name.endswith(".gguf") else (name, None)


def check_model(name: str):
    """The tokenizer of a usable causal LM, or a LoadError saying what is wrong: a missing local
    path, a hub name that cannot be reached, a folder without a causal LM, a tokenizer without EOS.
    Reads only the config and the tokenizer, so it is quick."""
    path, gguf = source(name)
    local = (
        os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1 or gguf is not None
    )
    if local and not os.path.exists(name):
        raise LoadError(f"--model {name}: no such file or folder")
    if not local and not hub.reachable():
        raise LoadError(
            f"--model {name}: no such local path, and the hub cannot be reached; pass a local folder or "
            ".gguf file"
        )
    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf)
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise LoadError(f"--model {name}: holds a {config.model_type!r} model, not a causal LM")
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    except LoadError:
        raise
    # transformers raises OSError, ValueError or a hub error here
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
        where = "not a Hugging Face model folder" if local else "could not load it from the hub"
        raise LoadError(f"--model {name}: {where} ({reason})") from None
    if tokenizer.eos_token_id is None:
        raise LoadError(f"--model {name}: its tokenizer has no EOS token, so messages could never end")
    return tokenizer


def load_model(name: str, device: str, dtype: torch.dtype):
    """A Hugging Face causal LM and its tokenizer: a hub name, a local folder or a .gguf file."""
    tokenizer = check_model(name)
    # apply_chat_template ignores padding_side in transformers 5.x
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    path, gguf = source(name)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=dtype).to(device)
    # the weights are plain de-quantised tensors now; unmark them so save_pretrained writes them
    if gguf:
        model.hf_quantizer, model.is_quantized = None, False
        del model.config.quantization_config
    check_output_layer(name, model)
    return model, tokenizer


def check_output_layer(name: str, model):
    """Agent.token_logprobs applies the output layer to the decoder's last hidden states itself,
    on the agent's tokens only; a model whose logits are more than that (Gemma 2's soft-capping, a
    logit scale) would be scored wrongly, so it is refused here, on a 4-token probe."""
    ids = torch.arange(1, 5, device=model.device)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        ours = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state)
    if not torch.allclose(logits, ours, rtol=1e-3, atol=1e-3):
        raise LoadError(
            f"--model {name}: its logits are post-processed (soft-capping or a logit scale), which this "
            "project does not score"
        )


@dataclass(frozen=True)
class Training:
    """How an agent's weights are trained: the optimiser of its RL updates (adam or sgd), its
    learning rate (or a list of one per agent), and gradient checkpointing. Training.of(cfg)
    gives a run's; agent(i) agent i's."""

    lr: float | tuple = 3e-4
    optimizer: str = "adam"
    grad_ckpt: bool = False

    @classmethod
    def of(cls, cfg) -> "Training":
        return cls(tuple(cfg.lr) if isinstance(cfg.lr, list) else cfg.lr, cfg.optimizer, cfg.grad_ckpt)

    def agent(self, i: int) -> "Training":
        return replace(self, lr=of_agent(self.lr, i))


def make_agent(name, model, tokenizer, training: Training = Training()) -> Agent:
    model.config.use_cache = True
    # no dropout anywhere: the ratio must be exactly 1 before an update, and the loss's forward
    # (train mode) must be the measurement's (eval mode)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Hugging Face attention reads its dropout as a float, in train mode only
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    # checkpointing is only active in train mode, and sampling runs in eval mode; non-reentrant,
    # because a frozen base's inputs need no grad
    if training.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    # adam normalises each parameter's step (about lr per step); sgd steps in proportion to the gradient
    if training.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=training.lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=0.0)
    return Agent(name, model, tokenizer, optimizer)


def clone_team(model, tokenizer, n: int, training: Training = Training()) -> list[Agent]:
    """n independent copies of one (warmed-up) model: a homogeneous team that diverges in training."""
    copies = [(copy.deepcopy(model), copy.deepcopy(tokenizer)) for _ in range(n)]
    return [make_agent(f"agent{i}", *pair, training.agent(i)) for i, pair in enumerate(copies)]


def lora_team(base, tokenizer, n: int, lora_spec: dict, training: Training = Training(), seed: int = 0):
    """n agents on one frozen base: each its own LoRA adapter (lora.py) and an optimiser over it.
    lora_spec: the adapters' rank, alpha and targets (lora.spec)."""
    check_lora_targets(base, lora_spec["targets"])
    models = [lora.adapted(base, **lora_spec, seed=derive_seed(seed, "lora", i)) for i in range(n)]
    return [make_agent(f"agent{i}", model, tokenizer, training.agent(i)) for i, model in enumerate(models)]


def check_lora_targets(model, targets: list[str]):
    """A LoadError, before any work is done on the model, if no layer matches --lora-targets."""
    try:
        lora.target_layers(model, targets)
    except ValueError as e:
        raise LoadError(str(e)) from None


def load_team(
    paths: list[str], device: str, dtype: torch.dtype, training: Training = Training()
) -> list[Agent]:
    """One agent per path (a heterogeneous team when the paths differ); folders of LoRA adapters
    (adapter_config.json) become a LoRA team on their common base."""
    if not all(os.path.exists(os.path.join(p, lora.CONFIG)) for p in paths):
        return [
            make_agent(f"agent{i}", *load_model(p, device, dtype), training.agent(i))
            for i, p in enumerate(paths)
        ]
    try:
        config = lora.read_config(paths[0])
        base = load_model(config["base_model_name_or_path"], device, dtype)
        spec = lora.spec(config["r"], config["lora_alpha"], config["target_modules"])
        team = lora_team(*base, len(paths), spec, training)
        for agent, path in zip(team, paths):
            lora.load_adapter(agent.model, path)
    except (OSError, ValueError, KeyError) as e:
        raise LoadError(f"{paths[0]}: not a readable LoRA adapter ({type(e).__name__}: {e})") from None
    return team


def save_model(model, tokenizer, path: str, weights=None):
    """save_pretrained, of the model's own weights or of `weights` (a sharded model's whole ones,
    under its own class name rather than FSDP's)."""
    if weights is not None:
        # a tied weight once, under its first name, as save_pretrained writes a model's own
        named = list(model.named_parameters(remove_duplicate=False))
        first = {}
        for name, p in named:
            first.setdefault(id(p), name)
        weights = {k: v for k, v in weights.items() if k not in {n for n, p in named if first[id(p)] != n}}
    model.save_pretrained(path, state_dict=weights)
    tokenizer.save_pretrained(path)
    if weights is not None:
        config = AutoConfig.from_pretrained(path)
        config.architectures = [
            c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers")
        ][:1]
        config.save_pretrained(path)


def save_team(team: list[Agent], folder: str, base: str = "", states=None) -> list[str]:
    """One directory per agent, folder/agent{i}/: a Hugging Face checkpoint, or for a LoRA team its
    adapter in the peft format, on the base model `base` (a folder or hub name). states: the
    whole weights of sharded agents (fsdp.full_state)."""
    paths = []
    for i, agent in enumerate(team):
        path = os.path.join(folder, agent.name)
        if lora.is_adapted(agent.model):
            lora.save_adapter(agent.model, path, base)
        else:
            save_model(agent.model, agent.tokenizer, path, states[i][0] if states and states[i] else None)
        paths.append(path)
    return paths
