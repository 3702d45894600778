"""A model pair: a draft ("device") and a verifier ("cloud") causal LM that share one tokenizer, checked to form a
pair (`make_pair`). A leaf of the models package: the loaders (`presets`, `tiny`) build on it.

Vocabularies must match token for token; ids the tokenizer never emits (filler rows of the embedding) are masked
in both models; one chat template renders prompts for both.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hlm.config import MAX_PROMPT_CHARS
from hlm.drafter import Drafter
from hlm.errors import UserError
from hlm.estimators import SelectionCalibration
from hlm.features import default_heads
from hlm.models.numerics import STORED_BLOCK_ROWS, Numerics
from hlm.prefix import template_head
from hlm.quant import GgmlLinear, HeadRows, Int8Linear, PlanesLinear, recipe_of

if TYPE_CHECKING:
    from hlm.llamacpp import LlamaCppDrafter, LlamaDraft


class ModelError(UserError, RuntimeError):
    """A model pair cannot be loaded or does not form a valid pair."""


class PromptError(UserError):
    """The prompt is empty or too long for the pair's context."""


@dataclass(frozen=True)
class Calibration:
    """beta ~ a*u + b fitted by `python -m hlm calibrate` (U-HLM); thresholds on u."""

    a: float
    b: float
    delta: float  # P(q[d] < p[d]) over the calibration run
    risk_averse: float  # -b/a
    risk_prone: float  # (delta - b)/a
    samples: int
    note: str = ""


@dataclass
class ModelPair:
    name: str
    draft: PreTrainedModel
    verifier: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    valid: torch.Tensor  # bool per vocabulary id: False for filler ids never emitted
    stop_ids: frozenset[int]
    max_context: int
    calibration: Calibration | None = None
    selection: SelectionCalibration = field(default_factory=SelectionCalibration)
    quant: dict[str, str] = field(default_factory=dict)  # per model: the recipe running and why it was chosen
    llama: LlamaDraft | None = None  # the draft on llama.cpp, where its load took it (`hlm.models.presets`)

    @property
    def vocab_size(self) -> int:
        return int(self.valid.shape[0])

    @property
    def heads(self) -> tuple[tuple[int, int], ...]:
        """The draft's (layer, head) pairs whose attention the `heads` estimators (the default among them) read: the
        calibration's, or RAUQ's middle layers until one is fitted."""
        cfg = self.draft.config
        return self.selection.heads or default_heads(cfg.num_hidden_layers, cfg.num_attention_heads)

    @property
    def head_layers(self) -> frozenset[int]:
        """The layers of `heads`: where the `heads` estimators' passes compute attention weights (and what
        `--quant compiled`'s one graph computes in every step)."""
        return frozenset(layer for layer, _ in self.heads)

    def new_drafter(self, layers: Collection[int], capacity: int) -> Drafter | LlamaCppDrafter:
        """A fresh drafter for a run of at most `capacity` tokens whose passes read the attention weights of `layers`:
        on llama.cpp where the pair took it (weights read from its graph where `layers` are named), else on the
        transformers draft."""
        if self.llama is not None:
            return self.llama.drafter(capacity, weights=bool(layers))
        return Drafter(self.draft, self.template_head)

    @property
    def attention_path(self) -> str:
        """Where runs that read attention weights draft, where that is not the draft the numerics key names
        (`PairFacts.run_key` keys their cached runs by it): llama.cpp's graph with flash attention off."""
        return "" if self.llama is None else "attention weights: llama.cpp, flash attention off"

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Chat-template the prompt (one template for both models) and check it fits the context."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        ids = self._render(prompt)
        if len(ids) + max_new_tokens > self.max_context:
            raise PromptError(f"the prompt is {len(ids):,} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                              f"the context of {self.max_context:,} tokens")
        return ids

    def _render(self, prompt: str) -> list[int]:
        if self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    @functools.cached_property
    def template_head(self) -> tuple[int, ...]:
        """The template ids every prompt starts with (`hlm.prefix` prefills them once per model)."""
        return template_head(self._render("Hello."), self._render("? 42"))

    @property
    def embeddings(self) -> torch.Tensor | HeadRows:
        """The draft's output-embedding rows, indexed as a matrix's (the semantic statistic compares their cosines).
        On the fast path no float copy of the head stays alive: an int8 head gives its int8 rows (a per-row scale
        leaves cosines unchanged), a head on GGUF planes or ggml's blocks the rows asked for, decoded from them."""
        head = self.draft.get_output_embeddings()
        if isinstance(head, PlanesLinear | GgmlLinear):
            return HeadRows(head)
        return head.weight_int8 if isinstance(head, Int8Linear) else head.weight

    @property
    def numerics(self) -> str:
        """The models' dtype, fast path and verifier attention in one line: cached study and sweep results are keyed
        by it (the verifier's `hlm.rows` kernel changed its greedy answers' numerics); a run that never drafts by the
        part without the draft (`hlm.models.numerics.without_draft`)."""
        recipes = tuple((role, recipe_of(why)) for role, why in sorted(self.quant.items()))
        return str(Numerics(str(self.draft.dtype).removeprefix("torch."), recipes,
                            self.verifier.config._attn_implementation, self.verifier_block_rows))

    @property
    def verifier_block_rows(self) -> int:
        """Rows per float GEMM of the verifier's short passes (`hlm.rows.exact_rows`; a verifier made otherwise, as
        some tests make one, has the block every stored key had)."""
        return getattr(self.verifier, "hlm_block_rows", STORED_BLOCK_ROWS)

    def describe(self) -> dict[str, Any]:
        """Hardware and model facts for the CLI/app hardware panel."""
        def info(m: PreTrainedModel) -> dict[str, Any]:
            return {"name": getattr(m, "hlm_name", m.config.name_or_path), "params": m.num_parameters(),
                    "dtype": str(m.dtype).removeprefix("torch."), "device": str(m.device),
                    "attention": m.config._attn_implementation, "quant": getattr(m, "hlm_quant", "none")}
        return {"pair": self.name, "quant": self.quant, "draft": info(self.draft), "verifier": info(self.verifier),
                "vocab_size": self.vocab_size, "max_context": self.max_context,
                "torch_threads": torch.get_num_threads(),
                "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"}


_FILLER = re.compile(r"\[PAD\d+\]")


def _stop_ids(tokenizer: PreTrainedTokenizerBase, *models: PreTrainedModel) -> frozenset[int]:
    ids: set[int] = set()
    for m in models:
        eos = getattr(m.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab)
    return frozenset(ids)


def make_pair(name: str, draft: PreTrainedModel, verifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              verifier_tokenizer: PreTrainedTokenizerBase | None = None,
              calibration: Calibration | None = None) -> ModelPair:
    """Check that the two models form a pair and mask filler ids; refuses mismatched vocabularies."""
    if verifier_tokenizer is not None and verifier_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"{name}: the draft and verifier tokenizers have different vocabularies "
                         f"({len(tokenizer)} vs {len(verifier_tokenizer)} tokens); speculative decoding needs one")
    v_draft, v_verifier = draft.config.vocab_size, verifier.config.vocab_size
    if v_draft != v_verifier:
        raise ModelError(f"{name}: vocabulary sizes differ (draft {v_draft}, verifier {v_verifier})")
    if len(tokenizer) > v_draft:
        raise ModelError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the models only {v_draft}")
    valid = torch.arange(v_draft) < len(tokenizer)
    # GGUF tokenizers name the embedding's padding rows "[PAD<id>]": fillers too, though the tokenizer lists them.
    fillers = [i for token, i in tokenizer.get_vocab().items() if i < v_draft and _FILLER.fullmatch(token)]
    valid[fillers] = False
    contexts = [getattr(m.config, "max_position_embeddings", None) or 2048 for m in (draft, verifier)]
    max_context = min(*contexts, int(os.environ.get("HLM_MAX_CONTEXT", "32768")))
    return ModelPair(name, draft, verifier, tokenizer, valid, _stop_ids(tokenizer, draft, verifier), max_context,
                     calibration)


