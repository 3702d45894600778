"""Payload formats on the embedded pair: bits per upload, link energy and acceptance (docs/payload.md).

    python scripts/measure_payload.py            # writes docs/results/payload/results.json (or --out PATH)
    python scripts/measure_payload.py --table docs/results/payload/results.json            # the table again
    python scripts/measure_payload.py --teacher-forced docs/results/payload/results.json   # acceptance vs temperature

Runs the CLI's default policy (ours, the pair's calibrated u_th) once per upload format on 4 prompts
(T = 0.7, 32 new tokens, seed 0). Every format is exact, so the formats differ only in cost and acceptance.
Besides the counts of each run, at every upload it records the expected acceptance sum(min(p_hat, q)) for
*every* format at that same position (the draft's p and the verifier's q are both at hand): a paired,
low-variance comparison that a few dozen accept/reject coin flips per format cannot give.
`--teacher-forced` then scores every position of those texts (one pass of each model per text) at several
temperatures, to see how much margin each top-k leaves when distributions are flatter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts/ sits at its top level
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hlm import decoder as decoder_module  # noqa: E402
from hlm.config import LinkConfig, PolicyConfig, RunConfig, SamplingConfig  # noqa: E402
from hlm.decoder import HybridDecoder  # noqa: E402
from hlm.experiments.prompts import load_prompts  # noqa: E402
from hlm.models import ModelPair, load_pair  # noqa: E402
from hlm.payload import _HEADER, MAGIC, VERSION, _encode_values, decode, encode, payload_bits  # noqa: E402
from hlm.sampling import distribution  # noqa: E402
from hlm.verifier import LocalVerifier, Verdict  # noqa: E402

RUN_FORMATS = [(32, 0), (16, 0), (8, 0), (16, 16), (16, 64), (16, 256)]
PAIRED_FORMATS = RUN_FORMATS + [(8, 16), (8, 64), (8, 256)]
PROMPTS = ["code-02", "explanation-02", "knowledge-02", "summarization-02"]


def name(bits: int, topk: int) -> str:
    return f"{bits}-bit " + (f"top-{topk}" if topk else "full")


def uniform_residual(p: torch.Tensor, bits: int, topk: int) -> torch.Tensor:
    """The top-k form as sent before issue 10: the k values unnormalised, the rest spread uniformly."""
    vals, idx = torch.topk(p, topk)
    raw = _HEADER.pack(MAGIC, bits, VERSION, p.shape[0], topk) + idx.numpy().astype("<u4").tobytes()
    return decode(raw + _encode_values(vals.numpy(), bits))


class Recorder(LocalVerifier):
    """The in-process verifier, plus per-upload expected acceptance for every format at this position."""

    def __init__(self, pair: ModelPair, drafts: dict[int, tuple[bytes, torch.Tensor]]) -> None:
        super().__init__(pair.verifier, pair.valid, head=pair.template_head)
        self.drafts, self.rows = drafts, []

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict:
        verdict = super().verify(context, draft, payload)
        p = self.drafts[id(payload)][1]
        q = distribution(self.last_logits, self.sampling, self.valid)
        row = {name(*f): float(torch.minimum(decode(encode(p, *f)), q).sum()) for f in PAIRED_FORMATS}
        for bits, k in PAIRED_FORMATS:
            if k:  # the old top-k form: its exact acceptance, and that of drafting from p (biased)
                u = uniform_residual(p, bits, k)
                row[name(bits, k) + " uniform-residual"] = float(torch.minimum(u, q).sum())
                row[name(bits, k) + " before (draft ~ p)"] = float(
                    (p * torch.where(u > 0, (q / u.clamp_min(1e-30)).clamp(max=1.0), torch.zeros_like(q))).sum())
        self.rows.append(row)
        return verdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "payload" / "results.json")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--models", default="embedded")
    ap.add_argument("--teacher-forced", metavar="RESULTS_JSON", help="score the texts of an earlier run instead")
    ap.add_argument("--table", metavar="RESULTS_JSON", help="print the table of an earlier run and exit")
    args = ap.parse_args()
    if args.table:
        return table(json.loads(Path(args.table).read_text())["runs"])
    if args.teacher_forced:
        return teacher_forced(load_pair(args.models), json.loads(Path(args.teacher_forced).read_text()))
    t0 = time.perf_counter()
    pair = load_pair(args.models)
    drafts: dict[int, tuple[bytes, torch.Tensor]] = {}
    real_as_sent = decoder_module.as_sent

    def as_sent(p: torch.Tensor, bits: int, topk: int) -> tuple[bytes, torch.Tensor]:  # keeps each payload's raw p
        data, sent = real_as_sent(p, bits, topk)
        drafts[id(data)] = (data, p.detach().float().cpu())
        return data, sent

    decoder_module.as_sent = as_sent
    recorder = Recorder(pair, drafts)
    dec = HybridDecoder(pair, recorder)
    prompts = {r["id"]: r["prompt"] for r in load_prompts()}
    # The CLI's default policy: ours with the pair's calibrated risk-averse u_th.
    policy = PolicyConfig(u_th=pair.calibration.risk_averse) if pair.calibration else PolicyConfig()
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=args.max_new_tokens, seed=0)
    print(f"loaded in {time.perf_counter() - t0:.0f} s; policy {policy}", flush=True)
    runs = []
    for bits, k in RUN_FORMATS:
        config = RunConfig(sampling, policy, LinkConfig(bits_per_prob=bits, topk=k))
        for pid in PROMPTS:
            drafts.clear()
            recorder.rows = []
            t = time.perf_counter()
            text, events, summary = dec.run(prompts[pid], config)
            parts = summary["device_energy_parts_j"]
            runs.append({"format": name(bits, k), "bits_per_prob": bits, "topk": k, "prompt": pid, "text": text,
                         "tokens": summary["tokens"], "uploads": summary["uploads"], "accepted": summary["accepted"],
                         "resampled": summary["resampled"], "uplink_bits": summary["uplink_bits"],
                         "radio_j": parts["radio"], "idle_j": parts["device_idle"],
                         "payload_bits": payload_bits(pair.vocab_size, bits, k), "paired": recorder.rows,
                         "wall_s": time.perf_counter() - t})
            print(f"{name(bits, k):14s} {pid:17s} {summary['tokens']:2d} tok {summary['uploads']:2d} up "
                  f"{summary['accepted']:2d} acc {time.perf_counter() - t:5.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "policy": str(policy), "prompts": PROMPTS}, indent=1))
    table(runs)
    print(f"total {time.perf_counter() - t0:.0f} s")


def table(runs: list[dict]) -> None:
    """Radio energy from the measured bits; the idle wait priced at LinkConfig's assumed cloud time, the same for
    every format, because the measured verify times on a shared CPU vary 100-fold between runs (kept in the JSON
    as `idle_j`) while the formats only change what is sent."""
    link = LinkConfig()
    idle = link.device_idle_power_w * (link.cloud_verify_time_s + (link.token_id_bits + 8) / link.downlink_rate_bps
                                       + link.rtt_s)
    paired = [row for r in runs for row in r["paired"]]
    print(f"\npaired expected acceptance over all {len(paired)} uploads of all runs:")
    for key in paired[0]:
        print(f"  {key:36s} {statistics.fmean(row[key] for row in paired):.3f}")
    print("\n| format | bits per upload (payload + ids) | upload rate | acceptance (measured) | E[acceptance] "
          "| link energy per token: radio + idle = total |\n|---|---|---|---|---|---|")
    for f in RUN_FORMATS:
        rs = [r for r in runs if r["format"] == name(*f)]
        tok, up, acc = (sum(r[key] for r in rs) for key in ("tokens", "uploads", "accepted"))
        own = [row[name(*f)] for r in rs for row in r["paired"]]
        bits = sum(r["uplink_bits"] for r in rs) / up
        radio = link.tx_power_w * bits / link.uplink_rate_bps * up / tok
        print(f"| {name(*f)} | {bits:,.0f} ({rs[0]['payload_bits']:,} + {bits - rs[0]['payload_bits']:,.0f}) "
              f"| {up / tok:.1%} ({up}/{tok}) | {acc / up:.1%} ({acc}/{up}) | {statistics.fmean(own):.3f} "
              f"| {1e3 * radio:.3g} + {1e3 * idle * up / tok:.2f} = {1e3 * (radio + idle * up / tok):.2f} mJ |")


@torch.inference_mode()
def teacher_forced(pair: ModelPair, results: dict, temperatures: tuple[float, ...] = (0.7, 1.0, 1.5)) -> None:
    """Mean sum(min(p_hat, q)) over every generated position of the first format's texts, per temperature."""
    prompts = {r["id"]: r["prompt"] for r in load_prompts()}
    first = results["runs"][0]["format"]
    texts = [(r["prompt"], r["text"]) for r in results["runs"] if r["format"] == first]
    logits = []
    for pid, text in texts:
        head = pair.encode_prompt(prompts[pid], 1)
        ids = torch.tensor([head + pair.tokenizer(text, add_special_tokens=False)["input_ids"]])
        pos = slice(len(head) - 1, ids.shape[1] - 1)  # logits that predict each generated token
        logits.append((pair.draft(ids).logits[0, pos], pair.verifier(ids).logits[0, pos]))
    formats = [(32, 0), (16, 0), (8, 0), (16, 16), (16, 64), (16, 256), (8, 16)]
    print(f"positions: {sum(len(z) for z, _ in logits)}\n| T | " + " | ".join(name(*f) for f in formats) + " |")
    for t in temperatures:
        s = SamplingConfig(temperature=t)
        acc = {f: [] for f in formats}
        for zp, zq in logits:
            for a, b in zip(zp, zq, strict=True):
                p, q = distribution(a, s, pair.valid), distribution(b, s, pair.valid)
                for f in formats:
                    acc[f].append(float(torch.minimum(decode(encode(p, *f)), q).sum()))
        print(f"| {t} | " + " | ".join(f"{statistics.fmean(acc[f]):.3f}" for f in formats) + " |", flush=True)


if __name__ == "__main__":
    main()
