"""Convert a draft model folder (``specdec train draft``) to a GGUF file llama.cpp runs as the draft
of its target, with the target's tokenizer (and, for a draft that borrows them, its embeddings).

    .venv/bin/python scripts/draft_to_gguf.py DRAFT_FOLDER --like smollm2 --out draft.gguf --dtype f16
    llama-speculative-simple -m TARGET.gguf -md draft.gguf --spec-type draft-simple -p "Hello"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "draft_to_gguf"


def main(argv: list[str] | None = None) -> int:
    from specdec.models.gguf_export import DTYPES

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", type=Path, help="the draft: a Hugging Face folder (config.json + safetensors)"
    )
    parser.add_argument(
        "--like",
        required=True,
        help="the target's GGUF file (or smollm2): its tokenizer and architecture are copied",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the GGUF file to write (default: FOLDER.gguf)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f16", help="type of the matrices")
    parser.add_argument(
        "--embeddings-from", default=None, help="GGUF file of a borrowed embedding table (default: --like)"
    )
    args = parser.parse_args(argv)

    from specdec.models.gguf_export import export_gguf
    from specdec.models.loading import resolve_path

    try:
        like = resolve_path(args.like)
        if like.is_dir():
            raise ValueError(f"--like {args.like} is a folder; give the target's GGUF file")
        source = resolve_path(args.embeddings_from) if args.embeddings_from else None
        folder = args.folder.resolve()
        out = args.out or folder.parent / f"{folder.name}.gguf"
        written = export_gguf(args.folder, out, like=like, dtype=args.dtype, embeddings_from=source)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB, {args.dtype}, tokenizer of {like.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
