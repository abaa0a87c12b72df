"""``specdec generate``: stream a completion to stdout and a stats line to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from specdec.cli import UserError
from specdec.commands.common import (
    add_model_arguments,
    add_sampling_arguments,
    build_generator,
    check_sampling_arguments,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument(
        "--chat", action="store_true", help="the prompt is a user's message: apply the model's chat template"
    )
    p.add_argument("--system", default=None, help="with --chat: a system message before the user's")


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """The conversation ``--chat`` asks for (None without it)."""
    if not args.chat:
        if args.system is not None:
            raise UserError("--system needs --chat")
        return None
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [*system, {"role": "user", "content": args.prompt}]


def run(args: argparse.Namespace) -> int:
    check_sampling_arguments(args)
    messages = chat_messages(args)
    gen = build_generator(args)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    if args.json:
        out = gen.chat(messages, **kwargs) if messages else gen.generate(args.prompt, **kwargs)
        record: dict[str, Any] = {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
        record["stats"] = out.stats.to_dict()
        print(json.dumps(record))
        return 0
    stream = gen.chat_stream(messages, **kwargs) if messages else gen.stream(args.prompt, **kwargs)
    for chunk in stream:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[specdec] {stream.stats.summary()}", file=sys.stderr)
    return 0
