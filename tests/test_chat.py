"""Chat: templates rendered as Hugging Face renders them, replies equal to plain decoding of the
rendered prompt, the end-of-turn token, and the two chat commands end to end."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from rich.color import ColorSystem
from rich.text import Text
from safetensors.torch import load_file, save_file
from tests.helpers import save_char_tokenizer, save_tiny_llama
from transformers import AutoTokenizer

from specdec import DraftModelDrafter, GenerationError, SpeculativeGenerator, load_model
from specdec.cli import main
from specdec.commands.chat import ReplyPrinter
from specdec.engine import StreamChunk
from specdec.engine.chat import DEFAULT_TEMPLATE_STOPS, chat_prompt, end_of_turn_ids, render_chat
from specdec.models.tokenizer import Tokenizer

# ChatML as SmolLM2 writes it, laid out over lines so that trim_blocks / lstrip_blocks matter,
# with a BOS token, loop.first, raise_exception and a filter.
CHATML = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('only system, user and assistant roles are supported') }}
    {% endif %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
SPECIALS = ["<s>", "<|im_start|>", "<|im_end|>"]  # ids 96, 97, 98 after the 96 characters
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  Name a prime.  "},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Another?"},
]


def save_chatml_tokenizer(folder: Path, template: str = CHATML) -> Path:
    """The character tokenizer plus ChatML's special tokens and a BOS its post-processor adds."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import processors

    save_char_tokenizer(folder)
    tok = FastTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<eos>",
        "chat_template": template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def demo_pair():  # type: ignore[no-untyped-def]
    return load_model("demo-target", dtype="float32"), load_model("demo-draft", dtype="float32")


# ----------------------------------------------------------------- rendering
def test_render_equals_transformers(chatml_folder: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(chatml_folder))
    ours = Tokenizer.from_folder(chatml_folder)
    for messages in (MESSAGES, MESSAGES[1:2]):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(messages, ours) == expected
        prompt = chat_prompt(messages, ours)
        expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected_ids = expected_ids["input_ids"] if not isinstance(expected_ids, list) else expected_ids
        assert prompt.token_ids == list(expected_ids)
        assert prompt.token_ids.count(hf.bos_token_id) == 1  # the template's BOS, not a second one
    assert render_chat(MESSAGES[1:2], ours).startswith("<s>\n<|im_start|>system\nYou are a helpful")


def test_plain_prompt_still_gets_the_tokenizers_bos(chatml_folder: Path) -> None:
    ours = Tokenizer.from_folder(chatml_folder)
    assert ours is not None
    ours.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no BOS of its own
    bos = ours.token_to_id("<s>")
    assert chat_prompt([{"role": "user", "content": "hi"}], ours).token_ids[0] == bos


def test_end_of_turn_token(chatml_folder: Path) -> None:
    ours = Tokenizer.from_folder(chatml_folder)
    assert ours is not None
    assert end_of_turn_ids(ours) == {ours.token_to_id("<|im_end|>")}
    demo = load_model("demo-target").tokenizer
    assert demo is not None and end_of_turn_ids(demo) == frozenset()  # its template ends turns with "\n"


def test_default_template_without_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_folder(save_char_tokenizer(tmp_path))
    prompt = chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tok)
    assert prompt.text == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"
    assert prompt.stop == DEFAULT_TEMPLATE_STOPS and prompt.stop_token_ids == frozenset()


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "messages is empty"),
        ("hello", "must be a list"),
        ([{"role": "robot", "content": "x"}], "has the role 'robot'"),
        ([{"role": "user"}], "content must be a string"),
        (["hi"], "must be an object"),
        ([{"role": "tool", "content": "x"}], "the chat template rejected the messages: only system"),
    ],
)
def test_bad_messages_give_one_line(chatml_folder: Path, messages, message: str) -> None:  # type: ignore[no-untyped-def]
    tok = Tokenizer.from_folder(chatml_folder)
    with pytest.raises(GenerationError, match=re.escape(message)) as info:
        chat_prompt(messages, tok)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- generation
def test_chat_greedy_equals_plain_generate_with_a_drafter(demo_pair) -> None:  # type: ignore[no-untyped-def]
    target, draft = demo_pair
    gen = SpeculativeGenerator(target, DraftModelDrafter(draft, 4))
    plain = SpeculativeGenerator(target)
    messages = [{"role": "system", "content": "a stack"}, {"role": "user", "content": "class Stack:"}]
    out = gen.chat(messages, max_new_tokens=48)
    ref = plain.generate(chat_prompt(messages, target.tokenizer).token_ids, max_new_tokens=48)
    assert out.token_ids == ref.token_ids and out.text == ref.text
    assert len(out.token_ids) == 48 and out.stats.accepted_tokens > 0
    streamed = list(gen.chat_stream(messages, max_new_tokens=48))
    assert sum((c.token_ids for c in streamed), []) == ref.token_ids
    assert "".join(c.text for c in streamed) == ref.text


def test_chat_stops_at_the_end_of_turn_token(tmp_path: Path) -> None:
    """A tiny ChatML model whose ``<|im_end|>`` row is twice the row of a token greedy decoding
    picks early: greedy decoding says ``<|im_end|>`` there, and the reply ends right before."""
    folder = save_chatml_tokenizer(tmp_path)
    save_tiny_llama(folder, vocab_size=96 + len(SPECIALS), eos_token_id=0)
    messages = [{"role": "user", "content": "Hi there"}]
    prompt_ids = chat_prompt(messages, Tokenizer.from_folder(folder)).token_ids
    free = SpeculativeGenerator(load_model(folder, dtype="float32")).generate(
        prompt_ids, max_new_tokens=8, ignore_eos=True
    )
    im_end = 98
    weights = load_file(folder / "model.safetensors")
    lm_head = weights["lm_head.weight"]  # (V, D)
    lm_head[im_end] = 2 * lm_head[free.token_ids[2]]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    target = load_model(folder, dtype="float32")
    ref = SpeculativeGenerator(target).generate(prompt_ids, max_new_tokens=20, ignore_eos=True)
    assert im_end in ref.token_ids
    cut = ref.token_ids.index(im_end)
    assert 0 not in ref.token_ids[:cut]  # the model's own EOS comes later, if at all
    gen = SpeculativeGenerator(target, DraftModelDrafter(target, 3))
    out = gen.chat(messages, max_new_tokens=20)
    assert out.token_ids == ref.token_ids[:cut] and out.finish_reason == "eos"
    # Plain generation of the same ids does not know the template and runs on.
    assert len(gen.generate(prompt_ids, max_new_tokens=20).token_ids) > cut


# ----------------------------------------------------------------- the terminal
def test_reply_printer_colours_by_kind(demo_pair) -> None:  # type: ignore[no-untyped-def]
    tok = demo_pair[0].tokenizer
    ids = tok.encode("def add(a, b):\n\treturn a + b")
    kinds = [("accepted", "recovered", "bonus", "target")[i % 4] for i in range(len(ids))]
    buffer = io.StringIO()
    printer = ReplyPrinter(buffer, tok, ColorSystem.STANDARD)
    for i in range(0, len(ids), 3):
        chunk_ids = ids[i : i + 3]
        text = tok.decode(ids[: i + 3])[len(tok.decode(ids[:i])) :]
        printer.add(StreamChunk(chunk_ids, text, kinds[i : i + 3]))
    shown = Text.from_ansi(buffer.getvalue())
    assert shown.plain == tok.decode(ids)  # the tab survives
    colour = {"accepted": 2, "recovered": 3, "bonus": 6}  # green, yellow, cyan
    at = 0
    for token_id, kind in zip(ids, kinds, strict=True):
        piece = tok.decode([token_id])
        styles = [s.style for s in shown.spans if s.start <= at < s.end]
        if kind == "target":
            assert styles == []
        else:
            assert len(styles) == 1 and styles[0].color.number == colour[kind]  # type: ignore[union-attr]
        at += len(piece)
    plain = io.StringIO()
    ReplyPrinter(plain, tok, None).add(StreamChunk(ids, tok.decode(ids), kinds))
    assert plain.getvalue() == tok.decode(ids)


def run_cli(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


MODEL_ARGS = ["--dtype", "float32", "--threads", "1", "--max-new-tokens", "12"]


def test_generate_chat_end_to_end(demo_pair, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    target = demo_pair[0]
    messages = [{"role": "system", "content": "sorting"}, {"role": "user", "content": "def sort(xs):"}]
    expected = SpeculativeGenerator(target).chat(messages, max_new_tokens=12)
    argv = ["generate", "--chat", "def sort(xs):", "--system", "sorting", "--json", *MODEL_ARGS]
    code, out, _ = run_cli(argv, "", monkeypatch, capsys)
    assert code == 0 and json.loads(out)["token_ids"] == expected.token_ids
    code, out, err = run_cli(
        ["generate", "--chat", "def sort(xs):", "--system", "sorting", *MODEL_ARGS], "", monkeypatch, capsys
    )
    assert code == 0 and out == expected.text + "\n" and "acceptance" in err
    code, _, err = run_cli(["generate", "hi", "--system", "x", *MODEL_ARGS], "", monkeypatch, capsys)
    assert code == 2 and err == "specdec: error: --system needs --chat\n"


def test_chat_command_with_piped_stdin(demo_pair, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    plain = SpeculativeGenerator(demo_pair[0])
    first = plain.chat([{"role": "user", "content": "def fib(n):"}], max_new_tokens=12).text
    second = plain.chat(
        [
            {"role": "user", "content": "def fib(n):"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "class Stack:"},
        ],
        max_new_tokens=12,
    ).text
    after_reset = plain.chat([{"role": "user", "content": "import os"}], max_new_tokens=12).text
    stdin = "def fib(n):\n\nclass Stack:\n/reset\nimport os\n/exit\nnot read\n"
    code, out, err = run_cli(["chat", "--drafter", "draft", *MODEL_ARGS], stdin, monkeypatch, capsys)
    assert code == 0
    assert out == f"{first}\n{second}\n{after_reset}\n"  # no colour codes in a pipe
    stats = re.findall(r"12 tokens · [\d.]+ tok/s · mean accepted length ([\d.]+) · acceptance (\d+)%", err)
    assert len(stats) == 3 and all(float(tau) >= 1.0 for tau, _ in stats)
    assert "(conversation forgotten)" in err and "accepted draft" in err
    # Ctrl-D (end of input) ends the session too; --system opens the conversation.
    code, out, _ = run_cli(
        ["chat", "--drafter", "none", "--system", "sorting", *MODEL_ARGS],
        "def sort(xs):\n",
        monkeypatch,
        capsys,
    )
    with_system = [{"role": "system", "content": "sorting"}, {"role": "user", "content": "def sort(xs):"}]
    assert code == 0 and out == plain.chat(with_system, max_new_tokens=12).text + "\n"


def test_chat_command_reports_an_overlong_turn_and_goes_on(demo_pair, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    too_long = "x = 1 " * 2000
    code, out, err = run_cli(["chat", *MODEL_ARGS], f"{too_long}\ndef f():\n", monkeypatch, capsys)
    assert code == 0
    assert re.search(r"specdec: error: the prompt has \d+ tokens; the model's context is \d+ tokens", err)
    expected = SpeculativeGenerator(demo_pair[0]).chat(
        [{"role": "user", "content": "def f():"}], max_new_tokens=12
    )
    assert out == expected.text + "\n" and err.count("tok/s") == 1
