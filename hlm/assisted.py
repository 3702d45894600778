"""The LLM's greedy answer by assisted generation: transformers' speculative decoding, the pair's drafter proposing
and the verifier checking a block of drafts in one forward pass. At temperature 0 a draft is kept only where it is
the verifier's own argmax and the first mismatch is replaced by that argmax, so the answer is the LLM's greedy
output in a fraction of the verifier's passes: token for token up to a near-tie that a block pass rounds
differently from a one-token pass (on the embedded pair's q4k verifier, 21 of 32 held-back prompts identical over 64
tokens, docs/dashboard.md).

Only quality reads this answer (BERTScore and the faithful prefix need its text and ids): its events carry no
costs, since one verifier pass decides several tokens and the drafter's time is no part of "the LLM alone". A run
that is shown with its figures (Compare's reference row) stays a plain `llm` decode. At T > 0 the references stay
plain too: transformers' speculative sampling is exact in distribution, but it draws from torch's global random
stream, so a seeded sample would not be the one the plain path draws (docs/dashboard.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from hlm import prefix
from hlm.config import SamplingConfig
from hlm.decoder import TextStream
from hlm.events import TokenEvent
from hlm.models.pairs import ModelPair

# Inside `generate` the drafter reads the whole prompt in one pass; with its eager attention the memory of that pass
# grows with the prompt's square (64 MB a layer at 1,024 tokens on the embedded drafter), so longer prompts take the
# plain path, which `hlm.prefix` reads in chunks.
PROMPT_LIMIT = 1024


def assists(prompt_ids: Sequence[int], sampling: SamplingConfig) -> bool:
    """Whether `greedy_answer` gives this run's reference: greedy, and a prompt within `PROMPT_LIMIT`."""
    return sampling.temperature == 0 and len(prompt_ids) <= PROMPT_LIMIT


class _Valid(LogitsProcessor):
    """Mask the ids the tokenizer never emits, as `hlm.sampling.distribution` does: the argmax is over the same ids."""

    def __init__(self, valid: torch.Tensor) -> None:
        self.invalid = ~valid

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.masked_fill(self.invalid.to(scores.device)[: scores.shape[-1]], float("-inf"))


class _Cancelled(StoppingCriteria):
    """Stop after the current block of drafts once the caller's cancel event is set."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class Answer(BaseStreamer):
    """Token ids into the events quality reads (index, position, id, its text), as `generate` accepts them, or at
    once from stored ids (`add`). `emit` hears each event."""

    def __init__(self, pair: ModelPair, prompt_len: int, sampling: SamplingConfig,
                 emit: Callable[[TokenEvent], None] | None = None) -> None:
        self.pair, self.prompt_len, self.sampling, self.emit = pair, prompt_len, sampling, emit
        self.text, self.events, self.prompt_seen = TextStream(pair.tokenizer), [], False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.add(value.reshape(-1).tolist())
        self.prompt_seen = True  # `generate` first puts the prompt

    def end(self) -> None:
        """Nothing to flush: the last token flushed the text."""

    def add(self, ids: Sequence[int]) -> None:
        s = self.sampling
        for token in ids:
            index = len(self.events)
            last = index == s.max_new_tokens - 1 or (s.stop_at_eos and token in self.pair.stop_ids)
            event = TokenEvent(index=index, position=self.prompt_len + index, token_id=token,
                               text=self.text.push(token, last), source="cloud_sampled", uploaded=False)
            self.events.append(event)
            if self.emit is not None:
                self.emit(event)


def greedy_answer(pair: ModelPair, prompt_ids: Sequence[int], sampling: SamplingConfig,
                  cancel: threading.Event | None = None,
                  emit: Callable[[TokenEvent], None] | None = None) -> list[TokenEvent]:
    """The verifier's greedy answer to `prompt_ids` (`assists` says when), with the pair's drafter assisting; `emit`
    hears each token as a block is accepted. Stops at the pair's stop ids as a plain run does (`stop_at_eos`);
    `cancel` ends it within one block (or one layer of the prompt's pass): the answer so far is returned."""
    cancel = cancel or threading.Event()
    answer = Answer(pair, len(prompt_ids), sampling, emit)
    if cancel.is_set():
        return answer.events
    # Every logits-changing field is set: `generate` fills the unset ones from the model's generation_config (a hub
    # model's repetition_penalty would change the argmax).
    config = GenerationConfig(do_sample=False, max_new_tokens=sampling.max_new_tokens, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, min_length=0,
                              eos_token_id=sorted(pair.stop_ids) if sampling.stop_at_eos else [],
                              pad_token_id=pair.tokenizer.pad_token_id)
    ids = torch.tensor([list(prompt_ids)], device=pair.verifier.device)
    try:
        with prefix.stopping(cancel), torch.inference_mode():
            pair.verifier.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                   assistant_model=pair.draft, streamer=answer,
                                   logits_processor=LogitsProcessorList([_Valid(pair.valid)]),
                                   stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
    except prefix.Cancelled:
        pass
    return answer.events
