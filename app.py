"""The web dashboard: type a prompt and watch the hybrid decoder work (layout and wiring only; `hlm.dashboard`
computes everything shown).

    python app.py [--models embedded|tiny|DRAFT,VERIFIER] [--cloud URL]

Serves on 127.0.0.1:7860; Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override that, HLM_MODELS and
HLM_CLOUD stand for --models and --cloud. Named API endpoints (see the page's "Use via API" link):
/generate (streams one run), /compare (hlm, uhlm, ours and the coin matched to ours against the LLM-only
reference), /hardware, /status (the caches and their bounds). At most QUEUE_MAX requests wait for the model.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd
from gradio.components.plot import PlotData

from hlm.cli import add_cloud_args, add_model_args
from hlm.dashboard import KNOBS, Dashboard, Frame

ASSETS = Path(__file__).resolve().parent / "hlm" / "assets"
LOG = logging.getLogger("hlm.app")
# The knobs /compare takes; the rest stay at their defaults (the link too)
COMPARE_KNOBS = ("k", "gamma", "u_th", "temperature", "max_new_tokens", "seed")
# Requests waiting for the one model worker (page and API together); past it a visitor is told the app is busy
# and to try again, instead of the queue growing without bound. HLM_QUEUE_MAX sets another cap.
QUEUE_MAX = int(os.environ.get("HLM_QUEUE_MAX", "8"))
# Browser and API sessions whose state (the trade-off history) Gradio keeps; the oldest go first past it.
SESSIONS_MAX = int(os.environ.get("HLM_SESSIONS_MAX", "256"))
# Gradio records every queued event for its analytics summary, 10,000 by default: a run's worth is plenty here.
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "500")

HEADER = ('<div class="hlm-header"><h1>Hybrid LM decoding</h1><p>A small model on the device drafts every token. '
          'The device uploads only the drafts the large cloud model is <span class="hl">most likely to change</span>, '
          '<span class="hl">while the answer is still the large model\'s</span>; the cloud verifies those, and every '
          'other draft stays as it is, which saves radio energy. Colours show where each token came from; the '
          'Evidence tab shows how well this choice works across many prompts.</p></div>')
COMPARE_NOTE = ("**Compare** runs the prompt with the LLM alone (the reference), then HLM (every token uploaded), "
                "U-HLM (uncertain tokens), ours (the drafts its estimator scores highest) and a coin uploading as many "
                "as ours did (the control), with the settings on the left. **Show me** runs HLM, ours and the coin "
                "against the LLM's answer (cached, else at greedy HLM's tokens, which are the LLM's own, else the "
                "LLM's samples decoded first; an answer kept on disk or taken from HLM has no figures) and sums "
                "the result up in one sentence. A run "
                "already made with the same prompt and settings (by Generate, Show me or Compare, or for the examples "
                "at the page's defaults when the app started) is shown again with its measured figures, not decoded "
                "again: the same tokens would come out.")


def user_errors(fn: Callable) -> Callable:
    """Errors a viewer can fix show as a Gradio error with their message; no traceback reaches the page."""
    def convert(exc: Exception) -> gr.Error:
        return gr.Error(str(exc), title="Cannot run", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Dashboard.USER_ERRORS as exc:
                raise convert(exc) from None
        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Dashboard.USER_ERRORS as exc:
            raise convert(exc) from None
    return call


def page_errors(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Every error of a page action as a message with text (`Dashboard.notice`): with show_error=False Gradio would
    show a bug as an empty "Error" toast. A bug's traceback goes to the server log only."""
    @functools.wraps(fn)
    def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error becomes a message; bugs are logged first
            if not isinstance(exc, Dashboard.USER_ERRORS):
                LOG.exception("page action failed")
            raise gr.Error(Dashboard.notice(exc), print_exception=False) from None
    return stream


# `Frame.figures` (the what-if replay's charts, a decoding run's after its first), drawn in the browser into the
# charts already on the page (`Plotly.react` diffs them):
# a new value of a gr.Plot re-creates its chart and draws it twice, which took most of a replay's time (4 draws of
# 20-66 ms on 2 shared cores). The layout gets what gr.Plot gives every figure (autosize, margins that grow to fit).
REDRAW = """(figures) => {
    for (const [name, figure] of Object.entries(figures || {})) {
        const chart = document.querySelector(`#hlm-${name} .js-plotly-plot`);
        if (chart && window.Plotly) window.Plotly.react(chart, figure.data, {...figure.layout, autosize: true,
            margin: {...figure.layout.margin, autoexpand: true}});
    }
}"""


def emit(frame: Frame) -> list[Any]:
    """A frame as the outputs' values, in `Frame` field order; None skips a component."""
    out: list[Any] = []
    for f in fields(Frame):
        value = getattr(frame, f.name)
        if value is None:
            out.append(gr.skip())
        elif f.name in Frame.PLOTS:
            out.append(_plot(value))
        elif f.name == "table":
            out.append(pd.DataFrame(value, columns=Frame.HEADERS))
        elif f.name == "tab":
            out.append(gr.Tabs(selected=value))
        else:
            out.append(value)
    return out


def widget(name: str, **override: Any) -> gr.components.Component:
    """The knob `name` as its widget, from the one table (`KNOBS`); `override` sets what the page shows instead."""
    knob = KNOBS[name]
    args = {"value": knob.default, "label": knob.label, "info": knob.info, "elem_id": knob.elem_id, **override}
    low, high, step = knob.range
    if knob.kind == "dropdown":
        return gr.Dropdown(list(knob.choices), **args)
    if knob.kind == "radio":
        return gr.Radio(list(knob.choices), **args)
    if knob.kind == "number":
        return gr.Number(precision=0, minimum=low, **args)
    return gr.Slider(low, high, step=step, **args)


class Risk(NamedTuple):
    """Where the page shows a pair's calibrated u_th: a note, and one button per calibrated value (hidden when the
    pair is not calibrated)."""

    note: gr.Markdown
    averse: gr.Button
    prone: gr.Button


@dataclass
class Controls:
    """The left column: what a run reads (the pair, the prompt, `knobs` keyed by knob name) and the buttons."""

    prompt: gr.Textbox
    preset: gr.Dropdown
    knobs: dict[str, gr.components.Component]
    risk: Risk
    generate: gr.Button
    compare: gr.Button
    show: gr.Button
    stop: gr.Button


def build(dash: Dashboard) -> gr.Blocks:
    """The page: the controls on the left, the views on the right, every event a call of one `Dashboard` method."""
    with gr.Blocks(title="Hybrid LM decoding: device drafts, cloud verifies") as demo:
        gr.HTML(HEADER)
        history = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                controls = _controls(dash)
            with gr.Column(scale=3, min_width=300):
                views = _views(dash)
        _wire_runs(dash, controls, views, history)
        _wire_settings(dash, controls, demo)
        _api(dash, demo)

        def on_close(request: gr.Request) -> None:  # a tab closed mid-run frees the worker at once
            dash.stop(request.session_hash)

        demo.unload(on_close)
    return demo


def _controls(dash: Dashboard) -> Controls:
    """The prompt and its examples, the model pair, k and γ, the run buttons, and the rest folded away."""
    prompt = gr.Textbox(label="Prompt", lines=4, max_lines=12, placeholder="Ask a question or for code…",
                        autofocus=True, info=dash.PROMPT_INFO)
    examples = dash.examples()
    gr.Examples([[e["prompt"]] for e in examples], [prompt], label="Examples",
                example_labels=[e["label"] for e in examples])
    preset = gr.Dropdown(dash.presets, value=dash.start, label="Model pair (device → cloud)",
                         interactive=len(dash.presets) > 1)
    knobs = {"k": widget("k"), "gamma": widget("gamma")}
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", scale=2, min_width=100)
        compare = gr.Button("Compare", scale=2, min_width=100)
        show = gr.Button("Show me", scale=2, min_width=100, elem_id="hlm-show-me")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=70)
    with gr.Accordion("Advanced settings", open=False, elem_id="hlm-advanced"):
        advanced, risk = _advanced(dash)
    return Controls(prompt, preset, {**knobs, **advanced}, risk, generate, compare, show, stop)


def _advanced(dash: Dashboard) -> tuple[dict[str, gr.components.Component], Risk]:
    """"Advanced settings": the policy and its u_th (with the pair's calibrated values), sampling, device and link
    (their knobs start at the default link preset's values)."""
    knobs = {"policy": widget("policy"), "estimator": widget("estimator"),
             "u_th": widget("u_th", value=dash.pair(dash.start).u_th)}
    with gr.Row():
        averse = gr.Button("risk-averse", size="sm", visible=False)
        prone = gr.Button("risk-prone", size="sm", visible=False)
    risk = Risk(gr.Markdown(elem_classes="hlm-note"), averse, prone)
    for name in ("temperature", "max_new_tokens", "seed"):
        knobs[name] = widget(name)
    gr.Markdown("**Device and radio link** (modelled; each choice says where its numbers come from)",
                elem_classes="hlm-note")
    link = dash.link(KNOBS["link_preset"].default)
    knobs["device_profile"], knobs["link_preset"] = widget("device_profile"), widget("link_preset")
    knobs["bandwidth_mhz"] = widget("bandwidth_mhz", value=link.bandwidth_mhz)
    knobs["snr_db"] = widget("snr_db", value=link.snr_db)
    knobs["tx_power_w"] = widget("tx_power_w", value=link.tx_power_w)
    knobs["bits_per_prob"], knobs["topk"] = widget("bits_per_prob"), widget("topk")
    return knobs, risk


def _views(dash: Dashboard) -> dict[str, gr.components.Component]:
    """The right column: the headline cards over the Output, Compare, Token details, Hardware and Evidence tabs;
    keyed by the `Frame` field each shows (Evidence is fixed: no frame changes it)."""
    blank = dash.blank()
    stats = gr.HTML(blank.stats)
    with gr.Tabs(selected="output") as tabs:
        with gr.Tab("Output", id="output"):
            gr.HTML(dash.legend())
            tokens = gr.HTML("", elem_classes="hlm-tokens", min_height=120, max_height=360, autoscroll=True)
            with gr.Row(equal_height=True):
                energy = gr.Plot(_plot(blank.energy), show_label=False, min_width=280, elem_id="hlm-energy")
                uploads = gr.Plot(_plot(blank.uploads), show_label=False, min_width=280, elem_id="hlm-uploads")
            quality = gr.Plot(_plot(blank.quality), show_label=False)
        with gr.Tab("Compare", id="compare"):
            gr.Markdown(COMPARE_NOTE, elem_classes="hlm-note")
            compare = gr.HTML(blank.compare)
        with gr.Tab("Token details", id="details"):
            table = gr.Dataframe(headers=Frame.HEADERS, interactive=False, max_height=480,
                                 label="Every token of the last run (after Compare or Show me: ours). Score: "
                                       "the estimator's, against the bar it had to reach to be uploaded")
        with gr.Tab("Hardware", id="hardware"):
            hardware = gr.HTML(dash.hardware(dash.start))
        with gr.Tab("Evidence", id="evidence", elem_id="hlm-evidence"):
            _evidence(dash)
    return {"stats": stats, "tokens": tokens, "energy": energy, "uploads": uploads, "quality": quality,
            "table": table, "compare": compare, "tab": tabs, "hardware": hardware}


def _evidence(dash: Dashboard) -> None:
    """The Evidence tab: values read from the committed result files when the page is built; no event fills it,
    so loading the page computes nothing."""
    e = dash.evidence()
    gr.Markdown(e.capture)
    gr.Plot(_plot(e.recall), show_label=False, elem_id="hlm-capture")
    gr.Plot(_plot(e.prefix), show_label=False)
    gr.Markdown(e.capture_table, elem_classes="hlm-note")
    gr.Markdown(e.end_to_end)
    gr.Markdown(e.humaneval)


def _streamed(action: Callable[..., Iterator[Frame]]) -> Callable[..., Iterator[list[Any]]]:
    """A run button's handler: the session, pair, prompt, history and knobs into `action` (`Dashboard.generate`,
    `compare` or `show_me`), its frames out as the page's outputs."""
    @page_errors
    def on_run(request: gr.Request, pair: str, text: str, past: list, *values: Any) -> Iterator[list]:
        for frame in action(request.session_hash, pair, text, KNOBS.settings(values), past):
            yield emit(frame)
    return on_run


def _wire_runs(dash: Dashboard, c: Controls, views: dict[str, gr.components.Component], history: gr.State) -> None:
    """The buttons that run the models (one run at a time across sessions: they share the models), Stop, and the
    what-if replay: a k, γ or u_th move redraws the last run without a model, so it answers while you drag. Every
    one of them updates the page through a `Frame`."""
    figures = gr.JSON(visible=False)  # `Frame.figures`, drawn into the page's charts by REDRAW
    figures.change(None, figures, None, js=REDRAW, api_visibility="private")
    targets = {**views, "history": history, "prompt": c.prompt, "figures": figures}
    outputs = [targets[f.name] for f in fields(Frame)]
    inputs = [c.preset, c.prompt, history, *(c.knobs[knob.name] for knob in KNOBS)]
    model_work = {"outputs": outputs, "concurrency_limit": 1, "concurrency_id": "model",
                  "show_progress": "minimal", "show_progress_on": [views["stats"]], "scroll_to_output": True,
                  "api_visibility": "private"}
    on_generate = _streamed(dash.generate)
    run = c.generate.click(on_generate, inputs, **model_work)
    c.prompt.submit(on_generate, inputs, **model_work)
    both = c.compare.click(_streamed(dash.compare), inputs, **model_work)
    shown = c.show.click(_streamed(dash.show_me), inputs, **model_work)

    def on_stop(request: gr.Request) -> None:
        dash.stop(request.session_hash)

    c.stop.click(on_stop, None, None, queue=False, api_visibility="private").then(
        None, None, None, cancels=[run, both, shown], api_visibility="private")

    def on_replay(request: gr.Request, k: Any, gamma: Any, u_th: Any) -> list:
        return emit(dash.replay(request.session_hash, k, gamma, u_th))

    replayed = [c.knobs["k"], c.knobs["gamma"], c.knobs["u_th"]]
    for knob in replayed:  # no queue, no model
        knob.input(on_replay, replayed, outputs, queue=False, show_progress="hidden", trigger_mode="always_last",
                   api_visibility="private")


def _wire_settings(dash: Dashboard, c: Controls, demo: gr.Blocks) -> None:
    """Settings that fill in others: a link preset its link knobs, a device profile its description, a pair its
    u_th note and the risk buttons that set its calibrated values."""
    def on_link_preset(name: str) -> list:
        link = dash.link(name)
        return [gr.Dropdown(info=link.description), link.bandwidth_mhz, link.snr_db, link.tx_power_w]

    link_knobs = [c.knobs[name] for name in ("link_preset", "bandwidth_mhz", "snr_db", "tx_power_w")]
    c.knobs["link_preset"].input(on_link_preset, link_knobs[0], link_knobs, api_visibility="private")
    c.knobs["device_profile"].input(lambda name: gr.Dropdown(info=dash.device(name)),
                                    c.knobs["device_profile"], c.knobs["device_profile"], api_visibility="private")

    def on_pair(pair: str) -> list:
        info = dash.pair(pair)
        return [info.note, info.u_th, _risk_button("risk-averse", info.risk_averse),
                _risk_button("risk-prone", info.risk_prone)]

    pair_outputs = [c.risk.note, c.knobs["u_th"], c.risk.averse, c.risk.prone]
    c.preset.change(on_pair, c.preset, pair_outputs, api_visibility="private")
    demo.load(on_pair, c.preset, pair_outputs, api_visibility="private")
    c.risk.averse.click(lambda pair: dash.pair(pair).risk_averse, c.preset, c.knobs["u_th"], api_visibility="private")
    c.risk.prone.click(lambda pair: dash.pair(pair).risk_prone, c.preset, c.knobs["u_th"], api_visibility="private")


def _risk_button(name: str, value: float | None) -> gr.Button:
    """A calibrated u_th as a button that sets it; hidden where the pair is not calibrated."""
    return gr.Button("" if value is None else f"{name} {value:g}", visible=value is not None)


def _api(dash: Dashboard, demo: gr.Blocks) -> None:
    """The documented endpoints for `gradio_client` (plain JSON in and out; the page's events are private). Their
    knob parameters, defaults and docs come from `KNOBS` (`KNOBS.endpoint`)."""
    api = {"concurrency_limit": 1, "concurrency_id": "model"}
    start = dash.start

    @user_errors
    @KNOBS.endpoint(*(knob.name for knob in KNOBS))
    def generate(prompt: str, settings: Any, quality: bool = True, pair: str = "") -> Iterator[dict[str, Any]]:
        """Stream one run of the hybrid decoder. Each message holds the run so far: status (decoding, reference,
        done, stopped), text, tokens (one record per token: source, u, importance, p/q, bits, energy), summary
        (upload rate, LLM calls, energy and its HLM counterfactual, tokens/s) and, at the end, bertscore_f1.

        Args:
            prompt: the user message (chat-templated for both models)
            quality: score the output with BERTScore against the LLM-only output (generated once, then cached)
            pair: model pair (default: the one the app started with)
        """
        yield from dash.api_generate(pair or start, prompt, settings, quality)

    @user_errors
    @KNOBS.endpoint(*COMPARE_KNOBS)
    def compare(prompt: str, settings: Any, pair: str = "") -> Iterator[dict[str, Any]]:
        """Run the LLM-only reference, then hlm, uhlm, ours and random (its coin matched to ours' upload rate) on
        one prompt with the same settings (the link at its defaults). Streams {"runs": [...]}, each run with status,
        text, summary and bertscore_f1 against the reference.

        Args:
            prompt: the user message
            pair: model pair (default: the one the app started with)
        """
        yield from dash.api_compare(pair or start, prompt, settings)

    @user_errors
    def hardware(pair: str = "") -> dict[str, Any]:
        """The model pair, the hardware it runs on, and how each energy figure is obtained (measured or modelled).

        Args:
            pair: model pair (default: the one the app started with)
        """
        return dash.hardware_info(pair or start)

    def status() -> dict[str, Any]:
        """Every cache the app keeps in memory, with its size and its bound (for operators and the soak script)."""
        sessions = getattr(demo, "state_holder", None)  # Gradio's per-session state, set once the app serves
        return {**dash.status(), "sessions": {"size": len(sessions.session_data) if sessions else 0,
                                              "bound": SESSIONS_MAX}}

    gr.api(generate, api_name="generate", **api)
    gr.api(compare, api_name="compare", **api)
    gr.api(hardware, api_name="hardware")
    gr.api(status, api_name="status", queue=False)


def _plot(figure: dict[str, Any]) -> PlotData:
    """Figure dicts go out as plotly JSON as they are (no `go.Figure` validation on every update)."""
    return PlotData(type="plotly", plot=json.dumps(figure))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the hybrid-decoding dashboard (Gradio).")
    add_model_args(parser)
    add_cloud_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dash = Dashboard.open(args.models, args.device, args.dtype, args.quant, args.cloud, args.emulate_link)
    except Dashboard.USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    demo = build(dash)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX)
    try:
        demo.launch(show_error=False, state_session_capacity=SESSIONS_MAX, css_paths=[ASSETS / "app.css"],
                    footer_links=["api", "gradio"],
                    head=f"<script>{(ASSETS / 'app.js').read_text(encoding='utf-8')}</script>")
    except OSError as exc:  # the port is taken (Gradio's message says how to choose another)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
