"""Options shared by the subcommands that load a target and a drafter."""

from __future__ import annotations

import argparse

import torch

from specdec import kernels
from specdec.cli import UserError
from specdec.drafters.registry import DRAFTERS, DrafterSpec, make_drafter
from specdec.engine import SpeculativeGenerator
from specdec.models import LoadedModel, load_model

# Below this size a forward pass is a few hundred tiny operators: a second CPU thread only adds
# synchronisation (measured on the demo pair: 7x slower with 2 threads on a busy 2-core machine).
SMALL_MODEL_PARAMS = 50_000_000


def apply_threads_option(threads: int | None) -> bool:
    """Set torch's CPU threads from ``--threads``; False when the option was not given."""
    if threads is None:
        return False
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return True


def set_threads(args: argparse.Namespace, target: LoadedModel) -> None:
    if apply_threads_option(args.threads):
        return
    # Without the one-call CPU forward (specdec.kernels) a small model's pass is hundreds of tiny
    # torch ops, and a second thread only adds synchronisation; with it, both cores pay.
    small = target.config.num_parameters < SMALL_MODEL_PARAMS
    one_call = kernels.load() is not None and target.dtype == torch.float32
    if target.device.type == "cpu" and small and not one_call:
        torch.set_num_threads(1)


def add_model_arguments(p: argparse.ArgumentParser, parallel: bool = True) -> None:
    """The target / drafter options; ``parallel``: with ``--parallel`` (subcommands that decode
    through :func:`build_generator`)."""
    p.add_argument("--target", default="demo-target", help="target folder or demo-target")
    p.add_argument(
        "--draft",
        default=None,
        help="draft model: a name, GGUF file or folder (default: the target's own draft, else demo-draft)",
    )
    p.add_argument(
        "--drafter",
        default="auto",
        choices=["none", *DRAFTERS],
        help="drafting method (none = plain decoding; auto = the best available for the target)",
    )
    p.add_argument("--num-draft-tokens", "-k", type=int, default=4, help="draft tokens per step (K)")
    p.add_argument("--tree-width", type=int, default=1, help="siblings per tree node (1 = a chain)")
    p.add_argument("--max-tree-nodes", type=int, default=None, help="tree node budget (default K x width)")
    p.add_argument(
        "--heads",
        default=None,
        help="trained heads for early-exit / medusa / eagle (default: <target>/<method>)",
    )
    add_draft_vocab_argument(p)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 | quantized (GGUF)")
    p.add_argument(
        "--device", default="cpu", help="cpu | cuda | cuda:N | auto (a GPU where there is one, else the CPU)"
    )
    add_q8_rows_argument(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"CPU threads (default: torch's; 1 for targets under {SMALL_MODEL_PARAMS // 10**6}M parameters "
        "when the CPU kernels are unavailable)",
    )
    if parallel:
        p.add_argument(
            "--parallel",
            action="store_true",
            help="draft the next window in a thread of its own while the target verifies (drafter draft, "
            "tree width 1; the draft thread runs one torch thread)",
        )


def add_draft_vocab_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="every drafter but ngram: score drafts over the N most frequent tokens of the target's "
        "draft_vocab.json (0: the whole vocabulary; default: a quarter where the file exists)",
    )


def add_q8_rows_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--q8-rows",
        action="store_true",
        help="a quantized GGUF model rounds the rows of its decoding and verify products to 8 bits, as "
        "llama.cpp does (about 2x faster on K-quant blocks; another function, so outputs may differ from "
        "the default float32 rows; speculative output still equals plain output). Same as SPECDEC_Q8_ROWS=1",
    )


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)


def check_sampling_arguments(args: argparse.Namespace) -> None:
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")


def build_generator(args: argparse.Namespace) -> SpeculativeGenerator:
    if args.num_draft_tokens < 1:
        raise UserError(f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}")
    target = load_model(args.target, dtype=args.dtype, device=args.device)
    set_threads(args, target)
    if args.tree_width < 1 or (args.max_tree_nodes is not None and args.max_tree_nodes < 1):
        raise UserError("--tree-width and --max-tree-nodes must be >= 1")
    if args.draft_vocab is not None and args.draft_vocab < 0:
        raise UserError(f"--draft-vocab must be >= 0, got {args.draft_vocab}")
    spec = DrafterSpec(
        target,
        args.draft,
        args.num_draft_tokens,
        args.dtype,
        heads=args.heads,
        tree_width=args.tree_width,
        max_tree_nodes=args.max_tree_nodes,
        draft_vocab=args.draft_vocab,
    )
    try:
        drafter = make_drafter(args.drafter, spec)
        return SpeculativeGenerator(target, drafter, parallel=args.parallel)
    except ValueError as e:
        raise UserError(str(e)) from None
