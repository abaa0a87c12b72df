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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from specdec.cache import KVCache
from specdec.drafters.base import DraftContext, Drafter, TargetOutput, empty_proposal
from specdec.engine.stats import SpecStats
from specdec.engine.textstream import StreamChunk, TextAssembler
from specdec.engine.tree_step import tree_step
from specdec.models.loading import LoadedModel, check_compatible
from specdec.sampling import SamplingParams, logits_to_probs
from specdec.verify.chain import verify_greedy, verify_rejection
from specdec.verify.tree import tree_depth


class GenerationError(ValueError):
    """A request the engine cannot serve (a user-facing error)."""


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


class GenerationStream:
    """Iterator of :class:`StreamChunk`; ``stats``, ``finish_reason`` and ``output`` are set
    once it is exhausted."""

    def __init__(self, chunks: Iterator[StreamChunk], state: dict) -> None:  # type: ignore[type-arg]
        self._chunks = chunks
        self._state = state

    def __iter__(self) -> Iterator[StreamChunk]:
        return self._chunks

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    @property
    def stats(self) -> SpecStats:
        return self._state["stats"]  # type: ignore[no-any-return]

    @property
    def finish_reason(self) -> str | None:
        return self._state.get("finish_reason")

    @property
    def output(self) -> GenerationOutput:
        a: TextAssembler = self._state["assembler"]
        return GenerationOutput(a.ids, a.text, self.stats, self.finish_reason or "length", a.kinds)

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]


class SpeculativeGenerator:
    """Generate with ``target``, sped up by ``drafter`` (None: plain decoding)."""

    def __init__(self, target: LoadedModel, drafter: Drafter | None = None) -> None:
        self.target = target
        self.drafter = drafter
        draft_model = getattr(drafter, "model", None)
        if isinstance(draft_model, LoadedModel):
            check_compatible(target, draft_model)
        self._cache: KVCache | None = None
        eos = set(target.config.eos_token_ids)
        if target.tokenizer is not None and target.tokenizer.eos_token_id is not None:
            eos.add(target.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    # ----------------------------------------------------------------- public API
    def generate(self, prompt: str | list[int], **kwargs) -> GenerationOutput:  # type: ignore[no-untyped-def]
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
        params = self._validate_sampling(temperature, top_k, top_p)
        prompt_ids = self.encode(prompt)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops and self.target.tokenizer is None:
            raise GenerationError("stop strings need a model folder with a tokenizer")
        generator = torch.Generator(device=self.target.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        state: dict = {"stats": SpecStats(prompt_tokens=len(prompt_ids))}  # type: ignore[type-arg]
        state["eos"] = self.eos_token_ids | frozenset(int(t) for t in stop_token_ids)
        state["assembler"] = TextAssembler(self.target.tokenizer, stops)
        chunks = self._chunks(prompt_ids, params, max_new_tokens, generator, ignore_eos, state)
        return GenerationStream(chunks, state)

    def chat(self, messages: Sequence[Mapping[str, str]], **kwargs) -> GenerationOutput:  # type: ignore[no-untyped-def]
        """Answer ``messages`` (``[{"role", "content"}]``) through the model's chat template;
        keyword arguments as in :meth:`stream`."""
        stream = self.chat_stream(messages, **kwargs)
        for _ in stream:
            pass
        return stream.output

    def chat_stream(self, messages: Sequence[Mapping[str, str]], **kwargs) -> GenerationStream:  # type: ignore[no-untyped-def]
        """Stream the reply to ``messages``; it ends at EOS or the template's end-of-turn token."""
        from specdec.engine.chat import chat_prompt  # jinja2 only for chat

        prompt = chat_prompt(messages, self.target.tokenizer)
        user_stop = kwargs.pop("stop", None)
        stop = [user_stop] if isinstance(user_stop, str) else list(user_stop or [])
        return self.stream(
            prompt.token_ids, stop=[*stop, *prompt.stop] or None, stop_token_ids=prompt.stop_token_ids, **kwargs
        )

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.target.tokenizer is None:
                raise GenerationError("a text prompt needs a model folder with a tokenizer")
            ids = self.target.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError("the prompt is empty")
        vocab = self.target.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise GenerationError(f"prompt token ids must lie in [0, {vocab})")
        if len(ids) >= self.target.max_seq_len:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens; the model's context is "
                f"{self.target.max_seq_len} tokens"
            )
        return ids

    @staticmethod
    def _validate_sampling(temperature, top_k, top_p) -> SamplingParams:  # type: ignore[no-untyped-def]
        try:
            return SamplingParams(float(temperature), top_k, top_p)
        except (TypeError, ValueError) as e:
            raise GenerationError(str(e)) from None

    # ----------------------------------------------------------------- the loop
    def _target_cache(self, capacity: int) -> KVCache:
        if self._cache is None or self._cache.max_seq_len < capacity:
            self._cache = self.target.new_cache(1, capacity)
        self._cache.reset()
        return self._cache

    @torch.inference_mode()
    def _chunks(self, prompt_ids, params, max_new_tokens, generator, ignore_eos, state):  # type: ignore[no-untyped-def]
        stats: SpecStats = state["stats"]
        text: TextAssembler = state["assembler"]
        start = time.perf_counter()
        try:
            for new, kinds in self._steps(prompt_ids, params, max_new_tokens, generator, stats):
                if not ignore_eos:
                    eos_at = next((i for i, t in enumerate(new) if t in state["eos"]), None)
                    if eos_at is not None:
                        new, kinds = new[:eos_at], kinds[:eos_at]
                        state["finish_reason"] = "eos"
                stats.new_tokens += len(new)
                yield from text.add(new, kinds)
                if text.stopped:
                    state["finish_reason"] = "stop"
                if "finish_reason" in state:
                    break
            state.setdefault("finish_reason", "length")
            stats.new_tokens = len(text.ids)
            yield from text.flush()
        finally:
            stats.total_s = time.perf_counter() - start

    def _steps(self, prompt_ids, params, max_new_tokens, generator, stats):  # type: ignore[no-untyped-def]
        """Yield ``(tokens, kinds)`` per verify step until ``max_new_tokens`` or the context end."""
        target, drafter = self.target, self.drafter
        device = target.device
        ctx_len = target.max_seq_len
        n = len(prompt_ids)
        # Room for the largest proposal: a chain of K or a tree of max_tree_nodes nodes.
        max_k = max(getattr(drafter, "num_draft_tokens", 0), getattr(drafter, "max_tree_nodes", 0) or 0)
        cache = self._target_cache(min(ctx_len, n + max_new_tokens + max_k + 1))
        ctx_len = cache.max_seq_len

        t = time.perf_counter()
        hidden = None
        if n > 1:
            tokens = torch.tensor([prompt_ids[:-1]], device=device)  # (1, n-1)
            _, hidden = target(tokens, torch.arange(n - 1, device=device), cache, num_logits=0, return_hidden=True)
            stats.target_forwards += 1
        cache.truncate(n - 1)
        if drafter is not None:
            drafter.prefill(prompt_ids, TargetOutput(hidden[0] if hidden is not None else None, cache))
        stats.prefill_s = time.perf_counter() - t

        tokens_so_far = list(prompt_ids)
        produced = 0
        while produced < max_new_tokens and len(tokens_so_far) < ctx_len:
            budget = max_new_tokens - produced
            room = ctx_len - len(tokens_so_far)
            limit = min(budget - 1, room - 1)

            t = time.perf_counter()
            if drafter is not None and limit > 0:
                ctx = DraftContext(tokens_so_far, params, limit, generator)
                proposal = drafter.propose(ctx)
            else:
                proposal = empty_proposal(device)
            t_draft = time.perf_counter()
            stats.draft_s += t_draft - t

            nodes = None
            if proposal.tree is not None:  # tree step: one pass, compacts the cache itself
                K, nodes = tree_depth(proposal.tree), proposal.tree.num_nodes
                needs_hidden = getattr(drafter, "needs_hidden", False)
                result = tree_step(target, cache, tokens_so_far, proposal.tree, params, generator, needs_hidden)
            else:
                K = proposal.num_tokens
                pending = torch.tensor([tokens_so_far[-1]], device=device)
                inp = torch.cat([pending, proposal.tokens.to(device)])[None]  # (1, K+1)
                pos = torch.arange(len(tokens_so_far) - 1, len(tokens_so_far) + K, device=device)
                kv_len = len(tokens_so_far) + K  # no device sync to find it
                needs_hidden = getattr(drafter, "needs_hidden", False)  # EAGLE / Medusa read the target's features
                if proposal.reused is not None:  # self-speculation: the first layers ran while drafting
                    reused = proposal.reused
                    logits, hidden = target.module.forward_reusing(
                        inp, pos[None], cache, reused.num_layers, reused.hidden[None], kv_len
                    )
                    hidden = hidden if needs_hidden else None
                elif needs_hidden:
                    logits, hidden = target.step(inp, pos, cache, return_hidden=True, kv_len=kv_len)
                else:
                    logits, hidden = target.step(inp, pos, cache, kv_len=kv_len), None
                logits = logits[0]  # (K+1, V)
                if params.greedy:
                    result = verify_greedy(proposal.tokens, logits)
                else:
                    target_probs = logits_to_probs(logits, params)  # (K+1, V)
                    result = verify_rejection(proposal.tokens, proposal.draft_probs, target_probs, generator)
                if hidden is not None:  # rows of the pending token and the accepted drafts
                    rows = [0, *(1 + i for i in result.accepted_path)]
                    result = replace(result, target_hidden=hidden[0, rows])  # (num_accepted + 1, d)
            cache.truncate(len(tokens_so_far) + result.num_accepted)
            if drafter is not None and K > 0:
                drafter.on_verified(result)
            stats.verify_s += time.perf_counter() - t_draft
            stats.record(K, result.num_accepted, nodes)

            new = result.tokens[:budget]
            kinds = result.kinds[: len(new)] if drafter is not None else ["target"] * len(new)
            tokens_so_far += new
            produced += len(new)
            yield new, kinds
