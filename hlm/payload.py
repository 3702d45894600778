"""The bytes an upload carries: the draft's distribution p in a compact binary form (never pickle).

Formats (METHOD.md): the full distribution at 32, 16 or 8 bits per probability, or the CU-HLM top-k form
(k indices + k probabilities, the remaining mass spread uniformly over the other ids). 8-bit values are
negative log-probabilities quantised linearly over [0, 24] nats (255 = zero), because linear 8-bit
probabilities would round almost the whole vocabulary to zero. Only 32-bit full keeps rejection sampling
exact; the others trade a small, measurable bias for fewer bits.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

MAGIC = b"HLMP"
_HEADER = struct.Struct("<4sBBII")  # magic, bits_per_prob, version, vocab_size, topk
VERSION = 1
_NATS_8BIT = 24.0
MAX_VOCAB = 1 << 20


class PayloadError(ValueError):
    """The bytes do not form a valid payload (wrong magic, sizes or values)."""


def _encode_values(values: np.ndarray, bits: int) -> bytes:
    if bits == 32:
        return values.astype("<f4").tobytes()
    if bits == 16:
        return values.astype("<f2").tobytes()
    nats = -np.log(np.clip(values, 1e-30, None))
    codes = np.where(values > 0, np.clip(np.rint(nats / _NATS_8BIT * 254), 0, 254), 255)
    return codes.astype(np.uint8).tobytes()


def _decode_values(raw: bytes, bits: int, count: int) -> np.ndarray:
    if bits == 32:
        return np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
    if bits == 16:
        return np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
    codes = np.frombuffer(raw, dtype=np.uint8, count=count).astype(np.float32)
    return np.where(codes == 255, 0.0, np.exp(-codes / 254 * _NATS_8BIT)).astype(np.float32)


def encode(probs: torch.Tensor, bits_per_prob: int = 32, topk: int = 0) -> bytes:
    """Serialise a probability vector (1-D, sums to 1)."""
    p = probs.detach().to(torch.float32).cpu().numpy()
    vocab = p.shape[0]
    if topk and topk < vocab:
        idx = np.argpartition(-p, topk - 1)[:topk].astype("<u4")
        body = idx.tobytes() + _encode_values(p[idx], bits_per_prob)
        k = topk
    else:
        body, k = _encode_values(p, bits_per_prob), 0
    return _HEADER.pack(MAGIC, bits_per_prob, VERSION, vocab, k) + body


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
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise PayloadError("payload probabilities are not a distribution")
    out = torch.from_numpy(p)
    return out / out.sum()


def payload_bits(vocab_size: int, bits_per_prob: int, topk: int) -> int:
    """Bits of an encoded distribution (header included), without building it: the modelled payload."""
    body = topk * (32 + bits_per_prob) if topk and topk < vocab_size else vocab_size * bits_per_prob
    return 8 * _HEADER.size + body
