"""The draft's one-token decode step, compiled once by inductor (`--quant compiled`).

Why: the int8 draft's eager step spends most of its time in `aten._weight_int8pack_mm`, whose kernel is bound by its
arithmetic on these CPUs, and the rest in small ops and Python dispatch. Inductor with `freezing` (the weights become
constants of the graph) and `max_autotune` may replace that kernel by its own CPU GEMM template, timed against it
per layer shape, and fuses the small ops around it; the step ran about twice as fast here (docs/speed.md). A draft
on ggml's blocks (`hlm.quant.GgmlLinear`) keeps ggml's products, as one op of the graph (`hlm::ggml_mul_mat`), and
gets the rest fused: 34-37 against 50-60 ms a step on an AVX2 machine.

What it costs: a compile of about a minute, and sums in another order than the eager kernels, so the draft's numerics
(`ModelPair.numerics`) differ and cached results keyed by them are not reused. Each graph holds its own packed copy of
the weights (`freezing`; 0.49 GB for the embedded draft), so one graph serves every pass it can: it computes
the attention weights of the default estimator's layers in every step, and a pass that reads fewer (the coin's, the
device-only policy's) takes what it asks for. Only an estimator that reads other layers compiles a second graph.

Inductor's on-disk graph cache stays off for these graphs: with `freezing` a cached graph carries the weights it was
compiled with, and its key does not include them (another model of the same shapes was served the first one's
weights). The kernels and autotuning choices, which hold no weights, are still cached on disk.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Collection

import torch
from transformers import DynamicCache, PreTrainedModel

from hlm.quant import QuantError, recipe_of, step_seconds

INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
            "fx_graph_cache": False,
            "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # quiet consoles
# Inductor's autotuner still calls the deprecated `Tensor.storage()` (torch 2.13); the warning is torch's own.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", module=r"torch\._inductor\.")

Step = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]  # logits, final hidden state, attentions


class CompiledStep:
    """`step(ids, cache, layers)`: one token after the cached context, as `model(...)` computes it: the next
    position's logits (1, vocab), the final normed hidden state (1, hidden) and the attention weights of `layers`
    (None when no layer is asked for).

    A graph computes the weights of a fixed set of layers, eagerly, and SDPA elsewhere: `layers` at construction
    first, then, for a pass asking for a layer outside every set compiled so far, that set joined with the pass's.
    Graphs are dynamic in the cache's length; the token and the cache's tensors are made contiguous first (a
    rollback leaves views), so a graph is never compiled again for strides."""

    def __init__(self, model: PreTrainedModel, layers: Collection[int] = ()) -> None:
        self.model = model
        self.sets = [tuple(sorted(layers))]  # the layer sets compiled (or to compile at the first call), in order
        self._compiled = torch.compile(self._forward)

    def _forward(self, ids: torch.Tensor, cache: DynamicCache, mask: tuple[bool, ...]) -> Step:
        # The layers travel as one bool per layer: Dynamo specialises bools, while an int that changed between two
        # compiles would become symbolic, and the layer tests in the attention would go wrong.
        layers = tuple(i for i, read in enumerate(mask) if read)
        out = self.model.base_model(input_ids=ids, cache=cache, use_cache=True, output_attentions=bool(layers),
                                    attention_layers=layers)
        hidden = out.last_hidden_state[:, -1]
        return self.model.get_output_embeddings()(hidden), hidden, out.attentions

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: DynamicCache, layers: Collection[int] = ()) -> Step:
        ids = ids.reshape(-1).clone()[None]  # strides of its own: a slice of a longer row would compile again
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
            torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
            torch._dynamo.maybe_mark_dynamic(layer.values, 2)
        wanted = set(layers)
        computed = next((s for s in self.sets if wanted <= set(s)), None)
        if computed is None:
            computed = tuple(sorted(wanted.union(self.sets[0])))
            self.sets.append(computed)
        # Inductor reads `freezing` outside what `torch.compile(options=...)` patches, so the whole call is patched.
        with torch._inductor.config.patch(INDUCTOR):
            mask = tuple(i in computed for i in range(self.model.config.num_hidden_layers))
            logits, hidden, attentions = self._compiled(ids, cache, mask)
        if not wanted:
            return logits, hidden, None
        return logits, hidden, tuple(a for layer, a in zip(computed, attentions, strict=True) if layer in wanted)


def compile_step(model: PreTrainedModel, why: str, layers: Collection[int] = ()) -> str:
    """Give the draft its compiled step (`hlm_step`, which `Drafter` and `hlm.quant.decode_step` run for one-token
    passes), compiled now with the attention weights of `layers` (the default estimator's); returns its fast path's
    `why`, extended by the step's time before and after, measured at load."""
    if model.device.type != "cpu":
        raise QuantError(f"--quant compiled compiles for the CPU only (the draft is on {model.device})")
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise QuantError("--quant compiled needs a C++ compiler for inductor's CPU kernels (e.g. apt-get install "
                         "g++); without one, use --quant auto")
    before = step_seconds(model)
    model.hlm_step = CompiledStep(model, layers)
    start = time.perf_counter()
    after = step_seconds(model)  # its untimed first call compiles
    return (f"{recipe_of(why).rstrip(',')}+compiled ({after * 1e3:.0f} ms a step vs {before * 1e3:.0f} ms uncompiled, "
            f"measured at load; compiled in {time.perf_counter() - start:.0f} s)")
