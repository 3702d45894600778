"""The page's HTML: the headline cards and status line, the tokens with their hover text, the Compare view and its
one-sentence verdict, the hardware panel, the token table's rows, and the message an error shows."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from hlm.config import PolicyConfig, RunConfig
from hlm.dashboard.runs import Replay, RunView
from hlm.dashboard.settings import REFERENCE_SAMPLES
from hlm.decoder import HybridDecoder
from hlm.errors import UserError
from hlm.events import SOURCES, TokenEvent
from hlm.link import upload_bits, upload_cost
from hlm.policies import Role
from hlm.verifier import CloudUnavailable

# Errors a viewer can cause or fix (`UserError`) or should hear about (the cloud is down); the app shows their message
# as a Gradio error. Anything else is a bug: the app hides it (show_error=False) and the server log keeps the traceback.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, CloudUnavailable)

UNEXPECTED = ("Something went wrong on the server ({name}); the run was abandoned. The server log has the details; "
              "trying again or changing a setting may help.")


def error_notice(exc: Exception) -> str:
    """The message (HTML: Gradio's toast renders it so) a viewer sees for `exc`, led by a bold title: Gradio 6.31
    titles every error toast "Error" whatever `gr.Error(title=...)` says. A fixable error says what to fix, a bug
    says that it is one (its traceback stays in the server log)."""
    if isinstance(exc, USER_ERRORS):
        title, text = "Cannot run.", str(exc)
    else:
        title, text = "Unexpected error.", UNEXPECTED.format(name=type(exc).__name__)
    return f"<strong>{title}</strong> {html.escape(text)}"


SOURCE_LABELS = {
    "local": "kept on device",
    "cloud_accepted": "accepted by cloud",
    "cloud_resampled": "resampled by cloud",
    "cloud_sampled": "cloud only (LLM)",
    "unverified": "unverified (upload failed)",
}
PART_LABELS = {"device_compute": "SLM compute", "radio": "radio", "device_idle": "idle wait", "cloud": "cloud compute"}
PART_COLOURS = {"device_compute": "#3b82f6", "radio": "#f59e0b", "device_idle": "#94a3b8"}

def replay_note(run: RunView, r: Replay) -> str:
    s = run.summary
    assert s is not None
    return (f"what-if replay at {r.knobs} on this run's drafts: {sum(r.uploads)} of {len(r.uploads)} "
            f"uploaded ({_pct(r.upload_rate)}, ran at {_pct(s.upload_rate)}), link energy {r.link_j:.3g} J "
            f"(modelled; ran at {s.link_energy_j:.3g} J). The text after a changed decision could differ: Generate "
            "runs it for real.")


# ---------------------------------------------------------------------------------------------- HTML


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{round(x, 3) + 0.0:.1%}"  # + 0.0: no "-0.0%"


def token_title(e: TokenEvent, policy: PolicyConfig) -> str:
    """The hover text of one token: why it was kept or uploaded, and what the cloud said."""
    lines = [f"#{e.index}  {e.text!r}  {SOURCE_LABELS[e.source]}"]
    if e.u is not None:
        lines.append(f"uncertainty u = {e.u:.2f} ({'above' if e.u > policy.u_th else 'not above'} "
                     f"u_th = {policy.u_th:g})")
    if e.score is not None and e.score_threshold is not None:
        lines.append(f"{policy.estimator} score {e.score:.3f} vs bar {e.score_threshold:.3f} (k {policy.k}, "
                     f"γ {policy.gamma:g}): {'upload' if e.score >= e.score_threshold else 'keep'}")
    if e.importance is not None and e.importance_threshold is not None and e.importance_rank is not None:
        lines.append(f"importance {e.importance:.4f} vs threshold τ {e.importance_threshold:.4f}, "
                     f"rank {e.importance_rank + 1} (top-k {policy.k}): "
                     f"{'important' if e.important else 'not important'}")
    if e.p_draft is not None and e.q_draft is not None:
        lines.append(f"p(draft) {e.p_draft:.3f}, q(draft) {e.q_draft:.3f}, accept prob min(1, q/p) "
                     f"{e.accept_prob:.3f}" if e.accept_prob is not None else f"p {e.p_draft:.3f}, q {e.q_draft:.3f}")
    if e.source == "cloud_resampled" and e.draft_id is not None:
        lines.append(f"draft id {e.draft_id} rejected; the cloud sampled id {e.token_id}")
    if e.bits_up:
        synced = f", including {e.synced_ids} synced ids" if e.synced_ids else ""
        lines.append(f"uploaded {e.bits_up:,} bits{synced}")
    else:
        lines.append("nothing uploaded")
    device = {p: e.energy_j.get(p, 0.0) * 1e3 for p in PART_COLOURS}
    lines.append(f"device energy {sum(device.values()):.3g} mJ: " +
                 ", ".join(f"{PART_LABELS[p]} {j:.3g}" for p, j in device.items()))
    return "\n".join(lines)


def token_span(e: TokenEvent, policy: PolicyConfig, would_upload: bool = False) -> str:
    """One token, focusable (Enter, Space or a click opens its details: `hlm/assets/app.js`). Leading blanks stay
    outside the span, so the source's underline marks the word, not the space before it. `would_upload`: the
    what-if replay outlines the drafts it would upload."""
    title = html.escape(token_title(e, policy)).replace("\n", "&#10;")
    word = e.text.lstrip(" \t") or e.text
    lead = e.text[:len(e.text) - len(word)]
    mark = " would-upload" if would_upload else ""
    return (f'{lead}<span class="tok {e.source}{mark}" tabindex="0" role="button" data-i="{e.index}" '
            f'title="{title}">{html.escape(word)}</span>')


def token_spans(run: RunView) -> list[str]:
    """The run's tokens as spans, rendering only those added since the last call."""
    run.spans.extend(token_span(e, run.config.policy) for e in run.events[len(run.spans):])
    return run.spans


def tokens_html(run: RunView) -> str:
    """Only spans: the output grows by appending, which Gradio sends as a diff (the styling is the
    component's class). A draft the cloud is verifying shows last, marked pending."""
    p = run.pending
    tail = "" if p is None else (f'<span class="tok pending" title="draft #{p.index}: waiting for the cloud\'s '
                                 f'verdict">{html.escape(p.text)}</span>')
    return "".join(token_spans(run)) + tail


def legend_html(sources: Sequence[str] = SOURCES) -> str:
    items = "".join(f'<span class="item"><span class="swatch tok {s}"></span>{SOURCE_LABELS[s]}</span>'
                    for s in sources)
    hint = '<span class="hint">tap, click or press Enter on a token for its details</span>'
    return f'<div class="hlm-legend">{items}{hint}</div>'


def _card(value: str, name: str, sub: str) -> str:
    return (f'<div class="card"><div class="value">{value}</div><div class="name">{name}</div>'
            f'<div class="sub">{sub}</div></div>')


def stats_html(run: RunView | None, note: str | None = None) -> str:
    """The headline figures and a status line (`note`, when given, replaces the run's own: the replay's)."""
    s = run.summary if run else None
    if s is None:
        cards = [_card("–", n, "") for n in ("upload rate", "energy saved", "tokens / s", "LLM calls", "BERTScore")]
    else:
        hlm_j = f"{s.device_energy_j:.3g} J vs {s.hlm_device_energy_j:.3g} J for HLM" if s.hlm_device_energy_j else \
            f"{s.device_energy_j:.3g} J on the device"
        hlm_j += f"; link {s.link_energy_j:.3g} J (radio + waiting: what the policy controls)"
        f1 = run.f1 if run else None
        cards = [
            _card(_pct(s.upload_rate), "upload rate", f"{s.uploads} of {s.tokens} tokens"),
            _card(_pct(s.energy_saving), "energy saved", hlm_j),
            _card(f"{s.tokens_per_s:.1f}", "tokens / s", f"{s.tokens_per_s_modelled_link:.1f} over the modelled link"),
            _card(str(s.llm_calls), "LLM calls", f"{s.accepted} accepted, {s.resampled} resampled"),
            _card("–" if f1 is None else f"{f1:.3f}", "BERTScore", quality_note(run)),
        ]
    phase = "replay" if note else run.phase if run else "waiting"
    note = html.escape(note or (f"{run.label}: {run.note}" if run else "Enter a prompt and press Generate."))
    return f'<div class="hlm-stats">{"".join(cards)}</div><div class="hlm-status {phase}">{note}</div>'


def quality_note(run: RunView | None) -> str:
    """What the BERTScore card's figure is, and what is inside the noise."""
    if run is not None and run.faithful is not None:
        return "F1 vs the LLM's answer; faithful prefix {} of {} tokens (greedy: identical to it)".format(
            *run.faithful)
    if run is not None and run.band is not None:
        return (f"mean F1 vs {REFERENCE_SAMPLES} LLM samples; they score {run.band[0]:.3f}–{run.band[1]:.3f} "
                "against each other: inside that band is noise")
    return "F1 vs the LLM-only output"


# The runs `verdict` compares: the subject (ours) against the counterfactual (HLM) and the control (the matched coin)
VERDICT_ROLES: tuple[Role, ...] = ("counterfactual", "subject", "control")


def verdict(runs: Sequence[RunView]) -> str | None:
    """One sentence from a finished comparison's measured numbers (ours against HLM and the matched coin); None
    until all three are done and scored. Never a canned claim: every figure is read off this prompt's runs."""
    done = {r.role: r for r in runs if r.phase == "done" and r.f1 is not None and r.summary}
    if not set(VERDICT_ROLES) <= done.keys():
        return None
    hlm, ours, coin = (done[role] for role in VERDICT_ROLES)
    o, h, c = ours.summary, hlm.summary, coin.summary
    assert o is not None and h is not None and c is not None  # `done` holds runs with a summary
    less = 1.0 - o.link_energy_j / h.link_energy_j if h.link_energy_j > 0 else 0.0
    energy = (f"used {_pct(abs(less))} {'less' if less >= 0 else 'more'} link energy (radio and waiting for the "
              "cloud) than HLM")
    sent = f"On this prompt ours sent {_pct(o.upload_rate)} of its tokens to the cloud, {energy} and"
    if ours.faithful and hlm.faithful and coin.faithful:  # greedy: the share of the answer kept word for word
        def kept(r: RunView) -> str:
            return _pct(r.faithful[0] / r.faithful[1] if r.faithful and r.faithful[1] else 0.0)

        return (f"{sent} kept the LLM's answer token for token for {kept(ours)} of its length (BERTScore F1 "
                f"{ours.f1:.3f}; HLM {kept(hlm)}, {hlm.f1:.3f}); a coin sending as many ({_pct(c.upload_rate)}) "
                f"kept {kept(coin)} ({coin.f1:.3f}).")
    noise = f"; LLM samples score {ours.band[0]:.3f}–{ours.band[1]:.3f} against each other" if ours.band else ""
    return (f"{sent} scored BERTScore F1 {ours.f1:.3f} against the LLM's {'samples' if ours.band else 'answer'} "
            f"(HLM {hlm.f1:.3f}{noise}); a coin sending as many ({_pct(c.upload_rate)}) scored {coin.f1:.3f}.")


def compare_html(runs: Sequence[RunView]) -> str:
    """The Compare view: a summary table (rows appear as runs finish) over the runs' outputs side by side."""
    head = "".join(f"<th>{h}</th>" for h in COMPARE_HEADERS)
    subject = {r.label for r in runs if r.role == "subject"}  # its row stands out
    body = "".join(("<tr class=\"ours\">" if row[0] in subject else "<tr>") +
                   "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in compare_rows(runs))
    done = " done" if runs and all(r.phase in ("done", "stopped") for r in runs) else ""
    table = (f'<div class="hlm-compare-summary{done}"><table><thead><tr>{head}</tr></thead>'
             f'<tbody>{body}</tbody></table></div>' if body else "")
    cols = [f'<div class="col"><div class="head"><b>{html.escape(run.label)}</b><span>{_column_facts(run)}</span>'
            f'</div><div class="hlm-col-tokens">{"".join(token_spans(run))}</div></div>' for run in runs]
    said = verdict(runs)
    lead = f'<p class="hlm-verdict">{html.escape(said)}</p>' if said else ""
    band = next((r.band for r in runs if r.band), None)
    if band:
        lead += (f'<p class="hlm-band">BERTScore F1 is the mean against {REFERENCE_SAMPLES} LLM samples; the '
                 f"samples score {band[0]:.3f}–{band[1]:.3f} against each other, so differences inside that band "
                 "are sampling noise (HLM samples the LLM's distribution exactly).</p>")
    return f'{lead}{table}<div class="hlm-compare">{"".join(cols)}</div>'


def _column_facts(run: RunView) -> str:
    """The line under a run's name in Compare: its figures, or why it has none (yet)."""
    s = run.summary
    if not run.priced:
        return f"the answer only ({run.answer_from}): no time or energy figures"
    if s is None:
        return "waiting…"
    again = f" · the run of {run.shown_again}, shown again (same prompt and settings)" if run.shown_again else ""
    served = f" · {s.wall_s:.1f} s, {said}" if (said := run.served) else ""
    return (f"upload {_pct(s.upload_rate)} · saving {_pct(s.energy_saving)} · "
            f"F1 {'–' if run.f1 is None else f'{run.f1:.3f}'}{again}{served}")


def hardware_html(decoder: HybridDecoder, config: RunConfig, cloud: str | None, quality_method: str) -> str:
    """Device, dtype, and how each energy figure is obtained (measured by a counter, or modelled)."""
    d = decoder.pair.describe()
    link, methods = config.link, decoder.energy_methods(config.link, config.device)

    def model(m: dict[str, Any], role: str) -> str:
        fast = d["quant"].get(role, "none")
        return (f"{html.escape(m['name'])}: {m['params'] / 1e6:,.0f} M parameters, {m['dtype']} on {m['device']}; "
                f"weights: {html.escape(fast)}")

    full = upload_bits(link, decoder.pair.vocab_size, 0)
    cost = upload_cost(link, full, link.cloud_verify_time_s)
    rows = [
        ("model pair", f"{html.escape(d['pair'])}, vocabulary {d['vocab_size']:,}, context {d['max_context']:,}"),
        ("device (drafts)", model(d["draft"], "draft")),
        ("cloud (verifies)", model(d["verifier"], "verifier") + (f", served by {html.escape(cloud)}" if cloud else
                                                     ", in this process (the radio link between them is modelled)")),
        ("hardware", f"{html.escape(d['device_name'])}, {d['torch_threads']} torch threads"),
        *((f"energy: {PART_LABELS[p]}", _method(m)) for p, m in methods.items()),
        ("link", f"uplink {link.uplink_rate_bps / 1e6:.1f} Mbit/s; one full upload is {full:,} bits = "
                 f"{cost.uplink_s * 1e3:.1f} ms and {cost.radio_j * 1e3:.2f} mJ of radio"),
        ("quality", html.escape(quality_method) + ", against the LLM-only output for the same prompt and sampling"),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="hlm-hardware">{body}</table>'


def _method(label: str) -> str:
    kind = "measured" if label.startswith("measured") else "modelled"
    return f'<span class="badge {kind}">{kind}</span> {html.escape(label.split(": ", 1)[-1])}'


# ---------------------------------------------------------------------------------------------- tables

TOKEN_HEADERS = ["#", "token", "source", "u", "score", "bar", "importance", "τ", "rank", "p(draft)", "q(draft)",
                 "accept", "bits up"]
COMPARE_HEADERS = ["policy", "tokens", "upload rate", "LLM calls", "device energy (J)", "saved vs HLM", "tokens/s",
                   "tokens/s, modelled link", "BERTScore F1"]


def _fmt(x: float | int | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def token_rows(events: Sequence[TokenEvent]) -> list[list[str]]:
    """One row per token under TOKEN_HEADERS; score and bar: the estimator's score and the threshold it was held
    against (uploaded iff score >= bar), blank where the policy scores nothing."""
    return [[str(e.index), repr(e.text), e.source, _fmt(e.u, ".2f"), _fmt(e.score, ".3f"),
             _fmt(e.score_threshold, ".3f"), _fmt(e.importance, ".4f"),
             _fmt(e.importance_threshold, ".4f"), _fmt(None if e.importance_rank is None else e.importance_rank + 1,
                                                        "d"),
             _fmt(e.p_draft, ".3f"), _fmt(e.q_draft, ".3f"), _fmt(e.accept_prob, ".3f"), _fmt(e.bits_up, ",")]
            for e in events]


def compare_rows(runs: Sequence[RunView]) -> list[list[str]]:
    rows = []
    for run in runs:
        s = run.summary
        if s is not None:
            rows.append([run.label, str(s.tokens), _pct(s.upload_rate), str(s.llm_calls), f"{s.device_energy_j:.3g}",
                         _pct(s.energy_saving), f"{s.tokens_per_s:.2f}", f"{s.tokens_per_s_modelled_link:.2f}",
                         _fmt(run.f1, ".3f")])
    return rows

