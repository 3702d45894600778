"""Upload policies: small pure functions of one draft's statistics (METHOD.md).

`ours` uploads a draft iff it is uncertain (u > u_th) and important (attention weight >= tau and within the
top-k); `uhlm` on uncertainty alone; `random` replaces importance by a coin with the same gate on u, so at a
matched upload rate it is the control that shows whether importance picks the right tokens.
`llm` (the verifier alone) involves no drafts and is run by the decoder directly.
"""

from __future__ import annotations

from hlm.config import PolicyConfig


def uncertain(u: float, u_th: float) -> bool:
    return u > u_th


def should_upload(policy: PolicyConfig, u: float, important: bool | None, coin: float) -> bool:
    """Decide one draft. `coin` ~ U(0, 1) is used only by `random`."""
    match policy.name:
        case "slm":
            return False
        case "hlm":
            return True
        case "uhlm":
            return uncertain(u, policy.u_th)
        case "ours":
            return uncertain(u, policy.u_th) and bool(important)
        case "random":
            return uncertain(u, policy.u_th) and coin >= policy.skip_rate
    raise ValueError(f"policy {policy.name!r} does not decide drafts")
