"""Greedy acceptance of a drafter by prompt length: where in the context do drafts stop agreeing?

The shipped demo pair and its heads were first trained on windows of 256 tokens, and the
bench's prompts run past that (a `code` prompt is about 385 tokens before its 128 new ones).
This script decodes held-out text (files of the corpus's test split with at least 8
characters per token of the longest length, each cut to its first ``length`` tokens) for
every prompt length given, with one drafter at K = 4, and prints the acceptance rate and tau
(tokens committed per verify pass). Several ``--draft`` / ``--heads`` folders give rows side
by side (drafts and EAGLE heads trained on 256- and 1024-token windows compared with it are in
docs/training.md).

    .venv/bin/python scripts/acceptance_by_length.py --drafter draft --draft demo-draft,runs/draft-long
    .venv/bin/python scripts/acceptance_by_length.py --drafter eagle --heads default,runs/eagle-long
"""

from __future__ import annotations

import argparse

import torch

import specdec
from specdec.drafters.registry import DrafterSpec, make_drafter
from specdec.train.corpus import read_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drafter", default="draft", help="draft | eagle | medusa | early-exit | ...")
    p.add_argument("--draft", default="demo-draft", help="comma list of draft model folders (draft-model drafters)")
    p.add_argument("--heads", default="default", help="comma list of heads folders (default: <target>/<method>)")
    p.add_argument("--target", default="demo-target")
    p.add_argument("--lengths", default="64,192,320,512,1024", help="prompt lengths in tokens")
    p.add_argument("--prompts", type=int, default=8, help="prompts (test-split files) per length")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("-k", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)

    target = specdec.load_model(args.target, dtype="float32")
    lengths = [int(n) for n in args.lengths.split(",")]
    texts = [text for text in read_split("test") if len(text) >= 8 * max(lengths)][: args.prompts]
    variants = [(d, h) for d in args.draft.split(",") for h in args.heads.split(",")]
    print(f"{args.drafter}, K = {args.k}, greedy, {len(texts)} prompts per length, {args.new_tokens} new tokens")
    print("| draft / heads | " + " | ".join(f"{n} tokens: accept, tau" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for draft, heads in variants:
        spec = DrafterSpec(target, draft=draft, num_draft_tokens=args.k, heads=None if heads == "default" else heads)
        gen = specdec.SpeculativeGenerator(target, make_drafter(args.drafter, spec))
        cells = []
        for n in lengths:
            accepted = drafted = steps = committed = 0
            for text in texts:
                ids = target.tokenizer.encode(text[: n * 8])[:n]  # (~3.9 characters per token)
                stats = gen.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True).stats
                accepted, drafted = accepted + stats.accepted_tokens, drafted + stats.draft_tokens
                steps, committed = steps + stats.verify_steps, committed + stats.committed_tokens
            cells.append(f"{accepted / max(drafted, 1):.2f}, {committed / max(steps, 1):.2f}")
        label = draft if args.drafter in ("draft", "adaptive", "hybrid", "staged") else heads
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
