"""A model's quality guard against its source: the embedded GGUF's own weights, dequantised and computed in
float32, beside the bf16 copy the project converts them to and a fast path (by default the one it ships: each
model on its GGUF's own blocks, `q4k` for the verifier, `gguf` for the draft). Top-1 agreement and mean
KL(p_source || p) over the tuning prompts' bf16 greedy answers, as `hlm bench`'s guard computes them
(docs/speed.md, "Quality guard").

    python scripts/guard_source.py --prompts 32
    python scripts/guard_source.py --model draft --prompts 16
    python scripts/guard_source.py --model draft --prompts 32 --skip 16
    python scripts/guard_source.py --model draft --recipe int8 --prompts 32 --skip 16 --keep q_proj,k_proj,v_proj,o_proj
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import gguf
import torch
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hlm import gguf_blocks  # noqa: E402
from hlm.experiments.bench import _guard_sequences  # noqa: E402
from hlm.models import embedded  # noqa: E402
from hlm.models.presets import PRESETS, load_model, load_pair  # noqa: E402
from hlm.quant import RECIPES, quality, quantize  # noqa: E402

SPECS = {"draft": embedded.DRAFT, "verifier": embedded.VERIFIER}
SHIPPED = dict(zip(SPECS, PRESETS["embedded"].fast, strict=True))  # the fast path each model ships


@torch.no_grad()
def source_model(folder: Path, gguf_path: Path) -> torch.nn.Module:
    """The converted model in float32 with every weight the GGUF holds replaced by its float32 dequantisation
    (each checked to round to the converted bf16 weight)."""
    model = load_model(str(folder), torch.device("cpu"), torch.float32, "sdpa")
    reader = gguf.GGUFReader(gguf_path)
    names = gguf_blocks.tensor_names(reader, model)
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
    parser.add_argument("--model", choices=tuple(SHIPPED), default="verifier")
    parser.add_argument("--skip", type=int, default=0, help="tuning prompts to pass over first")
    parser.add_argument("--recipe", choices=RECIPES[1:], help="the fast path measured (default: the one the model "
                        "ships: gguf for the draft, q4k for the verifier)")
    parser.add_argument("--keep", type=lambda s: tuple(s.split(",")), default=(),
                        help="layers (e.g. q_proj,k_proj,v_proj,o_proj) that --recipe int8 or int4 leaves in bf16")
    args = parser.parse_args()
    spec, recipe = SPECS[args.model], args.recipe or SHIPPED[args.model]
    if args.keep and recipe not in ("int8", "int4"):
        parser.error("--keep leaves layers of an int8 or int4 model in bf16: use it with --recipe int8 or int4")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    pair = load_pair("embedded", quant="none")
    bf16 = getattr(pair, args.model)
    folder = embedded.model_dir(spec)
    sequences = _guard_sequences(pair, args.prompts, args.tokens, bf16, skip=args.skip)
    print(f"{sum(len(s) - start for s, start in zip(*sequences, strict=True))} positions, {args.prompts} prompts x "
          f"{args.tokens} tokens (the bf16 {args.model}'s greedy answers)", flush=True)
    fast = load_model(str(folder), torch.device("cpu"), torch.bfloat16, "sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        path = embedded.join_gguf(spec, Path(tmp) / spec.filename, progress=False)
        source = source_model(folder, path)
        fast = quantize(fast, recipe, keep=args.keep)
    recipe += f" but {','.join(args.keep)}" if args.keep else ""
    rows = [(f"{recipe} vs bf16", bf16, fast), ("bf16 vs source (GGUF weights, float32)", source, bf16),
            (f"{recipe} vs source (GGUF weights, float32)", source, fast)]
    for label, reference, model in rows:
        top1, kl, *_ = quality(reference, model, *sequences)
        print(f"{label:42s} top-1 {100 * top1:6.2f} %   KL {kl:.5f} nats", flush=True)


if __name__ == "__main__":
    main()
