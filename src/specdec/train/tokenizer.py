"""Byte-level BPE tokenizer for Python source (Sennrich et al. 2016; GPT-2's byte-level
variant, Radford et al. 2019), trained with Hugging Face ``tokenizers``.

Every byte is in the base alphabet and no normaliser or prefix space is applied, so
``decode(encode(s)) == s`` for any string: tabs, CRLF, trailing spaces and non-ASCII text
included. ``<|endoftext|>`` is the only special token; it ends (and separates) documents.

A saved folder holds ``tokenizer.json`` and a ``tokenizer_config.json`` that
``transformers.AutoTokenizer`` reads (``PreTrainedTokenizerFast``), with a small chat template
(see :data:`CHAT_TEMPLATE`) so a server can turn chat messages into a prompt.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# The models are code completers, not chat models: a chat becomes one Python document.
# System messages turn into `# ` comment lines; user and assistant contents are joined as
# they are, each ended by a newline; the generation prompt adds nothing (the model continues).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '# ' + message['content'] | replace('\\n', '\\n# ') + '\\n' }}"
    "{% else %}"
    "{{ message['content'] }}{% if not message['content'].endswith('\\n') %}{{ '\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
)


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer: no normaliser, no prefix space, exact decode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Learn BPE merges on ``texts``; ids 0..255 are bytes' symbols, then ``<|endoftext|>``."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_config(model_max_length: int) -> dict[str, object]:
    """The ``tokenizer_config.json`` that ``AutoTokenizer`` and specdec read."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tok: Tokenizer, folder: Path, model_max_length: int = 2048) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = tokenizer_config(model_max_length)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder} (train one with 'specdec train tokenizer')")
    return Tokenizer.from_file(str(path))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of ``src`` into the model folder ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)


def eos_id(tok: Tokenizer) -> int:
    token_id = tok.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token")
    return int(token_id)
