"""Drafting overlapped with verification (PEARL's post-verify, Liu et al. 2025, Sec. 3.2).

Sequential speculation alternates: the draft model drafts window i, then the target verifies it,
then the draft waits for the result. Here, while the target verifies window i (the main
thread), the draft model already drafts window i + 1 in a worker thread of its own, from the
optimistic assumption that window i is accepted in full::

    main thread:    verify P_i              | verify P_{i+1} = Q[1:]        | ...
    worker thread:  draft Q after ctx + P_i | draft after ctx' + Q[1:]      | ...

``Q`` has K + 1 tokens: ``Q[0]`` guesses the target's bonus token after ``P_i``. ``Q[1:]`` is the
next window when all of ``P_i`` was accepted and the bonus token equals ``Q[0]``; otherwise it
is dropped and the draft model drafts again from the committed tokens, as sequential
speculation would (the draft cache keeps the prefix it shares with them).

Lossless. Greedy: the target verifies every proposal, so the output is the target's own,
token for token (as with sequential speculation). Sampling: rejection sampling keeps the
target's distribution for any proposal whose tokens were drawn from the distributions its
``draft_probs`` carry, independently of the target's draws (Leviathan et al. 2023, Thm. 1; Chen
et al. 2023): ``Q`` is drawn by the draft with a generator of its own, seeded from the
request's, so the two threads never share one, and verified with the target's later draws.
Keeping ``Q[1:]`` only when ``Q[0]`` equals the bonus token is for acceptance (only then was it
drafted after the committed tokens), not for losslessness. Sampled output is another draw from
the same distribution as sequential speculation's under the same seed, not the same draw.

On a CPU the two threads run on two cores: torch releases the GIL inside its operators (and the
CPU kernels' one-call passes), and the worker sets its own intra-op thread count
(``draft_threads``). The drafter must be a plain chain of a draft model (capabilities
``batchable``: ``draft`` with ``--tree-width 1``): this module runs that chain itself, on a KV
cache of its own, so that it can draft from an assumed context and rewind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from specdec.cache import KVCache
from specdec.drafters.base import Drafter, DraftProposal
from specdec.drafters.vocab import DraftVocab, draft_pass
from specdec.engine.chain_step import chain_step
from specdec.engine.stats import SpecStats
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams, logits_to_probs, sample


@dataclass(frozen=True)
class Phase:
    """One drafting or verifying interval on the request's clock (seconds from its start)."""

    lane: str  # "draft" or "verify"
    start: float
    end: float
    overlapped: bool = False  # a draft run while the target verified


@dataclass
class Timeline:
    """The phases of the last request, for plots."""

    phases: list[Phase] = field(default_factory=list)
    kept: int = 0  # optimistic windows used
    dropped: int = 0  # optimistic windows drafted and dropped


class DraftChain:
    """Greedy or sampled chains of ``model`` from any context, on its own KV cache: drafts after
    ``token_ids`` keep the longest cached prefix, so a chain drafted from an assumed context that
    turned out wrong costs only the tokens after the divergence."""

    def __init__(self, model: LoadedModel, draft_vocab: DraftVocab | None = None) -> None:
        self.model = model
        self.draft_vocab = draft_vocab
        self.cache: KVCache = model.new_cache(1, 1)
        self._cached: list[int] = []  # the tokens whose keys / values the cache holds

    def reset(self, capacity: int) -> None:
        """A new request of at most ``capacity`` tokens plus drafts."""
        if self.cache.max_seq_len < capacity:
            self.cache = self.model.new_cache(1, capacity)
        self.cache.reset()
        self._cached = []

    def propose(
        self, token_ids: list[int], num_tokens: int, sampling: SamplingParams, generator: torch.Generator
    ) -> DraftProposal:
        """``num_tokens`` drafts after ``token_ids`` (its last token unread by the target)."""
        with torch.inference_mode():
            return self._propose(token_ids, num_tokens, sampling, generator)

    def _propose(
        self, token_ids: list[int], K: int, sampling: SamplingParams, generator: torch.Generator
    ) -> DraftProposal:
        keep = 0
        for a, b in zip(self._cached, token_ids[:-1], strict=False):
            if a != b:
                break
            keep += 1
        self.cache.truncate(keep)
        device = self.model.device
        feed = torch.tensor([token_ids[keep:]], device=device)  # (1, T)
        rows = self.draft_vocab.kernel_rows if self.draft_vocab is not None else None
        chain = self.model.module.draft_chain(feed, keep, K, self.cache, sampling, generator, rows)
        if chain is not None:
            proposal = DraftProposal(*chain)  # (K,), (K, V) or None
        else:
            proposal = self._loop(feed, keep, K, sampling, generator)
        self._cached = token_ids + proposal.tokens.tolist()[:-1]
        return proposal

    def _loop(
        self, feed: torch.Tensor, start: int, K: int, sampling: SamplingParams, generator: torch.Generator
    ) -> DraftProposal:
        """The chain one draft pass per token (where the CPU kernels' one call does not apply)."""
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        logits = self._pass(feed, start)  # (V,)
        for i in range(K):
            if sampling.greedy:
                token = logits.argmax(-1)
            else:
                draft_probs = logits_to_probs(logits, sampling)  # (V,)
                token = sample(draft_probs, generator)
                probs.append(draft_probs)
            tokens.append(token)
            if i < K - 1:
                logits = self._pass(token.reshape(1, 1), start + feed.shape[1] + i)
        return DraftProposal(torch.stack(tokens), torch.stack(probs) if probs else None)  # (K,), (K, V)

    def _pass(self, feed: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``feed`` ``(1, T)`` at positions ``start..``; the last token's logits ``(V,)``."""
        end = start + feed.shape[1]
        pos = torch.arange(start, end, device=feed.device)
        logits = draft_pass(self.model, self.draft_vocab, feed, pos, self.cache, 1, kv_len=end)  # (1, V)
        self.cache.truncate(end)
        return logits[-1]


def _head(proposal: DraftProposal, n: int) -> DraftProposal:
    """The first ``n`` drafts of a chain proposal."""
    probs = proposal.draft_probs[:n] if proposal.draft_probs is not None else None
    return DraftProposal(proposal.tokens[:n], probs)


def _tail(proposal: DraftProposal) -> DraftProposal:
    """A chain proposal without its first draft."""
    probs = proposal.draft_probs[1:] if proposal.draft_probs is not None else None
    return DraftProposal(proposal.tokens[1:], probs)


class ParallelSpeculation:
    """The generation loop of :class:`~specdec.engine.SpeculativeGenerator` with ``parallel=True``.

    ``overlap=False`` runs the same chain and bookkeeping one phase after the other (sequential
    speculation, for timelines side by side)."""

    def __init__(self, drafter: Drafter, draft_threads: int = 1, overlap: bool = True) -> None:
        caps = drafter.capabilities
        if not caps.batchable or caps.draft_model is None:
            raise ValueError(
                f"parallel drafting needs a drafter that is a plain chain of a draft model "
                f"(draft with tree width 1), not {type(drafter).__name__}"
            )
        self.num_draft_tokens = drafter.num_draft_tokens
        self.chain = DraftChain(caps.draft_model, caps.draft_vocab)
        self.draft_threads = draft_threads
        self.overlap = overlap
        self.timeline = Timeline()
        self._pool: ThreadPoolExecutor | None = None

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, "specdec-draft", torch.set_num_threads, (self.draft_threads,))
        return self._pool

    def close(self) -> None:
        """Stop the draft thread (a later request starts it again)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def steps(
        self,
        target: LoadedModel,
        cache: KVCache,
        prompt_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator,
        max_new_tokens: int,
        stats: SpecStats,
    ) -> Iterator[tuple[list[int], list[str]]]:
        """Yield ``(tokens, kinds)`` per verify step, as the sequential loop does; the target cache
        holds ``prompt_ids[:-1]`` (prefilled by the caller)."""
        K = self.num_draft_tokens
        draft_generator = torch.Generator(device=self.chain.model.device)
        draft_generator.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        self.chain.reset(cache.max_seq_len + K + 2)
        self.timeline = timeline = Timeline()
        clock = time.perf_counter()
        ids = list(prompt_ids)
        produced = 0
        proposal: DraftProposal | None = None  # the next window, drafted while the last verified
        while produced < max_new_tokens and len(ids) < cache.max_seq_len:
            budget = max_new_tokens - produced
            limit = min(budget, cache.max_seq_len - len(ids)) - 1
            if proposal is None and limit > 0:
                t = time.perf_counter()
                proposal = self.chain.propose(ids, min(K, limit), params, draft_generator)
                stats.draft_s += time.perf_counter() - t
                timeline.phases.append(Phase("draft", t - clock, time.perf_counter() - clock))
            window = _head(proposal, max(limit, 0)) if proposal is not None else _empty()
            ahead: Future[tuple[DraftProposal, Phase]] | None = None
            assumed = ids + window.tokens.tolist()
            if self.overlap and window.num_tokens > 0 and limit - window.num_tokens > 1:
                ahead = self._worker().submit(self._timed, assumed, K + 1, params, draft_generator, clock)
            t = time.perf_counter()
            try:
                result = chain_step(target, cache, ids, window, params, generator)
            except BaseException:
                if ahead is not None:  # the draft thread finishes before anyone reuses its chain
                    ahead.exception()
                raise
            t_verify = time.perf_counter()
            stats.verify_s += t_verify - t
            timeline.phases.append(Phase("verify", t - clock, t_verify - clock))
            stats.record(window.num_tokens, result.num_accepted)
            proposal = None
            if ahead is not None:
                drafted, phase = ahead.result()
                timeline.phases.append(phase)
                if result.bonus and result.tokens[-1] == int(drafted.tokens[0]):
                    proposal = _tail(drafted)
                    timeline.kept += 1
                else:
                    timeline.dropped += 1
            new = result.tokens[:budget]
            ids += new
            produced += len(new)
            yield new, result.kinds[: len(new)]

    def _timed(
        self, token_ids: list[int], K: int, params: SamplingParams, generator: torch.Generator, clock: float
    ) -> tuple[DraftProposal, Phase]:
        """A chain drafted in the worker, with its phase on the request's clock."""
        t = time.perf_counter()
        proposal = self.chain.propose(token_ids, K, params, generator)
        return proposal, Phase("draft", t - clock, time.perf_counter() - clock, overlapped=True)


def _empty() -> DraftProposal:
    return DraftProposal(torch.empty(0, dtype=torch.long))
