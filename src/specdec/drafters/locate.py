"""Where the trained drafter files of a target live.

A target folder keeps its heads inside it (``<folder>/<method>/``). A GGUF file keeps them
beside it (``<dir>/<file stem>.<method>/``). Models whose drafters ship with specdec have them
under ``specdec/assets/<name>/<method>/``: :data:`SHIPPED` maps the file stem (up to its first
dot, so every quantization of the model matches) to that name; the head's own ``config.json``
then checks the sizes when it loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specdec.models.loading import LoadedModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"SmolLM2-135M-Instruct": "smollm2"}


def heads_folder(target: LoadedModel, method: str, for_writing: bool = False) -> Path:
    """The folder of ``target``'s ``method`` drafter: beside the target if one is there (or
    ``for_writing``), else the shipped one if specdec has one for this model, else where
    it would be beside the target."""
    path = Path(target.path)
    own = path / method if path.is_dir() else path.parent / f"{path.stem}.{method}"
    if for_writing or (own / "config.json").is_file():
        return own
    shipped = SHIPPED.get(path.name.split(".")[0])
    if shipped is not None and (ASSETS / shipped / method / "config.json").is_file():
        return ASSETS / shipped / method
    return own


def draft_vocab_folder(target: LoadedModel) -> Path:
    """The folder of ``target``'s ``draft_vocab.json`` (:mod:`specdec.drafters.vocab`): the target
    folder itself; beside a GGUF file ``<dir>/<file stem>.draft-vocab/`` if it is there, else the
    shipped one if specdec has one for this model."""
    path = Path(target.path)
    if path.is_dir():
        return path
    own = path.parent / f"{path.stem}.draft-vocab"
    shipped = SHIPPED.get(path.name.split(".")[0])
    if not (own / "draft_vocab.json").is_file() and shipped is not None:
        if (ASSETS / shipped / "draft_vocab.json").is_file():
            return ASSETS / shipped
    return own
