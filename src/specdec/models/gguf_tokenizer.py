"""Tokenizers rebuilt from GGUF metadata (``tokenizer.ggml.*``) as Hugging Face ``tokenizers``.

Two models load:

* ``gpt2``: byte-level BPE (SmolLM, Llama 3, Qwen2, ...). Vocabulary and merges come from the
  file; the pre-tokenizer is chosen by ``tokenizer.ggml.pre``, the regexes llama.cpp splits text
  with before merging (a name we do not know is refused: a wrong split gives other token ids).
* ``llama``: SentencePiece BPE (Llama 1-2, Mistral). The file keeps token scores instead of
  merges; the merges are the pairs of pieces whose concatenation is a piece, best score first,
  with byte fallback for characters outside the vocabulary.

Token types follow llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
Control tokens become special added tokens (never split, skipped when decoding), user-defined
tokens plain added tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as FastTokenizer
from tokenizers.models import BPE

from specdec.models.config import ModelLoadError
from specdec.models.tokenizer import Tokenizer

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(
    *splits: pre_tokenizers.PreTokenizer, gpt2_regex: bool = False
) -> pre_tokenizers.PreTokenizer:
    """``splits``, then bytes spelled in GPT-2's byte alphabet (after GPT-2's own regex split
    where ``gpt2_regex``)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
    return pre_tokenizers.Sequence([*splits, byte_level])


def _regex(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies (its llama-vocab.cpp regex lists)
_GPT2_STYLE = _byte_level(gpt2_regex=True)
_DIGITS_THEN_GPT2 = _byte_level(pre_tokenizers.Digits(individual_digits=True), gpt2_regex=True)
PRE_TOKENIZERS: dict[str, pre_tokenizers.PreTokenizer] = {
    "default": _GPT2_STYLE,
    "gpt2": _GPT2_STYLE,
    "gpt-2": _GPT2_STYLE,
    "mpt": _GPT2_STYLE,
    "olmo": _GPT2_STYLE,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "llama-bpe": _byte_level(_regex(_LLAMA3_SPLIT)),
    "llama3": _byte_level(_regex(_LLAMA3_SPLIT)),
    "smaug-bpe": _byte_level(_regex(_LLAMA3_SPLIT)),
    "qwen2": _byte_level(_regex(_QWEN2_SPLIT)),
}
IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe"}  # whole words in the vocabulary win, as in llama.cpp


def _gpt2_model(meta: dict[str, Any], vocab: dict[str, int]) -> tuple[BPE, pre_tokenizers.PreTokenizer]:
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise ModelLoadError(f"unsupported GGUF pre-tokenizer {pre!r}; specdec knows {known}")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    model = BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORE_MERGES)
    return model, PRE_TOKENIZERS[pre]


def spm_merges(vocab: dict[str, int], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a scored vocabulary: every split of a normal piece into
    two pieces of the vocabulary, ordered by the merged piece's score (best first), then by the ids
    of the left and right pieces."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, idx in vocab.items():
        if types and types[idx] != 1:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[idx], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_model(meta: dict[str, Any], vocab: dict[str, int], tokens: list[str]) -> BPE:
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))]
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [])]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    return BPE(
        vocab=vocab, merges=spm_merges(vocab, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True
    )


def _special(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None


def _post_processor(
    meta: dict[str, Any], tokens: list[str], bos_default: bool
) -> processors.PostProcessor | None:
    """A template that adds BOS (and EOS) where the file asks for it."""
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = _special(meta, tokens, "bos"), _special(meta, tokens, "eos")
    first = [bos] if add_bos and bos is not None else []
    last = [eos] if add_eos and eos is not None else []
    if not first and not last:
        return None
    ids = {t: tokens.index(t) for t in first + last}
    single = " ".join([*first, "$A", *last])
    pair = " ".join([*first, "$A", *last, *first, "$B", *last])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))


def tokenizer_from_metadata(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF file describes (``meta``: its key -> value fields), wrapped in
    specdec's :class:`Tokenizer` with the chat template and BOS / EOS strings; one-line
    :class:`ModelLoadError` for a tokenizer model we cannot rebuild."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = [str(t) for t in meta.get("tokenizer.ggml.tokens", [])]
    if not tokens:
        raise ModelLoadError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    vocab: dict[str, int] = {}
    for idx, token in enumerate(tokens):
        vocab.setdefault(token, idx)  # a repeated token keeps its first id, as llama.cpp does
    builders: dict[str, Callable[[], FastTokenizer]] = {
        "gpt2": lambda: _build_gpt2(meta, vocab),
        "llama": lambda: _build_spm(meta, vocab, tokens),
    }
    if kind not in builders:
        raise ModelLoadError(
            f"unsupported GGUF tokenizer model {kind!r}; specdec reads gpt2 (BPE) and llama (SentencePiece)"
        )
    backend = builders[str(kind)]()
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [])]
    control = [t for t, k in zip(tokens, types, strict=False) if k == CONTROL]
    user = [t for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    post = _post_processor(meta, tokens, bos_default=kind == "llama")
    if post is not None:
        backend.post_processor = post
    config = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "eos_token": _special(meta, tokens, "eos"),
        "bos_token": _special(meta, tokens, "bos"),
    }
    return Tokenizer(backend, config, True)


def _build_gpt2(meta: dict[str, Any], vocab: dict[str, int]) -> FastTokenizer:
    model, pre = _gpt2_model(meta, vocab)
    backend = FastTokenizer(model)
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    if meta.get("tokenizer.ggml.pre") == "qwen2":
        backend.normalizer = normalizers.NFC()
    return backend


def _build_spm(meta: dict[str, Any], vocab: dict[str, int], tokens: list[str]) -> FastTokenizer:
    backend = FastTokenizer(_spm_model(meta, vocab, tokens))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "\u2581")]
    if bool(meta.get("tokenizer.ggml.add_space_prefix", True)):
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(" ", 1, 0)] if bool(meta.get("tokenizer.ggml.add_space_prefix", True)) else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return backend
