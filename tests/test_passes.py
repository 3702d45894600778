"""The verifier's kept passes (`hlm.verifier.Track`): a pass that a kept session ran on the same prompt, from as
many rows over the same ids, is served again bit for bit and charged what it cost then; every run's tokens and
verdicts stay those of a verifier that remembers nothing."""

import pytest
from conftest import cfg

from hlm import verifier as verifier_module
from hlm.decoder import HybridDecoder
from hlm.verifier import LOGITS_ROWS, TRACK_TOKENS, TRACKS, LocalVerifier


def forgetful(tiny) -> HybridDecoder:
    return HybridDecoder(tiny, LocalVerifier(tiny.verifier, tiny.valid, head=tiny.template_head))


def decided(events) -> list[tuple]:
    return [(e.token_id, e.source, e.q_draft, e.p_draft) for e in events]


def verifier_rows(tiny, run) -> tuple[list[int], list]:
    """`run()`'s events and the rows of each verifier pass it made."""
    seen: list[int] = []
    hook = tiny.verifier.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
    try:
        return seen, run()
    finally:
        hook.remove()


def test_greedy_hlm_after_the_llm_alone_runs_no_pass_and_is_charged_the_llm_alones(tiny):
    """At greedy each of HLM's verifies reads one token after the LLM alone's, as the LLM alone did: served all,
    and each token charged the LLM alone's pass (its clock too), with the tokens of a verifier that keeps nothing."""
    prompt, decoder = "Kept passes: greedy HLM.", HybridDecoder(tiny)
    _, llm, _ = decoder.run(prompt, cfg("llm", n=12, temperature=0.0))
    rows, (_, hlm, _) = verifier_rows(tiny, lambda: decoder.run(prompt, cfg("hlm", n=12, temperature=0.0)))
    assert rows == []  # the prompt as `hlm.prefix.read` kept it, every later pass as the LLM alone ran it
    assert [e.token_id for e in hlm] == [e.token_id for e in llm]
    assert decided(hlm) == decided(forgetful(tiny).run(prompt, cfg("hlm", n=12, temperature=0.0))[1])
    assert [e.served_s for e in hlm[1:]] == [e.verify_s for e in llm[1:]]
    assert all(e.verify_s >= e.served_s > 0 for e in hlm)
    assert hlm[-1].wall_s >= sum(e.served_s for e in hlm)


@pytest.mark.parametrize("policy,kw", [("ours", {"k": 6}), ("ours", {"k": 24}), ("random", {"skip_rate": 0.5}),
                                       ("uhlm", {"u_th": 0.5})])
def test_greedy_runs_after_others_decide_as_a_forgetful_verifier_does(tiny, policy, kw):
    """Selective runs after the LLM alone and HLM leave the kept path, come back to it and sync several rows: where
    a pass is one a kept session ran it is served, else it runs (its cache caught up from a kept one), and every
    verdict is the one a verifier that keeps nothing gives. (On this prompt `ours` at k = 24 does both.)"""
    prompt, decoder = "Kept passes: greedy runs.", HybridDecoder(tiny)
    for before in ("llm", "hlm"):
        decoder.run(prompt, cfg(before, n=24, temperature=0.0))
    config = cfg(policy, n=24, temperature=0.0, **kw)
    rows, (_, events, _) = verifier_rows(tiny, lambda: decoder.run(prompt, config))
    assert decided(events) == decided(forgetful(tiny).run(prompt, config)[1])
    if kw.get("k") == 24:
        assert sum(e.served_s > 0 for e in events[1:]) > 0 and rows  # both kinds happened


@pytest.mark.parametrize("policy,kw", [("ours", {"k": 6}), ("hlm", {})])
def test_sampled_runs_take_the_kept_logits_and_draw_as_before(tiny, policy, kw):
    """Sampling needs the whole row, which a sampled pass keeps: the same run again is served every pass after the
    prompt and draws the same tokens from the same stream; another seed decides as a forgetful verifier does."""
    prompt, decoder = f"Kept passes: sampled {policy}.", HybridDecoder(tiny)
    _, first, _ = decoder.run(prompt, cfg(policy, n=16, seed=1, temperature=0.8, **kw))
    rows, (_, again, _) = verifier_rows(tiny, lambda: decoder.run(prompt, cfg(policy, n=16, seed=1, temperature=0.8,
                                                                                **kw)))
    assert rows == [] and decided(again) == decided(first)
    other = cfg(policy, n=16, seed=2, temperature=0.8, **kw)
    assert decided(decoder.run(prompt, other)[1]) == decided(forgetful(tiny).run(prompt, other)[1])


def test_a_greedy_run_served_from_sampled_passes_takes_their_logits(tiny):
    """A sampled pass keeps its logits row, and a greedy verify can be served from it: here every pass, each deciding
    as a forgetful verifier does. (It takes the argmax of the logits, not of the sampled q, in which a temperature
    could round a near-tie to a tie; no such tie is built here.)"""
    prompt, greedy = "Kept passes: greedy after nearly greedy.", cfg("llm", n=12, temperature=0.0)
    decoder = HybridDecoder(tiny)
    decoder.run(prompt, cfg("llm", n=12, temperature=0.001))  # samples the argmax here, and keeps its rows
    rows, (_, events, _) = verifier_rows(tiny, lambda: decoder.run(prompt, greedy))
    assert rows == [] and decided(events) == decided(forgetful(tiny).run(prompt, greedy)[1])


def test_a_new_prompt_drops_the_kept_tracks_and_their_size_is_bounded(tiny):
    decoder = HybridDecoder(tiny)
    for seed in range(TRACKS + 2):  # sampled runs keep a logits row for every pass
        decoder.run("Kept passes: the first prompt.", cfg("llm", n=40, seed=seed))
    tracks = verifier_module._TRACKS[tiny.verifier]
    assert len(tracks) <= TRACKS and sum(t.cached for t in tracks) <= TRACK_TOKENS
    assert sum(p.logits is not None for t in tracks for p in t.passes.values()) <= LOGITS_ROWS
    decoder.run("Kept passes: the second prompt.", cfg("llm", n=4, temperature=0.0))
    assert len(verifier_module._TRACKS[tiny.verifier]) == 1
    assert all(p.logits is None for p in verifier_module._TRACKS[tiny.verifier][0].passes.values())  # greedy


def test_a_verifier_that_does_not_remember_keeps_and_serves_nothing(tiny):
    """A server's verifier, or the bench's (`remember` off): it keeps no track and runs every pass, even where a
    remembering verifier of the same model kept the very passes."""
    prompt, greedy = "Kept passes: not for every verifier.", cfg("hlm", n=6, temperature=0.0)
    HybridDecoder(tiny).run(prompt, greedy)
    before = list(verifier_module._TRACKS[tiny.verifier])
    rows, (_, events, _) = verifier_rows(tiny, lambda: forgetful(tiny).run(prompt, greedy))
    assert len(rows) == len(events) - 1 and not any(e.served_s > 0 for e in events[1:])
    assert verifier_module._TRACKS[tiny.verifier] == before

def test_a_session_longer_than_the_budget_is_not_kept(tiny, monkeypatch):
    """A long prompt's session would hold its whole KV cache: past TRACK_TOKENS it is not kept (nor any other)."""
    monkeypatch.setattr(verifier_module, "TRACK_TOKENS", 30)
    HybridDecoder(tiny).run("Kept passes: a prompt longer than the budget of kept tokens.", cfg("llm", n=4))
    assert verifier_module._TRACKS[tiny.verifier] == []
