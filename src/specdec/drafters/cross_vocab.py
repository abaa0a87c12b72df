"""A draft model with another tokenizer drafts through text (universal assisted generation,
Hugging Face 2024; Timor et al., ICML 2025, "Accelerating LLM inference with lossless
speculative decoding algorithms for heterogeneous vocabularies", Sec. 3, string-level exact
match).

The draft model reads its own tokens of the committed text and drafts greedily; its drafts are
decoded to text and that text is encoded with the target's tokenizer. The target verifies the
target tokens as it verifies any chain, so greedy output stays the target's own, token for token.

Three conversions per step, each on a small window so that a step costs the same at any length:

* **target -> text**: the tokens committed since the last step are decoded together with a few
  tokens before them, and the text they add is appended (where a byte-level token ends inside a
  UTF-8 character the step is a plain one, and the text is read afresh once it completes).
* **text -> draft tokens**: the draft's tokens of the committed text are a frozen prefix and a
  tail re-encoded each step from the text after the prefix; the tail's first tokens are frozen
  once it grows long. The draft's KV cache keeps the longest prefix it shares with these tokens.
* **draft -> target tokens**: after each draft token the drafted text is encoded behind the last
  committed target tokens; the target tokens that stay the same with one draft token more or
  less are *stable* (a later draft character can still merge into the last token), and the
  proposal is the stable prefix, up to K tokens.

Sampling drafts by token-level intersection (:mod:`specdec.drafters.token_intersection`): the
draft samples among the tokens both vocabularies share, each draft is a target token and carries
its exact distribution, and rejection sampling keeps the output distributed as the target's.
"""

from __future__ import annotations

import torch

from specdec.drafters.base import (
    DraftContext,
    DrafterCapabilities,
    DraftProposal,
    TargetOutput,
    empty_proposal,
)
from specdec.drafters.token_intersection import TokenIntersection
from specdec.drafters.vocab import draft_pass
from specdec.engine.request import GenerationError
from specdec.models.config import ModelLoadError
from specdec.models.loading import LoadedModel
from specdec.models.tokenizer import Tokenizer
from specdec.sampling import sample
from specdec.verify.chain import VerifyResult

WINDOW = 4  # committed tokens decoded / re-encoded beside new text, for a stable boundary
TAIL = 24  # draft tokens re-encoded each step before the oldest are frozen
FREEZE_KEEP = 8  # draft tokens left in the tail when it is frozen
HEALING_CACHE = 4096  # texts whose healing token sets are kept


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def appended_text(tokenizer: Tokenizer, before: list[int], new: list[int]) -> str | None:
    """The text ``new`` adds after ``before`` (decoded together, so a boundary that changes the
    decoding, such as SentencePiece's leading space, is handled); None when the decoding of
    ``before`` is not a prefix (``new`` completes a character that ``before`` cut)."""
    head = tokenizer.decode(before, skip_special_tokens=False)
    full = tokenizer.decode(before + new, skip_special_tokens=False)
    return full[len(head) :] if full.startswith(head) else None


class CrossVocabDrafter:
    """Drafts for ``target`` with ``model``, a draft model whose tokenizer differs (greedy only).

    ``max_draft_steps`` bounds the draft model's tokens per proposal (default ``2 K + 2``: the
    draft's tokens may be shorter than the target's)."""

    def __init__(
        self,
        target: LoadedModel,
        model: LoadedModel,
        num_draft_tokens: int = 4,
        max_draft_steps: int | None = None,
    ) -> None:
        if target.tokenizer is None or model.tokenizer is None:
            raise ModelLoadError(
                "vocabulary mismatch: a draft with another vocabulary drafts through text, "
                "which needs a tokenizer for both the target and the draft"
            )
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens}")
        self.target_tokenizer = target.tokenizer
        self.target_vocab_size = target.config.vocab_size
        self._shared: TokenIntersection | None = None  # sampling: tokens both vocabularies share
        self.draft_tokenizer = model.tokenizer
        self.model = model
        self.num_draft_tokens = num_draft_tokens
        self.max_draft_steps = max_draft_steps or 2 * num_draft_tokens + 2
        self.capabilities = DrafterCapabilities(max_tree_nodes=num_draft_tokens)
        eos = set(model.config.eos_token_ids)
        if model.tokenizer.eos_token_id is not None:
            eos.add(model.tokenizer.eos_token_id)
        self.draft_eos = frozenset(eos)
        self.cache = model.new_cache(1)
        self._cached: list[int] = []  # draft tokens whose keys / values the draft cache holds
        self._token_texts: list[str] | None = None  # the text of each draft token, built on first use
        self._healing_ids: dict[str, torch.Tensor] = {}  # text -> (M,) draft tokens starting with it
        self._reset([])

    def _reset(self, prompt_ids: list[int]) -> None:
        """Read the text of ``prompt_ids`` afresh (the draft cache is kept: the next ``propose``
        reuses the prefix it shares with the new draft tokens)."""
        self._target_ids: list[int] = list(prompt_ids)  # target tokens whose text is in _text
        self._text = self.target_tokenizer.decode(prompt_ids, skip_special_tokens=False)
        self._frozen: list[int] = []  # draft tokens of _text[:_frozen_chars], never re-encoded
        self._frozen_chars = 0
        self._tail: list[int] = []  # draft tokens of _text[_frozen_chars:]
        if prompt_ids:
            self._tail = self.draft_tokenizer.encode(self._text, add_special_tokens=True)
            self._freeze()

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self._reset(list(prompt_ids))
        self.cache.truncate(0)
        self._cached = []
        ids = self._draft_ids()
        if len(ids) > 1:
            self._feed(ids[:-1], 0, num_logits=0)
            self._cached = ids[:-1]

    # ----------------------------------------------------------------- committed text
    def _draft_ids(self) -> list[int]:
        return self._frozen + self._tail

    def _freeze(self) -> None:
        """Move the tail's first tokens into the frozen prefix once the tail is long (their text
        must decode to a prefix of the tail's text, else they stay in the tail)."""
        if len(self._tail) <= TAIL:
            return
        head = self._tail[: len(self._tail) - FREEZE_KEEP]
        text = self.draft_tokenizer.decode(head, skip_special_tokens=False)
        if self._text.startswith(text, self._frozen_chars):
            self._frozen += head
            self._frozen_chars += len(text)
            self._tail = self._tail[len(head) :]

    def _sync(self, token_ids: list[int]) -> None:
        """Bring the committed text and the draft's tokens of it up to ``token_ids``."""
        m = len(self._target_ids)
        if token_ids[:m] != self._target_ids:  # not an extension: start over from this text
            self._reset(token_ids)
            return
        if len(token_ids) == m:
            return
        start = max(0, m - WINDOW)
        added = appended_text(self.target_tokenizer, token_ids[start:m], token_ids[m:])
        if added is None:  # the new tokens complete a character cut before: read the text afresh
            self._reset(token_ids)
            return
        self._target_ids = list(token_ids)
        self._text += added
        tail_text = self._text[self._frozen_chars :]
        self._tail = self.draft_tokenizer.encode(tail_text, add_special_tokens=not self._frozen)
        self._freeze()

    # ----------------------------------------------------------------- drafting
    def _feed(self, token_ids: list[int], start: int, num_logits: int = 1) -> torch.Tensor:
        """Feed ``token_ids`` to the draft at positions ``start..``; the logits ``(num_logits, V)``
        of the last ones."""
        tokens = torch.tensor([token_ids], device=self.model.device)  # (1, T)
        end = start + tokens.shape[1]
        pos = torch.arange(start, end, device=tokens.device)  # (T,)
        logits = draft_pass(
            self.model, None, tokens, pos, self.cache, num_logits, kv_len=end
        )  # (num_logits, V)
        self.cache.truncate(end)
        return logits

    def _target_tokens(self, committed: list[int], text: str) -> list[int]:
        """Target tokens of ``text`` after the ``committed`` tokens: encoded behind the last
        :data:`WINDOW` of them, so that the boundary tokenises as the target would; where those
        would merge with the new text, ``text`` is encoded on its own."""
        window = committed[-WINDOW:]
        head = self.target_tokenizer.decode(window, skip_special_tokens=False)
        ids = self.target_tokenizer.encode(head + text, add_special_tokens=False)
        if ids[: len(window)] == window:
            return ids[len(window) :]
        return self.target_tokenizer.encode(text, add_special_tokens=False)

    def propose(self, ctx: DraftContext) -> DraftProposal:
        K = min(self.num_draft_tokens, ctx.max_draft_tokens)
        self._sync(ctx.token_ids)
        context = self._draft_ids()
        if (
            K <= 0
            or not context
            or self._text.endswith("\ufffd")  # the committed text ends inside a character
            or len(context) + self.max_draft_steps > self.cache.max_seq_len
        ):
            return empty_proposal(self.model.device)
        if not ctx.sampling.greedy:
            return self._propose_sampled(ctx, K, context)
        dropped = self._healed_text(context)
        base = context[:-1] if dropped else context  # token healing: the last token is redrafted
        keep = min(common_prefix(self._cached, base), len(base) - 1)
        self.cache.truncate(keep)
        logits = self._feed(base[keep:], keep)[-1]  # (V,)
        window = base[-WINDOW:]
        drafts: list[int] = []
        previous: list[int] = []  # target tokens of the text drafted one draft token earlier
        stable: list[int] = []
        for step in range(self.max_draft_steps):
            token = self._heal(logits, dropped) if step == 0 and dropped else int(logits.argmax(-1))
            if token in self.draft_eos:
                stable = previous  # the drafted text ends here: all of it is final
                break
            drafts.append(token)
            text = appended_text(self.draft_tokenizer, window, drafts)
            if text is not None and text.startswith(dropped) and not text.endswith("\ufffd"):
                current = self._target_tokens(ctx.token_ids, text[len(dropped) :])
                stable = current[: common_prefix(previous, current)]
                previous = current
            if len(stable) >= K or step == self.max_draft_steps - 1:
                break
            logits = self._feed([token], len(base) + step)[-1]
        self._cached = (base + drafts)[: self.cache.lengths[0]]
        return DraftProposal(torch.tensor(stable[:K], dtype=torch.long))

    # ----------------------------------------------------------------- sampling
    def _propose_sampled(self, ctx: DraftContext, K: int, context: list[int]) -> DraftProposal:
        """K drafts sampled from the draft's distribution over the tokens both vocabularies share
        (:mod:`specdec.drafters.token_intersection`): target tokens with their exact distributions."""
        shared = self._shared_tokens()
        keep = min(common_prefix(self._cached, context), len(context) - 1)
        self.cache.truncate(keep)
        logits = self._feed(context[keep:], keep)[-1]  # (V_d,)
        drafted: list[int] = []  # draft ids
        tokens: list[int] = []  # the same tokens' target ids
        probs: list[torch.Tensor] = []
        for i in range(K):
            draft_side, target_side = shared.restrict(logits, ctx.sampling)  # (V_d,), (V_t,)
            token = int(sample(draft_side, ctx.generator))
            drafted.append(token)
            tokens.append(shared.to_target[token])
            probs.append(target_side)
            if i < K - 1:
                logits = self._feed([token], len(context) + i)[-1]
        self._cached = (context + drafted)[: self.cache.lengths[0]]
        return DraftProposal(torch.tensor(tokens, dtype=torch.long), torch.stack(probs))  # (K,), (K, V_t)

    def _shared_tokens(self) -> TokenIntersection:
        """The tokens both vocabularies share, found on the first sampled request; a sampled
        request is refused where there are none."""
        if self._shared is None:
            self._shared = TokenIntersection(
                self.target_tokenizer,
                self.draft_tokenizer,
                self.target_vocab_size,
                self.model.config.vocab_size,
            )
        if not len(self._shared):
            raise GenerationError(
                "the draft model's vocabulary shares no token with the target's, so it cannot draft for "
                "sampling (token-level intersection); use temperature 0 (drafting through text)"
            )
        return self._shared

    # ----------------------------------------------------------------- token healing
    def _healed_text(self, context: list[int]) -> str:
        """The text of the draft's last committed token, which the draft redrafts (token healing,
        as in Microsoft's guidance): the committed text may end inside a token the draft would
        write (the target's ``" "`` before a digit, part of an indent), and a draft that reads
        such a cut token continues poorly. Only white space is redrafted: where the target cut
        a word, the draft's redrafted words were worse than its continuations (demo pair on
        SmolLM2). Empty where nothing is redrafted."""
        if len(context) < 2:
            return ""
        text = appended_text(self.draft_tokenizer, context[-1 - WINDOW : -1], context[-1:])
        return text if text and text.isspace() else ""

    def _heal(self, logits: torch.Tensor, dropped: str) -> int:
        """The draft's greedy token among those whose text starts with ``dropped``, given its
        ``logits`` ``(V,)`` (the last committed token itself is one of them)."""
        ids = self._healing_ids.get(dropped)
        if ids is None:
            if self._token_texts is None:
                decode = self.draft_tokenizer.decode
                self._token_texts = [decode([i], skip_special_tokens=False) for i in range(logits.shape[-1])]
            ids = torch.tensor([i for i, t in enumerate(self._token_texts) if t.startswith(dropped)])  # (M,)
            if len(self._healing_ids) >= HEALING_CACHE:
                self._healing_ids.clear()
            self._healing_ids[dropped] = ids
        return int(ids[logits[ids].argmax()])

    def on_verified(self, result: VerifyResult) -> None:
        """Nothing to roll back: the next ``propose`` keeps the longest prefix of the draft cache
        that the committed text still tokenises to."""


def cross_vocab_drafter(
    target: LoadedModel,
    draft: LoadedModel,
    num_draft_tokens: int,
    tree_width: int = 1,
    draft_vocab: int | None = None,
) -> CrossVocabDrafter:
    """The ``draft`` drafter for a draft model whose vocabulary differs from ``target``'s; the
    options that only a shared vocabulary supports are refused (:class:`ModelLoadError`)."""
    if tree_width != 1:
        raise ModelLoadError("a draft model with another tokenizer drafts a chain only (--tree-width 1)")
    if draft_vocab:
        raise ModelLoadError(
            "--draft-vocab ranks the target's tokens; a draft model with another tokenizer scores its own vocabulary"
        )
    return CrossVocabDrafter(target, draft, num_draft_tokens)
