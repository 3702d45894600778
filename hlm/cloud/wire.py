"""The binary wire format of a verify, the one module both the client (`hlm.cloud.client`) and the server
(`hlm.cloud.server`) import: fixed little-endian structs, token ids as uint32, the distribution as an
`hlm.payload` blob; never pickle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from hlm.verifier import Verdict

WIRE_VERSION = 1
REQUEST_MAGIC, RESPONSE_MAGIC = b"HLMV", b"HLMR"
# magic, version, flags (bit 0: a draft follows), reserved, base (ids the client assumes the session holds),
# number of ids, draft id; then the ids as uint32 and, with a draft, the hlm.payload bytes to the end.
REQUEST = struct.Struct("<4sBBHIII")
# magic, version, accepted (0 no, 1 yes, 2 no draft), reserved, token, ids the session now holds,
# p_draft, q_draft, compute_s, energy_j (NaN where absent).
RESPONSE = struct.Struct("<4sBBHIIffff")
HAS_DRAFT = 1
NO_DRAFT = 2


class WireError(ValueError):
    """Bytes that do not form a valid request or response of this protocol."""


@dataclass(frozen=True)
class VerifyRequest:
    base: int
    ids: list[int]
    draft: int | None
    payload: bytes | None


def pack_request(base: int, ids: list[int], draft: int | None, payload: bytes | None) -> bytes:
    flags = HAS_DRAFT if draft is not None else 0
    head = REQUEST.pack(REQUEST_MAGIC, WIRE_VERSION, flags, 0, base, len(ids), draft or 0)
    return head + np.asarray(ids, dtype="<u4").tobytes() + (payload or b"")


def unpack_request(body: bytes, vocab_size: int, max_ids: int) -> VerifyRequest:
    """Parse and bound-check a verify body; the payload itself is checked by `hlm.payload.decode`."""
    if len(body) < REQUEST.size:
        raise WireError(f"request is {len(body)} bytes, shorter than its {REQUEST.size}-byte header")
    magic, version, flags, _, base, n_ids, draft = REQUEST.unpack_from(body)
    if magic != REQUEST_MAGIC or version != WIRE_VERSION:
        raise WireError("not an hlm verify request (bad magic or version)")
    if flags & ~HAS_DRAFT:
        raise WireError(f"unknown flags {flags:#x}")
    if n_ids > max_ids:
        raise WireError(f"{n_ids} ids exceed the limit of {max_ids}")
    end = REQUEST.size + 4 * n_ids
    if len(body) < end:
        raise WireError(f"request announces {n_ids} ids but carries {(len(body) - REQUEST.size) // 4}")
    ids = np.frombuffer(body, dtype="<u4", count=n_ids, offset=REQUEST.size)
    if n_ids and int(ids.max()) >= vocab_size:
        raise WireError(f"token id {int(ids.max())} is outside the vocabulary of {vocab_size}")
    payload = body[end:]
    if not flags & HAS_DRAFT:
        if draft or payload:
            raise WireError("a draft id or payload without the draft flag")
        return VerifyRequest(base, ids.tolist(), None, None)
    if draft >= vocab_size:
        raise WireError(f"draft id {draft} is outside the vocabulary of {vocab_size}")
    if not payload:
        raise WireError("a draft without its distribution payload")
    return VerifyRequest(base, ids.tolist(), draft, payload)


def _to_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _from_nan(value: float) -> float | None:
    return None if np.isnan(value) else value


def pack_verdict(v: Verdict, held: int) -> bytes:
    accepted = NO_DRAFT if v.accepted is None else int(v.accepted)
    return RESPONSE.pack(RESPONSE_MAGIC, WIRE_VERSION, accepted, 0, v.token, held, _to_nan(v.p_draft),
                         _to_nan(v.q_draft), v.compute_s, _to_nan(v.energy_j))


def unpack_verdict(body: bytes) -> tuple[Verdict, int]:
    if len(body) != RESPONSE.size:
        raise WireError(f"verdict is {len(body)} bytes, expected {RESPONSE.size}")
    magic, version, accepted, _, token, held, p_d, q_d, compute_s, energy_j = RESPONSE.unpack(body)
    if magic != RESPONSE_MAGIC or version != WIRE_VERSION or accepted > NO_DRAFT:
        raise WireError("not an hlm verdict (bad magic, version or flag)")
    return Verdict(token, None if accepted == NO_DRAFT else bool(accepted), _from_nan(p_d), _from_nan(q_d),
                   compute_s, _from_nan(energy_j)), held
