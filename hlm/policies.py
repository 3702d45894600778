"""Upload policies (METHOD.md), one `Policy` each in `REGISTRY`: what a policy is (what it reads, whether it drafts,
uploads or flips a coin, how it decides a draft) is declared here once, and the decoder, the sweep and the CLI ask
the registry, never a policy's name.

`uhlm` uploads on uncertainty alone (u > u_th); `random` on a coin (upload iff coin >= skip_rate), so at a
matched upload rate it is the control that shows whether a policy picks the right tokens; `hlm` uploads every
draft, `slm` none. `ours` asks its estimator (`hlm.estimators`), and `llm` (the verifier alone) involves no
drafts: the decoder runs it directly. `decide` is the loop's one decision call, whichever way a policy decides.
A new policy is one more entry (and its tests).

Each policy also declares its `role` in an experiment, and the sweep, the study, the page's Compare and Show me
and the bench read roles, never names: the `reference` (the quality yardstick every output is scored against),
the `counterfactual` (what the energy saving is measured against), the `subject` (the method under test, run
at its tuned settings), the `control` (run matched to the subject's upload rate) and `baseline`s (run once each,
compared as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hlm.estimators import REGISTRY as ESTIMATORS

if TYPE_CHECKING:
    from hlm.config import PolicyConfig
    from hlm.decoder import Draft
    from hlm.estimators import SelectionCalibration

Decide = Callable[["PolicyConfig", "float | None", float], bool]
Role = Literal["reference", "counterfactual", "subject", "control", "baseline"]
ROLES: tuple[Role, ...] = ("reference", "counterfactual", "subject", "control", "baseline")


def uncertain(u: float, u_th: float) -> bool:
    return u > u_th


@dataclass(frozen=True)
class Policy:
    """One upload policy. `decide(config, u, coin)` rules on one draft (u: its uncertainty where `uses_uncertainty`;
    coin ~ U(0, 1) where `uses_coin`); None where the policy does not decide drafts itself (`ours` asks its
    estimator, `llm` drafts nothing)."""

    name: str
    description: str
    role: Role
    decide: Decide | None = None
    drafts: bool = True  # False: the verifier alone generates (no device model runs)
    uploads: bool = True  # False: nothing is ever sent, so no payload is built
    uses_uncertainty: bool = False  # the decoder measures u for every draft
    uses_estimator: bool = False  # the decision is `hlm.estimators.REGISTRY[config.estimator]`'s
    uses_coin: bool = False  # the decoder draws the coin stream
    uses_u_th: bool = False  # its runs (in the sweep: rows) carry u_th
    tuned: bool = False  # its runs carry an importance setting (estimator, k, gamma), its own or the one matched
    colour: str = "#17becf"  # in every chart (page and sweep figures)

    def label(self, config: PolicyConfig) -> str:
        """A run's name wherever it is shown (page, Compare, scatter, sweep progress): the policy and the knobs its
        decision reads (ours names its estimator only when it is not the default)."""
        if self.uses_estimator:
            default = type(config).estimator  # the dataclass field's default (config imports this module)
            return f"{self.name} k={config.k} γ={config.gamma:g}" + (
                "" if config.estimator == default else f" {config.estimator}")
        if self.uses_coin:
            return f"{self.name} skip={config.skip_rate:.2f}"
        if self.uses_u_th:
            return f"{self.name} u_th={config.u_th:g}"
        return self.name

    def setting(self, config: PolicyConfig) -> str:
        """The importance setting a `tuned` run carries, "-" for the others: the sweep's `setting` column, which
        pairs the control with the subject setting it is matched to (it carries that setting's knobs)."""
        return f"{config.estimator} k={config.k} γ={config.gamma:g}" if self.tuned else "-"


REGISTRY: dict[str, Policy] = {p.name: p for p in (
    Policy("ours", "upload the drafts its estimator scores highest", "subject", uses_uncertainty=True,
           uses_estimator=True, uses_u_th=True, tuned=True, colour="#1f77b4"),
    Policy("uhlm", "if u > u_th", "baseline", lambda config, u, coin: u is not None and uncertain(u, config.u_th),
           uses_uncertainty=True, uses_u_th=True, colour="#ff7f0e"),
    Policy("hlm", "every token", "counterfactual", lambda config, u, coin: True, colour="#222222"),
    Policy("slm", "never", "baseline", lambda config, u, coin: False, uploads=False, colour="#8c8c8c"),
    Policy("llm", "the cloud model alone", "reference", drafts=False, uploads=False, colour="#9467bd"),
    Policy("random", "a coin (the control)", "control", lambda config, u, coin: coin >= config.skip_rate,
           uses_coin=True, uses_u_th=True, tuned=True, colour="#d62728"),
)}
NAMES = tuple(REGISTRY)
HYBRID = tuple(n for n, p in REGISTRY.items() if p.drafts)  # what a sweep may ask for (the reference always runs)


def with_role(role: Role) -> str:
    """The name of the one registered policy that plays `role` (reference, counterfactual, subject, control)."""
    names = [p.name for p in REGISTRY.values() if p.role == role]
    if len(names) != 1:
        raise LookupError(f"{len(names)} registered policies play the role {role!r}; an experiment needs exactly one")
    return names[0]


def floor() -> str:
    """The one policy that drafts and never uploads (`slm`): what the device achieves alone, the floor a hybrid
    policy is measured up from (the reference is the ceiling)."""
    names = [p.name for p in REGISTRY.values() if p.drafts and not p.uploads]
    if len(names) != 1:
        raise LookupError(f"{len(names)} registered policies draft and never upload; an experiment needs exactly one")
    return names[0]


def role_of(name: str) -> Role:
    """`name`'s role in an experiment."""
    return REGISTRY[name].role


def should_upload(policy: PolicyConfig, u: float | None, coin: float) -> bool:
    """A policy's own rule on one draft: `coin` ~ U(0, 1) is read only where `uses_coin`, u where `uses_uncertainty`
    (the what-if replay re-decides recorded drafts with it)."""
    rule = REGISTRY[policy.name].decide
    if rule is None:
        raise ValueError(f"policy {policy.name!r} does not decide drafts")
    return rule(policy, u, coin)


def decide(config: PolicyConfig, draft: Draft, coin: float, selection: SelectionCalibration) -> bool:
    """Upload `draft` or keep it: the one decision of the loop. A policy that `uses_estimator` hands the draft's
    statistics to `hlm.estimators.REGISTRY[config.estimator]` (scored against the pair's `selection`, unless the
    draft carries its score already); the others apply their own rule to its u and the coin."""
    if REGISTRY[config.name].uses_estimator:
        return ESTIMATORS[config.estimator].decide(draft.stats, draft.importance, config, selection, draft.score)
    return should_upload(config, draft.u, coin)
