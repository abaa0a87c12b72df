"""``specdec bench``: time decoding methods side by side; ``--cost-curve`` times the target.

    specdec bench                                  # demo pair, every method, three code tasks
    specdec bench --target smollm2 --tasks all     # the real-task suite (conversation, ..., rewrite)
    specdec bench --target m.gguf --llama-cpp ~/.cache/specdec/llama.cpp   # llama.cpp in the same run
    specdec bench --methods hf,draft,adaptive --tasks code --num-prompts 2 --runs 1
    specdec bench --methods draft,draft+parallel --threads 2   # drafting while the target verifies
    specdec bench --quick --target T --draft D     # a few seconds (CI)
    specdec bench --prompts my_prompts.jsonl       # your own prompts: {"prompt": ..., "task": ...}
    specdec bench --cost-curve --sizes 100M,700M --dtypes bfloat16

Writes ``bench.json``, ``bench.md`` and ``speedup.png`` (or ``cost_curve.json/.md/.png``)
to ``--out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from specdec.cli import UserError
from specdec.commands.common import add_draft_vocab_argument, add_q8_rows_argument, apply_threads_option

QUICK = {"num_prompts": 1, "runs": 1, "max_new_tokens": 12}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="demo-target", help="target folder or demo-target")
    p.add_argument("--draft", default="demo-draft", help="draft model folder or demo-draft")
    p.add_argument(
        "--methods",
        default="all",
        help="comma list of hf, hf-assisted, hf-lookup, plain and drafter names, spelled NAME[@K[xW]][+parallel]: "
        "NAME@K sets K, NAME@KxW a tree; draft+parallel (draft@K+parallel) drafts in a thread of its own while "
        "the target verifies; hf-assisted with a draft of another vocabulary is HF's universal assisted "
        "generation; all = every one known (plain is always run: it is the baseline)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="comma list of code, edit, long (completion on the demo pair) and conversation, translation, "
        "summarisation, qa, math, rag, coding, rewrite (chat prompts); all = the chat tasks "
        "(default: code,edit,long on the demo pair, all on a model with a chat template)",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help='your own prompts instead of the tasks: JSON lines {"prompt": text or token ids, '
        '"task": name, "max_new_tokens": n} (task, max_new_tokens optional)',
    )
    p.add_argument(
        "--num-prompts", type=int, default=None, help="prompts per task (default: 4, chat tasks: all 8)"
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 (long: 512)")
    p.add_argument(
        "--llama-cpp",
        type=Path,
        default=None,
        metavar="DIR",
        help="a llama.cpp build (scripts/build_llama_cpp.sh): adds llama.cpp, llama.cpp-lookup and "
        "llama.cpp-spec on the target's GGUF file",
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs per prompt (median is kept)")
    p.add_argument("--num-draft-tokens", "-k", type=int, default=4, help="K of the fixed-K drafters")
    add_draft_vocab_argument(p)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0: greedy (the default); > 0: sampled, the same seeds for every method",
    )
    p.add_argument("--top-k", type=int, default=None, help="sampling: keep the k likeliest tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="sampling: keep the likeliest tokens up to this probability"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (a quantized GGUF file runs on its blocks on the CPU) | float32 | bfloat16 | float16 | quantized",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu | cuda | cuda:N | auto (a GPU where there is one, else the CPU)"
    )
    add_q8_rows_argument(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of each row (default: torch's); a +parallel row gives the target N - 1 "
        "(at least 1) and its draft thread 1",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench-<time>)")
    p.add_argument("--quick", action="store_true", help="1 prompt per task, 1 run, 12 new tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cost-curve", action="store_true", help="time target forwards over k tokens instead")
    p.add_argument("--sizes", default="100M,300M,700M", help="cost curve: model sizes")
    p.add_argument("--dtypes", default="bfloat16,float32", help="cost curve: dtypes")
    p.add_argument("--ks", default="1-32", help="cost curve: tokens per forward, e.g. 1-8,12,16,32")
    p.add_argument("--repeats", type=int, default=3, help="cost curve: timings per k (median)")


def _default_out(kind: str) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{kind}-{stamp}"


def _ks(text: str) -> list[int]:
    """``1-4,8`` -> ``[1, 2, 3, 4, 8]``."""
    ks: set[int] = set()
    try:
        for part in _csv(text):
            low, _, high = part.partition("-")
            ks.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UserError(f"--ks must look like 1-8,12,16, got {text!r}") from None
    if not ks or min(ks) < 1 or max(ks) > 64:
        raise UserError(f"--ks must lie in 1..64, got {text!r}")
    return sorted(ks)


def run_cost_curve(args: argparse.Namespace) -> int:
    from specdec.bench import cost_curve

    sizes, dtypes = _csv(args.sizes), _csv(args.dtypes)
    bad = [s for s in sizes if s not in cost_curve.SIZES] + [
        d for d in dtypes if d not in ("float32", "bfloat16", "float16")
    ]
    if bad:
        raise UserError(f"unknown size or dtype {bad[0]!r}; sizes: {', '.join(cost_curve.SIZES)}")
    ks = _ks(args.ks)
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    out = args.out or _default_out("cost-curve")
    data = cost_curve.measure(
        out, sizes, dtypes, ks, args.repeats, progress=not args.no_progress, device=args.device
    )
    table = cost_curve.to_markdown(data)
    (out / "cost_curve.md").write_text(table)
    cost_curve.plot(data, out / "cost_curve.png")
    print(table)
    print(f"[specdec] wrote {out}/cost_curve.json, cost_curve.md, cost_curve.png")
    return 0


def bench_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from specdec.bench.llama_cpp import LLAMA_CPP_METHODS, LlamaCppError, check_bin_dir
    from specdec.bench.methods import available_methods, parse_method
    from specdec.bench.runner import BenchConfig
    from specdec.bench.tasks import ALL_TASKS, REAL_TASKS, read_prompt_file
    from specdec.models.loading import resolve_device
    from specdec.sampling import SamplingParams

    if args.quick:
        args.num_prompts, args.runs = QUICK["num_prompts"], QUICK["runs"]
        args.max_new_tokens = args.max_new_tokens or QUICK["max_new_tokens"]
    for flag in ("num_prompts", "runs", "num_draft_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.draft_vocab is not None and args.draft_vocab < 0:
        raise UserError(f"--draft-vocab must be >= 0, got {args.draft_vocab}")
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
        device = str(resolve_device(args.device))  # (auto: recorded as the device it chose)
    except ValueError as e:  # (ModelLoadError is one)
        raise UserError(str(e)) from None
    llama_cpp = args.llama_cpp.expanduser() if args.llama_cpp is not None else None
    if llama_cpp is not None:
        try:
            check_bin_dir(llama_cpp)
        except LlamaCppError as e:
            raise UserError(str(e)) from None
    methods = available_methods(llama_cpp is not None) if args.methods == "all" else _csv(args.methods)
    try:
        for m in methods:
            parse_method(m, args.num_draft_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None
    wants_llama = [m for m in methods if m.partition("@")[0] in LLAMA_CPP_METHODS]
    if wants_llama and llama_cpp is None:
        raise UserError(
            f"{wants_llama[0]} needs a llama.cpp build: --llama-cpp DIR (scripts/build_llama_cpp.sh)"
        )
    tasks = [] if args.tasks is None else list(REAL_TASKS) if args.tasks == "all" else _csv(args.tasks)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or (args.tasks is not None and not tasks):
        raise UserError(
            f"unknown task {unknown[0] if unknown else ''!r}; choose from all, {', '.join(ALL_TASKS)}"
        )
    if args.prompts is not None:
        try:
            records = read_prompt_file(args.prompts)  # checked now, before the models load
        except ValueError as e:
            raise UserError(str(e)) from None
        tasks = list(dict.fromkeys(r.task for r in records))
    return BenchConfig(
        target=args.target,
        draft=args.draft,
        methods=tuple(methods),
        tasks=tuple(tasks),
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        runs=args.runs,
        num_draft_tokens=args.num_draft_tokens,
        draft_vocab=args.draft_vocab,
        dtype=args.dtype,
        device=device,
        prompts_file=None if args.prompts is None else str(args.prompts),
        sampling=sampling,
        llama_cpp=None if llama_cpp is None else str(llama_cpp),
    )


def run(args: argparse.Namespace) -> int:
    apply_threads_option(args.threads)
    if args.cost_curve:
        return run_cost_curve(args)
    from specdec.bench.report import to_markdown, write_all
    from specdec.bench.runner import run_bench

    config = bench_config(args)
    try:
        result = run_bench(config, progress=not args.no_progress)
    except ValueError as e:  # a task that does not fit the model's context, an unknown name
        raise UserError(str(e)) from None
    paths = write_all(result, args.out or _default_out("bench"))
    print(to_markdown(result))
    print(f"[specdec] wrote {', '.join(str(p) for p in paths.values())}")
    return 0
