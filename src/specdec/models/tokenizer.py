"""A thin tokenizer wrapper: Hugging Face ``tokenizers`` for ``tokenizer.json`` folders,
``transformers.AutoTokenizer`` for anything else (e.g. SentencePiece-only folders)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


class Tokenizer:
    """``encode`` / ``decode`` plus the few special-token facts the engine needs."""

    def __init__(self, backend: Any, config: dict[str, Any], fast: bool) -> None:
        self._backend = backend
        self._fast = fast  # True: a `tokenizers.Tokenizer`; False: a transformers tokenizer
        self.chat_template: str | None = config.get("chat_template")
        self.eos_token: str | None = _token_text(config.get("eos_token"))
        self.bos_token: str | None = _token_text(config.get("bos_token"))

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer | None:
        cfg_path = folder / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as FastTokenizer

            return cls(FastTokenizer.from_file(str(folder / "tokenizer.json")), config, True)
        if (folder / "tokenizer.model").is_file() or cfg_path.is_file():
            try:
                from transformers import AutoTokenizer
            except ImportError:
                from specdec.models.config import ModelLoadError

                raise ModelLoadError(
                    f"{folder} has no tokenizer.json; reading its tokenizer needs transformers "
                    "(pip install transformers sentencepiece)"
                ) from None
            return cls(AutoTokenizer.from_pretrained(str(folder)), config, False)
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._fast:
            return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        if self._fast:
            return self._backend.token_to_id(token)  # type: ignore[no-any-return]
        tid = self._backend.convert_tokens_to_ids(token)
        return None if tid == self._backend.unk_token_id else int(tid)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    def vocab(self) -> dict[str, int]:
        return dict(self._backend.get_vocab())

    def save(self, folder: Path) -> None:
        """Write this tokenizer into ``folder`` so that :meth:`from_folder` reads it back (a GGUF
        file's tokenizer, for a model folder trained from it): ``tokenizer.json`` and a
        ``tokenizer_config.json`` with the chat template and special tokens."""
        folder.mkdir(parents=True, exist_ok=True)
        if not self._fast:
            self._backend.save_pretrained(str(folder))
            return
        self._backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def fingerprint(self) -> str:
        """A hash of the token -> id map: equal fingerprints mean interchangeable token ids."""
        items = sorted(self.vocab().items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):  # {"content": "</s>", ...} in older tokenizer_config files
        return tok.get("content")
    return tok
