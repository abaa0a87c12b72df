"""Build a drafter from its CLI / config name. One entry per drafter file.

``make_drafter(name, target, draft=..., num_draft_tokens=4, ...)`` is the one way the library,
the CLI, the benchmark and the server build drafters. ``auto`` picks the best drafter available
for the target:

* where the target ranks its drafters by measurement (an ``auto.json``: ``{"order": [names],
  "measured": "how"}`` in its folder, beside its GGUF file, or shipped; :mod:`.locate`), the
  first of them that can be built (its trained heads or draft model are there);
* else, in this order, trained heads beside the target (``eagle``, ``early-exit``, ``medusa``:
  they draft from the target's own features), a draft model beside it (``<target>/draft``,
  what ``specdec train draft`` writes), prompt lookup (``ngram``: needs nothing, never refuses);
* a draft model named with ``draft=`` (``--draft``) is always the one run: ``auto`` then picks
  the best-ranked drafter that runs a draft model (``draft`` without a ranking; one with
  another tokenizer drafts through text), and where it cannot draft for the target an error
  says why.

Drafters that run a draft model use the target's own draft model where none is named (beside
it, or shipped for it), else :data:`DEFAULT_DRAFT`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from specdec.drafters.base import Drafter
from specdec.models.config import ModelLoadError
from specdec.models.loading import LoadedModel, check_compatible, load_model

if TYPE_CHECKING:
    from specdec.drafters.vocab import DraftVocab


DEFAULT_DRAFT = "demo-draft"  # the shipped code draft: drafts for demo-target


@dataclass(frozen=True)
class DrafterSpec:
    """What a drafter may be built from: the loaded target, a draft folder, K, dtype."""

    target: LoadedModel
    draft: str | None = None  # the draft model (name, GGUF file or folder); None: not named
    num_draft_tokens: int = 4
    dtype: str = "auto"
    heads: str | None = None  # trained heads folder (early-exit / medusa / eagle); default <target>/<method>
    tree_width: int = 1  # draft / ngram / staged / medusa / eagle: siblings per tree node (1 = a chain)
    max_tree_nodes: int | None = (
        None  # draft / ngram / medusa / eagle: tree node budget (default K * tree_width)
    )
    draft_vocab: int | None = None  # all but ngram: tokens scored (None: default, 0: all)


def _draft_name(spec: DrafterSpec) -> str:
    """The draft model a drafter runs: the one named, else the target's own (beside it or
    shipped for it, :func:`_draft_beside`), else :data:`DEFAULT_DRAFT`."""
    return spec.draft or _draft_beside(spec) or DEFAULT_DRAFT


def _load_draft(spec: DrafterSpec, draft: LoadedModel | None = None) -> tuple[LoadedModel, DraftVocab | None]:
    """The draft model (``draft`` if already loaded) and the draft vocabulary it scores (the
    target's ranking, its own rows)."""
    from specdec.drafters.vocab import resolve_draft_vocab

    if draft is None:
        draft = load_model(
            _draft_name(spec),
            dtype=spec.dtype,
            device=str(spec.target.device),
            embeddings_from=spec.target,
        )
    check_compatible(spec.target, draft)  # (the draft vocabulary's ids are the target's)
    return draft, resolve_draft_vocab(spec.target, spec.draft_vocab, scorer=draft)


def _draft_model(spec: DrafterSpec, draft: LoadedModel | None = None) -> Drafter:
    from specdec.drafters.draft_model import DraftModelDrafter

    draft, vocab = _load_draft(spec, draft)
    return DraftModelDrafter(draft, spec.num_draft_tokens, spec.tree_width, spec.max_tree_nodes, vocab)


def _draft_any_vocab(spec: DrafterSpec) -> Drafter:
    """``draft``: a draft model; one with another tokenizer than the target's drafts through
    text (:mod:`specdec.drafters.cross_vocab`; the other drafters need the target's vocabulary)."""
    from specdec.drafters.cross_vocab import cross_vocab_drafter

    draft = load_model(
        _draft_name(spec),
        dtype=spec.dtype,
        device=str(spec.target.device),
        embeddings_from=spec.target,
    )
    try:
        check_compatible(spec.target, draft)
    except ModelLoadError:
        return cross_vocab_drafter(
            spec.target, draft, spec.num_draft_tokens, spec.tree_width, spec.draft_vocab
        )
    return _draft_model(spec, draft)


def _ngram(spec: DrafterSpec) -> Drafter:
    from specdec.drafters.ngram import NgramDrafter

    return NgramDrafter(
        spec.num_draft_tokens, num_branches=spec.tree_width, max_tree_nodes=spec.max_tree_nodes
    )


def _staged(spec: DrafterSpec) -> Drafter:
    from specdec.drafters.staged import StagedDrafter

    draft, vocab = _load_draft(spec)
    return StagedDrafter(draft, spec.num_draft_tokens, tree_width=spec.tree_width, draft_vocab=vocab)


def _adaptive(spec: DrafterSpec) -> Drafter:
    from specdec.drafters.adaptive import AdaptiveDrafter

    return AdaptiveDrafter(_draft_model(spec), max_draft_tokens=2 * spec.num_draft_tokens)


def _hybrid(spec: DrafterSpec) -> Drafter:
    from specdec.drafters.hybrid import HybridDrafter

    return HybridDrafter(_draft_model(spec))


def _heads(spec: DrafterSpec, method: str) -> str:
    """The heads folder: ``spec.heads``, else beside the target or shipped for it (:mod:`.locate`)."""
    from specdec.drafters.locate import heads_folder

    return spec.heads if spec.heads is not None else str(heads_folder(spec.target, method))


def _early_exit(spec: DrafterSpec) -> Drafter:
    from specdec.drafters.early_exit import EarlyExitDrafter

    return EarlyExitDrafter(spec.target, _heads(spec, "early-exit"), spec.num_draft_tokens, spec.draft_vocab)


def _medusa(spec: DrafterSpec) -> Drafter:
    from specdec.drafters.medusa import MedusaDrafter

    spec = replace(spec, heads=_heads(spec, "medusa"))

    return MedusaDrafter(
        spec.target, spec.heads, spec.num_draft_tokens, spec.tree_width, spec.max_tree_nodes, spec.draft_vocab
    )


def _eagle(spec: DrafterSpec) -> Drafter:
    from specdec.drafters.eagle import EagleDrafter

    spec = replace(spec, heads=_heads(spec, "eagle"))

    return EagleDrafter(
        spec.target, spec.heads, spec.num_draft_tokens, spec.tree_width, spec.max_tree_nodes, spec.draft_vocab
    )


HEAD_METHODS = ("eagle", "early-exit", "medusa")  # drafters that run trained heads
MODEL_DRAFTERS = ("draft", "hybrid", "adaptive", "staged")  # drafters that run a draft model
AUTO_ORDER = (*HEAD_METHODS, "draft", "ngram")  # auto's order where the target ranks none


def _draft_beside(spec: DrafterSpec) -> str | None:
    """The draft model folder beside the target (``specdec train draft``'s), if there is one."""
    folder = Path(_heads(spec, "draft"))
    return str(folder) if (folder / "config.json").is_file() else None


def _auto_candidate(spec: DrafterSpec, name: str) -> Drafter | None:
    """``name`` built for ``auto``, or None where what it runs (heads, a draft model) is not there."""
    if name in HEAD_METHODS:
        folder = _heads(spec, name)
        if not (Path(folder) / "config.json").is_file():
            return None
        try:
            return DRAFTERS[name](replace(spec, heads=str(folder)))
        except ModelLoadError:  # heads for another method or another target: look further
            return None
    if name not in MODEL_DRAFTERS:
        return DRAFTERS[name](spec)
    draft = spec.draft or _draft_beside(spec)
    if draft is None:
        return None
    return (
        _draft_any_vocab(replace(spec, draft=draft))
        if name == "draft"
        else DRAFTERS[name](replace(spec, draft=draft))
    )


def _auto(spec: DrafterSpec) -> Drafter:
    """The best drafter available for ``spec.target`` (the module docstring's rule)."""
    from specdec.drafters.locate import auto_ranking

    try:
        order = auto_ranking(spec.target, tuple(name for name in DRAFTERS if name != "auto")) or list(
            AUTO_ORDER
        )
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    if spec.draft is not None:  # a named draft is always run
        order = [name for name in order if name in MODEL_DRAFTERS] or ["draft"]
    for name in order:
        drafter = _auto_candidate(spec, name)
        if drafter is not None:
            return drafter
    return _ngram(spec)


DRAFTERS: dict[str, Callable[[DrafterSpec], Drafter]] = {
    "auto": _auto,
    "draft": _draft_any_vocab,
    "adaptive": _adaptive,
    "hybrid": _hybrid,
    "early-exit": _early_exit,
    "medusa": _medusa,
    "eagle": _eagle,
    "ngram": _ngram,
    "staged": _staged,
}


def make_drafter(
    name: str,
    target: LoadedModel | DrafterSpec,
    *,
    draft: str | None = None,
    num_draft_tokens: int = 4,
    dtype: str = "auto",
    heads: str | None = None,
    tree_width: int = 1,
    max_tree_nodes: int | None = None,
    draft_vocab: int | None = None,
) -> Drafter | None:
    """The drafter ``name`` (``auto``, ``draft``, ``ngram``, ... : :data:`DRAFTERS`) for ``target``.

    ``draft``: the draft model (a name, GGUF file or folder; default :func:`_draft_name`'s) of the
    drafters that run one; the other keywords as in :class:`DrafterSpec`, which may also be
    passed whole instead of ``target``. ``none`` gives None (plain decoding); unknown names
    and bad shapes raise ValueError, a draft that cannot be loaded ModelLoadError.
    """
    if name == "none":
        return None
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; choose none, {', '.join(DRAFTERS)}")
    if isinstance(target, DrafterSpec):
        spec = target
    else:
        spec = DrafterSpec(
            target,
            draft,
            num_draft_tokens,
            dtype,
            heads,
            tree_width,
            max_tree_nodes,
            draft_vocab,
        )
    return DRAFTERS[name](spec)
