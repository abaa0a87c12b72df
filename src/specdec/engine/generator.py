"""The generation loop: propose -> score -> verify -> commit.

State between steps, with ``n`` committed tokens (prompt + generated)::

    target cache: slots 0 .. n-2 hold the keys/values of tokens 0 .. n-2
    token n-1:    *pending*: committed but not yet read by the target

One step feeds ``[pending, d1 .. dK]`` at positions ``n-1 .. n-1+K``; the target's K+1
distributions verify the drafts; ``j`` accepted drafts plus one recovered / bonus token are
committed and the cache is rolled back to ``n + j`` slots. Plain decoding is the same step with
K = 0. Because even the first generated token goes through this step, the prompt's last token
starts out pending and the prefill reads only ``prompt[:-1]``.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specdec.cache import KVCache
from specdec.drafters.base import DraftContext, Drafter, DraftProposal, TargetOutput, empty_proposal
from specdec.engine.chain_step import chain_step
from specdec.engine.parallel import ParallelSpeculation
from specdec.engine.request import (
    GenerationError,
    check_prompt,
    check_request,
    cut_at_eos,
    eos_token_ids,
    request_generator,
    validate_sampling,
)
from specdec.engine.stats import SpecStats
from specdec.engine.textstream import StreamChunk, TextAssembler
from specdec.engine.tree_step import tree_step
from specdec.models.loading import LoadedModel, check_compatible
from specdec.sampling import SamplingParams
from specdec.verify.chain import VerifyResult
from specdec.verify.tree import tree_depth

__all__ = ["GenerationError", "GenerationOutput", "GenerationStream", "SpeculativeGenerator"]


@dataclass(frozen=True)
class GenerationOutput:
    """``token_ids``: new tokens only, without the EOS token or the stop string's tokens.
    ``text``: their decoded text, cut right before a stop string. ``finish_reason``:
    ``eos``, ``stop`` (a stop string), or ``length`` (max_new_tokens or the context end)."""

    token_ids: list[int]
    text: str
    stats: SpecStats
    finish_reason: str
    kinds: list[str]


@dataclass
class _StreamState:
    """What a stream fills in as it runs; read by :class:`GenerationStream`."""

    stats: SpecStats
    assembler: TextAssembler
    eos: frozenset[int]
    finish_reason: str | None = None


class GenerationStream:
    """Iterator of :class:`StreamChunk`; ``stats``, ``finish_reason`` and ``output`` are set
    once it is exhausted."""

    def __init__(self, chunks: Generator[StreamChunk, None, None], state: _StreamState) -> None:
        self._chunks = chunks
        self._state = state

    def __iter__(self) -> Iterator[StreamChunk]:
        return self._chunks

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    @property
    def stats(self) -> SpecStats:
        return self._state.stats

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reason

    @property
    def output(self) -> GenerationOutput:
        a = self._state.assembler
        return GenerationOutput(a.ids, a.text, self.stats, self.finish_reason or "length", a.kinds)

    def close(self) -> None:
        self._chunks.close()


@dataclass
class _Decoding:
    """One request's decoding state between steps (see the module docstring)."""

    token_ids: list[int]  # committed: prompt + generated; the last one is pending
    cache: KVCache
    params: SamplingParams
    generator: torch.Generator
    stats: SpecStats
    produced: int = 0


class SpeculativeGenerator:
    """Generate with ``target``, sped up by ``drafter`` (None: plain decoding). ``parallel``:
    the draft model drafts the next window while the target verifies this one
    (:mod:`specdec.engine.parallel`; a plain chain drafter of a draft model)."""

    def __init__(self, target: LoadedModel, drafter: Drafter | None = None, parallel: bool = False) -> None:
        self.target = target
        self.drafter = drafter
        draft_model = drafter.capabilities.draft_model if drafter is not None else None
        if draft_model is not None:
            check_compatible(target, draft_model)
        self.parallel: ParallelSpeculation | None = None
        if parallel:
            if drafter is None:
                raise ValueError("parallel drafting needs a drafter")
            self.parallel = ParallelSpeculation(drafter)
        self._cache: KVCache | None = None
        self.eos_token_ids = eos_token_ids(target)

    # ----------------------------------------------------------------- public API
    def generate(self, prompt: str | list[int], **kwargs: Any) -> GenerationOutput:
        """Generate a completion; keyword arguments as in :meth:`stream`."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        return stream.output

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        ignore_eos: bool = False,
        stop_token_ids: Iterable[int] = (),
    ) -> GenerationStream:
        """Stream a completion as :class:`StreamChunk`s (several tokens per chunk).
        ``stop_token_ids`` end the output as the EOS token does (a chat's end-of-turn token)."""
        params = validate_sampling(temperature, top_k, top_p)
        prompt_ids = self.encode(prompt)
        check_request(prompt_ids, max_new_tokens, self.target.config.vocab_size, self.target.max_seq_len)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops and self.target.tokenizer is None:
            raise GenerationError("stop strings need a model folder with a tokenizer")
        generator = request_generator(self.target.device, seed)
        state = _StreamState(
            SpecStats(prompt_tokens=len(prompt_ids)),
            TextAssembler(self.target.tokenizer, stops),
            self.eos_token_ids | frozenset(int(t) for t in stop_token_ids),
        )
        chunks = self._chunks(prompt_ids, params, max_new_tokens, generator, ignore_eos, state)
        return GenerationStream(chunks, state)

    def chat(self, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> GenerationOutput:
        """Answer ``messages`` (``[{"role", "content"}]``) through the model's chat template;
        keyword arguments as in :meth:`stream`."""
        stream = self.chat_stream(messages, **kwargs)
        for _ in stream:
            pass
        return stream.output

    def chat_stream(self, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> GenerationStream:
        """Stream the reply to ``messages``; it ends at EOS or the template's end-of-turn token."""
        from specdec.engine.chat import chat_prompt  # jinja2 only for chat

        prompt = chat_prompt(messages, self.target.tokenizer)
        user_stop = kwargs.pop("stop", None)
        stop = [user_stop] if isinstance(user_stop, str) else list(user_stop or [])
        return self.stream(
            prompt.token_ids,
            stop=[*stop, *prompt.stop] or None,
            stop_token_ids=prompt.stop_token_ids,
            **kwargs,
        )

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of ``prompt`` (a string needs the model's tokenizer), checked against the
        vocabulary and the context (:class:`GenerationError`)."""
        if isinstance(prompt, str):
            if self.target.tokenizer is None:
                raise GenerationError("a text prompt needs a model folder with a tokenizer")
            ids = list(self.target.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
        check_prompt(ids, self.target.config.vocab_size, self.target.max_seq_len)
        return ids

    # ----------------------------------------------------------------- the loop
    def _target_cache(self, capacity: int) -> KVCache:
        if self._cache is None or self._cache.max_seq_len < capacity:
            self._cache = self.target.new_cache(1, capacity)
        self._cache.reset()
        return self._cache

    @torch.inference_mode()
    def _chunks(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        generator: torch.Generator,
        ignore_eos: bool,
        state: _StreamState,
    ) -> Generator[StreamChunk, None, None]:
        stats, text = state.stats, state.assembler
        start = time.perf_counter()
        try:
            for new, kinds in self._steps(prompt_ids, params, max_new_tokens, generator, stats):
                if not ignore_eos:
                    new, kinds, eos = cut_at_eos(new, kinds, state.eos)
                    if eos:
                        state.finish_reason = "eos"
                stats.new_tokens += len(new)
                yield from text.add(new, kinds)
                if text.stopped:
                    state.finish_reason = "stop"
                if state.finish_reason is not None:
                    break
            state.finish_reason = state.finish_reason or "length"
            stats.new_tokens = len(text.ids)
            yield from text.flush()
        finally:
            stats.total_s = time.perf_counter() - start

    def _prefill(
        self, prompt_ids: list[int], cache: KVCache, stats: SpecStats, with_drafter: bool = True
    ) -> None:
        """Read ``prompt[:-1]`` into the target cache and hand the drafter what it declared it needs
        (not ``with_drafter``: the parallel loop drafts with a chain of its own)."""
        t = time.perf_counter()
        target, drafter, n = self.target, self.drafter, len(prompt_ids)
        hidden = None
        layers = drafter.capabilities.feature_layers if drafter is not None and with_drafter else ()
        if n > 1:
            tokens = torch.tensor([prompt_ids[:-1]], device=target.device)  # (1, n-1)
            pos = torch.arange(n - 1, device=target.device)
            _, hidden = target(tokens, pos, cache, num_logits=0, return_hidden=True, feature_layers=layers)
            stats.target_forwards += 1
        cache.truncate(n - 1)
        if drafter is not None and with_drafter:
            caps = drafter.capabilities
            drafter.prefill(
                prompt_ids,
                TargetOutput(
                    hidden[0] if hidden is not None else None,  # (n-1, d)
                    cache if caps.reuses_target_cache else None,
                ),
            )
        stats.prefill_s = time.perf_counter() - t

    def _propose(self, state: _Decoding, limit: int) -> DraftProposal:
        if self.drafter is None or limit <= 0:
            return empty_proposal(self.target.device)
        return self.drafter.propose(DraftContext(state.token_ids, state.params, limit, state.generator))

    def _verify(self, state: _Decoding, proposal: DraftProposal) -> VerifyResult:
        """One target pass over the pending token and the proposal; commits in the cache."""
        needs_hidden = self.drafter is not None and self.drafter.capabilities.needs_hidden
        layers = self.drafter.capabilities.feature_layers if self.drafter is not None else ()
        target, cache, ids, params, generator = (
            self.target,
            state.cache,
            state.token_ids,
            state.params,
            state.generator,
        )
        if proposal.tree is not None:
            return tree_step(target, cache, ids, proposal.tree, params, generator, needs_hidden, layers)
        return chain_step(target, cache, ids, proposal, params, generator, needs_hidden, layers)

    def _steps(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        generator: torch.Generator,
        stats: SpecStats,
    ) -> Iterator[tuple[list[int], list[str]]]:
        """Yield ``(tokens, kinds)`` per verify step until ``max_new_tokens`` or the context end:
        propose -> verify (score + accept + commit in the target cache) -> drafter.on_verified."""
        drafter = self.drafter
        caps = drafter.capabilities if drafter is not None else None
        room = max(drafter.num_draft_tokens, caps.max_tree_nodes) if drafter and caps else 0
        n = len(prompt_ids)
        cache = self._target_cache(min(self.target.max_seq_len, n + max_new_tokens + room + 1))
        state = _Decoding(list(prompt_ids), cache, params, generator, stats)
        self._prefill(prompt_ids, cache, stats, with_drafter=self.parallel is None)
        if self.parallel is not None:
            yield from self.parallel.steps(
                self.target, cache, prompt_ids, params, generator, max_new_tokens, stats
            )
            return
        while state.produced < max_new_tokens and len(state.token_ids) < cache.max_seq_len:
            budget = max_new_tokens - state.produced
            t = time.perf_counter()
            proposal = self._propose(state, min(budget, cache.max_seq_len - len(state.token_ids)) - 1)
            t_draft = time.perf_counter()
            stats.draft_s += t_draft - t
            result = self._verify(state, proposal)
            K = tree_depth(proposal.tree) if proposal.tree is not None else proposal.num_tokens
            if drafter is not None and K > 0:
                drafter.on_verified(result)
            stats.verify_s += time.perf_counter() - t_draft
            stats.record(K, result.num_accepted, proposal.tree.num_nodes if proposal.tree else None)
            new = result.tokens[:budget]
            kinds = result.kinds[: len(new)] if drafter is not None else ["target"] * len(new)
            state.token_ids += new
            state.produced += len(new)
            yield new, kinds
