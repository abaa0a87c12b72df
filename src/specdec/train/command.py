"""``specdec train``: the tokenizer, a target model, a draft model, or drafter heads.

    specdec train tokenizer --out runs/tok
    specdec train target --tokenizer runs/tok --out runs/target --max-minutes 40
    specdec train draft --teacher runs/target --out runs/draft --max-minutes 15
    specdec train draft --teacher runs/target --no-distill --out runs/draft-data
    specdec train draft --teacher runs/target --init runs/draft --seq-len 1024 --out runs/draft-long
    specdec train heads ...            (see specdec.train.heads)
    specdec train draft-vocab --target runs/target   (token ranking for the head drafters)
    specdec train data --target smollm2 --out runs/smol-data   (self-distillation data)
    specdec train eagle --target smollm2 --data runs/smol-data  (an EAGLE head on that data)
    specdec train medusa|early-exit --target smollm2 --data runs/smol-data  (heads on that data)
    specdec train draft --target smollm2 --data runs/smol-data  (a DistillSpec draft on that data)

Models train on the Python standard library corpus (:mod:`specdec.train.corpus`) and are
saved as Hugging Face folders (``LlamaForCausalLM``) with the tokenizer files copied in.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specdec.cli import UserError
from specdec.train import draft_data, heads_data
from specdec.train.corpus import corpus_files, read_split
from specdec.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from specdec.train.trainer import ModelShape, TrainConfig, load_checkpoint, new_model, pack_documents, train

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

TARGET_SHAPE = ModelShape()
DRAFT_SHAPE = ModelShape(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=384)
SHAPE_FLAGS = {
    "hidden_size": "width of the residual stream",
    "num_layers": "number of decoder layers",
    "num_heads": "attention heads (head_dim = hidden / heads)",
    "num_kv_heads": "key/value heads (grouped-query attention)",
    "intermediate_size": "SwiGLU hidden width",
    "max_position_embeddings": "longest sequence the model accepts",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", required=True, parser_class=type(parser))
    tok = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer on the corpus")
    tok.add_argument(
        "--out", type=Path, required=True, help="folder for tokenizer.json + tokenizer_config.json"
    )
    tok.add_argument("--vocab-size", type=int, default=8192)
    tok.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to be merged")
    tok.add_argument("--max-position-embeddings", type=int, default=2048, help="model_max_length")
    _add_max_files(tok)
    tok.set_defaults(_train_run=run_tokenizer)

    target = sub.add_parser("target", help="train a target model from scratch")
    target.add_argument("--tokenizer", type=Path, required=True, help="folder from 'specdec train tokenizer'")
    _add_common(target, TARGET_SHAPE, TrainConfig())
    target.set_defaults(_train_run=run_target)

    draft = sub.add_parser(
        "draft", help="distil a draft model from a target (DistillSpec): --target T --data D, or --teacher T"
    )
    draft.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="without --data: the target folder to distil on the code corpus (also gives the tokenizer)",
    )
    draft_data.add_arguments(draft)
    draft.add_argument("--no-distill", action="store_true", help="train on the data alone (cross-entropy)")
    draft.add_argument("--ce-weight", type=float, default=0.0, help="mix in the data's cross-entropy (0..1)")
    _add_common(draft, DRAFT_SHAPE, TrainConfig(lr=3e-3), out_required=False)
    draft.set_defaults(_train_run=run_draft, lr=None)

    vocab = sub.add_parser(
        "draft-vocab", help="rank the target's tokens by frequency for the head drafters (draft_vocab.json)"
    )
    vocab.add_argument("--target", default="demo-target", help="target folder or demo-target")
    vocab.add_argument(
        "--files",
        type=Path,
        nargs="+",
        default=None,
        help="text files to count (default: the corpus train split)",
    )
    vocab.add_argument(
        "--data",
        type=Path,
        default=None,
        help="count the target's replies in this 'specdec train data' folder",
    )
    vocab.add_argument(
        "--out", type=Path, default=None, help="folder for draft_vocab.json (default: the target's)"
    )
    vocab.set_defaults(_train_run=run_draft_vocab)

    from specdec.train import data as data_module

    data = sub.add_parser("data", help="self-distillation data: the target's own answers to chat prompts")
    data_module.add_arguments(data)
    data.set_defaults(_train_run=data_module.run)

    from specdec.train import eagle as eagle_module

    eagle = sub.add_parser("eagle", help="train an EAGLE head on self-distillation data (training-time test)")
    eagle_module.add_arguments(eagle)
    eagle.set_defaults(_train_run=eagle_module.run)

    for method in ("medusa", "early-exit"):
        p = sub.add_parser(method, help=f"train a {method} head on self-distillation data")
        heads_data.add_arguments(p, method)
        p.set_defaults(_train_run=heads_data.run)

    heads = sub.add_parser("heads", help="train Medusa / EAGLE-style drafter heads on a target")
    try:
        module = importlib.import_module("specdec.train.heads")
    except ModuleNotFoundError as e:
        if e.name != "specdec.train.heads":
            raise
        heads.set_defaults(_train_run=_heads_missing)
    else:
        module.add_arguments(heads)
        heads.set_defaults(_train_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._train_run(args) or 0)


def run_draft_vocab(args: argparse.Namespace) -> int:
    from collections import Counter

    from specdec.drafters.vocab import rank_tokens, write_draft_vocab
    from specdec.models.config import ModelConfig
    from specdec.models.loading import resolve_path
    from specdec.models.tokenizer import Tokenizer

    if args.data is not None:
        return _draft_vocab_from_data(args)
    folder = resolve_path(args.target)
    cfg, tokenizer = ModelConfig.from_folder(folder), Tokenizer.from_folder(folder)
    if tokenizer is None:
        raise UserError(f"{folder} has no tokenizer: cannot count tokens")
    if args.files:
        missing = [f for f in args.files if not f.is_file()]
        if missing:
            raise UserError(f"no such file: {missing[0]}")
        texts, source = [f.read_text(encoding="utf-8", errors="replace") for f in args.files], "files"
    else:
        texts, source = read_split("train"), "corpus train split"
    ids = [
        t for text in texts for t in tokenizer.encode(text, add_special_tokens=False) if t < cfg.vocab_size
    ]
    if not ids:
        raise UserError("the texts give no tokens to count")
    counts = Counter(ids)
    ranking = rank_tokens(counts, cfg.vocab_size)
    path = write_draft_vocab(args.out or folder, ranking, len(ids), f"{source}, {len(texts)} texts")
    cover = ", ".join(
        f"{n}: {sum(counts.get(t, 0) for t in ranking[:n]) / len(ids):.1%}"
        for n in (cfg.vocab_size // 8, cfg.vocab_size // 4, cfg.vocab_size // 2)
    )
    print(
        f"ranked {cfg.vocab_size} tokens by {len(ids)} counted in {len(texts)} texts; covered by the top {cover}"
    )
    print(f"wrote {path}")
    return 0


def _draft_vocab_from_data(args: argparse.Namespace) -> int:
    """``draft-vocab --data D``: rank the tokens of the target's own replies (what it drafts)."""
    from collections import Counter

    from specdec.drafters.locate import draft_vocab_folder
    from specdec.drafters.vocab import rank_tokens, write_draft_vocab
    from specdec.models.config import ModelLoadError
    from specdec.models.loading import load_model
    from specdec.train.data import check_manifest, read_records

    try:
        target = load_model(args.target, dtype="float32")
        check_manifest(args.data, target)
    except (ModelLoadError, ValueError) as e:
        raise UserError(str(e)) from None
    records = read_records(args.data, "train")
    counts = Counter(t for r in records for t in r.token_ids[r.reply_start :])
    if not counts:
        raise UserError(f"{args.data} holds no replies to count")
    ranking = rank_tokens(counts, target.config.vocab_size)
    total = sum(counts.values())
    path = write_draft_vocab(
        args.out or draft_vocab_folder(target), ranking, total, f"{len(records)} replies"
    )
    quarter = target.config.vocab_size // 4
    cover = sum(counts.get(t, 0) for t in ranking[:quarter]) / total
    print(f"ranked by {total} reply tokens; the top {quarter} cover {cover:.1%}; wrote {path}")
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    texts = _train_texts(args.max_files)
    tok = train_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    save_tokenizer(tok, args.out, model_max_length=args.max_position_embeddings)
    print(f"tokenizer: {tok.get_vocab_size()} tokens from {len(texts)} files -> {args.out}")
    return 0


def run_target(args: argparse.Namespace) -> int:
    _need_folder(args.tokenizer / "tokenizer.json", "--tokenizer")
    return _run_training(args, args.tokenizer, teacher=None)


def run_draft(args: argparse.Namespace) -> int:
    if args.data is not None:
        fixed = ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size")  # the target's, with --data
        return draft_data.run(args, {name: getattr(DRAFT_SHAPE, name) for name in fixed})
    if args.teacher is None:
        missing = "--data D (from 'specdec train data')" if args.target else "--target T --data D"
        raise UserError(f"name {missing} for a draft of any target, or --teacher FOLDER for the code corpus")
    if args.layers is not None or args.own_embeddings:
        flag = "--layers" if args.layers is not None else "--own-embeddings"
        raise UserError(f"{flag} is for a draft trained with --data")
    if args.out is None:
        raise UserError("--out: the folder for the draft trained on the code corpus")
    args.lr = 3e-3 if args.lr is None else args.lr
    _need_folder(args.teacher / "config.json", "--teacher")
    _need_folder(args.teacher / "tokenizer.json", "--teacher")
    if not 0.0 <= args.ce_weight <= 1.0:
        raise UserError(f"--ce-weight must be in [0, 1], got {args.ce_weight}")
    if args.no_distill and args.ce_weight:
        raise UserError(
            "--ce-weight mixes cross-entropy into distillation; it has no meaning with --no-distill"
        )
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = teacher.config.max_position_embeddings
    return _run_training(args, args.teacher, teacher=None if args.no_distill else teacher)


def _run_training(args: argparse.Namespace, tokenizer_dir: Path, teacher: object) -> int:
    if args.resume and args.init is not None:
        raise UserError("--resume continues OUT/checkpoint; --init starts a new run from a model: choose one")
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(tokenizer_dir)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    if cfg.seq_len < 2 or cfg.batch_size < 1 or cfg.max_steps < 1:
        raise UserError("--seq-len must be >= 2, --batch-size and --max-steps >= 1")
    if args.resume:
        model, state = load_checkpoint(args.out, device)
        print(f"resuming from step {state['step']} ({args.out / 'checkpoint'})")
    elif args.init is not None:
        model, state = _init_model(args.init, tok), None
        torch.nn.Module.to(model, device)  # in place (transformers' .to() has an odd signature for mypy)
        print(f"starting from the weights of {args.init} (its shape; a new optimizer and schedule)")
    else:
        shape = _shape(args)
        if shape.hidden_size % shape.num_heads or shape.num_heads % shape.num_kv_heads:
            raise UserError("--hidden-size must be a multiple of --num-heads, and heads of --num-kv-heads")
        model, state = new_model(shape, tok, cfg.seed), None
        torch.nn.Module.to(model, device)  # in place (transformers' .to() has an odd signature for mypy)
    # The corpus is read once the model is settled, so a bad --init or shape fails at once.
    train_stream = pack_documents(_train_texts(args.max_files), tok)
    val_stream = pack_documents(read_split("validation"), tok)
    if teacher is not None:
        teacher = teacher.to(device)  # type: ignore[attr-defined]
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters, {len(train_stream)} training tokens, device {device}")
    result = train(model, train_stream, val_stream, cfg, args.out, tokenizer_dir, teacher, state)  # type: ignore[arg-type]
    summary = {
        "parameters": params,
        "steps": result.steps,
        "tokens": result.tokens,
        "minutes": round(result.seconds / 60, 2),
        "val_loss": result.val_losses[-1][1] if result.val_losses else None,
        "distilled": teacher is not None,
    }
    print(json.dumps(summary))
    return 0


def _add_common(
    p: argparse.ArgumentParser, shape: ModelShape, cfg: TrainConfig, out_required: bool = True
) -> None:
    p.add_argument(
        "--out",
        type=Path,
        required=out_required,
        default=None,
        help="output model folder (checkpoints in OUT/checkpoint)"
        + ("" if out_required else "; with --data default beside the target"),
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this model folder's weights and shape (e.g. to train on longer windows)",
    )
    for name, help_text in SHAPE_FLAGS.items():
        default = getattr(shape, name)
        if name == "max_position_embeddings" and shape is DRAFT_SHAPE:
            default, help_text = None, help_text + " (default: the teacher's)"
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=help_text)
    p.add_argument("--seq-len", type=int, default=cfg.seq_len, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=cfg.batch_size, help="sequences per step")
    p.add_argument("--lr", type=float, default=cfg.lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=cfg.min_lr_ratio, help="final lr / peak lr")
    p.add_argument("--warmup-steps", type=int, default=cfg.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=cfg.weight_decay)
    p.add_argument("--max-steps", type=int, default=cfg.max_steps)
    p.add_argument(
        "--max-minutes", type=float, default=None, help="time budget; the cosine schedule ends with it"
    )
    p.add_argument(
        "--eval-interval", type=int, default=cfg.eval_interval, help="steps between validation + checkpoint"
    )
    p.add_argument(
        "--eval-batches", type=int, default=cfg.eval_batches, help="validation batches per evaluation"
    )
    p.add_argument("--save-dtype", choices=["bfloat16", "float32"], default=cfg.save_dtype)
    p.add_argument("--seed", type=int, default=cfg.seed)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_max_files(p)


def _init_model(folder: Path, tok: Tokenizer) -> LlamaForCausalLM:
    """The model saved in ``folder``, in float32, for a new run; refused unless it shares the
    tokenizer's vocabulary (its token ids are the ones the run trains on)."""
    _need_folder(folder / "config.json", "--init")
    from transformers import LlamaForCausalLM

    try:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(
            f"--init {folder}: not a Llama model folder ({str(e).splitlines()[0][:120]})"
        ) from None
    if model.config.vocab_size != tok.get_vocab_size():
        raise UserError(
            f"--init {folder}: vocabulary of {model.config.vocab_size} tokens, the tokenizer has {tok.get_vocab_size()}"
        )
    return model


def _add_max_files(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-files", type=int, default=None, help="use only the first N training files (smoke runs)"
    )


def _shape(args: argparse.Namespace) -> ModelShape:
    return ModelShape(**{name: getattr(args, name) for name in SHAPE_FLAGS})


def _train_texts(max_files: int | None) -> list[str]:
    if max_files is None:
        return read_split("train")
    return [p.read_text(encoding="utf-8") for p in corpus_files("train")[:max_files]]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None


def _need_folder(path: Path, flag: str) -> None:
    if not path.is_file():
        raise UserError(f"{flag}: {path.parent} has no {path.name}")


def _heads_missing(args: argparse.Namespace) -> int:
    raise UserError("'specdec train heads' is not available: specdec.train.heads is missing")
