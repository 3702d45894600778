"""A model's quality guard against its source: the embedded GGUF's own weights, dequantised and computed in
float32, beside the bf16 copy the project converts them to and the fast path it ships (the verifier's `q4k`: the
GGUF's Q4_K codes on the int4 kernel; the draft's `int8`). Top-1 agreement and mean KL(p_source || p) over the
tuning prompts' bf16 greedy answers, as `hlm bench`'s guard computes them (docs/speed.md, "Quality guard").

    python scripts/guard_source.py --prompts 32
    python scripts/guard_source.py --model draft --prompts 16
    python scripts/guard_source.py --model draft --prompts 32 --skip 16 --keep q_proj,k_proj,v_proj,o_proj
    python scripts/guard_source.py --model draft --recipe gguf --prompts 16

`--recipe gguf` runs the model on its GGUF's own blocks wherever torch's int4 kernel holds them exactly (groups of
32): Q4_K as one 4-bit plane (the verifier's `q4k`), Q8_0 and Q5_0 as two (w = d (16 h + l - offset)); the rest
(Q6_K's groups of 16) stay bf16. Only the block scales are rounded to bf16. Not a recipe the package ships: for the
draft it measured slower than int8 (docs/speed.md, "Quality guard").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hlm import q4k  # noqa: E402
from hlm.experiments.bench import _guard_sequences  # noqa: E402
from hlm.models import embedded  # noqa: E402
from hlm.models.presets import load_model, load_pair  # noqa: E402
from hlm.quant import Int4Linear, quality, quantize  # noqa: E402

RECIPES = {"verifier": (embedded.VERIFIER, "q4k"), "draft": (embedded.DRAFT, "int8")}  # the fast path each ships
Q = gguf.GGMLQuantizationType
PLANES = {Q.Q8_0: (128, 34), Q.Q5_0: (16, 22)}  # code offset (w = d (c - offset)) and bytes per block of 32


class Planes(nn.Module):
    """A GGUF block of 5 or 8 bits as two 4-bit planes: c = 16 h + l, so w = 16 d h + d l - d offset, each plane in
    the int4 kernel's form (q - 8) scale + zero with zeros that are powers of two times d (exact). Each plane's output
    is rounded to bf16 before the sum, one rounding more than one kernel would make: part of what the guard measures."""

    def __init__(self, linear: nn.Linear, tensor: gguf.ReaderTensor, weight: torch.Tensor) -> None:
        super().__init__()
        n, k = weight.shape
        offset, size = PLANES[tensor.tensor_type]
        d = torch.from_numpy(np.asarray(tensor.data).reshape(-1, size)[:, :2].copy().view(np.float16)
                             .astype(np.float32)).reshape(n, k // 32, 1)
        codes = torch.round(weight.reshape(n, k // 32, 32) / torch.where(d == 0, 1.0, d)) + offset
        codes = torch.where(d == 0, offset, codes).reshape(n, k).to(torch.int32)
        d = d[..., 0].to(torch.bfloat16).float()  # the kernel's scales are bf16: 16 d and 8 d stay exact
        hi_zero, lo_zero = (0 * d, 8 * d) if offset == 128 else (128 * d, -8 * d)
        self.hi = Int4Linear(codes >> 4, 16 * d, hi_zero, None, torch.bfloat16)
        self.lo = Int4Linear(codes & 15, d, lo_zero, linear.bias, torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hi(x) + self.lo(x)


@torch.no_grad()
def gguf_blocks(model: nn.Module, gguf_path: Path) -> nn.Module:
    """`model` (bf16) with each Linear the GGUF stores as Q4_K, Q5_0 or Q8_0 on those blocks, in place."""
    reader = gguf.GGUFReader(gguf_path)
    names = q4k.tensor_names(reader, model)
    tensors = {t.name: t for t in reader.tensors}
    for stem, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            tensor = tensors.get(f"{names.get_name(f'{stem}.{name}' if stem else name)}.weight")
            if not isinstance(child, nn.Linear) or tensor is None:
                continue
            n, k = child.weight.shape
            if tensor.tensor_type == Q.Q4_K:
                setattr(parent, name, Int4Linear.q4k(child, np.asarray(tensor.data)))
            elif tensor.tensor_type in PLANES:
                weight = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).reshape(n, k).copy())
                setattr(parent, name, Planes(child, tensor, weight))
    for param in model.parameters():
        param.data = param.data.clone()
    return model


@torch.no_grad()
def source_model(folder: Path, gguf_path: Path) -> torch.nn.Module:
    """The converted model in float32 with every weight the GGUF holds replaced by its float32 dequantisation
    (each checked to round to the converted bf16 weight)."""
    model = load_model(str(folder), torch.device("cpu"), torch.float32, "sdpa")
    reader = gguf.GGUFReader(gguf_path)
    names = q4k.tensor_names(reader, model)
    tensors = {t.name: t for t in reader.tensors}
    for name, param in model.named_parameters():
        stem, _, kind = name.rpartition(".")
        tensor = tensors.get(f"{names.get_name(stem)}.{kind}")
        if tensor is None:
            raise SystemExit(f"no GGUF tensor for {name}")
        exact = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).reshape(param.shape).copy())
        if not torch.equal(exact.to(torch.bfloat16), param.to(torch.bfloat16)):
            raise SystemExit(f"{name}: the GGUF does not round to the converted weight")
        param.copy_(exact)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", choices=tuple(RECIPES), default="verifier")
    parser.add_argument("--skip", type=int, default=0, help="tuning prompts to pass over first")
    parser.add_argument("--recipe", choices=("shipped", "gguf"), default="shipped",
                        help="the fast path measured: the one the model ships (int8 draft, q4k verifier), or its "
                             "GGUF's own blocks")
    parser.add_argument("--keep", type=lambda s: tuple(s.split(",")), default=(),
                        help="layers (e.g. q_proj,k_proj,v_proj,o_proj) the draft's int8 leaves in bf16")
    args = parser.parse_args()
    if args.keep and (args.model != "draft" or args.recipe != "shipped"):
        parser.error("--keep leaves part of the int8 draft in bf16: use it with --model draft and the shipped recipe")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    pair = load_pair("embedded", quant="none")
    spec, recipe = RECIPES[args.model]
    bf16 = getattr(pair, args.model)
    folder = embedded.model_dir(spec)
    sequences = _guard_sequences(pair, args.prompts, args.tokens, bf16, skip=args.skip)
    print(f"{sum(len(s) - start for s, start in zip(*sequences, strict=True))} positions, {args.prompts} prompts x "
          f"{args.tokens} tokens (the bf16 {args.model}'s greedy answers)", flush=True)
    fast = load_model(str(folder), torch.device("cpu"), torch.bfloat16, "sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        path = embedded.join_gguf(spec, Path(tmp) / spec.filename, progress=False)
        source = source_model(folder, path)
        if args.recipe == "gguf":
            fast, recipe = gguf_blocks(fast, path), "gguf blocks"
        else:
            fast = quantize(fast, recipe, keep=args.keep)
    recipe += f" but {','.join(args.keep)}" if args.keep else ""
    rows = [(f"{recipe} vs bf16", bf16, fast), ("bf16 vs source (GGUF weights, float32)", source, bf16),
            (f"{recipe} vs source (GGUF weights, float32)", source, fast)]
    for label, reference, model in rows:
        top1, kl = quality(reference, model, *sequences)
        print(f"{label:42s} top-1 {100 * top1:6.2f} %   KL {kl:.5f} nats", flush=True)


if __name__ == "__main__":
    main()
