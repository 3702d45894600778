"""Upload policies: small pure functions of one draft's statistics (METHOD.md).

`uhlm` uploads on uncertainty alone (u > u_th); `random` on a coin (upload iff coin >= skip_rate), so at a
matched upload rate it is the control that shows whether a policy picks the right tokens; `hlm` uploads every
draft, `slm` none. `ours` asks its estimator (`hlm.estimators`), and `llm` (the verifier alone) involves no
drafts: the decoder runs both directly.
"""

from __future__ import annotations

from hlm.config import PolicyConfig


def uncertain(u: float, u_th: float) -> bool:
    return u > u_th


def should_upload(policy: PolicyConfig, u: float | None, coin: float) -> bool:
    """Decide one draft. `coin` ~ U(0, 1) is used only by `random`, u only by `uhlm`."""
    match policy.name:
        case "slm":
            return False
        case "hlm":
            return True
        case "uhlm":
            return u is not None and uncertain(u, policy.u_th)
        case "random":
            return coin >= policy.skip_rate
    raise ValueError(f"policy {policy.name!r} does not decide drafts")
