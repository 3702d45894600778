"""The draft's one-token decode step, compiled once by inductor (`--quant compiled`).

Why: the int8 draft's eager step spends most of its time in `aten._weight_int8pack_mm`, whose kernel is bound by its
arithmetic on these CPUs, and the rest in small ops and Python dispatch. Inductor with `freezing` (the weights become
constants of the graph) and `max_autotune` may replace that kernel by its own CPU GEMM template, timed against it
per layer shape, and fuses the small ops around it; the step ran about twice as fast here (docs/speed.md).

What it costs: a compile of about a minute per set of attention layers a pass asks for (one for the drafts that read
no attention, one for the estimator's layers), and sums in another order than the eager kernels, so the draft's
numerics (`ModelPair.numerics`) differ and cached results keyed by them are not reused.

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

from hlm.quant import QuantError, step_seconds

INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
            "fx_graph_cache": False,
            "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # quiet consoles
# Inductor's autotuner still calls the deprecated `Tensor.storage()` (torch 2.13); the warning is torch's own.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", module=r"torch\._inductor\.")

Step = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]  # logits, final hidden state, attentions


class CompiledStep:
    """`step(ids, cache, layers)`: one token after the cached context, as `model(...)` computes it: the next
    position's logits (1, vocab), the final normed hidden state (1, hidden) and the attention weights of `layers`.

    One graph per set of `layers`, dynamic in the cache's length; the token and the cache's tensors are made
    contiguous first (a rollback leaves views), so a graph is never compiled again for strides. Each graph holds its
    own packed copy of the weights (`freezing`): about 0.7 GB per set for the embedded draft."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._compiled = torch.compile(self._forward)

    def _forward(self, ids: torch.Tensor, cache: DynamicCache, layers: tuple[int, ...]) -> Step:
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
        # Inductor reads `freezing` outside what `torch.compile(options=...)` patches, so the whole call is patched.
        with torch._inductor.config.patch(INDUCTOR):
            return self._compiled(ids, cache, tuple(sorted(layers)))


def compile_step(model: PreTrainedModel, why: str) -> str:
    """Give the draft its compiled step (`hlm_step`, which `Drafter` and `hlm.quant.decode_step` run for one-token
    passes), compiled now for the passes that read no attention; returns its fast path's `why`, extended by the
    step's time before and after, measured at load."""
    if model.device.type != "cpu":
        raise QuantError(f"--quant compiled compiles for the CPU only (the draft is on {model.device})")
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise QuantError("--quant compiled needs a C++ compiler for inductor's CPU kernels (e.g. apt-get install "
                         "g++); without one, use --quant auto")
    before = step_seconds(model)
    model.hlm_step = CompiledStep(model)
    start = time.perf_counter()
    after = step_seconds(model)  # its untimed first call compiles
    return (f"{why.split(' ')[0]}+compiled ({after * 1e3:.0f} ms a step vs {before * 1e3:.0f} ms uncompiled, "
            f"measured at load; compiled in {time.perf_counter() - start:.0f} s)")
