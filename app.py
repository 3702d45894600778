"""The web dashboard: type a prompt and watch the hybrid decoder work (layout and wiring only; `hlm.dashboard`
computes everything shown).

    python app.py [--models embedded|tiny|DRAFT,VERIFIER] [--cloud URL]

Serves on 127.0.0.1:7860; Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override that, HLM_MODELS and
HLM_CLOUD stand for --models and --cloud. Named API endpoints (see the page's "Use via API" link):
/generate (streams one run), /compare (hlm, uhlm, ours and the coin matched to ours against the LLM-only
reference), /hardware.
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
from dataclasses import fields
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio.components.plot import PlotData

from hlm.cli import add_model_args
from hlm.config import DEVICE_PROFILES, ESTIMATORS, LINK_PRESETS, MAX_PROMPT_CHARS, POLICIES, PolicyConfig
from hlm.dashboard import (
    TOKEN_HEADERS,
    USER_ERRORS,
    Dashboard,
    Frame,
    Service,
    Settings,
    calibration_of,
    compare_html,
    default_u_th,
    energy_figure,
    error_notice,
    history_figure,
    legend_html,
    load_examples,
    stats_html,
    upload_figure,
)
from hlm.estimators import REGISTRY, WINDOW
from hlm.models import PRESETS

ASSETS = Path(__file__).resolve().parent / "hlm" / "assets"
LOG = logging.getLogger("hlm.app")
PLOTS = {"energy", "uploads", "quality"}

HEADER = ('<div class="hlm-header"><h1>Hybrid LM decoding</h1><p>A small model on the device drafts every token. '
          'Only tokens that are both <span class="hl">uncertain</span> and <span class="hl">important</span> are '
          'uploaded for the large cloud model to verify, which saves radio energy. Colours show where each token '
          'came from.</p></div>')
POLICY_INFO = ("ours: upload the drafts its estimator scores highest · uhlm: if u > u_th · hlm: every token · "
               "slm: never · llm: the cloud model alone · random: a coin (the control)")
_DEFAULT_ESTIMATOR = REGISTRY[PolicyConfig.estimator]
ESTIMATOR_INFO = (f"how ours scores a draft; {PolicyConfig.estimator} (default): {_DEFAULT_ESTIMATOR.description}; "
                  "paper-*: the paper-literal attention rule (README: Selection)")


def user_errors(fn: Callable) -> Callable:
    """Errors a viewer can fix show as a Gradio error with their message; no traceback reaches the page."""
    def convert(exc: Exception) -> gr.Error:
        return gr.Error(str(exc), title="Cannot run", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as exc:
                raise convert(exc) from None
        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise convert(exc) from None
    return call


def page_errors(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Every error of a page action as a message with text (`error_notice`): with show_error=False Gradio would
    show a bug as an empty "Error" toast. A bug's traceback goes to the server log only."""
    @functools.wraps(fn)
    def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error becomes a message; bugs are logged first
            if not isinstance(exc, USER_ERRORS):
                LOG.exception("page action failed")
            raise gr.Error(error_notice(exc), print_exception=False) from None
    return stream


def emit(frame: Frame) -> list[Any]:
    """A frame as the outputs' values, in `Frame` field order; None skips a component."""
    out: list[Any] = []
    for f in fields(Frame):
        value = getattr(frame, f.name)
        if value is None:
            out.append(gr.skip())
        elif f.name in PLOTS:
            out.append(_plot(value))
        elif f.name == "table":
            out.append(pd.DataFrame(value, columns=TOKEN_HEADERS))
        elif f.name == "tab":
            out.append(gr.Tabs(selected=value))
        else:
            out.append(value)
    return out


def build(dash: Dashboard) -> gr.Blocks:
    service = dash.service
    start = service.start
    names = [f.name for f in fields(Settings)]
    with gr.Blocks(title="Hybrid LM decoding: device drafts, cloud verifies") as demo:
        gr.HTML(HEADER)
        history = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                prompt = gr.Textbox(label="Prompt", lines=4, max_lines=12, placeholder="Ask a question or for code…",
                                    autofocus=True, info=f"up to {MAX_PROMPT_CHARS:,} characters; a long prompt is "
                                    "read in chunks (the status line shows how far), and Stop cuts it at once")
                examples = load_examples()
                gr.Examples([[e["prompt"]] for e in examples], [prompt], label="Examples",
                            example_labels=[e["label"] for e in examples])
                preset = gr.Dropdown(service.presets, value=start, label="Model pair (device → cloud)",
                                     interactive=len(service.presets) > 1)
                c: dict[str, gr.components.Component] = {
                    "k": gr.Slider(1, WINDOW, value=Settings.k, step=1, label="k: upload budget", elem_id="hlm-k",
                                   info=f"about k uploads per {WINDOW} drafts on typical prompts (more on hard ones)"),
                    "gamma": gr.Slider(0, 3, value=Settings.gamma, step=0.1, label="γ: strictness",
                                       elem_id="hlm-gamma",
                                       info="raises the bar by γ standard deviations of the score; larger γ uploads "
                                            "less"),
                }
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", scale=2, min_width=100)
                    compare = gr.Button("Compare", scale=2, min_width=100)
                    show = gr.Button("Show me", scale=2, min_width=100, elem_id="hlm-show-me")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=70)
                with gr.Accordion("Advanced settings", open=False, elem_id="hlm-advanced"):
                    c["policy"] = gr.Dropdown(list(POLICIES), value=Settings.policy, label="Policy", info=POLICY_INFO,
                                              elem_id="hlm-policy")
                    c["estimator"] = gr.Dropdown(list(ESTIMATORS), value=Settings.estimator, label="Estimator (ours)",
                                                 info=ESTIMATOR_INFO, elem_id="hlm-estimator")
                    c["u_th"] = gr.Slider(0, 1, value=default_u_th(start), step=0.01, label="u_th: uncertainty "
                                          "threshold", info="uhlm and paper-*: a draft is uncertain when u > u_th")
                    with gr.Row():
                        averse = gr.Button("risk-averse", size="sm", visible=False)
                        prone = gr.Button("risk-prone", size="sm", visible=False)
                    calibration = gr.Markdown(elem_classes="hlm-note")
                    c["temperature"] = gr.Slider(0, 2, value=Settings.temperature, step=0.05, label="Temperature",
                                                 info="0 = greedy: HLM equals the LLM, so differences are the "
                                                      "policy's; > 0: scored against 3 LLM samples, with their band")
                    c["max_new_tokens"] = gr.Slider(8, 512, value=Settings.max_new_tokens, step=8,
                                                    label="Max new tokens", elem_id="hlm-max-new-tokens")
                    c["seed"] = gr.Number(value=Settings.seed, precision=0, minimum=0, label="Seed")
                    gr.Markdown("**Device and radio link** (modelled; each choice says where its numbers come "
                                "from)", elem_classes="hlm-note")
                    c["device_profile"] = gr.Dropdown([(ch.label, n) for n, ch in DEVICE_PROFILES.items()],
                                                      value=Settings.device_profile, label="Device profile",
                                                      info=DEVICE_PROFILES[Settings.device_profile].description)
                    c["link_preset"] = gr.Dropdown([(ch.label, n) for n, ch in LINK_PRESETS.items()],
                                                   value=Settings.link_preset, label="Link preset",
                                                   info=LINK_PRESETS[Settings.link_preset].description)
                    link = LINK_PRESETS[Settings.link_preset].config
                    c["bandwidth_mhz"] = gr.Slider(0.1, 100, value=link.bandwidth_hz / 1e6, step=0.01,
                                                   label="Uplink bandwidth (MHz)")
                    c["snr_db"] = gr.Slider(-30, 60, value=link.snr_db, step=0.1, label="SNR (dB)")
                    c["tx_power_w"] = gr.Slider(0, 3, value=link.tx_power_w, step=0.05,
                                                label="Transmit power (W)")
                    c["bits_per_prob"] = gr.Radio([8, 16, 32], value=Settings.bits_per_prob,
                                                  label="Bits per probability")
                    c["topk"] = gr.Slider(0, 1024, value=Settings.topk, step=1,
                                          label="Top-k compression (0 = full distribution)")
            with gr.Column(scale=3, min_width=300):
                stats = gr.HTML(stats_html(None))
                with gr.Tabs(selected="output") as tabs:
                    with gr.Tab("Output", id="output"):
                        gr.HTML(legend_html())
                        tokens = gr.HTML("", elem_classes="hlm-tokens", min_height=120, max_height=360,
                                         autoscroll=True)
                        with gr.Row(equal_height=True):
                            energy = gr.Plot(_plot(energy_figure([])), show_label=False, min_width=280)
                            uploads = gr.Plot(_plot(upload_figure([])), show_label=False, min_width=280)
                        quality = gr.Plot(_plot(history_figure([])), show_label=False)
                    with gr.Tab("Compare", id="compare"):
                        gr.Markdown("**Compare** runs the prompt with the LLM alone (the reference), then HLM "
                                    "(every token uploaded), U-HLM (uncertain tokens), ours (the drafts its "
                                    "estimator scores highest) and a coin uploading as many as ours did (the "
                                    "control), with the settings on the left. **Show me** runs HLM, ours and the "
                                    "coin and sums the result up in one sentence.", elem_classes="hlm-note")
                        compare_view = gr.HTML(compare_html([]))
                    with gr.Tab("Token details", id="details"):
                        table = gr.Dataframe(headers=TOKEN_HEADERS, interactive=False, max_height=480,
                                             label="Every token of the last run (hovering a token shows the same)")
                    with gr.Tab("Hardware", id="hardware"):
                        hardware = gr.HTML(dash.hardware(start))

        controls = [c[n] for n in names]
        targets = {"stats": stats, "tokens": tokens, "energy": energy, "uploads": uploads, "quality": quality,
                   "table": table, "history": history, "compare": compare_view,
                   "tab": tabs, "hardware": hardware, "prompt": prompt}
        outputs = [targets[f.name] for f in fields(Frame)]

        def settings(values: Sequence[Any]) -> Settings:
            return Settings(**dict(zip(names, values, strict=True)))

        @page_errors
        def on_generate(request: gr.Request, pair: str, text: str, past: list, *values: Any) -> Iterator[list]:
            for frame in dash.generate(request.session_hash, pair, text, settings(values), past):
                yield emit(frame)

        @page_errors
        def on_compare(request: gr.Request, pair: str, text: str, past: list, *values: Any) -> Iterator[list]:
            for frame in dash.compare(request.session_hash, pair, text, settings(values), past):
                yield emit(frame)

        @page_errors
        def on_show(request: gr.Request, pair: str, text: str, past: list, *values: Any) -> Iterator[list]:
            for frame in dash.show_me(request.session_hash, pair, text, settings(values), past):
                yield emit(frame)

        def on_replay(request: gr.Request, k: Any, gamma: Any, u_th: Any) -> list:
            return emit(dash.replay(request.session_hash, k, gamma, u_th))

        def on_stop(request: gr.Request) -> None:
            service.stop(request.session_hash)

        def on_pair(pair: str) -> list:
            cal = calibration_of(pair)
            note = (f"u_th calibrated for this pair ({cal.samples} samples): risk-averse {cal.risk_averse:g}, "
                    f"risk-prone {cal.risk_prone:g}." if cal else
                    f"This pair is not calibrated (`python -m hlm calibrate`); u_th {default_u_th(pair):.2f} is "
                    "U-HLM's reported risk-averse value.")
            return [f"{_pair_info(pair)}. {note}", default_u_th(pair),
                    gr.Button(f"risk-averse {cal.risk_averse:g}" if cal else "", visible=cal is not None),
                    gr.Button(f"risk-prone {cal.risk_prone:g}" if cal else "", visible=cal is not None)]

        model_work = {"outputs": outputs, "concurrency_limit": 1, "concurrency_id": "model",
                      "show_progress": "minimal", "show_progress_on": [stats], "scroll_to_output": True,
                      "api_visibility": "private"}
        run = generate.click(on_generate, [preset, prompt, history, *controls], **model_work)
        prompt.submit(on_generate, [preset, prompt, history, *controls], **model_work)
        both = compare.click(on_compare, [preset, prompt, history, *controls], **model_work)
        shown = show.click(on_show, [preset, prompt, history, *controls], **model_work)
        stop.click(on_stop, None, None, queue=False, api_visibility="private").then(
            None, None, None, cancels=[run, both, shown], api_visibility="private")
        for knob in (c["k"], c["gamma"], c["u_th"]):  # what-if replay: no queue, no model: answers while you drag
            knob.input(on_replay, [c["k"], c["gamma"], c["u_th"]], outputs, queue=False, show_progress="hidden",
                       trigger_mode="always_last", api_visibility="private")
        def on_link_preset(name: str) -> list:
            chosen = LINK_PRESETS[name]
            return [gr.Dropdown(info=chosen.description), chosen.config.bandwidth_hz / 1e6, chosen.config.snr_db,
                    chosen.config.tx_power_w]

        c["link_preset"].input(on_link_preset, c["link_preset"],
                               [c["link_preset"], c["bandwidth_mhz"], c["snr_db"], c["tx_power_w"]],
                               api_visibility="private")
        c["device_profile"].input(lambda name: gr.Dropdown(info=DEVICE_PROFILES[name].description),
                                  c["device_profile"], c["device_profile"], api_visibility="private")
        pair_outputs = [calibration, c["u_th"], averse, prone]
        preset.change(on_pair, preset, pair_outputs, api_visibility="private")
        demo.load(on_pair, preset, pair_outputs, api_visibility="private")
        for button, key in ((averse, "risk_averse"), (prone, "risk_prone")):
            button.click(lambda pair, key=key: getattr(calibration_of(pair), key), preset, c["u_th"],
                         api_visibility="private")

        _api(dash, start)
    return demo


def _api(dash: Dashboard, start: str) -> None:
    """The documented endpoints for `gradio_client` (plain JSON in and out; the page's events are private)."""
    api = {"concurrency_limit": 1, "concurrency_id": "model"}

    @user_errors
    def generate(prompt: str, k: int = Settings.k, gamma: float = Settings.gamma, policy: str = Settings.policy,
                 estimator: str = Settings.estimator, u_th: float | None = None,
                 temperature: float = Settings.temperature, max_new_tokens: int = Settings.max_new_tokens,
                 seed: int = Settings.seed, device_profile: str = Settings.device_profile,
                 link_preset: str = Settings.link_preset, bandwidth_mhz: float | None = None,
                 snr_db: float | None = None, tx_power_w: float | None = None,
                 bits_per_prob: int = Settings.bits_per_prob,
                 topk: int = Settings.topk, quality: bool = True, pair: str = "") -> Iterator[dict[str, Any]]:
        """Stream one run of the hybrid decoder. Each message holds the run so far: status (decoding, reference,
        done, stopped), text, tokens (one record per token: source, u, importance, p/q, bits, energy), summary
        (upload rate, LLM calls, energy and its HLM counterfactual, tokens/s) and, at the end, bertscore_f1.

        Args:
            prompt: the user message (chat-templated for both models)
            k: ours' upload budget: about k uploads per 32 drafts (1..32; paper-* estimators: attention-row rank)
            gamma: ours' strictness: the bar rises by gamma std of the score (>= 0)
            policy: ours, uhlm, hlm, slm, llm or random
            estimator: how ours scores a draft (probe, ubar, semantic, rauq, paper-lookahead, paper-self)
            u_th: uncertainty threshold in [0, 1]; omitted: the pair's calibrated risk-averse value
            temperature: sampling temperature of both models; 0 (default) = greedy, where HLM equals the LLM
            max_new_tokens: tokens to generate at most
            seed: random seed of drafting, uncertainty and verification
            device_profile: how the SLM's time and energy per token are priced: phone (a published on-device
                measurement) or this-machine (measured here)
            link_preset: default, paper-like, cell-edge or good-5g (README "Device profiles and link presets")
            bandwidth_mhz: modelled uplink bandwidth; omitted: the preset's
            snr_db: modelled uplink SNR; omitted: the preset's
            tx_power_w: modelled transmit power; omitted: the preset's
            bits_per_prob: 8, 16 or 32 bits per uploaded probability
            topk: 0 uploads the full distribution, > 0 its top-k entries
            quality: score the output with BERTScore against the LLM-only output (generated once, then cached)
            pair: model pair (default: the one the app started with)
        """
        values = locals()
        yield from dash.api_generate(pair or start, prompt, Settings(**{n: values[n] for n in _SETTINGS}),
                                     quality)

    @user_errors
    def compare(prompt: str, k: int = Settings.k, gamma: float = Settings.gamma, u_th: float | None = None,
                temperature: float = Settings.temperature, max_new_tokens: int = Settings.max_new_tokens,
                seed: int = Settings.seed, pair: str = "") -> Iterator[dict[str, Any]]:
        """Run the LLM-only reference, then hlm, uhlm, ours and random (its coin matched to ours' upload rate) on
        one prompt with the same settings (the link at its defaults). Streams {"runs": [...]}, each run with status,
        text, summary and bertscore_f1 against the reference.

        Args:
            prompt: the user message
            k: ours' upload budget (about k uploads per 32 drafts)
            gamma: ours' strictness
            u_th: uncertainty threshold for uhlm and ours; omitted: the pair's calibrated value
            temperature: sampling temperature; 0 (default) = greedy; > 0: F1 is the mean over 3 LLM samples
            max_new_tokens: tokens to generate at most per run
            seed: random seed
            pair: model pair (default: the one the app started with)
        """
        values = locals()
        yield from dash.api_compare(pair or start, prompt, Settings(**{n: values[n] for n in _SETTINGS
                                                                       if n in values}))

    @user_errors
    def hardware(pair: str = "") -> dict[str, Any]:
        """The model pair, the hardware it runs on, and how each energy figure is obtained (measured or modelled).

        Args:
            pair: model pair (default: the one the app started with)
        """
        return dash.hardware_info(pair or start)

    gr.api(generate, api_name="generate", **api)
    gr.api(compare, api_name="compare", **api)
    gr.api(hardware, api_name="hardware")


_SETTINGS = [f.name for f in fields(Settings)]


def _pair_info(preset: str) -> str:
    p = PRESETS.get(preset)
    return p.description if p else preset


def _plot(figure: dict[str, Any]) -> PlotData:
    """Figure dicts go out as plotly JSON as they are (no `go.Figure` validation on every update)."""
    return PlotData(type="plotly", plot=json.dumps(figure))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the hybrid-decoding dashboard (Gradio).")
    add_model_args(parser)
    parser.add_argument("--cloud", default=os.environ.get("HLM_CLOUD"),
                        help="URL of a remote verifier (`serve-cloud`); default: the verifier runs in this process")
    parser.add_argument("--emulate-link", action="store_true", help="with --cloud: delay uploads by the modelled time")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        service = Service.from_args(args)
        service.warm_up()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    demo = build(Dashboard(service))
    demo.queue(default_concurrency_limit=1)
    demo.launch(show_error=False, css_paths=[ASSETS / "app.css"], footer_links=["api", "gradio"],
                head=f"<script>{(ASSETS / 'app.js').read_text(encoding='utf-8')}</script>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
