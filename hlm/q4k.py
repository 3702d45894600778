"""GGUF's Q4_K blocks, the format `--quant q4k` runs (`hlm.quant`): reading them from a GGUF file, checking them
against the float weights a model was converted to, and decoding them to 4-bit codes with a scale and an offset per
group of 32 weights. A leaf module, so the embedded pair's conversion can keep the blocks (`FILE`, beside the
converted weights) without importing the rest of the package; torch, numpy and gguf load with the first function
called, so reading `FILE` (`hlm.models.embedded.is_ready`) stays as light as the rest of that module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import torch

FILE = "q4k.safetensors"  # beside a converted model: the Q4_K blocks of its layers, keyed by module name
GROUP = 32  # weights per Q4_K sub-block: one scale and one offset each
BLOCK_BYTES = 144  # per 256 weights: d and dmin (fp16), eight 6-bit scales and mins (12 bytes), 256 4-bit codes


def decode(blocks: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_K tensor of n rows of k weights, from its raw blocks, as (codes [n, k] in 0..15, scale and offset
    [n, k / 32] in float32), w = scale * code - offset: what llama.cpp (and `gguf`'s `dequantize`) computes."""
    import numpy as np
    import torch
    from gguf.quants import Q4_K

    b = np.ascontiguousarray(blocks).reshape(-1, BLOCK_BYTES)
    if b.shape[0] * 256 != n * k:
        raise ValueError(f"Q4_K blocks hold {b.shape[0] * 256} weights, the layer {n} x {k}")
    d, dmin = (b[:, i:i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2))
    sc, m = Q4_K.get_scale_min(b[:, 4:16].copy())
    # 128 bytes of codes per block: four runs of 32 bytes, each two sub-blocks (low nibbles, then high nibbles)
    codes = (b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    scale, offset = d * sc.astype(np.float32), dmin * m.astype(np.float32)
    return (torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(scale.reshape(n, k // GROUP)),
            torch.from_numpy(offset.reshape(n, k // GROUP)))


def from_gguf(model: torch.nn.Module, path: Path) -> dict[str, np.ndarray]:
    """The raw blocks of each Linear layer the GGUF at `path` stores as Q4_K and `model` holds exactly as they
    decode (checked weight for weight, which also catches a layout the loader changed, e.g. permuted rows)."""
    import gguf
    import numpy as np
    import torch

    reader = gguf.GGUFReader(path)
    names = tensor_names(reader, model)
    if names is None:
        return {}
    tensors = {t.name: t for t in reader.tensors}
    found = {}
    for name, module in model.named_modules():
        tensor = tensors.get(f"{names.get_name(name)}.weight") if isinstance(module, torch.nn.Linear) else None
        if tensor is None or tensor.tensor_type != gguf.GGMLQuantizationType.Q4_K:
            continue
        blocks = np.asarray(tensor.data)
        codes, scale, offset = decode(blocks, module.out_features, module.in_features)
        exact = (codes.reshape(len(codes), -1, GROUP) * scale[..., None] - offset[..., None]).reshape(codes.shape)
        if torch.equal(exact.to(module.weight.dtype), module.weight.detach()):
            found[name] = blocks
    return found


def tensor_names(reader: gguf.GGUFReader, model: torch.nn.Module) -> gguf.TensorNameMap | None:
    """gguf's own map from `model`'s module names to the GGUF's tensor names, for the file's architecture (None
    where gguf does not know it)."""
    import gguf

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    archs = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        return None
    return gguf.get_tensor_name_map(archs[arch], model.config.get_text_config().num_hidden_layers)
