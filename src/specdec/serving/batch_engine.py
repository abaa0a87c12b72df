"""Continuous batching with speculative decoding: many sequences share each target pass.

One target KV cache holds ``max_batch_size`` rows; a request owns a row from its prefill to
its last token (Yu et al. 2022, "Orca": iteration-level scheduling). Each step:

1. every active row's drafter proposes up to K tokens (K from :class:`SpeculationPolicy`) as a
   chain or a tree;
2. one target pass reads all rows: row ``b`` feeds ``[pending, its drafts]`` from slot
   ``n_b - 1`` on, padded to a common width with extra slots *after* its real ones (why that is
   safe, with a worked example: :mod:`specdec.serving.ragged`);
3. each row verifies its own drafts and rolls back its own cache row (ragged acceptance).

Rows are prefilled one at a time (B = 1) when they join, exactly like
:class:`~specdec.engine.SpeculativeGenerator`'s prefill. Drafting runs either batched (a
:class:`~specdec.serving.batch_draft.BatchDraftModel`: K draft passes for all rows) or per row
(any :class:`~specdec.drafters.base.Drafter`, one instance per row). All of this runs on the
single engine thread; results leave through each request's ``emit`` callback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specdec.cache import KVCache
from specdec.drafters.base import DraftContext, Drafter, DraftProposal, TargetOutput, empty_proposal
from specdec.engine.request import (
    check_request,
    cut_at_eos,
    eos_token_ids,
    request_generator,
    with_accepted_hidden,
)
from specdec.engine.stats import SpecStats
from specdec.engine.textstream import StreamChunk, TextAssembler
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams
from specdec.serving.batch_draft import BatchDraftModel, DraftRow
from specdec.serving.metrics import ServerMetrics
from specdec.serving.policy import SpeculationPolicy
from specdec.serving.ragged import RowInput, build_inputs, fit_proposal, verify_row


@dataclass(frozen=True)
class EngineEvent:
    """Newly final output of one request. ``pieces[i]`` is the text of ``token_ids[i]`` (they
    concatenate to ``text``). The last event has ``finish_reason`` (``eos``, ``stop``,
    ``length``, ``cancelled`` or ``error``) and the request's ``stats``."""

    token_ids: list[int]
    text: str
    kinds: list[str]
    pieces: list[str]
    finish_reason: str | None = None
    error: str | None = None
    stats: SpecStats | None = None
    drafted: int = 0  # the request's drafted positions so far (live acceptance in the playground)
    accepted: int = 0


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    emit: Callable[[EngineEvent], None]
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Sequence:
    request: EngineRequest
    row: int
    tokens: list[int]
    generator: torch.Generator
    assembler: TextAssembler
    stats: SpecStats
    started: float
    produced: int = 0
    sent_chars: int = 0
    sent_tokens: int = 0


def rows_view(cache: KVCache, rows: slice) -> KVCache:
    """A KVCache over ``rows`` of ``cache`` that shares its storage (writes go through)."""
    view = object.__new__(KVCache)
    view.k, view.v = cache.k[:, rows], cache.v[:, rows]  # (L, B', H, S, D) views
    view.max_seq_len = cache.max_seq_len
    view.lengths = cache.lengths[rows]
    return view


class BatchEngine:
    """Owns the batched target cache, the drafting and the per-row sequences.

    ``drafting``: a :class:`BatchDraftModel`, or a factory of per-row drafters (None: plain).
    """

    def __init__(
        self,
        target: LoadedModel,
        drafting: BatchDraftModel | Callable[[], Drafter | None],
        max_batch_size: int,
        metrics: ServerMetrics,
        max_seq_len: int | None = None,
        adaptive_draft_tokens: bool = True,
    ) -> None:
        self.target = target
        self.metrics = metrics
        self.batch_drafter = drafting if isinstance(drafting, BatchDraftModel) else None
        self.drafter_factory: Callable[[], Drafter | None] = (
            (lambda: None) if isinstance(drafting, BatchDraftModel) else drafting
        )
        self.drafters = [self.drafter_factory() for _ in range(max_batch_size)]
        per_row = [d.num_draft_tokens for d in self.drafters if d]
        self.max_draft_tokens = (
            self.batch_drafter.num_draft_tokens if self.batch_drafter else max(per_row, default=0)
        )
        # Hidden states of the verify pass only where some drafter reads them (EAGLE, Medusa).
        self.needs_hidden = any(d.capabilities.needs_hidden for d in self.drafters if d)
        layers = {d.capabilities.feature_layers for d in self.drafters if d and d.capabilities.needs_hidden}
        if len(layers) > 1:
            raise ValueError(f"the drafters read the outputs of different target layers: {sorted(layers)}")
        self.feature_layers: tuple[int, ...] = layers.pop() if layers else ()
        self.context_len = min(max_seq_len or target.max_seq_len, target.max_seq_len)
        capacity = self.context_len + self.max_draft_tokens + 2  # + the pending token, + scratch
        self.cache = target.new_cache(max_batch_size, capacity)
        if self.batch_drafter is not None:
            self.batch_drafter.allocate(max_batch_size, capacity)
        self.rows: list[_Sequence | None] = [None] * max_batch_size
        self.policy = SpeculationPolicy(self.max_draft_tokens, adaptive=adaptive_draft_tokens)
        self._pending_step: tuple[int, int, int, float, float, bool] | None = None  # see _report_step
        self._previous_k = 0  # K of the latest step
        self.eos_token_ids = eos_token_ids(target)

    # ----------------------------------------------------------------- rows
    @property
    def num_active(self) -> int:
        return sum(seq is not None for seq in self.rows)

    @property
    def num_free(self) -> int:
        return len(self.rows) - self.num_active

    @torch.inference_mode()
    def add(self, request: EngineRequest) -> None:
        """Prefill ``request`` into the lowest free row (the caller checked there is one)."""
        row = self.rows.index(None)
        generator = request_generator(self.target.device, request.seed)
        ids = request.prompt_ids
        seq = _Sequence(
            request,
            row,
            list(ids),
            generator,
            TextAssembler(self.target.tokenizer, request.stop),
            SpecStats(prompt_tokens=len(ids)),
            time.perf_counter(),
        )
        self.rows[row] = seq
        t = time.perf_counter()
        try:  # (the HTTP layer has checked the request already; this engine trusts no caller)
            check_request(ids, request.max_new_tokens, self.target.config.vocab_size, self.context_len)
            hidden = None
            if len(ids) > 1:
                tokens = torch.tensor([ids[:-1]], device=self.target.device)  # (1, n-1)
                pos = torch.arange(len(ids) - 1, device=self.target.device)
                _, hidden = self.target(
                    tokens, pos, rows_view(self.cache, slice(row, row + 1)), num_logits=0, return_hidden=True,
                    feature_layers=self.feature_layers,
                )  # fmt: skip
                seq.stats.target_forwards += 1
                self.policy.observe_pass(len(ids) - 1, time.perf_counter() - t)
            self.cache.lengths[row] = len(ids) - 1
            target_out = TargetOutput(hidden[0] if hidden is not None else None)
            drafter = self.drafters[row]
            if drafter is not None:
                drafter.prefill(list(ids), target_out)
            if self.batch_drafter is not None:
                self.batch_drafter.prefill(row, list(ids), target_out)
        except Exception as e:  # this request alone fails; its row gets a fresh drafter
            self._finish(seq, "error", error=f"prefill failed: {e}")
            self.drafters[row] = self.drafter_factory()
            return
        seconds = time.perf_counter() - t
        seq.stats.prefill_s = seconds
        self.metrics.add_phase("prefill", seconds)

    def cancel_all(self, reason: str = "cancelled", error: str | None = None) -> None:
        """End every active request with ``reason`` (shutdown, or a failed batched pass)."""
        for seq in list(self.rows):
            if seq is not None:
                self._finish(seq, reason, error=error)

    # ----------------------------------------------------------------- one step
    def _report_step(self, now: float) -> None:
        """Hand the previous step to the policy, with the gap since it ended: serving work between
        consecutive steps. A gap longer than the step itself is taken as idle time and left out."""
        if self._pending_step is None:
            return
        batch_size, k, committed, seconds, ended, warm = self._pending_step
        self._pending_step = None
        gap = now - ended
        self.policy.observe_step(batch_size, k, committed, seconds + (gap if gap < seconds else 0.0), warm)

    @torch.inference_mode()
    def step(self) -> None:
        """One batched propose -> verify -> commit over every active row."""
        for seq in self.rows:
            if seq is not None and seq.request.cancelled.is_set():
                self._finish(seq, "cancelled")
        active = [seq for seq in self.rows if seq is not None]
        if not active:
            return
        batch_size = len(active)
        k_max = self.policy.choose(batch_size) if self.max_draft_tokens else 0
        t0 = time.perf_counter()
        proposals = self._propose_batched(active, k_max) if self.batch_drafter else {}
        capacity = self.cache.max_seq_len
        for seq in active if self.batch_drafter is None else []:
            t = time.perf_counter()
            try:
                proposals[seq.row] = fit_proposal(self._propose(seq, k_max), len(seq.tokens) - 1, capacity)
            except Exception as e:  # a broken drafter fails its own request only
                self._drafter_failed(seq, e)
                continue
            seconds = time.perf_counter() - t
            seq.stats.draft_s += seconds
            self.policy.observe_draft(proposals[seq.row].num_tokens, seconds)
        active = [seq for seq in active if seq.row in proposals]
        if not active:
            return
        t1 = time.perf_counter()
        logits, hidden = self._verify_pass(active, proposals)  # (B', T, V), (B', T, d) | None
        t2 = time.perf_counter()
        self.policy.observe_pass(logits.shape[0] * logits.shape[1], t2 - t1)  # padded tokens computed
        self.metrics.record_pass(len(active), k_max)
        produced = sum(seq.produced for seq in active)
        for seq in active:
            seq.stats.verify_s += t2 - t1
            self._commit(
                seq, proposals[seq.row], logits[seq.row], None if hidden is None else hidden[seq.row]
            )
        t3 = time.perf_counter()
        self.metrics.add_phase("draft", t1 - t0)
        self.metrics.add_phase("verify", t2 - t1)
        self.metrics.add_phase("commit", t3 - t2)
        committed = sum(seq.produced for seq in active) - produced  # tokens this step, all rows
        # The measured-goodput guard sees a step's whole cost: its own time plus the serving work
        # (streaming its tokens to clients) done before the next step starts, so that step's
        # observation is reported when the next one begins.
        self._report_step(t0)
        # After plain steps the batched draft model first catches up on the tokens it skipped.
        warm = not (self.batch_drafter is not None and k_max > 0 and self._previous_k == 0)
        self._pending_step = (batch_size, k_max, committed, t3 - t0, t3, warm)
        self._previous_k = k_max

    def _limit(self, seq: _Sequence, k: int) -> int:
        """Drafts the row may verify: within its token budget and the context."""
        budget = seq.request.max_new_tokens - seq.produced
        return min(budget - 1, self.context_len - len(seq.tokens) - 1, k)

    def _propose_batched(self, active: list[_Sequence], k_max: int) -> dict[int, DraftProposal]:
        assert self.batch_drafter is not None
        t = time.perf_counter()
        rows = [
            DraftRow(s.row, s.tokens, s.request.sampling, s.generator, self._limit(s, k_max)) for s in active
        ]
        drafted = self.batch_drafter.propose(rows)  # a failure here fails the batch (scheduler)
        seconds = time.perf_counter() - t
        self.policy.observe_draft(sum(p.num_tokens for p in drafted.values()), seconds)
        empty = empty_proposal(self.target.device)
        for seq in active:
            seq.stats.draft_s += seconds
        return {seq.row: drafted.get(seq.row, empty) for seq in active}

    def _propose(self, seq: _Sequence, k_max: int) -> DraftProposal:
        drafter = self.drafters[seq.row]
        # Drafters that read the target's hidden states (EAGLE, Medusa) need them every step.
        k_row = max(k_max, 1) if drafter is not None and drafter.capabilities.needs_hidden else k_max
        limit = self._limit(seq, k_row)
        if drafter is None or limit <= 0:
            return empty_proposal(self.target.device)
        ctx = DraftContext(seq.tokens, seq.request.sampling, limit, seq.generator)
        return drafter.propose(ctx)

    def _verify_pass(
        self, active: list[_Sequence], proposals: dict[int, DraftProposal]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One target pass over rows ``0 .. max active row`` (see :mod:`.ragged`)."""
        rows = [RowInput(s.row, s.tokens[-1], len(s.tokens) - 1, proposals[s.row]) for s in active]
        hi = max(seq.row for seq in active) + 1
        inputs = build_inputs(rows, hi, self.cache.max_seq_len, self.target.device)
        view = rows_view(self.cache, slice(0, hi))
        needs_hidden = self.needs_hidden
        out = self.target(
            inputs.tokens,
            inputs.positions,
            view,
            attn_mask=inputs.attn_mask,
            cache_slots=inputs.slots,
            return_hidden=needs_hidden,
            kv_len=inputs.kv_len,
            feature_layers=self.feature_layers,
        )  # (B', T, V) [, (B', T, d)]
        return out if needs_hidden else (out, None)

    def _commit(
        self,
        seq: _Sequence,
        proposal: DraftProposal,
        row_logits: torch.Tensor,
        row_hidden: torch.Tensor | None,
    ) -> None:
        request = seq.request
        result, k = verify_row(proposal, row_logits, request.sampling, seq.generator)
        n = len(seq.tokens)
        self.cache.compact(n, list(result.accepted_path), row=seq.row)  # a tree keeps its path
        drafter = self.drafters[seq.row]
        if drafter is not None and drafter.capabilities.needs_hidden:
            result = with_accepted_hidden(result, row_hidden)  # the pending token + accepted drafts
        if self.batch_drafter is not None:
            self.batch_drafter.on_verified(seq.row, n, result.num_accepted)
        if drafter is not None and k > 0:
            try:
                drafter.on_verified(result)
            except Exception as e:
                self._drafter_failed(seq, e)
                return
        nodes = proposal.num_tokens  # a tree's node count (a chain: k)
        seq.stats.record(k, result.num_accepted, nodes)
        self.metrics.record_step(k, result.num_accepted, nodes)
        self.policy.observe_acceptance(k, result.num_accepted)

        new = result.tokens[: request.max_new_tokens - seq.produced]
        kinds = result.kinds[: len(new)] if k > 0 else ["target"] * len(new)
        seq.tokens += new
        seq.produced += len(new)
        finish = None
        if not request.ignore_eos:
            new, kinds, eos = cut_at_eos(new, kinds, self.eos_token_ids)
            finish = "eos" if eos else None
        seq.stats.new_tokens += len(new)
        chunks = list(seq.assembler.add(new, kinds))
        if seq.assembler.stopped:
            finish = "stop"
        if finish is None and (seq.produced >= request.max_new_tokens or len(seq.tokens) >= self.context_len):
            finish = "length"
        if finish is not None:
            chunks += list(seq.assembler.flush())
            self._emit(seq, chunks)
            self._finish(seq, finish)
        elif chunks:
            self._emit(seq, chunks)

    # ----------------------------------------------------------------- output
    def _emit(self, seq: _Sequence, chunks: list[StreamChunk]) -> None:
        ids = [t for c in chunks for t in c.token_ids]
        text = "".join(c.text for c in chunks)
        kinds = [k for c in chunks for k in c.kinds]
        if not ids and not text:
            return
        pieces = self._pieces(seq, len(ids), text)
        seq.sent_tokens += len(ids)
        seq.sent_chars += len(text)
        stats = seq.stats
        seq.request.emit(
            EngineEvent(
                ids, text, kinds, pieces, drafted=stats.draft_positions, accepted=stats.accepted_tokens
            )
        )

    def _pieces(self, seq: _Sequence, num_tokens: int, text: str) -> list[str]:
        """Split ``text`` among the event's tokens by where each token's text begins."""
        tokenizer = self.target.tokenizer
        if num_tokens == 0:
            return []
        if tokenizer is None:
            return [""] * (num_tokens - 1) + [text]
        ids = seq.assembler.ids
        c0, c1 = seq.sent_chars, seq.sent_chars + len(text)
        bounds = [c0]
        for i in range(seq.sent_tokens + 1, seq.sent_tokens + num_tokens):
            end = len(tokenizer.decode(ids[:i]).rstrip("\ufffd"))
            bounds.append(min(max(end, bounds[-1]), c1))
        bounds.append(c1)
        return [text[bounds[i] - c0 : bounds[i + 1] - c0] for i in range(num_tokens)]

    def _drafter_failed(self, seq: _Sequence, error: Exception) -> None:
        """Fail the request and give its row a fresh drafter (the old one's state is suspect)."""
        self._finish(seq, "error", error=f"drafter failed: {error}")
        self.drafters[seq.row] = self.drafter_factory()

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        if self.rows[seq.row] is not seq:
            return
        self.rows[seq.row] = None
        self.cache.lengths[seq.row] = 0
        seq.stats.new_tokens = len(seq.assembler.ids)
        seq.stats.total_s = time.perf_counter() - seq.started
        status = {"eos": "stop", "stop": "stop"}.get(reason, reason)
        self.metrics.finish(status, len(seq.request.prompt_ids), seq.stats.new_tokens)
        seq.request.emit(EngineEvent([], "", [], [], finish_reason=reason, error=error, stats=seq.stats))
