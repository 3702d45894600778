"""A GGUF's own blocks, the formats `--quant q4k`, `gguf` and `ggml` run (`hlm.quant`): reading them from a GGUF
file, checking them against the float weights a model was converted to, and decoding them to codes with a scale per
group of 32 weights, the groups of torch's int4 kernel:
- Q4_K (`decode`): 4-bit codes, w = scale * code - offset: one 4-bit plane;
- Q5_0 and Q8_0 (`decode_planes`): 5- and 8-bit codes, w = d (code - offset): two 4-bit planes.
Q6_K's groups of 16 (and other formats) do not fit that kernel; ggml runs Q6_K too, as stored. A leaf module, so the
embedded pair's conversion can keep the blocks (`FILE`, beside the converted weights) without importing the rest of
the package; torch, numpy and gguf load with the first function called, so reading `FILE`
(`hlm.models.embedded.is_ready`) stays as light as the rest of that module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import torch

FILE = "gguf-blocks.safetensors"  # beside a converted model: the blocks of its layers, keyed by module name
GROUP = 32  # weights per Q4_K sub-block and per Q5_0 / Q8_0 block: one scale (and offset) each
BLOCK_BYTES = 144  # Q4_K, per 256 weights: d and dmin (fp16), eight 6-bit scales and mins (12 bytes), 256 4-bit codes
# Q5_0 and Q8_0, per 32 weights: bytes and the code's offset (w = d (code - offset)), the code as c = 16 h + l
PLANES = {"Q5_0": (22, 16), "Q8_0": (34, 128)}
KINDS = ("Q4_K", *PLANES)  # what torch's int4 kernel runs (`--quant q4k`, `gguf`)
STORED = (*KINDS, "Q6_K")  # what a converted folder keeps: ggml runs all of them (`--quant ggml`)
FORMAT = "blocks: " + " ".join(STORED)  # what FILE holds, in the folder's marker: one without Q6_K is built again


def kind(blocks: np.ndarray, n: int, k: int) -> str:
    """Which format `blocks` of an n x k layer hold, from their size (gguf's table: 144 / 256, 210 / 256, 22 / 32 and
    34 / 32 bytes a weight differ)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    sizes = {name: n * k // weights * size
             for name in STORED for weights, size in [GGML_QUANT_SIZES[GGMLQuantizationType[name]]]}
    found = [name for name, size in sizes.items() if size == blocks.size]
    if len(found) != 1:
        raise ValueError(f"{blocks.size} bytes of blocks for a {n} x {k} layer: not Q4_K, Q5_0, Q8_0 or Q6_K")
    return found[0]


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


def decode_planes(blocks: np.ndarray, name: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A Q5_0 or Q8_0 tensor of n rows of k weights, from its raw blocks, as (codes [n, k] in 0..255, d [n, k / 32]
    in float32, offset), w = d (code - offset): what llama.cpp (and `gguf`'s `dequantize`) computes."""
    import numpy as np
    import torch

    size, offset = PLANES[name]
    b = np.ascontiguousarray(blocks).reshape(-1, size)
    if b.shape[0] * GROUP != n * k:
        raise ValueError(f"{name} blocks hold {b.shape[0] * GROUP} weights, the layer {n} x {k}")
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    if name == "Q8_0":  # 32 signed bytes: code = byte + 128
        codes = b[:, 2:] ^ np.uint8(0x80)
    else:  # 32 high bits (bit j: weight j), then 16 bytes of low nibbles (weight j, then weight j + 16)
        high = b[:, 2:6].copy().view("<u4") >> np.arange(32, dtype=np.uint32) & 1
        codes = np.concatenate([b[:, 6:] & 0x0F, b[:, 6:] >> 4], axis=1) | (high << 4).astype(np.uint8)
    return torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(d.reshape(n, k // GROUP)), offset


def weights(blocks: np.ndarray, n: int, k: int) -> torch.Tensor:
    """The float32 weights [n, k] that `blocks` (one of STORED) decode to."""
    name = kind(blocks, n, k)
    if name == "Q6_K":  # no kernel here reads its codes: `gguf`'s own decoding
        import gguf
        import torch
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(blocks, gguf.GGMLQuantizationType.Q6_K).reshape(n, k))
    if name == "Q4_K":
        codes, scale, offset = decode(blocks, n, k)
        return (codes.reshape(n, -1, GROUP) * scale[..., None] - offset[..., None]).reshape(n, k)
    codes, d, offset = decode_planes(blocks, name, n, k)
    return ((codes.reshape(n, -1, GROUP).float() - offset) * d[..., None]).reshape(n, k)


def from_gguf(model: torch.nn.Module, path: Path) -> dict[str, np.ndarray]:
    """The raw blocks of each Linear layer the GGUF at `path` stores in one of STORED and `model` holds exactly as they
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
        if tensor is None or tensor.tensor_type.name not in STORED:
            continue
        blocks = np.asarray(tensor.data)
        exact = weights(blocks, module.out_features, module.in_features)
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
