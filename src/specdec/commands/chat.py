"""``specdec chat``: an interactive conversation with the target, sped up by the drafter.

Each reply streams as it is verified, coloured by where its tokens came from: **accepted** draft
tokens, the **recovered** token a rejection resamples, the **bonus** token after a fully accepted
draft, and plain target tokens. After each turn one line gives the speed and acceptance.
The reply goes to stdout, everything else (banner, stats) to stderr, so that
``printf 'q1\\nq2\\n' | specdec chat > replies.txt`` keeps only the replies.

At the prompt: ``/reset`` forgets the conversation (the ``--system`` message stays), ``/exit``
or Ctrl-D ends it; Ctrl-C during a reply stops that reply.
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, TextIO

from rich.color import ColorSystem
from rich.console import Console
from rich.style import Style
from rich.text import Text

from specdec.commands.common import (
    add_model_arguments,
    add_sampling_arguments,
    build_generator,
    check_sampling_arguments,
)
from specdec.engine import GenerationError, SpecStats, SpeculativeGenerator, StreamChunk
from specdec.models.tokenizer import Tokenizer

STYLES = {"accepted": "green", "recovered": "yellow", "bonus": "bold cyan", "target": ""}
LEGEND = (
    ("accepted", "accepted draft"),
    ("recovered", "recovered"),
    ("bonus", "bonus"),
    ("target", "target"),
)
COLOR_SYSTEMS = {
    "standard": ColorSystem.STANDARD,
    "256": ColorSystem.EIGHT_BIT,
    "truecolor": ColorSystem.TRUECOLOR,
    "windows": ColorSystem.WINDOWS,
}
EXIT_COMMANDS = ("/exit", "/quit")
PROMPT = ">>> "
# The prompt in bold; \001 / \002 tell readline the escape codes take no room on the line.
BOLD_PROMPT = "\001\x1b[1m\002>>> \001\x1b[0m\002"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--no-color", action="store_true", help="plain text, no colours")


class ReplyPrinter:
    """Writes a streamed reply to ``file``, each stretch of text styled by its token's kind
    (``color_system`` None: the text as it is, byte for byte).

    A chunk's text covers several tokens; the end of each token's text is found by decoding the
    reply's tokens up to it (an incomplete UTF-8 character is held back, as the stream does).
    The text is written, not rendered by rich, so that tabs and brackets pass through unchanged."""

    def __init__(self, file: IO[str], tokenizer: Tokenizer, color_system: ColorSystem | None) -> None:
        self.file = file
        self.tokenizer = tokenizer
        self.color_system = color_system
        self.ids: list[int] = []
        self.ends: list[int] = []  # text length once each token is decoded
        self.kinds: list[str] = []
        self.text = ""
        self._printed = 0

    def add(self, chunk: StreamChunk) -> None:
        for token_id, kind in zip(chunk.token_ids, chunk.kinds, strict=True):
            self.ids.append(token_id)
            self.kinds.append(kind)
            self.ends.append(len(self.tokenizer.decode(self.ids).rstrip("\ufffd")))
        self.text += chunk.text
        self._write_upto(len(self.text))

    def _write_upto(self, end: int) -> None:
        start, j = self._printed, 0
        while start < end:
            while j < len(self.ends) and self.ends[j] <= start:
                j += 1
            kind = self.kinds[j] if j < len(self.ends) else "target"
            stop = min(end, self.ends[j]) if j < len(self.ends) else end
            piece = self.text[start:stop]
            if self.color_system is not None and STYLES.get(kind):
                piece = Style.parse(STYLES[kind]).render(piece, color_system=self.color_system)
            self.file.write(piece)
            start = stop
        self._printed = end
        self.file.flush()


def color_system_of(console: Console) -> ColorSystem | None:
    """The colours ``console`` may write (None: a pipe, ``--no-color`` or ``NO_COLOR``)."""
    if console.no_color or console.color_system is None:
        return None
    return COLOR_SYSTEMS.get(console.color_system)


def say(console: Console, line: str, style: str) -> None:
    """One line of the session's own text (never read as markup)."""
    console.print(line, style=style, markup=False, soft_wrap=True)


def legend() -> Text:
    """The colour key printed under the banner."""
    out = Text("colours: ")
    for i, (kind, label) in enumerate(LEGEND):
        out.append(("  " if i else "") + label, style=STYLES[kind] or "default")
    return out


def turn_summary(stats: SpecStats, speculative: bool) -> str:
    """One line after each reply: tokens, speed and (with a drafter) acceptance."""
    line = f"{stats.new_tokens} tokens · {stats.tokens_per_s:.1f} tok/s"
    if speculative:
        line += (
            f" · mean accepted length {stats.mean_accepted_length:.2f}"
            f" · acceptance {stats.acceptance_rate:.0%}"
        )
    return line


def read_message(interactive: bool, stdin: TextIO, prompt: str = PROMPT) -> str | None:
    """The next user line (None at end of input)."""
    if interactive:
        try:
            return input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def run(args: argparse.Namespace) -> int:
    check_sampling_arguments(args)
    out = Console(file=sys.stdout, no_color=args.no_color, highlight=False)
    err = Console(file=sys.stderr, no_color=args.no_color, highlight=False)
    with err.status(f"loading {args.target}", spinner="dots"):
        gen = build_generator(args)
    if gen.target.tokenizer is None:
        raise GenerationError(f"chat needs a model with a tokenizer; {args.target} has none")
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    drafter = "none" if gen.drafter is None else args.drafter
    if gen.drafter is not None and args.drafter == "auto":
        k = getattr(gen.drafter, "num_draft_tokens", None)
        drafter += f" ({type(gen.drafter).__name__}" + (f", K={k})" if k else ")")
    say(err, f"specdec chat · target {args.target} · drafter {drafter}", "bold")
    if gen.drafter is not None:
        err.print(legend())
    say(err, "/reset forgets the conversation · /exit or Ctrl-D ends it", "dim")

    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    while True:
        try:
            message = read_message(interactive, sys.stdin, BOLD_PROMPT if color_system_of(out) else PROMPT)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if message is None:
            return 0
        command = message.strip()
        if not command:
            continue
        if command in EXIT_COMMANDS:
            return 0
        if command == "/reset":
            history = list(system)
            say(err, "(conversation forgotten)", "dim")
            continue
        reply = answer(gen, [*history, {"role": "user", "content": message}], sampling, out, err)
        if reply is not None:
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]


def answer(
    gen: SpeculativeGenerator,
    messages: list[dict[str, str]],
    sampling: dict,  # type: ignore[type-arg]
    out: Console,
    err: Console,
) -> str | None:
    """Stream one reply; None when the conversation cannot take it (the error is printed)."""
    assert gen.target.tokenizer is not None
    try:
        stream = gen.chat_stream(messages, **sampling)
    except GenerationError as e:  # the conversation outgrew the context, say: report and go on
        say(err, f"specdec: error: {e}", "red")
        return None
    printer = ReplyPrinter(out.file, gen.target.tokenizer, color_system_of(out))
    interrupted = False
    try:
        for chunk in stream:
            printer.add(chunk)
    except KeyboardInterrupt:
        stream.close()
        interrupted = True
    out.file.write("\n")
    note = " (stopped)" if interrupted else ("" if stream.finish_reason != "length" else " (length limit)")
    say(err, turn_summary(stream.stats, gen.drafter is not None) + note + "\n", "dim")
    return printer.text
