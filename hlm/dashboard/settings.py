"""What a viewer sets: `Settings` (the page's and the API's knobs, in display units) and the defaults that depend
on the pair (its calibrated u_th), validated into a `RunConfig` with a message a viewer can act on."""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hlm import ASSETS, session
from hlm.config import (
    DEVICE_PROFILES,
    ESTIMATORS,
    KNOB_HELP,
    LINK_PRESETS,
    ConfigError,
    LinkConfig,
    PolicyConfig,
    RunConfig,
    SamplingConfig,
)
from hlm.estimators import REGISTRY as ESTIMATOR_REGISTRY
from hlm.estimators import WINDOW
from hlm.models.pairs import Calibration
from hlm.models.presets import PRESETS
from hlm.policies import NAMES as POLICIES
from hlm.policies import REGISTRY as POLICY_REGISTRY
from hlm.session import resolve_u_th

_S, _P, _L = SamplingConfig(), PolicyConfig(), LinkConfig()
DEMO_MAX_NEW_TOKENS = 96  # shorter than the CLI's default so a Compare (4 runs) finishes in about a minute on CPU
# The page decodes greedily by default: HLM then equals the LLM token for token, so every difference on screen
# (faithful prefix, BERTScore) is the policy's, not sampling noise (docs/dashboard.md: why greedy).
DEMO_TEMPERATURE = 0.0

EXAMPLES = ASSETS / "examples.json"
# At T > 0 a run is scored against this many LLM samples (seeds seed, seed + 1, ...), and the samples against each
# other give the noise band: HLM samples the LLM's distribution exactly, so it scores like one of them.
REFERENCE_SAMPLES = 3
R = TypeVar("R")


@dataclass(frozen=True)
class Knob:
    """One setting a viewer can change, declared once: the `Settings` field's default, the page's widget (`kind`:
    slider over `range` = (min, max, step), dropdown or radio over `choices`, number from `range[0]`, `info` under
    it) and the API parameter's type and one-line documentation (`help`)."""

    name: str
    type: Any
    default: Any
    label: str
    help: str
    kind: str = "slider"
    range: tuple[float, float, float] = (0, 0, 0)
    choices: tuple[Any, ...] = ()
    info: str | None = None
    elem_id: str | None = None


def _described(names: Sequence[str], describe: Callable[[str], str]) -> str:
    return " · ".join(f"{n}: {describe(n)}" for n in names)


_ESTIMATOR = ESTIMATOR_REGISTRY[_P.estimator]


class Knobs:
    """The table of knobs, in the page's and the API's order, and what is generated from it: `Settings` from widget
    values, and API endpoints whose parameters and documentation are the table's."""

    def __init__(self, *knobs: Knob) -> None:
        self.table = {k.name: k for k in knobs}

    def __getitem__(self, name: str) -> Knob:
        return self.table[name]

    def __iter__(self) -> Iterator[Knob]:
        return iter(self.table.values())

    def settings(self, values: Sequence[Any]) -> Settings:
        """`Settings` from one value per knob, in table order (the page's widgets)."""
        return Settings(**dict(zip(self.table, values, strict=True)))

    def endpoint(self, *names: str) -> Callable[[Callable[..., Iterator[R]]], Callable[..., Iterator[R]]]:
        """Decorate a generator `fn(prompt, settings, *rest)`: the result takes `prompt`, then the knobs `names` (typed,
        their defaults the table's, documented by its `help`), then `rest`, and streams `fn` with them as one
        `Settings`. Gradio reads the signature and the docstring's Args for the endpoint's API page."""
        knobs = [self.table[n] for n in names]

        def decorate(fn: Callable[..., Iterator[R]]) -> Callable[..., Iterator[R]]:
            hints = typing.get_type_hints(fn)
            own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()]
            params = [own[0], *(inspect.Parameter(k.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=k.default,
                                                  annotation=k.type) for k in knobs), *own[2:]]
            signature = inspect.Signature(params, return_annotation=hints["return"])
            summary, _, args = (inspect.getdoc(fn) or "").partition("Args:\n")
            docs = dict(re.findall(r"^    (\w+): (.*(?:\n {8}.*)*)", args, re.M))
            docs.update({k.name: k.help for k in knobs})
            lines = "".join(f"    {p.name}: {docs[p.name]}\n" for p in params)

            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Iterator[R]:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                values = dict(bound.arguments)
                chosen = Settings(**{n: values.pop(n) for n in names})
                yield from fn(values.pop(own[0].name), chosen, **values)

            call.__signature__ = signature  # type: ignore[attr-defined]
            call.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
            call.__doc__ = f"{summary}Args:\n{lines}"
            return call
        return decorate


KNOBS = Knobs(
    Knob("k", int, _P.k, "k: upload budget", KNOB_HELP["k"], range=(1, WINDOW, 1), elem_id="hlm-k",
         info=f"about k uploads per {WINDOW} drafts on typical prompts (more on hard ones)"),
    Knob("gamma", float, _P.gamma, "γ: strictness", KNOB_HELP["gamma"],
         range=(0, 3, 0.1), elem_id="hlm-gamma",
         info="raises the bar by γ standard deviations of the score; larger γ uploads less"),
    Knob("policy", str, _P.name, "Policy", f"{KNOB_HELP['policy']}: {', '.join(POLICIES)}", "dropdown",
         choices=POLICIES, info=_described(POLICIES, lambda n: POLICY_REGISTRY[n].description), elem_id="hlm-policy"),
    Knob("estimator", str, _P.estimator, "Estimator (ours)", f"{KNOB_HELP['estimator']}: {', '.join(ESTIMATORS)}",
         "dropdown", choices=ESTIMATORS, elem_id="hlm-estimator",
         info=f"how ours scores a draft; {_P.estimator} (default): {_ESTIMATOR.description}; paper-*: the "
              "paper-literal attention rule (docs/selection.md)"),
    Knob("u_th", float | None, None, "u_th: uncertainty threshold",
         KNOB_HELP["u_th"], range=(0, 1, 0.01),
         info="uhlm and paper-*: a draft is uncertain when u > u_th"),
    Knob("temperature", float, DEMO_TEMPERATURE, "Temperature", KNOB_HELP["temperature"] + " (the page's "
         f"default); > 0: F1 is the mean over {REFERENCE_SAMPLES} LLM samples", range=(0, 2, 0.05),
         info="0 = greedy: HLM equals the LLM, so differences are the policy's; > 0: scored against "
              f"{REFERENCE_SAMPLES} LLM samples, with their band"),
    Knob("max_new_tokens", int, DEMO_MAX_NEW_TOKENS, "Max new tokens", KNOB_HELP["max_new_tokens"],
         range=(8, 512, 8), elem_id="hlm-max-new-tokens"),
    Knob("seed", int, _S.seed, "Seed", KNOB_HELP["seed"], "number",
         range=(0, 0, 1)),
    # The demo's story is a phone on a cellular uplink: the page prices the SLM as a phone (docs/energy.md,
    # "Device profiles"); `this-machine` shows this server's own measured time instead.
    Knob("device_profile", str, "phone", "Device profile", KNOB_HELP["device_profile"] + ": phone (a published "
         "on-device measurement) or this-machine (measured here)", "dropdown",
         choices=tuple((ch.label, n) for n, ch in DEVICE_PROFILES.items()), info=DEVICE_PROFILES["phone"].description),
    Knob("link_preset", str, "default", "Link preset", f"{KNOB_HELP['link_preset']}: {', '.join(LINK_PRESETS)}",
         "dropdown", choices=tuple((ch.label, n) for n, ch in LINK_PRESETS.items()),
         info=LINK_PRESETS["default"].description),
    Knob("bandwidth_mhz", float | None, None, "Uplink bandwidth (MHz)",
         "modelled uplink bandwidth; omitted: the preset's", range=(0.1, 100, 0.01)),
    Knob("snr_db", float | None, None, "SNR (dB)", "modelled uplink SNR; omitted: the preset's", range=(-30, 60, 0.1)),
    Knob("tx_power_w", float | None, None, "Transmit power (W)", "modelled transmit power; omitted: the preset's",
         range=(0, 3, 0.05)),
    Knob("bits_per_prob", int, _L.bits_per_prob, "Bits per probability", KNOB_HELP["bits_per_prob"],
         "radio", choices=(8, 16, 32)),
    # 16-bit top-64: same acceptance as the full distribution at 1/722 of the bits (docs/payload.md)
    Knob("topk", int, 64, "Top-k compression (0 = full distribution)",
         KNOB_HELP["topk"], range=(0, 1024, 1)),
)


def as_number(name: str, value: Any, whole: bool = False) -> float | int:
    """Gradio numbers arrive as floats (8.0) or None when a box is cleared; configs want ints and a message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if whole:
        if value != int(value):
            raise ConfigError(f"{name} must be a whole number, got {value}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class Settings:
    """The knobs the page and the API expose, in display units (bandwidth in MHz); `run_config` validates. Each
    default is `KNOBS`' (None: u_th the pair's calibrated value, a link figure the preset's)."""

    k: int = KNOBS["k"].default
    gamma: float = KNOBS["gamma"].default
    policy: str = KNOBS["policy"].default
    estimator: str = KNOBS["estimator"].default
    u_th: float | None = KNOBS["u_th"].default
    temperature: float = KNOBS["temperature"].default
    max_new_tokens: int = KNOBS["max_new_tokens"].default
    seed: int = KNOBS["seed"].default
    device_profile: str = KNOBS["device_profile"].default
    link_preset: str = KNOBS["link_preset"].default
    bandwidth_mhz: float | None = KNOBS["bandwidth_mhz"].default
    snr_db: float | None = KNOBS["snr_db"].default
    tx_power_w: float | None = KNOBS["tx_power_w"].default
    bits_per_prob: int = KNOBS["bits_per_prob"].default
    topk: int = KNOBS["topk"].default

    def run_config(self, calibration: Calibration | None) -> RunConfig:
        """Through the one door (`hlm.session.run_config`, which validates); here only Gradio's floats and
        display units (bandwidth in MHz) are turned into config values."""
        def optional(name: str, value: float | None, scale: float = 1.0) -> float | None:
            return None if value is None else as_number(name, value) * scale

        return session.run_config(
            policy=self.policy, k=as_number("k", self.k, whole=True), gamma=as_number("gamma", self.gamma),
            u_th=optional("u_th", self.u_th), estimator=self.estimator,
            temperature=as_number("temperature", self.temperature),
            max_new_tokens=as_number("max_new_tokens", self.max_new_tokens, whole=True),
            seed=as_number("seed", self.seed, whole=True), device=self.device_profile, link=self.link_preset,
            link_overrides={"bandwidth_hz": optional("bandwidth_mhz", self.bandwidth_mhz, 1e6),
                            "snr_db": optional("snr_db", self.snr_db),
                            "tx_power_w": optional("tx_power_w", self.tx_power_w),
                            "bits_per_prob": as_number("bits_per_prob", self.bits_per_prob, whole=True),
                            "topk": as_number("topk", self.topk, whole=True)},
            calibration=calibration)


def calibration_of(preset: str) -> Calibration | None:
    """The pair's fitted thresholds, known without loading the models (presets carry them)."""
    p = PRESETS.get(preset)
    return p.calibration if p else None


def default_u_th(preset: str) -> float:
    return resolve_u_th(None, calibration_of(preset))[0]


def load_examples(path: Path = EXAMPLES) -> list[dict[str, str]]:
    """Example prompts for the page: a list of {"label", "prompt"}."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [{"label": str(r["label"]), "prompt": str(r["prompt"])} for r in rows]

