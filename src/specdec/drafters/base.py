"""The one interface every drafter implements.

The engine drives a drafter through three calls per request:

1. ``prefill(prompt_ids, target_out)`` once, after the target has read the prompt;
2. ``propose(ctx)`` before each verify pass: up to ``ctx.max_draft_tokens`` tokens;
3. ``on_verified(result)`` after it: roll back own state (cache) and adapt.

What a drafter needs from the engine, and what it brings, it declares in
:class:`DrafterCapabilities` (``drafter.capabilities``); engines read that and nothing else.

A drafter owns its state (a draft model's KV cache, an n-gram index) and leaves the target's
cache alone, with one exception, declared as ``reuses_target_cache``: a self-speculative drafter
runs the target's own first layers, and may write their keys and values into the target's cache
(``TargetOutput.cache``), the values the verify pass would write there itself; its proposal then
says so (``ReusedLayers``) and the verify pass skips those layers for those tokens. Proposals
carry ``draft_probs`` when the drafter samples from a distribution (needed by lossless rejection
sampling); deterministic drafters leave it ``None``.

Writing a drafter: subclass :class:`Drafter` (it inherits the default capabilities: a chain
drafter that reads nothing of the target's), set ``num_draft_tokens``, implement the three calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from specdec.cache import KVCache
from specdec.sampling import SamplingParams
from specdec.verify.chain import VerifyResult

if TYPE_CHECKING:
    from specdec.drafters.vocab import DraftVocab
    from specdec.models.loading import LoadedModel


@dataclass(frozen=True)
class DrafterCapabilities:
    """What a drafter needs from the engine and what it brings, declared once at construction.

    Every engine (the single-sequence generator, the batched server) reads these fields and
    never inspects a drafter otherwise.

    * ``needs_hidden``: the drafter reads the target's final normed hidden states: the engine
      passes the prompt's in :attr:`TargetOutput.hidden` and, after every verify pass, the rows
      of the pending token and the accepted drafts in :attr:`VerifyResult.target_hidden`
      (EAGLE, Medusa). Engines ask the target for hidden states only for such drafters.
    * ``feature_layers``: with ``needs_hidden``, the decoder layers whose outputs come before the
      final normed hidden state in those rows, concatenated (``(T, (len + 1) d)``: EAGLE-3's
      fused low, middle and high features); empty: the final normed hidden state alone.
    * ``max_tree_nodes``: the most nodes one proposal holds (a chain of K: K); the engine
      reserves cache room for ``max(num_draft_tokens, max_tree_nodes)`` drafts.
    * ``draft_model``: the separate model the drafter runs, if any; the engine refuses it when
      its vocabulary differs from the target's.
    * ``draft_vocab``: the reduced vocabulary the drafter scores (reports show its size).
    * ``reuses_target_cache``: the drafter runs the target's own first layers and may write
      their keys and values into ``TargetOutput.cache`` (LayerSkip's cache reuse); its chain
      proposals then carry :class:`ReusedLayers` and the verify pass skips those layers for
      those tokens. Engines that cannot share their cache pass ``cache=None``, and the drafter
      keeps a cache of its own.
    * ``batchable``: the drafter is a plain chain of ``draft_model`` (no tree, no lookup, no
      state beyond that model's cache), so a batched server may run the drafts of all its rows
      in shared passes of ``draft_model`` (:mod:`specdec.serving.batch_draft`), with the same
      drafts as one drafter per row.
    """

    needs_hidden: bool = False
    feature_layers: tuple[int, ...] = ()
    max_tree_nodes: int = 0
    draft_model: LoadedModel | None = None
    draft_vocab: DraftVocab | None = None
    reuses_target_cache: bool = False
    batchable: bool = False


@dataclass(frozen=True)
class TargetOutput:
    """What the target computed on the prompt (for drafters that reuse it).

    ``hidden``: set for drafters whose capabilities say ``needs_hidden`` (else None).
    ``cache``: the target's KV cache of this request, for drafters that declare
    ``reuses_target_cache``, where the engine can take :class:`ReusedLayers` (the
    single-sequence engine; None elsewhere)."""

    hidden: torch.Tensor | None = None  # (T, d) final normed hidden states (see feature_layers)
    cache: KVCache | None = None


@dataclass(frozen=True)
class ReusedLayers:
    """Layers ``0 .. num_layers - 1`` of the target already ran for the pending token and every
    draft but the last, in this step's slots of the target's cache (LayerSkip's cache reuse,
    Elhoushi et al. 2024, Sec. 4.2): ``hidden`` ``(K, d)`` float32 is their output. The verify
    pass runs those layers for the last draft only, then the rest for all K + 1 tokens."""

    num_layers: int
    hidden: torch.Tensor  # (K, d)


@dataclass
class DraftContext:
    """What a drafter may read when proposing.

    ``token_ids``: the committed sequence, prompt + generated; its last token is *pending*
    (its target logits have not been computed yet): drafts continue after it.
    """

    token_ids: list[int]
    sampling: SamplingParams
    max_draft_tokens: int
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class DraftTree:
    """A tree of draft tokens hanging below the pending token (the implicit root).

    Nodes are in topological order (a parent before its children). A chain of K tokens is the
    tree with ``parents = [-1, 0, 1, ..., K-2]``. ``draft_probs[i]`` is the draft distribution
    node ``i`` was drawn from, i.e. the drafter's distribution after its parent (siblings share
    it); None for deterministic drafters.
    """

    tokens: torch.Tensor  # (N,) long
    parents: torch.Tensor  # (N,) long; -1 = child of the pending token
    draft_probs: torch.Tensor | None = None  # (N, V) float32

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class DraftProposal:
    """A chain (``tokens`` ``(K,)``, ``draft_probs`` ``(K, V)``) or, when ``tree`` is set, a tree
    whose node tokens are ``tokens``."""

    tokens: torch.Tensor  # (K,) long
    draft_probs: torch.Tensor | None = None  # (K, V) float32, or None for deterministic drafts
    tree: DraftTree | None = None
    reused: ReusedLayers | None = None  # chains only: layers the verify pass may skip

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


@runtime_checkable
class Drafter(Protocol):
    """The drafter contract: ``num_draft_tokens`` (K, which wrappers such as ``adaptive`` may
    change between steps), ``capabilities`` and three calls.

    * ``prefill(prompt_ids, target_out)``: a new request; reset own state and read the prompt.
      ``prompt_ids[-1]`` is pending (the target has read ``prompt_ids[:-1]``).
    * ``propose(ctx)``: at most ``ctx.max_draft_tokens`` drafts after ``ctx.token_ids`` (a chain
      proposal's ``num_tokens``, or a tree's depth); an empty proposal means a plain step.
    * ``on_verified(result)``: called after every verify pass of a non-empty proposal; roll own
      state back to the committed tokens (``result.num_accepted`` of the drafts were kept).
    """

    num_draft_tokens: int
    capabilities: DrafterCapabilities = DrafterCapabilities()

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None: ...

    def propose(self, ctx: DraftContext) -> DraftProposal: ...

    def on_verified(self, result: VerifyResult) -> None: ...


def check_draft_shape(num_draft_tokens: int, tree_width: int = 1, max_tree_nodes: int | None = None) -> int:
    """Validate a drafter's K, tree width and node budget (user input: ValueError with the
    argument's name). Returns the node budget, by default ``num_draft_tokens * tree_width``."""
    for name, value in (("num_draft_tokens", num_draft_tokens), ("tree_width", tree_width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    budget = max_tree_nodes or num_draft_tokens * tree_width
    if budget < 1:
        raise ValueError(f"max_tree_nodes must be >= 1, got {max_tree_nodes}")
    return budget


def empty_proposal(device: torch.device | str = "cpu") -> DraftProposal:
    """A proposal of no drafts: the engine runs a plain step."""
    return DraftProposal(torch.empty(0, dtype=torch.long, device=device))
