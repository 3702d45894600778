"""`python -m hlm generate`: one run, streamed in colour, or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from hlm import session
from hlm.cli.args import add_cloud_args, add_model_args, add_run_args, open_decoder, run_config
from hlm.config import MAX_PROMPT_CHARS

COLOURS = {"local": "", "cloud_accepted": "\033[32m", "cloud_resampled": "\033[31m", "cloud_sampled": "\033[34m",
           "unverified": "\033[33m"}


def cmd_generate(args: argparse.Namespace) -> int:
    config = run_config(args)  # validate flags before loading any model
    decoder = open_decoder(args, config.link)
    config = session.with_u_th(config, args.u_th, decoder.pair.calibration)
    if args.json:
        text, events, summary = decoder.run(args.prompt, config)
        json.dump({"text": text, "tokens": [e.to_dict() for e in events], "summary": summary, "config":
                   config.to_dict(), "numerics": decoder.pair.numerics, "fast_path": decoder.pair.quant}, sys.stdout)
        print()
        return 0
    from hlm.metrics import summarize

    colour = sys.stdout.isatty()
    events = []
    for e in decoder.generate(args.prompt, config):
        events.append(e)
        sys.stdout.write(f"{COLOURS[e.source]}{e.text}\033[0m" if colour and COLOURS[e.source] else e.text)
        sys.stdout.flush()
    s = summarize(events, config, decoder.pair.vocab_size, decoder.energy_methods(config.link, config.device),
                  decoder.call_s)
    saving = f"{s.energy_saving:.1%}" if s.energy_saving is not None else "n/a"
    print(f"\n\n[{s.policy}] {s.tokens} tokens, upload rate {s.upload_rate:.1%}, {s.llm_calls} LLM calls, "
          f"accepted {s.accepted}, resampled {s.resampled}, unverified {s.unverified}; device energy "
          f"{s.device_energy_j:.3f} J of which link {s.link_energy_j:.3f} J (HLM {s.hlm_device_energy_j or 0:.3f} J, "
          f"saving {saving}); device {s.device_profile}, link {s.link_preset}; "
          f"{s.tokens_per_s:.2f} tok/s measured, {s.tokens_per_s_modelled_link:.2f} tok/s with the modelled link; "
          f"models: {decoder.pair.numerics}", file=sys.stderr)
    if colour:
        print("colours: plain = kept locally, green = cloud accepted, red = cloud resampled, "
              "blue = cloud only, yellow = unverified", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text with the hybrid decoder")
    gen.add_argument("--prompt", required=True, help=f"up to {MAX_PROMPT_CHARS:,} characters (and the pair's context)")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, summary")
    add_cloud_args(gen)
    add_model_args(gen)
    add_run_args(gen)
    gen.set_defaults(func=cmd_generate)
