"""Mechanics of the hybrid loop on the tiny pair: exactness, rollback, policies, determinism."""

import numpy as np
import pytest
import torch
from conftest import cfg
from scipy.stats import chisquare

from hlm import decoder as decoder_module
from hlm.config import ESTIMATORS, PolicyConfig, RunConfig, SamplingConfig
from hlm.decoder import HybridDecoder
from hlm.drafter import Drafter
from hlm.payload import decode, encode
from hlm.sampling import distribution, pick, sample
from hlm.verifier import LocalVerifier

ALPHA = 1e-3  # significance level of the goodness-of-fit tests
PROMPT = "abc"
# Every upload format (bits_per_prob, topk): the top-k ones truncate the tiny pair's 259 valid ids hard.
FORMATS = [pytest.param(32, 0, id="32bit-full"), pytest.param(16, 0, id="16bit-full"),
           pytest.param(8, 0, id="8bit-full"), pytest.param(16, 4, id="16bit-top4"),
           pytest.param(8, 8, id="8bit-top8")]


def next_token_probs(model, pair, ids, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return distribution(logits, SamplingConfig(temperature=temperature), pair.valid).numpy()


def chi2_pvalue(samples: list[int], probs: np.ndarray) -> float:
    """Goodness of fit, with cells of expected count < 5 pooled into one."""
    n = len(samples)
    counts = np.bincount(samples, minlength=len(probs)).astype(float)
    expected = probs.astype(np.float64) / probs.sum() * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


def first_tokens(dec: HybridDecoder, policy: str, n: int = 2000, **kw) -> list[int]:
    return [next(dec.generate(PROMPT, cfg(policy, n=1, seed=s, **kw))).token_id for s in range(n)]


def drafted_from(draw: np.ndarray, p_hat: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The law of the token emitted when the draft is drawn from `draw` but the cloud accepts with
    min(1, q/p_hat) and resamples from norm(max(0, q - p_hat)); it is q only when draw == p_hat."""
    accept = np.where(p_hat > 0, np.minimum(1.0, q / np.where(p_hat > 0, p_hat, 1.0)), 0.0)
    residual = np.clip(q - p_hat, 0.0, None)
    return draw * accept + (draw * (1 - accept)).sum() * residual / residual.sum()


@pytest.mark.parametrize("bits,topk", FORMATS)
def test_hlm_output_follows_the_verifier_distribution_in_every_payload_format(tiny, bits, topk):
    """Over many seeds the emitted token is distributed as the verifier's q (chi-square, alpha = 1e-3) whatever
    the upload's precision or truncation, and the same test rejects the draft's p, so it has the power to fail."""
    ids = tiny.encode_prompt(PROMPT, 1)
    q = next_token_probs(tiny.verifier, tiny, ids)
    p = next_token_probs(tiny.draft, tiny, ids)
    samples = first_tokens(HybridDecoder(tiny), "hlm", bits=bits, topk=topk)
    assert chi2_pvalue(samples, q) > ALPHA
    assert chi2_pvalue(samples, p) < ALPHA


def test_llm_output_follows_the_verifier_distribution(tiny):
    """The same test for `llm` (no upload, so no payload format to vary)."""
    ids = tiny.encode_prompt(PROMPT, 1)
    samples = first_tokens(HybridDecoder(tiny), "llm")
    assert chi2_pvalue(samples, next_token_probs(tiny.verifier, tiny, ids)) > ALPHA
    assert chi2_pvalue(samples, next_token_probs(tiny.draft, tiny, ids)) < ALPHA


@pytest.mark.parametrize("bits,topk", [pytest.param(16, 4, id="16bit-top4"), pytest.param(8, 8, id="8bit-top8")])
def test_topk_is_exact_because_the_draft_comes_from_what_is_sent(tiny, bits, topk):
    """The SLM verifying itself (q = p) accepts most drafts, so drawing the draft from p while the cloud reads
    the truncated p_hat (the behaviour before issue 10) would emit a law ~0.24 in total variation from q here.
    The output follows q, and the test rejects that law: it would catch the regression."""
    ids = tiny.encode_prompt(PROMPT, 1)
    q = next_token_probs(tiny.draft, tiny, ids).astype(np.float64)
    p_hat = decode(encode(torch.from_numpy(q).float(), bits, topk)).numpy().astype(np.float64)
    dec = HybridDecoder(tiny, LocalVerifier(tiny.draft, tiny.valid, head=tiny.template_head))
    samples = first_tokens(dec, "hlm", bits=bits, topk=topk)
    assert chi2_pvalue(samples, q) > ALPHA
    assert chi2_pvalue(samples, drafted_from(q, p_hat, q)) < ALPHA


class RecordingVerifier(LocalVerifier):
    def verify(self, context, draft, payload):
        self.payloads.append(payload)
        return super().verify(context, draft, payload)


@pytest.mark.parametrize("bits,topk", FORMATS)
def test_the_draft_is_sampled_from_the_bytes_the_cloud_reads(tiny, monkeypatch, bits, topk):
    drawn = []
    monkeypatch.setattr(decoder_module, "pick", lambda probs, s, g: drawn.append(probs) or pick(probs, s, g))
    verifier = RecordingVerifier(tiny.verifier, tiny.valid, head=tiny.template_head)
    verifier.payloads = []
    events = list(HybridDecoder(tiny, verifier).generate(PROMPT, cfg("hlm", n=12, bits=bits, topk=topk)))
    assert len(drawn) == len(verifier.payloads) == len(events) == 12
    for probs, payload, e in zip(drawn, verifier.payloads, events, strict=True):
        assert torch.equal(decode(payload, tiny.vocab_size), probs)
        assert float(probs[e.draft_id]) == e.p_draft > 0


def test_topk_drafts_kept_locally_are_real_tokens_and_slm_ignores_the_link(tiny):
    """Under a selective policy a top-k draft may stay on the device: it is one of the k (never a filler id or
    a token outside the SLM's support). `slm` uploads nothing, so its drafts stay p's, whatever the link."""
    dec = HybridDecoder(tiny)
    events = list(dec.generate(PROMPT, cfg("uhlm", n=40, bits=8, topk=4, u_th=0.5)))
    assert any(e.source == "local" for e in events) and any(e.uploaded for e in events)
    assert all(bool(tiny.valid[e.token_id]) for e in events)
    slm = [[e.token_id for e in dec.generate(PROMPT, cfg("slm", n=16, topk=topk))] for topk in (0, 4)]
    assert slm[0] == slm[1]


def test_second_token_follows_the_verifier_after_a_local_sync(tiny):
    """Position 2 under hlm after a fixed first token: checks the verifier's cache sync path, not just prefill."""
    dec = HybridDecoder(tiny)
    first = {}
    for s in range(1500):
        events = list(dec.generate(PROMPT, cfg("hlm", n=2, seed=s)))
        first.setdefault(events[0].token_id, []).append(events[1].token_id)
    t1, seconds = max(first.items(), key=lambda kv: len(kv[1]))
    ids = tiny.encode_prompt(PROMPT, 2) + [t1]
    assert len(seconds) > 300
    assert chi2_pvalue(seconds, next_token_probs(tiny.verifier, tiny, ids)) > ALPHA


def test_drafter_rollback_matches_recompute(tiny):
    ids = tiny.encode_prompt(PROMPT, 8)
    d = Drafter(tiny.draft)
    d.prefill(ids)
    d.forward([65], layers={0, 1})
    d.forward([66], layers={0, 1})
    d.rollback(2)
    assert d.length == len(ids)
    cached = d.forward([67]).logits
    fresh = Drafter(tiny.draft).prefill(ids + [67]).logits
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def test_template_head_is_prefilled_once_and_changes_no_token(tiny, monkeypatch):
    from hlm import prefix

    ids = tiny.encode_prompt(PROMPT, 8)
    head = tiny.template_head
    assert 0 < len(head) < len(ids) and tuple(ids[: len(head)]) == head
    prefix._HEADS.clear()
    prefix._READS.clear()
    calls = []
    monkeypatch.setattr(tiny.draft, "forward", lambda *a, _f=tiny.draft.forward, **k: calls.append(1) or _f(*a, **k))
    cold = Drafter(tiny.draft, head=head).prefill(ids).logits
    prefix._READS.clear()  # this test is about the head: each run reads the rest of the prompt
    warm_drafter = Drafter(tiny.draft, head=head)
    warm = warm_drafter.prefill(ids).logits
    assert len(calls) == 3  # the head once, then the rest of the prompt per run
    assert torch.equal(cold, warm) and warm_drafter.length == len(ids)
    prefix._READS.clear()
    torch.testing.assert_close(warm, Drafter(tiny.draft).prefill(ids).logits, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    dec = HybridDecoder(tiny)
    runs = [[e.token_id for e in dec.generate(PROMPT, cfg("hlm", n=12, seed=5))] for _ in range(2)]
    prefix._HEADS.clear()
    prefix._READS.clear()
    assert [e.token_id for e in dec.generate(PROMPT, cfg("hlm", n=12, seed=5))] == runs[0] == runs[1]


class CheckingDrafter(Drafter):
    """Shadows the cached sequence and checks every pass against a from-scratch recompute."""

    checks = 0

    def prefill(self, ids, progress=None, hidden=False, meter=None):
        out = super().prefill(ids, progress, hidden, meter)
        self.shadow = list(ids)
        self._check(out)
        return out

    def _check(self, out):
        with torch.no_grad():
            fresh = self.model(torch.tensor([self.shadow]), output_hidden_states=True)
        torch.testing.assert_close(out.logits, fresh.logits[0, -1], rtol=1e-4, atol=1e-4)
        if out.hidden is not None:  # the judge's input is the state the lm-head read, cache or not
            torch.testing.assert_close(out.hidden, fresh.hidden_states[-1][0, -1], rtol=1e-4, atol=1e-4)
        CheckingDrafter.checks += 1

    def forward(self, ids, layers=(), hidden=False):
        if not hasattr(self, "shadow"):
            return super().forward(ids, layers, hidden)
        out = super().forward(ids, layers, hidden)
        self.shadow += ids
        self._check(out)
        return out

    def rollback(self, n):
        super().rollback(n)
        del self.shadow[len(self.shadow) - n:]
        assert self.length == len(self.shadow)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_decoder_cache_after_resamples_equals_recompute(tiny, estimator):
    decoder = HybridDecoder(tiny, drafter_factory=CheckingDrafter)
    events = list(decoder.generate(PROMPT, cfg("ours", n=24, u_th=0.0, k=32, gamma=0.0, estimator=estimator)))
    assert sum(e.source == "cloud_resampled" for e in events) >= 2  # rollbacks really happened
    assert CheckingDrafter.checks > 24


class CountingVerifier(LocalVerifier):
    calls = 0

    def verify(self, context, draft, payload):
        CountingVerifier.calls += 1
        return super().verify(context, draft, payload)


def test_slm_never_calls_the_verifier_and_hlm_verifies_every_token(tiny):
    CountingVerifier.calls = 0
    dec = HybridDecoder(tiny, CountingVerifier(tiny.verifier, tiny.valid))
    events = list(dec.generate(PROMPT, cfg("slm", n=20)))
    assert CountingVerifier.calls == 0 and all(e.source == "local" and not e.uploaded for e in events)
    events = list(dec.generate(PROMPT, cfg("hlm", n=20)))
    assert CountingVerifier.calls == 20
    assert all(e.uploaded and e.source in ("cloud_accepted", "cloud_resampled") for e in events)


def test_paper_rule_uploads_a_subset_of_what_uhlm_would(decoder):
    """On the same drafts: every draft the paper-literal rule uploads is uncertain (uhlm uploads it too), and
    importance does skip some uncertain drafts."""
    u_th = 0.3
    events = list(decoder.generate(PROMPT, cfg("ours", n=48, u_th=u_th, k=2, gamma=1.0,
                                               estimator="paper-lookahead")))
    assert all(e.u > u_th and e.important for e in events if e.uploaded)
    assert any(e.u > u_th and not e.uploaded for e in events)
    assert any(e.uploaded for e in events)


def test_same_seed_same_output_different_seed_differs(decoder):
    runs = [[e.token_id for e in decoder.generate(PROMPT, cfg("ours", n=24, seed=s, u_th=0.2))] for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_event_texts_concatenate_to_the_decoded_output(decoder, tiny):
    text, events, summary = decoder.run("héllo ✓", cfg("ours", n=40, u_th=0.2))
    assert text == tiny.tokenizer.decode([e.token_id for e in events], skip_special_tokens=True)
    assert summary["tokens"] == len(events) == 40
    assert summary["uploads"] == sum(e.uploaded for e in events)
    for e in events:
        assert set(e.energy_j) == {"device_compute", "radio", "device_idle", "cloud"}
        assert set(e.energy_method.values()) <= {"measured", "modelled"}
        assert (e.bits_up > 0) == e.uploaded


def test_cancel_stops_after_the_current_token(decoder):
    import threading

    cancel = threading.Event()
    got = []
    for e in decoder.generate(PROMPT, cfg("ours", n=50, u_th=0.2), cancel=cancel):
        got.append(e)
        if len(got) == 5:
            cancel.set()
    assert len(got) == 5


@pytest.mark.parametrize("bits,topk", FORMATS)
def test_greedy_hlm_equals_the_verifier_greedy(decoder, tiny, bits, topk):
    """At temperature 0 HLM must reproduce the verifier's own greedy decoding token for token, in every format."""
    events = list(decoder.generate(PROMPT, cfg("hlm", n=12, temperature=0.0, bits=bits, topk=topk)))
    ids = tiny.encode_prompt(PROMPT, 12)
    out = tiny.verifier.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 suppress_tokens=list(range(len(tiny.tokenizer), tiny.vocab_size)))
    assert [e.token_id for e in events] == out[0, len(ids):].tolist()


def test_greedy_picks_the_argmax_without_a_draw_and_sampling_draws():
    """Greedy skips the multinomial draw (3 ms over Qwen's vocabulary) and leaves the generator where it was; a
    sampled pick is the same draw `sample` makes."""
    z = torch.randn(50, generator=torch.Generator().manual_seed(1))
    greedy, sampled = SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    assert pick(distribution(z, greedy), greedy, g) == int(z.argmax())
    assert torch.equal(g.get_state(), state)
    probs = distribution(z, sampled)
    assert [pick(probs, sampled, g) for _ in range(20)] == \
        [sample(probs, h) for h in [torch.Generator().manual_seed(7)] for _ in range(20)]


def test_chunked_prefill_equals_one_pass_and_reports_progress(tiny, monkeypatch):
    from hlm import prefix

    ids = tiny.encode_prompt("a longer prompt, read in chunks of three tokens", 8)
    whole = Drafter(tiny.draft).prefill(ids, hidden=True)
    monkeypatch.setattr(prefix, "CHUNK", 3)
    prefix._READS.clear()  # read the prompt again, in chunks
    seen = []
    chunked = Drafter(tiny.draft)
    out = chunked.prefill(ids, progress=lambda done, total: seen.append((done, total)), hidden=True)
    torch.testing.assert_close(out.logits, whole.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.hidden, whole.hidden, rtol=1e-5, atol=1e-5)
    assert chunked.length == len(ids)
    assert seen[-1] == (len(ids), len(ids)) and len(seen) == -(-len(ids) // 3)


@pytest.mark.parametrize("policy", ["ours", "llm"])
def test_stop_during_a_long_prefill_cuts_it_within_a_layer(tiny, monkeypatch, policy):
    """Stop set after the first chunk: no token comes, and no later chunk or layer runs (the hooks raise)."""
    import threading

    from hlm import prefix

    monkeypatch.setattr(prefix, "CHUNK", 2)
    cancel, reports, layers = threading.Event(), [], []
    for model in (tiny.draft, tiny.verifier):
        for layer in model.model.layers:
            monkeypatch.setattr(layer, "forward", lambda *a, _f=layer.forward, **k: layers.append(1) or _f(*a, **k))

    def progress(who, done, total):
        reports.append((who, done))
        cancel.set()  # as if Stop were pressed while the first chunk ran

    prompt = "x" * 40
    events = list(HybridDecoder(tiny).generate(prompt, cfg(policy, n=4), cancel=cancel, progress=progress))
    assert events == []
    n = len(tiny.encode_prompt(prompt, 4))
    assert len(reports) == 1 and reports[0][1] < n
    after = len(layers)
    assert after <= 2 * len(tiny.verifier.model.layers)  # the template head and one chunk, at most
    # The models are not left watching a stale event: the next run goes through.
    assert len(list(HybridDecoder(tiny).generate(PROMPT, cfg(policy, n=3)))) == 3


def test_hlm_on_an_int8_pair_follows_the_int8_verifier_exactly():
    """The verifier's distribution is the reference whatever it runs: chi-square on the quantised verifier's q."""
    from hlm.models.tiny import tiny_pair

    pair = tiny_pair(quant="int8")
    assert pair.draft.hlm_quant == pair.verifier.hlm_quant == "int8"
    dec = HybridDecoder(pair)
    samples = first_tokens(dec, "hlm")
    ids = pair.encode_prompt(PROMPT, 1)
    assert chi2_pvalue(samples, next_token_probs(pair.verifier, pair, ids)) > ALPHA
    assert chi2_pvalue(samples, next_token_probs(pair.draft, pair, ids)) < ALPHA


def test_pending_drafts_announce_each_upload_before_its_verdict(decoder):
    from hlm.events import PendingDraft

    config = cfg("ours", n=24, seed=3, u_th=0.0, k=16)
    items = list(decoder.generate(PROMPT, config, drafts=True))
    plain = list(decoder.generate(PROMPT, config))
    events = [e for e in items if not isinstance(e, PendingDraft)]
    assert [e.token_id for e in events] == [e.token_id for e in plain]
    uploads = [e for e in events if e.uploaded]
    assert uploads
    for e in uploads:  # announced just before its own event, with the draft the cloud then judged
        at = items.index(e)
        announced = items[at - 1]
        assert isinstance(announced, PendingDraft) and announced.index == e.index
        assert announced.token_id == e.draft_id
    assert sum(isinstance(e, PendingDraft) for e in items) == len(uploads)


@pytest.mark.parametrize("policy", ["hlm", "ours", "llm"])
def test_a_verifier_that_reads_the_prompt_early_gives_the_same_tokens(tiny, policy):
    config = cfg(policy, n=16, seed=11, u_th=0.2)
    late = [e.token_id for e in HybridDecoder(tiny).generate(PROMPT, config)]
    early = LocalVerifier(tiny.verifier, tiny.valid, head=tiny.template_head, early=True)
    events = list(HybridDecoder(tiny, early).generate(PROMPT, config))
    assert [e.token_id for e in events] == late
    first = next(e for e in events if e.verify_s > 0)
    assert first.verify_s > 0  # the early prefill's compute is charged to the first verify


def test_closing_stops_an_early_prefill(tiny, monkeypatch):
    import threading

    from hlm import prefix

    monkeypatch.setattr(prefix, "CHUNK", 1)
    started = threading.Event()
    layer = tiny.verifier.model.layers[0]
    monkeypatch.setattr(layer, "forward", lambda *a, _f=layer.forward, **k: started.set() or _f(*a, **k))
    early = LocalVerifier(tiny.verifier, tiny.valid, early=True)
    early.open(SamplingConfig(), list(range(40, 240)))  # 200 one-token chunks
    assert started.wait(5)
    early.close()
    assert early._reader is None and early.cache is None


def test_a_prompt_read_before_is_not_read_again_and_charged_alike(tiny):
    """`hlm.prefix.read`: the second run of a prompt takes both models' prompt KV as the first run computed it. Its
    tokens are the same, neither model reads the prompt again, and the first token is charged the passes' measured
    time (the draft's to its device compute, the verifier's to its first verify), so neither run's figures depend on
    which ran first."""
    from hlm import prefix

    # A verifier that keeps no passes, so the second run's passes after the prompt run (tests/test_passes.py)
    decoder = HybridDecoder(tiny, LocalVerifier(tiny.verifier, tiny.valid, head=tiny.template_head))
    config = RunConfig(SamplingConfig(max_new_tokens=12, seed=3, stop_at_eos=False), PolicyConfig(name="hlm"))
    prompt = "A prompt read twice."
    passes: dict[str, list[int]] = {"draft": [], "verifier": []}
    hooks = [getattr(tiny, name).register_forward_pre_hook(
        lambda _m, _args, kwargs, seen=seen: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        for name, seen in passes.items()]
    try:
        _, first, _ = decoder.run(prompt, config)
        longest = {name: max(seen) for name, seen in passes.items()}
        for seen in passes.values():
            seen.clear()
        _, second, _ = decoder.run(prompt, config)
    finally:
        for hook in hooks:
            hook.remove()
    assert [e.token_id for e in second] == [e.token_id for e in first]
    assert min(longest.values()) > 1, "the first run read the prompt"
    assert max(passes["draft"] + passes["verifier"]) == 1, "the second read nothing but one token at a time"
    assert len(passes["verifier"]) == len(second) - 1  # one pass per upload after the first, which needed none
    key = tuple(tiny.encode_prompt(prompt, 12))
    recorded = {name: prefix._READS[getattr(tiny, name)].get(key, lambda _read: True).cost.seconds for name in passes}
    assert second[0].verify_s >= recorded["verifier"] > 0
    assert second[0].draft_s >= recorded["draft"] > 0


def test_read_prompt_lets_the_next_run_draft_without_reading_it(tiny):
    """`HybridDecoder.read_prompt` (the app's idle start-up work): afterwards the draft model reads nothing of that
    prompt but one token at a time."""
    decoder = HybridDecoder(tiny)
    config = RunConfig(SamplingConfig(max_new_tokens=6, seed=0, stop_at_eos=False), PolicyConfig(name="slm"))
    prompt = "A prompt read while idle."
    decoder.read_prompt(prompt, config)
    seen: list[int] = []
    hook = tiny.draft.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                                with_kwargs=True)
    try:
        decoder.run(prompt, config)
    finally:
        hook.remove()
    assert seen and max(seen) == 1
