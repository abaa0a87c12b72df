"""Shared test helpers: tiny random Llama-family checkpoints saved in Hugging Face format."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.models import LoadedModel, load_model


def save_tiny_llama(
    folder: Path,
    vocab_size: int = 96,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    init_std: float = 0.02,
    max_position_embeddings: int = 256,
    eos_token_id: int | None = None,
    base: Path | None = None,
    noise: float = 0.0,
) -> Path:
    """Save a random tiny Llama to ``folder``. With ``base``, copy that model's weights and add
    Gaussian ``noise`` (a draft that agrees with the base most of the time)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    if base is not None:
        ref = LlamaForCausalLM.from_pretrained(base)
        state = {k: v + noise * torch.randn_like(v) * v.std() for k, v in ref.state_dict().items()}
        model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder


CHARS = ["<eos>", "\n"] + [chr(c) for c in range(32, 126)]  # 96 symbols; "~" left out


def save_char_tokenizer(folder: Path) -> Path:
    """A character-level tokenizer over 96 symbols (id 0 = ``<eos>``) for the tiny models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<eos>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}
    (folder / "tokenizer_config.json").write_text(__import__("json").dumps(config))
    return folder


def accept_every_draft(draft_tokens, draft_probs, target_probs, generator=None):  # type: ignore[no-untyped-def]
    """A lossy stand-in for ``verify_rejection`` (negative controls): accepts every draft and
    samples the bonus token from the target, so the output follows the draft's distribution."""
    from specdec.verify.chain import VerifyResult

    k = draft_tokens.shape[0]
    bonus = int(torch.multinomial(target_probs[k], 1, generator=generator))
    return VerifyResult(draft_tokens.tolist() + [bonus], k, k, True, tuple(range(k)))


def needs_kernels() -> None:
    """Skip a test of the CPU kernels where they cannot be built, except under CI, which builds
    them: there a missing build fails the test instead of skipping it."""
    import os

    import pytest

    from specdec import kernels

    if kernels.load() is None:
        assert not os.environ.get("CI"), kernels.status()
        pytest.skip(kernels.status())


def random_head(method: str, target, seed: int, **settings):  # type: ignore[no-untyped-def]
    """A drafter head (``medusa``, ``eagle``, ``early-exit``) for ``target`` with random (not
    zero) weights, so that its drafts are sometimes right, often wrong."""
    from specdec.drafters.heads import new_head

    torch.manual_seed(seed)
    head = new_head(method, target.config, **settings)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    return head.eval().requires_grad_(False)


def small_vocab_trio(folder: Path) -> dict[str, LoadedModel]:
    """An 8-token target, a draft close to it (``near``) and an unrelated one (``far``), float32:
    vocabularies small enough to enumerate exact distributions."""
    target = save_tiny_llama(folder / "t", vocab_size=8, hidden_size=32, init_std=0.6, seed=3)
    near = save_tiny_llama(folder / "near", vocab_size=8, hidden_size=32, base=target, noise=0.2, seed=4)
    far = save_tiny_llama(folder / "far", vocab_size=8, hidden_size=32, num_layers=1, init_std=0.6, seed=5)
    return {name: load_model(p, dtype="float32") for name, p in [("target", target), ("near", near), ("far", far)]}


def write_tiny_data(target: LoadedModel, folder: Path) -> Path:
    """``specdec train data`` for ``target`` on ten one-turn prompts (eight training
    conversations, two validation), written to ``folder``."""
    import pytest

    from specdec.train import data as data_module
    from specdec.train.data import DataConfig, build_data
    from specdec.train.prompts import Prompt

    words = ["cat", "dog", "sun", "tea", "map", "box"]

    def prompts(count: int, seed: int = 0) -> list[Prompt]:
        return [
            Prompt(
                f"{i:016x}",
                "answer",
                "test",
                (f"Say {words[i % 6]} {words[(i * 5) % 6]}.",),
                "validation" if i % 5 == 0 else "train",
            )
            for i in range(count)
        ]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_module, "build_prompts", prompts)
        cfg = DataConfig(num_prompts=10, max_new_tokens=40, batch_size=5, sampled_percent=30)
        list(build_data(target, folder, cfg, progress=False))
    return folder
