"""The `tiny` pair: two small randomly initialised Qwen2 models sharing a byte-level tokenizer, built from
configs with fixed seeds in well under a second. For tests of the mechanics, not of quality.

The initialiser is wide (std 0.3) so the two models' distributions are peaked and clearly different:
rejection sampling then really rejects, which the exactness tests need.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from hlm import rows
from hlm.drafter import KERNEL
from hlm.models.pairs import ModelPair, make_pair
from hlm.quant import quantize

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 272  # 256 bytes + 3 specials + 13 filler ids that the tokenizer never emits (masked)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(specials: tuple[str, ...] = SPECIALS) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(seed: int, hidden: int = 64, layers: int = 2, vocab_size: int = VOCAB_SIZE,
               attention: str = "eager") -> PreTrainedModel:
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, initializer_range=0.3, tie_word_embeddings=True,
                         attn_implementation=attention, eos_token_id=258, bos_token_id=None, pad_token_id=256)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.hlm_name = f"tiny-{hidden}x{layers}-seed{seed}"
    return model


TINY_ROLES = {"draft": (1, 64, 2), "verifier": (2, 96, 3)}  # (seed, hidden, layers) of each model


def tiny_role(role: str, attention: str) -> PreTrainedModel:
    """The pair's `role` model, rebuilt identically (the bench's unquantised reference of a quantised tiny pair)."""
    seed, hidden, layers = TINY_ROLES[role]
    return tiny_model(seed=seed, hidden=hidden, layers=layers, attention=attention)


def tiny_pair(device: torch.device | None = None, quant: str = "auto") -> ModelPair:
    """`quant`: auto and none keep fp32 (the tests' exact reference); int8/int4 exercise the fast path."""
    device = device or torch.device("cpu")
    draft = tiny_role("draft", KERNEL).to(device)  # as `load_pair` loads a drafter
    verifier = tiny_role("verifier", rows.KERNEL).to(device)  # as `load_pair` loads a verifier
    pair = make_pair("tiny", draft, verifier, tiny_tokenizer(), tiny_tokenizer())
    if quant not in ("auto", "none"):
        for role in ("draft", "verifier"):
            quantize(getattr(pair, role), quant)
            pair.quant[role] = f"{quant} (as requested)"
    rows.exact_rows(verifier)
    return pair
