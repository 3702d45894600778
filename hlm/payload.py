"""The bytes an upload carries: the draft's distribution p in a compact binary form (never pickle).

Formats (METHOD.md): the full distribution at 32, 16 or 8 bits per probability, or the CU-HLM top-k form
(k indices + k probabilities; any remaining mass is spread uniformly over the other ids). 8-bit values are
negative log-probabilities quantised linearly over [0, 24] nats (255 = zero), because linear 8-bit
probabilities would round almost the whole vocabulary to zero.

Every format keeps rejection sampling exact because the device draws its draft from the distribution it
sends, p_hat = decode(encode(p)) (`as_sent`), and the cloud accepts with min(1, q/p_hat): the quantisation
and truncation change the acceptance rate, never the output distribution. `encode` writes the top-k form
truncated and renormalised, with the values rounded so that no residual mass is left to spread: p_hat is
then zero wherever p is, so a draft is always a token the SLM itself could have drawn (never a filler id).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

MAGIC = b"HLMP"
_HEADER = struct.Struct("<4sBBII")  # magic, bits_per_prob, version, vocab_size, topk
VERSION = 1
_NATS_8BIT = 24.0
MAX_VOCAB = 1 << 20
# Top-k values are scaled by this before quantisation so their decoded sum is >= 1 (no residual mass): it
# exceeds each format's worst relative rounding (fp32 2^-24, fp16 2^-11, 8-bit half a code). The decoder
# renormalises, so the scale costs no fidelity.
_TOPK_SCALE = {32: 1 + 2**-16, 16: 1 + 2**-9, 8: math.exp(0.5 * _NATS_8BIT / 254) * 1.001}


class PayloadError(ValueError):
    """The bytes do not form a valid payload (wrong magic, sizes or values)."""


def _encode_values(values: np.ndarray, bits: int) -> bytes:
    if bits == 32:
        return values.astype("<f4").tobytes()
    if bits == 16:  # torch's conversion rounds like numpy's (IEEE nearest-even) at ~1/300 of its cost
        return torch.from_numpy(values).to(torch.float16).numpy().astype("<f2", copy=False).tobytes()
    nats = -np.log(np.clip(values, 1e-30, None))
    codes = np.where(values > 0, np.clip(np.rint(nats / _NATS_8BIT * 254), 0, 254), 255)
    return codes.astype(np.uint8).tobytes()


def _decode_values(raw: bytes, bits: int, count: int) -> np.ndarray:
    if bits == 32:
        return np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
    if bits == 16:
        half = np.frombuffer(raw, dtype="<f2", count=count).astype(np.float16)  # a native, writable copy
        return torch.from_numpy(half).to(torch.float32).numpy()
    codes = np.frombuffer(raw, dtype=np.uint8, count=count).astype(np.float32)
    return np.where(codes == 255, 0.0, np.exp(-codes / 254 * _NATS_8BIT)).astype(np.float32)


def encode(probs: torch.Tensor, bits_per_prob: int = 32, topk: int = 0) -> bytes:
    """Serialise a probability vector (1-D, sums to 1); top-k keeps the k largest entries, renormalised."""
    p = probs.detach().to(torch.float32).cpu()
    vocab = p.shape[0]
    if not (topk and topk < vocab):
        return _HEADER.pack(MAGIC, bits_per_prob, VERSION, vocab, 0) + _encode_values(p.numpy(), bits_per_prob)
    values, indices = torch.topk(p, topk)
    idx, top = indices.numpy(), values.numpy().astype(np.float64)
    top /= top.sum()
    scale = _TOPK_SCALE[bits_per_prob]
    for _ in range(64):  # one pass in practice; the loop makes "no residual" a guarantee, not an estimate
        raw = _encode_values((top * scale).astype(np.float32), bits_per_prob)
        if float(_decode_values(raw, bits_per_prob, topk).sum()) >= 1.0:
            break
        scale *= 1.01
    return _HEADER.pack(MAGIC, bits_per_prob, VERSION, vocab, topk) + idx.astype("<u4").tobytes() + raw


def as_sent(probs: torch.Tensor, bits_per_prob: int = 32, topk: int = 0) -> tuple[bytes, torch.Tensor]:
    """The payload for p and the distribution the cloud will read from it (on p's device). The draft must be
    sampled from the latter for the cloud's rejection step to be exact in every format."""
    data = encode(probs, bits_per_prob, topk)
    return data, decode(data, int(probs.shape[-1])).to(probs.device)


def decode(data: bytes, vocab_size: int | None = None) -> torch.Tensor:
    """Inverse of `encode`, renormalised; validates every size so a hostile payload cannot crash us."""
    if len(data) < _HEADER.size:
        raise PayloadError("payload shorter than its header")
    magic, bits, version, vocab, k = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise PayloadError("not an hlm payload (bad magic or version)")
    if bits not in (8, 16, 32):
        raise PayloadError(f"bad bits_per_prob {bits}")
    if not 0 < vocab <= MAX_VOCAB or (vocab_size is not None and vocab != vocab_size):
        raise PayloadError(f"payload vocabulary {vocab} does not match the verifier's {vocab_size}")
    if k > vocab:
        raise PayloadError("top-k larger than the vocabulary")
    body = data[_HEADER.size:]
    width = bits // 8
    expected = k * (4 + width) if k else vocab * width
    if len(body) != expected:
        raise PayloadError(f"payload body is {len(body)} bytes, expected {expected}")
    if k:
        idx = np.frombuffer(body, dtype="<u4", count=k).astype(np.int64)
        if idx.max(initial=0) >= vocab or len(np.unique(idx)) != k:
            raise PayloadError("top-k indices out of range or repeated")
        vals = _decode_values(body[4 * k:], bits, k)
        p = np.full(vocab, max(0.0, 1.0 - float(vals.sum())) / max(vocab - k, 1), dtype=np.float32)
        p[idx] = vals
    else:
        p = _decode_values(body, bits, vocab).copy()
    # Finite values can still overflow a float32 sum (8 x 3e38), and the renormalised p would then be all zeros.
    if not np.all(np.isfinite(p)) or np.any(p < 0) or not 0 < p.sum(dtype=np.float64) <= np.finfo(np.float32).max:
        raise PayloadError("payload probabilities are not a distribution")
    out = torch.from_numpy(p)
    return out / out.sum()


def payload_bits(vocab_size: int, bits_per_prob: int, topk: int) -> int:
    """Bits of an encoded distribution (header included), without building it: the modelled payload."""
    body = topk * (32 + bits_per_prob) if topk and topk < vocab_size else vocab_size * bits_per_prob
    return 8 * _HEADER.size + body
