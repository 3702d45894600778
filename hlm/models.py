"""Model pairs: a draft ("device") and a verifier ("cloud") causal LM that share one tokenizer.

`load_pair(spec)` takes a preset name (`embedded`, `tiny`, `qwen`, `paper`) or `DRAFT,VERIFIER`, each a hub id,
a local folder or a `.gguf` file. Vocabularies must match token for token; ids the tokenizer never emits
(filler rows of the embedding) are masked in both models; one chat template renders prompts for both.
Remote code is never trusted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hlm.config import MAX_PROMPT_CHARS
from hlm.errors import UserError
from hlm.estimators import SelectionCalibration
from hlm.prefix import template_head
from hlm.quant import RECIPES, Int8Linear, quantize, step_seconds

ASSETS = Path(__file__).resolve().parent.parent / "assets"


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


@dataclass(frozen=True)
class Preset:
    draft: str
    verifier: str
    description: str
    calibration: Calibration | None = None
    selection: str = ""  # file in assets/ with the pair's `SelectionCalibration` (`python -m hlm study --fit`)
    # Per model (draft, verifier): the weight-only recipe `--quant auto` may use, from `hlm.quant`'s guard (`hlm
    # bench`). The verifier's distribution *is* the output, so it needs the whole guard; the draft's errors cannot
    # change what HLM emits, only how often the cloud agrees, so a draft recipe within the KL bar is taken and its
    # effect on selection re-measured (README "Speed").
    fast: tuple[str, str] = ("none", "none")

    def selection_calibration(self) -> SelectionCalibration:
        """The shipped calibration; without one (not fitted yet) the scores' scales are guesses, and it says so."""
        path = ASSETS / self.selection
        if self.selection and path.is_file():
            return SelectionCalibration.load(path)
        return SelectionCalibration(note=f"not fitted ({path.name} missing): `python -m hlm study --fit`")


PRESETS: dict[str, Preset] = {
    "embedded": Preset("embedded:draft", "embedded:verifier",
                       "Qwen2.5-Coder-0.5B-Instruct drafts for Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from PyPI)",
                       # `python -m hlm calibrate --models embedded --limit 10 --max-new-tokens 32` (bf16, T=0.7)
                       Calibration(a=0.577, b=-0.015, delta=0.483, risk_averse=0.025, risk_prone=0.862,
                                   samples=319, note="10 prompts of assets/prompts.jsonl, 32 tokens, T=0.7"),
                       selection="selection-embedded.json",
                       # 16 tuning prompts x 32 tokens vs bf16: int8 draft top-1 98.7 %, KL 0.0013; int8 verifier
                       # top-1 98.4 %, KL 0.0011 (bf16 vs fp32 itself: 98.8 %, 0.0002): the verifier stays bf16
                       fast=("int8", "none")),
    "tiny": Preset("tiny:draft", "tiny:verifier", "two tiny randomly initialised models (tests of mechanics)"),
    "qwen": Preset("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5 0.5B -> 1.5B (hub)"),
    "paper": Preset("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "meta-llama/Llama-2-7b-chat-hf",
                    "TinyLlama-1.1B -> Llama-2-7B, the paper's pair (hub)"),
}


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

    @property
    def vocab_size(self) -> int:
        return int(self.valid.shape[0])

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
    def embeddings(self) -> torch.Tensor:
        """The draft's output-embedding rows (the semantic statistic compares their cosines). On the fast path the
        head's int8 rows: a per-row scale leaves cosines unchanged, and no float copy of the head stays alive."""
        head = self.draft.get_output_embeddings()
        return head.weight_int8 if isinstance(head, Int8Linear) else head.weight

    @property
    def numerics(self) -> str:
        """The models' dtype and fast path in one line: cached study and sweep results are keyed by it."""
        recipes = ", ".join(f"{role} {why.split(' ')[0]}" for role, why in sorted(self.quant.items()))
        return f"{str(self.draft.dtype).removeprefix('torch.')}; {recipes or 'no fast path'}"

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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has bf16 kernels, else fp16 on CUDA and fp32 on CPU.

    On a CPU without oneDNN bf16 support (e.g. AMD EPYC without AVX512-BF16) bf16 falls back to a slow path:
    measured here, one 0.5B decode step took 1.6 s in bf16 and 0.27 s in fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_model(ref: str, device: torch.device, dtype: torch.dtype, attention: str) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention, "trust_remote_code": False}
    path = Path(ref)
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {ref}")
        kwargs["gguf_file"] = path.name
        ref = str(path.parent)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {ref!r}: {str(exc).splitlines()[0]}") from exc
    model.hlm_name = path.name if path.exists() else ref
    return model.to(device).eval()


def _load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    path = Path(ref)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if ref.endswith(".gguf"):
        kwargs["gguf_file"], ref = path.name, str(path.parent)
    try:
        return AutoTokenizer.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer {ref!r}: {str(exc).splitlines()[0]}") from exc


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


def fast_path(model: PreTrainedModel, requested: str, passed: str) -> str:
    """Put `model` on its fast path in place; returns why. `auto` takes the recipe accepted for this model by the
    quality guard (`passed`, `Preset.fast`) only where it is faster on this machine, one decode step timed before
    and after, since CPUs differ (int8 kernels help where memory traffic dominates; not every CPU has fast ones).
    An explicit recipe applies as asked."""
    if requested not in ("auto", *RECIPES):
        raise ModelError(f"unknown --quant {requested!r}: use auto or one of {', '.join(RECIPES)}")
    if requested == "none" or (requested == "auto" and passed == "none"):
        return "none" if requested == "none" else "none (auto: no recipe is accepted for this model; README 'Speed')"
    if model.device.type != "cpu":
        if requested == "auto":
            return f"none (auto: the {passed} kernels are CPU kernels)"
        raise ModelError(f"--quant {requested} runs on the CPU only (this model is on {model.device})")
    recipe = passed if requested == "auto" else requested
    before = step_seconds(model)
    quantize(model, recipe)
    after = step_seconds(model)
    why = f"{recipe} ({after * 1e3:.0f} ms a step vs {before * 1e3:.0f} ms in {str(model.dtype)[6:]}"
    if requested == "auto" and after >= before:
        raise _Slower(why + "; slower here)")
    return why + (", measured at load)" if requested == "auto" else ", as requested)")


def _release_memory() -> None:
    """Free dropped weights now and hand the freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Slower(Exception):
    """The fast path measured slower at load: the model is reloaded without it."""


@functools.lru_cache(maxsize=2)
def load_pair(spec: str = "embedded", device: str | None = None, dtype: str | None = None,
              progress: bool = True, quant: str = "auto") -> ModelPair:
    """Load a pair by preset name or `DRAFT,VERIFIER`; cached per process (the app and tests reuse it).
    `quant`: auto (the preset's recipe where measured faster), none, int8 or int4 (`hlm.quant`)."""
    dev = torch.device(device) if device else default_device()
    if spec == "tiny":
        from hlm.tiny import tiny_pair

        return tiny_pair(device=dev, quant=quant)
    torch_dtype = getattr(torch, dtype) if dtype else default_dtype(dev)
    preset = PRESETS.get(spec)
    if preset is not None:
        draft_ref, verifier_ref = preset.draft, preset.verifier
    elif "," in spec:
        draft_ref, verifier_ref = (part.strip() for part in spec.split(",", 1))
    else:
        raise ModelError(f"unknown model pair {spec!r}: use one of {', '.join(PRESETS)} or DRAFT,VERIFIER "
                         "(hub ids, local folders or .gguf files)")
    if spec == "embedded":
        from hlm.embedded import ensure_pair_dirs

        draft_ref, verifier_ref = (str(p) for p in ensure_pair_dirs(progress=progress))
    tokenizer = _load_tokenizer(draft_ref)
    verifier_tokenizer = _load_tokenizer(verifier_ref)
    # The drafter needs attention weights (eager); the verifier does not, so it uses the faster SDPA kernel.
    draft = load_model(draft_ref, dev, torch_dtype, "eager")
    verifier = load_model(verifier_ref, dev, torch_dtype, "sdpa")
    pair = make_pair(spec, draft, verifier, tokenizer, verifier_tokenizer, preset.calibration if preset else None)
    passed = preset.fast if preset else ("none", "none")
    for role, ref, attention, guard in zip(("draft", "verifier"), (draft_ref, verifier_ref), ("eager", "sdpa"),
                                           passed, strict=True):
        try:
            pair.quant[role] = fast_path(getattr(pair, role), quant, guard)
        except _Slower as slower:
            setattr(pair, role, load_model(ref, dev, torch_dtype, attention))
            pair.quant[role] = f"none (auto: {slower})"
        _release_memory()  # the last views of this model's memory-mapped checkpoint, before the next one loads
    if preset is not None:
        pair.selection = preset.selection_calibration()
    return pair
