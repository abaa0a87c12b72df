"""The ``specdec`` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. User
mistakes (missing folders, bad parameters, mismatched vocabularies) print one line to stderr
and exit with status 2; nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import NoReturn

# subcommand -> (module, help)
COMMANDS = {
    "demo": ("specdec.demo", "complete held-out code prompts with and without speculation"),
    "generate": ("specdec.commands.generate", "generate text, streamed to stdout"),
    "chat": ("specdec.commands.chat", "chat with a model in the terminal, replies coloured by token kind"),
    "check": ("specdec.commands.check", "check that speculation is lossless for a model pair"),
    "bench": ("specdec.bench.command", "benchmark drafters against plain and Hugging Face decoding"),
    "serve": ("specdec.serving.command", "OpenAI-compatible HTTP server"),
    "train": ("specdec.train.command", "train the tokenizer, target, draft or drafter heads"),
}


# subcommand -> (the extra that installs it, the packages of that extra it imports)
EXTRAS = {
    "serve": ("serve", ("fastapi", "uvicorn", "pydantic", "prometheus_client")),
    "bench": ("bench", ("transformers", "matplotlib")),
    "train": ("train", ("transformers",)),
}


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def user_errors() -> tuple[type[BaseException], ...]:
    from specdec.engine import GenerationError
    from specdec.models import ModelLoadError

    return (UserError, ModelLoadError, GenerationError, FileNotFoundError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"specdec: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specdec", description="Lossless speculative decoding.")
    from specdec import __version__

    parser.add_argument("--version", action="version", version=f"specdec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        missing = _missing_requirement(name, module_name)
        if missing is not None:
            p.set_defaults(_missing=missing)  # the other subcommands still work
            continue
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _missing_requirement(name: str, module_name: str) -> str | None:
    """Why ``specdec <name>`` cannot run here (a package of its extra is not installed), or None."""
    extra, packages = EXTRAS.get(name, ("", ()))
    absent = [package for package in packages if importlib.util.find_spec(package) is None]
    if not absent:
        try:
            importlib.import_module(module_name)
            return None
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing.partition(".")[0] == "specdec" and not module_name.startswith(missing):
                raise  # one of our modules is broken: a bug, not a missing package
            if module_name.startswith(missing):
                return f"'specdec {name}' is not available in this installation"
            absent = [missing.partition(".")[0]]
    needs = ", ".join(repr(package) for package in absent)
    packages_are = "package {}, which is" if len(absent) == 1 else "packages {}, which are"
    install = f"pip install 'specdec[{extra}]'" if extra else f"pip install {' '.join(absent)}"
    return f"'specdec {name}' needs the Python {packages_are.format(needs)} not installed ({install})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        # Known arguments first: a subcommand whose extra is missing has no options to know,
        # and says so in one line whatever options were given.
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse: --help, --version, or a usage error (already printed)
        return int(e.code or 0)
    if getattr(args, "_missing", None):
        print(f"specdec: error: {args._missing}", file=sys.stderr)
        return 2
    if unknown:
        print(f"specdec: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    if getattr(args, "q8_rows", False):  # --q8-rows: read when a quantized model loads
        from specdec.options import set_options

        set_options(q8_rows=True)
    try:
        return int(args._run(args) or 0)
    except user_errors() as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specdec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`specdec generate ... | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so that the exit's flush of stdout stays quiet)
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    # `python -m specdec.cli` runs this file as __main__, a second copy of the module: its UserError
    # is not the one the commands raise (specdec.cli.UserError), so run the package's main.
    from specdec.cli import main as package_main

    sys.exit(package_main())
