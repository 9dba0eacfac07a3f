"""Tiny chat models for the real-task tests, built in code: random Llama and Qwen2 weights, a
byte-level BPE tokenizer trained on a few sentences, and a ChatML chat template (the format of
SmolLM2 and Qwen2.5). The relay's tiny agents cover the character tokenizer."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Problem: Mia has 7 apples. She buys 5 more. How many apples does Mia have now?",
    "The answer is \\boxed{12}. Answer: 3/4, so \\frac{1}{2} of 1,000 is 500.",
    "solver reviewer finalizer team",
]


def bpe_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return finish(
        PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>" if eos else None
        )
    )


def finish(tok):
    tok.chat_template, tok.padding_side = CHAT_TEMPLATE, "left"
    return tok


def save_chat_model(path, arch: str = "llama", eos: bool = True) -> str:
    """A tiny random `arch` (llama or qwen2) with a byte-level BPE tokenizer, saved to `path`."""
    tok = bpe_tokenizer(eos)
    Config, Model = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    Model(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
