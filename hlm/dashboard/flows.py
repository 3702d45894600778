"""The page's actions (`Dashboard`): Generate, Compare, Show me, the what-if replay and the API endpoints, each a
generator of `Frame`s (one update of the page) or API payloads, on top of a shared `Service`."""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

from hlm.config import DEVICE_PROFILES, LINK_PRESETS, MAX_PROMPT_CHARS, ConfigError, RunConfig
from hlm.dashboard.charts import energy_figure, history_figure, upload_figure
from hlm.dashboard.evidence import Evidence, evidence
from hlm.dashboard.render import (
    TOKEN_HEADERS,
    USER_ERRORS,
    VERDICT_ROLES,
    compare_html,
    error_notice,
    hardware_html,
    legend_html,
    replay_note,
    stats_html,
    token_rows,
    token_span,
    tokens_html,
)
from hlm.dashboard.runs import (
    HISTORY_LIMIT,
    RunView,
    add_history,
    history_point,
    judge,
    noise_band,
    replay,
    replay_rule,
    replayable,
    replayed_on,
    run_label,
)
from hlm.dashboard.service import Request, Service
from hlm.dashboard.settings import REFERENCE_SAMPLES, Settings, as_number, calibration_of, default_u_th, load_examples
from hlm.estimators import WINDOW
from hlm.events import PendingDraft, TokenEvent
from hlm.models.presets import PRESETS
from hlm.policies import REGISTRY, Role, with_role

REPLAYS = 64  # sessions whose last replayable run the what-if replay keeps
# While a run decodes, its charts are redrawn at most this often (a Compare sent two plotly redraws every 0.4 s;
# the browser then took a third of a core from the decode on 2 cores)
CHART_INTERVAL_S = 2.0
# Compare and Show me send a frame at most this often while a run decodes: they show no tokens, only the table's and
# the cards' figures, and each frame cost the page ~0.1 s of the cores the models decode on (a Compare through the
# `Dashboard` 61 s, 174 frames; on the page 78 s). Their charts, on the Output tab behind the Compare tab, are
# redrawn only as each run ends (`live_frames`' chart_s). With a frame every 1 s and the charts every CHART_INTERVAL_S
# the browser took 10-11 s of CPU in a 70 s Show me on 2 cores; 7.6-7.9 s now
COMPARE_FRAME_S = 2.0

# The Compare action runs, after the reference, every policy that drafts and uploads, in this order of roles: the
# control comes after the subject, whose realised upload rate its coin is matched to
COMPARE_ORDER: tuple[Role, ...] = ("counterfactual", "baseline", "subject", "control")
COMPARED = tuple(p.name for role in COMPARE_ORDER for p in REGISTRY.values()
                 if p.role == role and p.drafts and p.uploads)
SHOW_ME = tuple(with_role(role) for role in VERDICT_ROLES)  # the "Show me" comparison: what the verdict needs


class PairInfo(NamedTuple):
    """What the page says about a model pair (`Dashboard.pair`)."""

    note: str  # its description and where its u_th comes from
    u_th: float  # the u_th the page shows for it
    risk_averse: float | None  # its calibrated values (None: not calibrated)
    risk_prone: float | None


class LinkValues(NamedTuple):
    """A link preset as the page's knobs show it (`Dashboard.link`)."""

    description: str
    bandwidth_mhz: float
    snr_db: float
    tx_power_w: float


@dataclass
class Frame:
    """One update of the page, field for field the app's outputs; None leaves a component as it is. `PLOTS` are
    plotly figure dicts, `table` rows under `HEADERS`, `tab` the tab to select. `figures` are the energy and upload
    charts ({"energy": ..., "uploads": ...}) drawn into the ones on the page (`app.REDRAW`): a new value of a chart
    re-creates it and draws it twice, and while a run decodes the browser's redraws take the cores the models
    decode on. So a decoding run's charts come as `figures` after its first, and the what-if replay's always."""

    PLOTS: ClassVar[frozenset[str]] = frozenset({"energy", "uploads", "quality"})
    HEADERS: ClassVar[list[str]] = TOKEN_HEADERS

    stats: str | None = None
    tokens: str | None = None
    energy: dict[str, Any] | None = None
    uploads: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    table: list[list[str]] | None = None
    history: list[dict[str, Any]] | None = None
    compare: str | None = None
    tab: str | None = None
    hardware: str | None = None
    prompt: str | None = None
    figures: dict[str, dict[str, Any]] | None = None


def live_frames(run: RunView, updates: Iterator[Any], tokens: bool = True, every_s: float = 0.0,
                chart_s: float = CHART_INTERVAL_S) -> Iterator[Frame]:
    """A frame per update of `run`, at most every `every_s` while it decodes (the update that ends a phase, and the
    last, always shown): stats and (unless `tokens` is off: Compare shows a table instead) tokens; the charts, where
    their points changed, at most every `chart_s` while the run decodes (not with the first token; math.inf: not
    until it ends) and at once after. Each frame costs the page (the server's serialising, the browser's
    re-rendering) CPU that, on a machine that also decodes, slows the decode: a plotly redraw far more than text."""
    drawn, due, shown, held = 0, time.monotonic() + chart_s, -math.inf, False
    in_place = False  # the charts last went as `figures`: the charts' own values still hold older points
    for _ in updates:
        now = time.monotonic()
        if run.phase == "decoding" and now < shown + every_s:
            held = True
            continue
        frame, shown, held = Frame(stats=stats_html(run), tokens=tokens_html(run) if tokens else None), now, False
        if len(run.points) != drawn and (run.phase != "decoding" or now >= due):
            charts = {"energy": energy_figure(run.points), "uploads": upload_figure(run.points)}
            in_place = bool(drawn) and run.phase == "decoding"  # the page has this run's charts: drawn into them
            if in_place:
                frame.figures = charts
            else:
                frame.energy, frame.uploads = charts["energy"], charts["uploads"]
            drawn, due = len(run.points), now + chart_s
        yield frame
    last = Frame(stats=stats_html(run), tokens=tokens_html(run) if tokens else None) if held else Frame()
    if len(run.points) != drawn or in_place:  # the last points, held back by the interval or drawn in place only
        last.energy, last.uploads = energy_figure(run.points), upload_figure(run.points)
    if last != Frame():
        yield last


def match_control(control: RunView, runs: Sequence[RunView]) -> None:
    """Match the control's coin to the subject's realised upload rate on this prompt, so its expected uploads equal
    the subject's count: the control that says whether choosing the drafts matters. No subject run: as it is."""
    subject = next((r for r in runs if r.role == "subject" and r.summary), None)
    if subject is not None and subject.summary is not None:
        control.config = control.config.with_policy(skip_rate=1.0 - subject.summary.upload_rate)
        control.label = f"{run_label(control.config)} (matched to {subject.config.policy.name})"


def subject(runs: Sequence[RunView]) -> RunView | None:
    """The finished subject (ours) of a comparison; None when it has no result (the comparison was cut short)."""
    return next((r for r in runs if r.role == "subject" and r.phase == "done" and r.summary), None)


class Dashboard:
    """The page's actions on top of a `Service`: each is a generator of `Frame`s (or API payloads)."""

    USER_ERRORS = USER_ERRORS  # errors a viewer can fix: the page shows their message (`notice`)
    PROMPT_INFO = (f"up to {MAX_PROMPT_CHARS:,} characters; a long prompt is read in chunks (the status line shows "
                   "how far), and Stop cuts it at once")

    def __init__(self, service: Service) -> None:
        self.service = service
        self._last: OrderedDict[str, tuple[str, RunView]] = OrderedDict()  # session -> (pair, its last replayable run)
        self.prepared: list[str] = []  # the example prompts whose compared runs are all kept (`prepare_examples`)

    @classmethod
    def open(cls, models: str, device: str | None = None, dtype: str | None = None, quant: str = "auto",
             cloud: str | None = None, emulate_link: bool = False) -> Dashboard:
        """The app's flags as plain values (`Service.open`); the start-up pair loads and runs once, so the first
        viewer's first token is fast."""
        service = Service.open(models, device, dtype, quant, cloud, emulate_link)
        service.warm_up()
        dashboard = cls(service)
        # while the page is served: the examples' LLM-alone runs (`build_references`), then their compared runs
        service.precompute(measured=True, then=dashboard.prepare_examples)
        return dashboard

    def prepare_examples(self, prompts: Sequence[str] | None = None, settings: Settings | None = None) -> list[str]:
        """Decode, in the background (`Service.when_idle`), every run Compare shows for `prompts` (default: the page's
        examples) at `settings` (default: the page's), those not kept yet, and keep them (`Service.keep_run`): a
        Compare or Show me on an example then shows runs already made (`_shown_again`, which says when each ran)
        instead of decoding three or four in a row while the viewer waits (on a slow 2-core machine, 66 and 88 s on
        the page). Returns the prompts whose runs it decoded, in order."""
        preset, made = self.service.start, []
        for prompt in prompts or [e["prompt"] for e in load_examples()]:
            base = self._prepare(preset, prompt, settings or Settings())
            runs = [self._new_run(preset, run_label(base.with_policy(name=n)), base.with_policy(name=n))
                    for n in COMPARED]
            for run in runs:
                if run.role == "control":
                    match_control(run, runs)
                while not self._shown_again(preset, prompt, run):  # the coin's rate needs ours' events
                    call_s = self.service.decoder(preset).call_s
                    events = self.service.when_idle(functools.partial(self._made_in_background, preset, prompt,
                                                                      run.config))
                    if events is not None:
                        self.service.keep_run(preset, prompt, run.config, events, call_s)
                        if prompt not in made:
                            made.append(prompt)
            if prompt not in self.prepared:
                self.prepared.append(prompt)
        return made

    def _made_in_background(self, preset: str, prompt: str, config: RunConfig,
                            cancel: threading.Event) -> list[TokenEvent]:
        """One run for `prepare_examples`, on the model thread."""
        return list(self.service.decoder(preset).generate(prompt, config, cancel))

    @staticmethod
    def notice(exc: Exception) -> str:
        return error_notice(exc)

    @staticmethod
    def examples() -> list[dict[str, str]]:
        return load_examples()

    @staticmethod
    def blank() -> Frame:
        """The page before any run: empty cards, charts that say what will appear, an empty Compare view."""
        return Frame(stats=stats_html(None), energy=energy_figure([]), uploads=upload_figure([]),
                     quality=history_figure([]), compare=compare_html([]))

    @staticmethod
    def legend() -> str:
        return legend_html()

    @staticmethod
    def evidence() -> Evidence:
        """The Evidence tab, read from the committed result files once per process (`hlm.dashboard.evidence`)."""
        return evidence()

    @property
    def start(self) -> str:
        """The pair the app started with (the pair an endpoint uses when none is given)."""
        return self.service.start

    @property
    def presets(self) -> list[str]:
        """The pairs a viewer can choose here, the start-up pair first."""
        return self.service.presets

    def stop(self, session: str) -> None:
        """The Stop button, or the visitor closed the tab: the session's running request stops after its current
        token (`Service.stop`)."""
        self.service.stop(session)

    def status(self) -> dict[str, Any]:
        """Every per-process cache of the page with its size and bound (the `/status` endpoint; the soak script)."""
        return {**self.service.status(), "example_runs_ready": list(self.prepared),
                "replays": {"size": len(self._last), "bound": REPLAYS},
                "history_points_per_session": {"bound": HISTORY_LIMIT}}

    @staticmethod
    def pair(preset: str) -> PairInfo:
        """What the page says about a pair, and its calibrated u_th values for the risk buttons."""
        cal = calibration_of(preset)
        p = PRESETS.get(preset)
        note = (f"u_th calibrated for this pair ({cal.samples} samples): risk-averse {cal.risk_averse:g}, "
                f"risk-prone {cal.risk_prone:g}." if cal else
                f"This pair is not calibrated (`python -m hlm calibrate`); u_th {default_u_th(preset):.2f} is "
                "U-HLM's reported risk-averse value.")
        return PairInfo(f"{p.description if p else preset}. {note}", default_u_th(preset),
                        cal.risk_averse if cal else None, cal.risk_prone if cal else None)

    @staticmethod
    def link(name: str) -> LinkValues:
        """A link preset's description and the values its knobs take."""
        chosen = LINK_PRESETS[name]
        return LinkValues(chosen.description, chosen.config.bandwidth_hz / 1e6, chosen.config.snr_db,
                          chosen.config.tx_power_w)

    @staticmethod
    def device(name: str) -> str:
        return DEVICE_PROFILES[name].description

    def _new_run(self, preset: str, label: str, config: RunConfig) -> RunView:
        decoder = self.service.decoder(preset)
        return RunView(label, config, decoder.pair.vocab_size, decoder.energy_methods(config.link, config.device),
                       decoder.call_s)

    def _prepare(self, preset: str, prompt: str, settings: Settings) -> RunConfig:
        """Validate everything a viewer typed before any model work (errors surface at once)."""
        decoder = self.service.decoder(preset)
        config = settings.run_config(decoder.pair.calibration)
        decoder.pair.encode_prompt(prompt, config.sampling.max_new_tokens)
        return config

    def _decode(self, preset: str, prompt: str, run: RunView, request: Request, quality: bool = True) -> Iterator[None]:
        """Decode into `run`, then (unless stopped) score it against the LLM-only reference. Yields after
        every change to `run`."""
        decoder = self.service.decoder(preset)
        run.phase, run.note = "decoding", "decoding…"

        def note(text: str) -> None:
            run.note = text

        def pending(draft: PendingDraft) -> None:
            run.pending = draft

        for events in self.service.stream(decoder, prompt, run.config, request.cancel, note, pending):
            run.update(events)
            if events:  # before the first token the note says what the prefill is doing
                run.note = f"decoding… {len(events)} tokens"
            yield
        if run.role == "reference" and not request.cancel.is_set():
            self.service.remember_reference(preset, prompt, run.config, run.events)
        elif not request.cancel.is_set():
            self.service.keep_run(preset, prompt, run.config, run.events, run.known_call_s)
        if quality and not request.cancel.is_set():
            run.phase = "reference"
            limit = run.config.sampling.max_new_tokens
            s = run.summary
            done = f"done: {s.tokens} tokens in {s.wall_s:.1f} s; " if s else ""
            references: list[list[TokenEvent]] = []
            for i, reference in self.service.references(preset, prompt, run.config, request.cancel):
                references[i:] = [reference]
                which = "answer" if run.config.sampling.temperature == 0 else f"sample {i + 1} of {REFERENCE_SAMPLES}"
                run.note = (f"{done}BERTScore on its way: the LLM's own {which}, {len(reference)}/{limit} tokens "
                            "(after the run, not beside it: the cores are busy decoding)")
                yield
            if not request.cancel.is_set():
                run.note = "scoring…"
                yield
                judge(run, references, self.service.score, noise_band(references, self.service.score))
        stopped = request.cancel.is_set()
        run.phase = "stopped" if stopped else "done"
        s = run.summary
        limit = (f"; stopped at the {len(run.events)}-token limit (raise Max new tokens for more)"
                 if run.at_limit(decoder.pair.stop_ids) else "")
        served = f" ({said})" if (said := run.served) else ""
        run.note = (f"stopped after {s.tokens if s else 0} tokens" if stopped else
                    f"done: {s.tokens} tokens decoded in {s.wall_s:.1f} s{limit}{served}" if s else "done: no tokens")
        yield

    def hardware(self, preset: str, config: RunConfig | None = None) -> str:
        decoder = self.service.decoder(preset)
        return hardware_html(decoder, config or Settings().run_config(decoder.pair.calibration), self.service.cloud,
                             self.service.quality_method)

    def hardware_info(self, preset: str) -> dict[str, Any]:
        """The hardware panel as data (the /hardware endpoint), with the page's default settings."""
        decoder = self.service.decoder(preset)
        cal = decoder.pair.calibration
        config = Settings().run_config(cal)
        return {"pair": decoder.pair.describe(), "energy_methods": decoder.energy_methods(config.link, config.device),
                "cloud": self.service.cloud, "quality": self.service.quality_method,
                "calibration": asdict(cal) if cal else None}

    def generate(self, session: str, preset: str, prompt: str, settings: Settings,
                 history: list[dict[str, Any]] | None) -> Iterator[Frame]:
        """The Generate button: stream one run, then its quality and a history point."""
        config = self._prepare(preset, prompt, settings)
        run = self._new_run(preset, run_label(config), config)
        request = self.service.begin(session)
        self._last.pop(session, None)
        try:
            yield Frame(stats=stats_html(run), tokens="", table=[], tab="output",
                        hardware=self.hardware(preset, config))
            table_shown = False
            for frame in live_frames(run, self._decode(preset, prompt, run, request)):
                if run.phase == "reference" and not table_shown:  # the result first; its BERTScore when ready
                    frame.table, table_shown = token_rows(run.events), True
                self._remember(session, preset, run)  # before the page shows "done": a slider moved at once replays
                yield frame
            history = add_history(history, history_point(run, prompt, preset))
            yield Frame(table=token_rows(run.events), history=history, quality=history_figure(history))
        finally:
            self.service.end(session, request)

    def _remember(self, session: str, preset: str, run: RunView) -> None:
        """`run`, once replayable, as the session's run the what-if replay re-decides (for the REPLAYS most recent
        sessions)."""
        if replayable(run):
            self._last[session] = (preset, run)
            while len(self._last) > REPLAYS:
                self._last.popitem(last=False)

    def replay(self, session: str, k: Any, gamma: Any, u_th: Any = None) -> Frame:
        """A knob move after a run of an estimator policy (k, γ) or an uncertainty one (u_th): outline the drafts
        the new values would upload and redraw the upload-rate and energy charts with the replay beside the run (no
        model call). An empty frame (nothing changes) when there is no such run or the values are not yet valid (a
        box being typed in)."""
        last = self._last.get(session)
        try:
            k, gamma = int(as_number("k", k, whole=True)), as_number("gamma", gamma)
            u_th = as_number("u_th", u_th) if u_th is not None else None
        except ConfigError:
            return Frame()
        if last is None or not 1 <= k <= WINDOW or gamma < 0:
            return Frame()
        preset, run = last
        policy, stat = run.config.policy, replayed_on(run.config)
        if stat == "u" and (u_th is None or not 0 <= u_th <= 1):
            return Frame()
        scale = self.service.decoder(preset).pair.selection.scale(policy.estimator) if stat == "score" else None
        r = replay(run, *replay_rule(run, scale, k, gamma, policy.u_th if u_th is None else u_th))
        return Frame(stats=stats_html(run, replay_note(run, r)),
                     tokens="".join(token_span(e, policy, up) for e, up in zip(run.events, r.uploads, strict=True)),
                     figures={"energy": energy_figure(run.points, r), "uploads": upload_figure(run.points, r)})

    def _compare(self, preset: str, prompt: str, base: RunConfig, request: Request, policies: Sequence[str] = COMPARED,
                 measured: bool = True) -> Iterator[tuple[list[RunView], RunView]]:
        """The reference (the LLM alone), then `policies` with the same settings, each scored against the reference
        (at T > 0 against REFERENCE_SAMPLES LLM samples, which also give the noise band: `judge`); the control
        (after the subject) gets its coin matched to the subject's upload rate (`match_control`). `measured`: the
        LLM alone is a run with its own time and energy (Compare shows it beside the others); else (Show me, whose
        verdict needs only its answer) the answer comes as `Service.references` gives it, from the cache (a stored
        answer has no figures), from HLM's run at greedy (`_answer_from_hlm`) or decoded. Yields (all runs, the one
        running) after every change."""
        llm = base.with_policy(name=with_role("reference"))
        runs = [self._new_run(preset, f"{run_label(llm)} (reference)", llm),
                *(self._new_run(preset, run_label(base.with_policy(name=n)), base.with_policy(name=n))
                  for n in policies)]
        reference = runs[0]
        reference.phase = "decoding"
        reference.priced = measured or self.service.priced(preset, prompt, llm)
        yield runs, reference
        if not measured:
            yield from self._answer_from_hlm(preset, prompt, llm, runs, request)
            if request.cancel.is_set():
                reference.phase, reference.note = "stopped", "stopped"
                return
        doing = "decoding" if measured else "the LLM's answer"
        samples: list[list[TokenEvent]] = []  # the reference first; at T > 0 more LLM samples for the band
        for i, events in self.service.references(preset, prompt, llm, request.cancel, same_link=measured):
            samples[i:] = [events]
            if i:
                reference.note = f"LLM sample {i + 1} of {REFERENCE_SAMPLES} for the noise band: {len(events)} tokens"
            else:
                reference.update(events)
                reference.note = f"{doing}… {len(events)} tokens"
            yield runs, reference
        if request.cancel.is_set():
            reference.phase, reference.note = "stopped", "stopped"
            return
        band = noise_band(samples, self.service.score)
        judge(reference, samples, self.service.score, band, is_reference=True)
        reference.phase, reference.note = "done", "done"
        for run in runs[1:]:
            if run.role == "control":
                match_control(run, runs)
            if run.phase != "done" and not self._shown_again(preset, prompt, run):
                for _ in self._decode(preset, prompt, run, request, quality=False):
                    yield runs, run
                if run.phase != "done":
                    return
            judge(run, samples, self.service.score, band)
            yield runs, run

    def _answer_from_hlm(self, preset: str, prompt: str, llm: RunConfig, runs: list[RunView],
                         request: Request) -> Iterator[tuple[list[RunView], RunView]]:
        """Show me at greedy with no answer kept: HLM first, then its tokens as the LLM's answer (every draft is
        verified, and at temperature 0 the verifier keeps or puts its own argmax: the LLM's greedy answer, token
        for token), so the LLM alone is not decoded for an answer HLM has just given (`Service.remember_answer`)."""
        hlm = next((r for r in runs if r.role == "counterfactual"), None)
        if hlm is None or llm.sampling.temperature != 0 or self.service.has_answer(preset, prompt, llm.sampling):
            return
        runs[0].phase, runs[0].note = "waiting", "the LLM's answer: HLM's tokens, once HLM has run"
        if not self._shown_again(preset, prompt, hlm):
            for _ in self._decode(preset, prompt, hlm, request, quality=False):
                yield runs, hlm
        if hlm.phase == "done":
            self.service.remember_answer(preset, prompt, llm.sampling, [e.token_id for e in hlm.events])
            runs[0].priced, runs[0].answer_from = False, "HLM's tokens: at greedy, the LLM's own"

    def _shown_again(self, preset: str, prompt: str, run: RunView) -> bool:
        """Fill `run` with the finished run of the same pair, prompt and settings, if one is kept (Generate's,
        Show me's, any session's: `Service.finished`) rather than decode the same tokens again; its figures are the
        ones measured then, and the page says when that was."""
        kept = self.service.finished(preset, prompt, run.config)
        if kept is None:
            return False
        run.known_call_s, run.shown_again = kept.call_s, kept.ended
        run.update(list(kept.events))
        run.phase, run.note = "done", f"done: the run of {kept.ended} with the same prompt and settings, shown again"
        return True

    def compare(self, session: str, preset: str, prompt: str, settings: Settings,
                history: list[dict[str, Any]] | None, policies: Sequence[str] = COMPARED,
                measured: bool = True) -> Iterator[Frame]:
        """The Compare button (and "Show me", with `SHOW_ME` and the LLM's answer not `measured`: `_compare`): the
        runs side by side, the headline figures following the one running (its charts as it ends), and the verdict
        once every run is scored; then the cards, charts, Output and token table show ours (the subject), which the
        what-if replay then re-decides."""
        base = self._prepare(preset, prompt, settings)
        request = self.service.begin(session)
        self._last.pop(session, None)  # the charts will follow these runs: no replay of an older one over them
        try:
            steps = self._compare(preset, prompt, base, request, policies, measured)
            runs, _ = next(steps)
            yield Frame(compare=compare_html(runs), tab="compare",
                        hardware=self.hardware(preset, base))
            for run, updates in itertools.groupby(steps, key=lambda step: step[1]):
                for frame in live_frames(run, updates, tokens=False, every_s=COMPARE_FRAME_S, chart_s=math.inf):
                    frame.compare = compare_html(runs)
                    yield frame
            history = add_history(history, *(history_point(r, prompt, preset) for r in runs[1:]))
            final = Frame(compare=compare_html(runs), history=history, quality=history_figure(history))
            ours = None if request.cancel.is_set() else subject(runs)
            if ours is not None:  # the cards and charts followed the runs to the last, the coin: ours now, everywhere
                final.stats, final.tokens, final.table = stats_html(ours), tokens_html(ours), token_rows(ours.events)
                final.energy, final.uploads = energy_figure(ours.points), upload_figure(ours.points)
                self._remember(session, preset, ours)
            yield final
        finally:
            self.service.end(session, request)

    def show_me(self, session: str, preset: str, prompt: str, settings: Settings,
                history: list[dict[str, Any]] | None) -> Iterator[Frame]:
        """The "Show me" button: ours against HLM and the matched coin on this prompt (the first example when the
        box is empty, put in the box so the viewer sees what ran), ending in `verdict`'s sentence."""
        if not prompt.strip():
            prompt = load_examples()[0]["prompt"]
            yield Frame(prompt=prompt)
        yield from self.compare(session, preset, prompt, settings, history, SHOW_ME, measured=False)

    def api_generate(self, preset: str, prompt: str, settings: Settings, quality: bool) -> Iterator[dict[str, Any]]:
        config = self._prepare(preset, prompt, settings)
        run = self._new_run(preset, run_label(config), config)
        for _ in self._decode(preset, prompt, run, Request(), quality=quality):
            yield run.payload()

    def api_compare(self, preset: str, prompt: str, settings: Settings) -> Iterator[dict[str, Any]]:
        base = self._prepare(preset, prompt, settings)
        for runs, _ in self._compare(preset, prompt, base, Request()):
            yield {"runs": [r.payload(tokens=False) for r in runs]}

