"""Named model pairs and the loader: `load_pair(spec)` takes a preset name (`embedded`, `tiny`, `qwen`, `paper`) or
`DRAFT,VERIFIER`, each a hub id, a local folder or a `.gguf` file, and puts each model on its fast path.
Remote code is never trusted.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hlm import ASSETS, ggml_kernel, llamacpp, memory, rows, timings
from hlm.compiled import compile_step
from hlm.config import COMPILED
from hlm.drafter import KERNEL, Drafter
from hlm.estimators import SelectionCalibration
from hlm.models import embedded
from hlm.models.embedded import ensure_pair_dirs
from hlm.models.pairs import Calibration, ModelError, ModelPair, make_pair
from hlm.models.tiny import tiny_pair, tiny_role
from hlm.quant import (
    BLOCK_RECIPES,
    RECIPES,
    Busy,
    block_kind,
    float_layer,
    ggml_layer,
    int4_layer,
    median_seconds,
    onednn_bf16,
    pack_float_linears,
    quantize,
    recipe_of,
    step_seconds,
    stored_blocks,
    streamed_seconds,
    use_blocks,
)

if TYPE_CHECKING:
    import numpy as np

LOG = logging.getLogger(__name__)
FP32_MARGIN = 1.5  # fp32 is taken only where bf16 takes longer than this many times its time (`cpu_bf16_taken`)
GUARD_MARGIN = 1.25  # on the verifier ggml beats the guard's recipe only where this many times faster (`_blocks_path`)


@dataclass(frozen=True)
class Preset:
    draft: str
    verifier: str
    description: str
    calibration: Calibration | None = None
    selection: str = ""  # file in hlm/assets/ with the pair's `SelectionCalibration` (`python -m hlm study --fit`)
    # Per model (draft, verifier): the weight-only recipe `--quant auto` may use, from `hlm.quant`'s guard (`hlm
    # bench`). The verifier's distribution *is* the output, so it needs the whole guard; the draft's errors cannot
    # change what HLM emits, only how often the cloud agrees, so a draft recipe within the KL bar is taken and its
    # effect on selection re-measured (docs/speed.md).
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
                                   samples=319, note="10 prompts of hlm/assets/prompts.jsonl, 32 tokens, T=0.7"),
                       selection="selection-embedded.json",
                       # Each model runs its GGUF's own blocks. The draft (gguf: Q5_0 and Q8_0 as two 4-bit planes,
                       # Q4_K as one) agrees with the bf16 draft on top-1 at 99.36 % of the bench's 16 tuning prompts
                       # x 32 tokens (KL 0.0006) and 99.06 % of 32 others; the int8 it ran before, 97.9 %. The
                       # verifier (q4k: it has no Q5_0 or Q8_0 layers) agrees with the GGUF's weights computed in fp32
                       # as closely as the bf16 copy does (docs/speed.md, "Quality guard")
                       fast=("gguf", "q4k")),
    "tiny": Preset("tiny:draft", "tiny:verifier", "two tiny randomly initialised models (tests of mechanics)"),
    "qwen": Preset("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5 0.5B -> 1.5B (hub)"),
    "paper": Preset("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "meta-llama/Llama-2-7b-chat-hf",
                    "TinyLlama-1.1B -> Llama-2-7B, the paper's pair (hub)"),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has bf16 kernels, else fp16 on CUDA; on a CPU without oneDNN's bf16 (AVX2 alone, no
    AVX-512), bf16 unless it measures much slower than fp32 (`cpu_bf16_taken`)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if onednn_bf16() or cpu_bf16_taken() else torch.float32


@functools.cache
def cpu_bf16_taken() -> bool:
    """Whether one row through a 1.5B model's widest layer (8,960 x 1,536, streamed from memory) takes bf16 at most
    FP32_MARGIN times as long as fp32 on this CPU, measured once a process. Without oneDNN's bf16, CPUs differ: on
    one (AMD EPYC, AVX2, torch 2.13) one row took 1.4-1.8 against 2.6-3.7 ms, half the bytes, and the int4 kernel
    took 1.0 ms on bf16 rows, while many rows run an eighth as fast as fp32's (21 against 161 GFLOPS at 512), so
    decoding gains and prompts lose (docs/speed.md, "CPUs with AVX2 alone"); on another, in an earlier torch, a 0.5B
    decode step took 1.6 s in bf16 and 0.27 s in fp32. The margin: fp32 holds twice the bytes (the embedded pair
    about 10 GB), and on a third AVX2 CPU the two took 1.5-2.0 ms each by turns, which flipped the dtype from one load
    to the next; so the timing is kept (`hlm.timings`). When the cores are busy (`Busy`), bf16, untimed."""
    try:
        (bf16, fp32), _ = timings.kept("dtype", lambda: streamed_seconds(
            float_layer(8960, 1536, torch.bfloat16), float_layer(8960, 1536, torch.float32)), 8960, 1536)
    except Busy as exc:
        LOG.warning("dtype: %s; bf16 taken untimed", exc)
        return True
    return bf16 <= FP32_MARGIN * fp32


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
    model.hlm_source = path if path.exists() else None  # where `--quant q4k` / `gguf` find the blocks
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


def fast_path(model: PreTrainedModel, requested: str, passed: str, output: bool = False) -> str:
    """Put `model` on its fast path in place; returns why. `auto` takes the recipe accepted for this model by the
    quality guard (`passed`, `Preset.fast`) only where it is faster on this machine, one decode step timed before
    and after, since CPUs differ (int8 kernels help where memory traffic dominates; not every CPU has fast ones).
    The timing is kept for later loads (`hlm.timings`). An explicit recipe applies as asked. `output`: the model whose
    distribution is the output (the verifier; `Preset.fast`), on which a near-tie goes to the guard's recipe."""
    if requested not in ("auto", *RECIPES):
        raise ModelError(f"unknown --quant {requested!r}: use auto or one of {', '.join(RECIPES)}")
    if requested == "none" or (requested == "auto" and passed == "none"):
        return "none" if requested == "none" else "none (auto: no recipe is accepted for this model; docs/speed.md)"
    if model.device.type != "cpu":
        if requested == "auto":
            return f"none (auto: the {passed} kernels are CPU kernels)"
        raise ModelError(f"--quant {requested} runs on the CPU only (this model is on {model.device})")
    recipe = passed if requested == "auto" else requested
    if recipe in BLOCK_RECIPES:
        return _blocks_path(model, requested, recipe, GUARD_MARGIN if output else 1.0)

    def measure() -> list[float]:
        before = step_seconds(model)
        quantize(model, recipe)
        return [before, step_seconds(model)]

    (before, after), when = timings.kept("step", measure, recipe, *model_key(model))
    quantized = when == timings.AT_LOAD  # measured now, on the model it quantised; a kept timing touched nothing
    why = f"{recipe} ({after * 1e3:.0f} ms a step vs {before * 1e3:.0f} ms in {str(model.dtype)[6:]}"
    if requested == "auto" and after >= before:
        if quantized:
            raise _Slower(why + "; slower here)")
        return f"none (auto: {why}; slower here, measured {when})"
    if not quantized:
        quantize(model, recipe)
    return why + (f", measured {when})" if requested == "auto" else ", as requested)")


def model_key(model: PreTrainedModel) -> tuple[str, ...]:
    """What a kept timing of `model` depends on besides the machine (`hlm.timings.kept`): its checkpoint and shape."""
    config = model.config
    return (config.name_or_path, config.model_type, str(model.dtype), model.device.type,
            *(str(getattr(config, name, None))
              for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")))


def _blocks_path(model: PreTrainedModel, requested: str, recipe: str, margin: float) -> str:
    """The recipes that run a GGUF's own blocks are timed on every layer they replace but the output head (whose
    made-up copies would take gigabytes): each shape once, float against each candidate's kernel, with made-up
    weights streamed from memory (`streamed_seconds`), summed over the layers of that shape; not on a whole step,
    which would read (and make resident) the very weights the blocks replace. `auto` weighs the guard's recipe
    against ggml where it is installed (`_kernel_costs`) and takes the fastest, if faster than float; on the verifier
    ggml must beat the guard's recipe `margin`-fold (GUARD_MARGIN), since the verifier's guard fails on its 8-bit
    activations: on an AMX machine q4k took 0.93-1.05 times ggml's time, which flipped loads between them,
    and on AVX2 alone ggml took 0.47 times theirs (docs/speed.md). The draft's guard passes on both. The largest
    layer alone misjudged the draft on one CPU (AVX2 alone): 0.70 against 0.73 ms favoured its blocks, while its
    small layers were each two to four times slower on them and the whole step 24 % slower."""
    candidates = ("ggml", recipe) if requested == "auto" and ggml_kernel.available() else (recipe,)
    found = {r: blocks for r in candidates if (blocks := stored_blocks(model, r))}
    if not found:
        if requested == "auto":
            return f"none (auto: no {recipe} blocks for this model)"
        use_blocks(model, {}, recipe)  # raises: nothing to run on
    try:
        (plain, costs, timed), when = timings.kept("blocks", lambda: _kernel_costs(model, found), sorted(found),
                                                   *model_key(model))
    except Busy as exc:  # untimed: the recipe its guard accepted (ggml where only it has blocks), bytes halved
        taken = recipe if recipe in found else next(iter(found))
        use_blocks(model, found[taken], taken)
        return f"{taken}, {len(found[taken])} layers (taken untimed: {exc})"
    taken = min(costs, key=costs.__getitem__)
    if requested == "auto" and recipe in costs and costs[taken] * margin > costs[recipe]:
        taken = recipe  # a near-tie goes to the numerics the guard accepted
    others = "".join(f"; {r} {cost * 1e3:.1f} ms" for r, cost in costs.items() if r != taken)
    why = (f"{taken}, {len(found[taken])} layers ({costs[taken] * 1e3:.1f} vs {plain * 1e3:.1f} ms in "
           f"{str(model.dtype)[6:]} for one row through its {timed} layers but the head{others}")
    if requested == "auto" and costs[taken] >= plain:
        return f"none (auto: {why}; slower here, measured {when})"
    use_blocks(model, found[taken], taken)
    return why + (f", measured {when})" if requested == "auto" else ", as requested)")


def _kernel_costs(model: PreTrainedModel,
                  found: dict[str, dict[str, np.ndarray]]) -> tuple[float, dict[str, float], int]:
    """Seconds of one row through the layers any of `found`'s recipes replaces (the head aside): all float, and per
    recipe its kernel where it has blocks and float elsewhere; and how many layers that is. A layer of two planes is
    timed as the one int4 layer of twice its rows it runs."""
    head = model.get_output_embeddings()
    kind = {name: block_kind(model, name, data) for blocks in found.values() for name, data in blocks.items()
            if model.get_submodule(name) is not head}
    shape = {name: (model.get_submodule(name).out_features, model.get_submodule(name).in_features) for name in kind}

    def kernel(r: str, name: str) -> tuple[str, str | int]:
        """What times `name` under recipe `r`: ggml per format, torch's int4 kernel by its planes (Q4_K one)."""
        return r, kind[name] if r == "ggml" else 1 if kind[name] == "Q4_K" else 2

    plain, costs = 0.0, dict.fromkeys(found, 0.0)
    for (n, k), count in Counter(shape.values()).items():
        layers = [name for name in kind if shape[name] == (n, k)]
        kernels = sorted({kernel(r, name) for r in found for name in layers if name in found[r]}, key=str)
        stand_ins = [ggml_layer(n, k, model.dtype, str(variant)) if r == "ggml" else
                     int4_layer(n, k, model.dtype, int(variant)) for r, variant in kernels]
        float_s, *kernel_s = streamed_seconds(float_layer(n, k, model.dtype), *stand_ins)
        seconds = dict(zip(kernels, kernel_s, strict=True))
        plain += count * float_s
        for r in costs:
            costs[r] += sum(seconds[kernel(r, name)] if name in found[r] else float_s for name in layers)
    return plain, costs, len(kind)


def _release_memory() -> None:
    """Free dropped weights now and hand the freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    memory.trim_heap()


class _Slower(Exception):
    """The fast path measured slower at load: the model is reloaded without it."""


def _refs(spec: str, progress: bool = True) -> tuple[str, str]:
    """(draft, verifier) as `load_model` takes them, for a preset name or `DRAFT,VERIFIER`."""
    if spec == "embedded":
        draft_dir, verifier_dir = ensure_pair_dirs(progress=progress)
        return str(draft_dir), str(verifier_dir)
    if spec in PRESETS:
        return PRESETS[spec].draft, PRESETS[spec].verifier
    if "," in spec:
        draft, verifier = (part.strip() for part in spec.split(",", 1))
        return draft, verifier
    raise ModelError(f"unknown model pair {spec!r}: use one of {', '.join(PRESETS)} or DRAFT,VERIFIER "
                     "(hub ids, local folders or .gguf files)")


def load_unquantised(spec: str, role: str, device: torch.device, dtype: torch.dtype,
                     attention: str) -> PreTrainedModel:
    """One model of a pair (`role`: draft or verifier) as its checkpoint holds it, without the fast path: the
    bench's plain reference, in whichever dtype it times."""
    if spec == "tiny":
        return tiny_role(role, attention).to(device=device, dtype=dtype)
    draft, verifier = _refs(spec, progress=False)
    return load_model(draft if role == "draft" else verifier, device, dtype, attention)


@functools.lru_cache(maxsize=2)
def load_pair(spec: str = "embedded", device: str | None = None, dtype: str | None = None,
              progress: bool = True, quant: str = "auto") -> ModelPair:
    """Load a pair by preset name or `DRAFT,VERIFIER`; cached per process (the app and tests reuse it).
    `quant`: auto (the preset's recipe where measured faster), none, int8, int4, q4k or gguf (`hlm.quant`), or
    compiled: auto, and the draft's decode step compiled (`hlm.compiled`)."""
    dev = torch.device(device) if device else default_device()
    recipe = "auto" if quant == COMPILED else quant
    pair = tiny_pair(device=dev, quant=recipe) if spec == "tiny" else \
        _load_named(spec, dev, dtype, progress, recipe, pack_draft=quant != COMPILED)
    if quant == COMPILED:  # one graph, with the weights the default estimator reads (`hlm.compiled`)
        pair.quant["draft"] = compile_step(pair.draft, pair.quant.get("draft", "none"), pair.head_layers)
    return pair


def _load_named(spec: str, dev: torch.device, dtype: str | None, progress: bool, quant: str,
                pack_draft: bool = True) -> ModelPair:
    """A preset or `DRAFT,VERIFIER` pair, each model on its fast path (`quant`) and its remaining bf16 layers packed,
    or widened for prompts (`hlm.quant.pack_float_linears`; not the draft's when it is to be compiled, which packs its
    own), with its calibrations."""
    torch_dtype = getattr(torch, dtype) if dtype else default_dtype(dev)
    preset = PRESETS.get(spec)
    draft_ref, verifier_ref = _refs(spec, progress)
    tokenizer = _load_tokenizer(draft_ref)
    verifier_tokenizer = _load_tokenizer(verifier_ref)
    # The verifier never returns attention weights: SDPA, its short passes row by row (`hlm.rows`). The drafter's
    # passes return them only for an estimator that reads them, and only on the layers it reads: SDPA elsewhere,
    # eager there (`hlm.drafter.KERNEL`).
    draft = load_model(draft_ref, dev, torch_dtype, KERNEL)
    verifier = load_model(verifier_ref, dev, torch_dtype, rows.KERNEL)
    pair = make_pair(spec, draft, verifier, tokenizer, verifier_tokenizer, preset.calibration if preset else None)
    passed = preset.fast if preset else ("none", "none")
    for role, ref, attention, guard in zip(("draft", "verifier"), (draft_ref, verifier_ref), (KERNEL, rows.KERNEL),
                                           passed, strict=True):
        try:
            pair.quant[role] = fast_path(getattr(pair, role), quant, guard, output=role == "verifier")
        except _Slower as slower:
            setattr(pair, role, load_model(ref, dev, torch_dtype, attention))
            pair.quant[role] = f"none (auto: {slower})"
        _release_memory()  # the last views of this model's memory-mapped checkpoint, before the next one loads
    rows.exact_rows(pair.verifier)  # its float layers, once the fast path has taken its own
    for role in ("draft", "verifier") if pack_draft else ("verifier",):
        if done := pack_float_linears(getattr(pair, role)):  # the recipe's word stays first (`quant.recipe_of`,
            pair.quant[role] += f" ({done})"  # the numerics' key)
    if quant == "auto" and pack_draft and (gguf := _draft_gguf(spec, draft_ref, progress)) is not None:
        _take_llama(pair, gguf)
    if preset is not None:
        pair.selection = preset.selection_calibration()
    return pair


def _draft_gguf(spec: str, draft_ref: str, progress: bool) -> Path | None:
    """The draft's GGUF file where llama.cpp can decode it (`hlm.llamacpp`): the embedded draft's, or one named."""
    if not llamacpp.available():
        return None
    if spec == "embedded":
        try:
            return embedded.ensure_gguf(embedded.DRAFT, progress)
        except embedded.EmbeddedModelError as exc:  # e.g. an image that removed the part packages and the file
            LOG.warning("the draft stays on its own path: %s", exc)
            return None
    return Path(draft_ref) if draft_ref.endswith(".gguf") else None


LLAMA_ROUNDS = 4  # rounds of LLAMA_STEPS one-token steps on each path, in turns (`_take_llama`)
LLAMA_STEPS = 3


@torch.inference_mode()
def _take_llama(pair: ModelPair, gguf: Path) -> None:
    """Draft on llama.cpp where its step measures faster than the draft's own path (the median of LLAMA_ROUNDS rounds
    of LLAMA_STEPS steps each, the two in turns, at a short context; `hlm.quant.median_seconds`, as the fast path's
    other timings at load): both read the same GGUF's blocks. The GGUF is loaded on llama.cpp only to be timed or
    taken: where a kept timing says no, never."""
    draft = functools.cache(lambda: llamacpp.LlamaDraft(gguf, pair.template_head))  # loaded once, on first use

    def measure() -> list[float]:
        steps = (LLAMA_ROUNDS + 1) * LLAMA_STEPS  # median_seconds calls each once more, untimed
        ids = pair.encode_prompt("Hello.", steps)
        fast_drafter, own_drafter = draft().drafter(len(ids) + steps), Drafter(pair.draft, pair.template_head)
        token = int(own_drafter.prefill(ids).logits.argmax())
        fast_drafter.prefill(ids)
        return [seconds / LLAMA_STEPS for seconds in median_seconds(
            [lambda d=d: [d.forward([token]) for _ in range(LLAMA_STEPS)] for d in (fast_drafter, own_drafter)],
            LLAMA_ROUNDS)]

    (fast, own), when = timings.kept("llama.cpp draft", measure, gguf.name, gguf.stat().st_size,
                                     recipe_of(pair.quant["draft"]), *model_key(pair.draft))
    timed = f"{fast * 1e3:.0f} against {own * 1e3:.0f} ms a step"
    if fast >= own:
        pair.quant["draft"] += f"; llama.cpp not taken ({timed}, measured {when})"
        return
    pair.llama = draft()
    # The recipe names both paths: every run drafts on llama.cpp, but the study's batched passes and the semantic
    # statistic's embedding rows stay on the one chosen at load (gguf or ggml, whose timings can come out either way
    # on a machine), and the numerics key must tell their results apart.
    kept = recipe_of(pair.quant["draft"]).rstrip(",")
    pair.quant["draft"] = f"llama.cpp+{kept} (auto: {timed} on {pair.quant['draft']}, which batched passes " \
                          f"keep; measured {when})"
    for buffer in pair.draft.buffers():  # that path's file-backed blocks (`quant.stored_blocks`), read by the timing
        memory.page_out(buffer)  # and now only by batched passes and the head's rows: out of memory until then
