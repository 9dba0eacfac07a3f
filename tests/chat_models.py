"""Tiny chat models for the real-task tests, built in code: random Llama, Qwen2, Qwen3 and Gemma 3
weights, byte-level BPE tokenizers trained on a few sentences, and chat templates: ChatML (the
format of SmolLM2 and Qwen2.5), Qwen3's (ChatML with its thinking switch) and Gemma's. The Gemma 3
model has a tokenizer of its own (another vocabulary size, other special tokens, a BOS), so a team
of it and a Llama has two tokenizer families; its layers alternate a sliding window of 4 tokens
with full attention, so the window matters on short prompts. The relay's tiny agents cover the
character tokenizer."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's template, cut to what the tests read: ChatML, and with enable_thinking=False an empty
# thinking block after the generation prompt (thinking is on when the flag is not passed)
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# Gemma 3's template: BOS, no system role (a system message opens the first user turn), and the
# assistant is "model"
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "Problem: Mia has 7 apples. She buys 5 more. How many apples does Mia have now?",
    "The answer is \\boxed{12}. Answer: 3/4, so \\frac{1}{2} of 1,000 is 500.",
    "solver reviewer finalizer team",
]


def trained_bpe(special: list, vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on CORPUS, its special tokens first (ids 0, 1, ...)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return core


def bpe_tokenizer(eos: bool = True, template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """The ChatML tokenizer of the Llama, Qwen2 and Qwen3 models: BPE merges up to 400 tokens (the
    corpus stops it at 353), EOS <|im_end|>, no BOS."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=trained_bpe(SPECIAL, 400), pad_token="<pad>", eos_token="<|im_end|>" if eos else None
    )
    tok.chat_template, tok.padding_side = template, "left"
    return tok


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """The Gemma 3 model's tokenizer: BPE merges up to 330 tokens, BOS <bos>, EOS <end_of_turn>."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=trained_bpe(GEMMA_SPECIAL, 330),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<end_of_turn>",
    )
    tok.chat_template, tok.padding_side = GEMMA_TEMPLATE, "left"
    return tok


def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The ChatML tokenizer with Qwen3's template and its thinking tags, added tokens that are not
    special (as in Qwen3's own: decoding keeps them in the text)."""
    tok = bpe_tokenizer(template=QWEN3_TEMPLATE)
    tok.add_tokens(["<think>", "</think>"])
    return tok


SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def gemma3_config(tok) -> Gemma3TextConfig:
    """Gemma 3's text model, tiny: layer 0 attends to a sliding window of 4 tokens, layer 1 to all."""
    return Gemma3TextConfig(
        **SHAPE,
        vocab_size=len(tok),
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        # no soft-capping of the logits: Agent.token_logprobs applies the output layer alone, and
        # team.check_output_layer refuses a model whose logits are more than that
        final_logit_softcapping=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )


def save_chat_model(path, arch: str = "llama", eos: bool = True) -> str:
    """A tiny random `arch` (llama, qwen2, qwen3 or gemma3) with its tokenizer, saved to `path`;
    eos=False: a Llama or Qwen2 tokenizer without EOS."""
    if arch == "gemma3":
        tok = gemma_tokenizer()
        model = Gemma3ForCausalLM(gemma3_config(tok))
    else:
        tok = qwen3_tokenizer() if arch == "qwen3" else bpe_tokenizer(eos)
        Config, Model = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        }[arch]
        config = Config(
            **SHAPE,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
        model = Model(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
