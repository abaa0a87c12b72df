"""Where the trained drafter files of a target live.

A target folder keeps its heads inside it (``<folder>/<method>/``). A GGUF file keeps them
beside it (``<dir>/<file stem>.<method>/``). Models whose drafters ship with specdec have them
under ``specdec/assets/<name>/<method>/``: :data:`SHIPPED` maps the file stem (up to its first
dot, so every quantization of the model matches) to that name; the head's own ``config.json``
then checks the sizes when it loads.

A target may also rank its drafters for ``auto`` by measurement: ``auto.json`` in its folder
(beside a GGUF file ``<dir>/<file stem>.auto.json``, or shipped), ``{"order": [names],
"measured": "how"}`` (:func:`auto_ranking`).
"""

from __future__ import annotations

import json
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


def auto_ranking_file(target: LoadedModel) -> Path | None:
    """``target``'s ``auto.json``: in its folder, beside its GGUF file, else shipped; None if none."""
    path = Path(target.path)
    own = path / "auto.json" if path.is_dir() else path.parent / f"{path.stem}.auto.json"
    if own.is_file():
        return own
    shipped = SHIPPED.get(path.name.split(".")[0])
    if shipped is not None and (ASSETS / shipped / "auto.json").is_file():
        return ASSETS / shipped / "auto.json"
    return None


def auto_ranking(target: LoadedModel, known: tuple[str, ...]) -> list[str] | None:
    """The drafter names of ``target``'s ``auto.json``, best first (None where it has none);
    ValueError for a file that is not ``{"order": [names in known], ...}``."""
    file = auto_ranking_file(target)
    if file is None:
        return None
    try:
        order = json.loads(file.read_text())["order"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f'{file}: not a drafter ranking ({{"order": [names]}}): {err}') from None
    if not isinstance(order, list) or not order or any(name not in known for name in order):
        raise ValueError(f'{file}: "order" must list drafter names among {", ".join(known)}')
    return order
