"""``specdec train data``: self-distillation data, the target's own answers to chat prompts.

The prompts come from :mod:`specdec.train.prompts`; the target answers each with its chat
template, many conversations per forward pass (rows of one KV cache, each at its own positions),
greedily or sampled (a fixed share, chosen by a hash of the prompt). A conversation with a
follow-up turn is answered twice: the second prompt holds the target's first reply.

Token ids are stored as one JSON line per conversation in ``shard-NNNNN.jsonl`` files (one
per batch, written whole and renamed, so an interrupted run loses at most the batch it was in),
and beside them, in ``shard-NNNNN.safetensors``, the target's final normed hidden states of
those tokens (bfloat16, keyed by the record's key): the target computed them while answering,
and recomputing them for training would cost a prefill-speed pass over every token
(``--no-hidden`` leaves them out; trainers then recompute them). A rerun skips the conversations already written
(resumable), and ``data.json`` records the target and settings so shards of different targets
never mix. Each record::

    {"key", "task", "source", "split", "mode": "greedy" | "sampled",
     "messages": [{"role", "content"}, ...],          # the whole conversation, replies included
     "token_ids": [...],                               # the last prompt + the last reply
     "reply_start": int}                               # where the last reply starts in token_ids
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specdec.engine.chat import chat_prompt
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams, logits_to_probs, sample
from specdec.train.prompts import Prompt, build_prompts

MANIFEST = "data.json"


@dataclass(frozen=True)
class DataConfig:
    num_prompts: int = 256
    max_new_tokens: int = 160
    max_prompt_tokens: int = 448  # longer rendered prompts are skipped
    batch_size: int = 16  # conversations per forward pass (and per shard)
    sampled_percent: int = 30  # share of conversations answered by sampling
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    save_hidden: bool = True  # the target's final hidden states, computed on the way (bfloat16)


@dataclass(frozen=True)
class Record:
    key: str
    task: str
    source: str
    split: str
    mode: str
    messages: list[dict[str, str]]
    token_ids: list[int]
    reply_start: int


@torch.inference_mode()
def answer_batch(
    target: LoadedModel,
    prompts: list[list[int]],
    stop_ids: frozenset[int],
    max_new_tokens: int,
    sampled: list[bool],
    sampling: SamplingParams,
    generator: torch.Generator,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The target's replies to ``prompts`` (token ids), one cache row each: greedy or sampled
    per row; a reply ends after its first token in ``stop_ids`` (kept) or ``max_new_tokens``.
    Also each row's final normed hidden states ``(len(prompt) + len(reply) - 1, d)``: the
    target computed them on the way, for every token it read (all but the reply's last).

    Rows are right-padded for the prefill; the padding's keys and values sit in slots past the
    row's prompt, each overwritten by the row's own next token before its position reaches it
    (the causal mask hides slots beyond a row's position)."""
    B, device = len(prompts), target.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    T = int(lengths.max())
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T) right-padded
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    cache = target.new_cache(B, T + max_new_tokens)
    _, hidden = target(tokens, torch.arange(T, device=device), cache, num_logits=0, return_hidden=True)
    last = hidden[torch.arange(B), lengths - 1]  # (B, d) each row's last prompt token
    steps: list[torch.Tensor] = []  # (B, d) per decoding step
    logits = target.module.lm_head(last)  # (B, V)
    sampled_rows = torch.tensor(sampled, device=device)  # (B,)
    replies: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    pos = lengths.clone()  # (B,) position of the token fed next
    for _ in range(max_new_tokens):
        nxt = logits.float().argmax(-1)  # (B,)
        if bool(sampled_rows.any()):
            drawn = sample(logits_to_probs(logits[sampled_rows], sampling), generator)  # (B_s,)
            nxt[sampled_rows] = drawn
        for b in range(B):
            if not done[b]:
                replies[b].append(int(nxt[b]))
                done[b] = int(nxt[b]) in stop_ids
        if all(done):
            break
        logits, h = target(nxt[:, None], pos[:, None], cache, return_hidden=True)
        logits = logits[:, -1]  # (B, V)
        steps.append(h[:, -1])
        pos += 1
    fed = torch.stack(steps, 1) if steps else hidden[:, :0]  # (B, steps, d)
    rows = [torch.cat([hidden[b, : len(p)], fed[b, : len(replies[b]) - 1]]) for b, p in enumerate(prompts)]
    return replies, rows


def _record(
    prompt: Prompt, mode: str, messages: list[dict[str, str]], ids: list[int], reply: list[int]
) -> Record:
    return Record(prompt.key, prompt.task, prompt.source, prompt.split, mode, messages, ids + reply, len(ids))


def answer_prompts(
    target: LoadedModel, prompts: list[Prompt], cfg: DataConfig, generator: torch.Generator
) -> tuple[list[Record], dict[str, torch.Tensor]]:
    """One batch: every prompt's conversation answered turn by turn (rows of one pass per turn);
    the records, and the final hidden states of each record's tokens but the last (bfloat16)."""
    tok = target.tokenizer
    assert tok is not None
    mode = {p.key: "sampled" if int(p.key, 16) % 100 < cfg.sampled_percent else "greedy" for p in prompts}
    sampling = SamplingParams(cfg.temperature, top_p=cfg.top_p)
    convs: dict[str, list[dict[str, str]]] = {p.key: [] for p in prompts}
    last: dict[str, tuple[list[int], list[int]]] = {}
    hidden: dict[str, torch.Tensor] = {}
    live = list(prompts)
    for turn in range(max(len(p.turns) for p in prompts)):
        live = [p for p in live if turn < len(p.turns)]
        rendered = []
        for p in live:
            convs[p.key].append({"role": "user", "content": p.turns[turn]})
            rendered.append(chat_prompt(convs[p.key], tok))
        keep = [i for i, r in enumerate(rendered) if len(r.token_ids) <= cfg.max_prompt_tokens]
        live, rendered = [live[i] for i in keep], [rendered[i] for i in keep]
        if not live:
            break
        stops = frozenset().union(*(r.stop_token_ids for r in rendered)) | set(target.config.eos_token_ids)
        replies, states = answer_batch(
            target, [r.token_ids for r in rendered], stops, cfg.max_new_tokens,
            [mode[p.key] == "sampled" for p in live], sampling, generator,
        )  # fmt: skip
        for p, r, reply, h in zip(live, rendered, replies, states, strict=True):
            hidden[p.key] = h.to(torch.bfloat16)
            text = tok.decode([t for t in reply if t not in stops], skip_special_tokens=True)
            convs[p.key].append({"role": "assistant", "content": text})
            last[p.key] = (r.token_ids, reply)
    records = [
        _record(p, mode[p.key], convs[p.key], *last[p.key])
        for p in prompts
        if p.key in last and len(convs[p.key]) == 2 * len(p.turns)
    ]
    return records, {r.key: hidden[r.key] for r in records}


def done_keys(folder: Path) -> set[str]:
    """Keys of the conversations already in ``folder``'s shards, and of prompts tried there."""
    keys: set[str] = set()
    for path in sorted(folder.glob("shard-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                keys.add(json.loads(line)["key"])
    tried = folder / "skipped.txt"
    if tried.is_file():
        keys.update(tried.read_text().split())
    return keys


def read_records(folder: str | Path, split: str | None = None) -> list[Record]:
    """The records of ``folder``'s shards (of one split if given), in shard order."""
    out = []
    for path in sorted(Path(folder).glob("shard-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = Record(**json.loads(line))
                if split is None or rec.split == split:
                    out.append(rec)
    return out


def read_hidden(folder: str | Path) -> dict[str, torch.Tensor]:
    """The stored hidden states of ``folder``'s shards by record key (``(len(token_ids) - 1, d)``)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("shard-*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _manifest(target: LoadedModel, cfg: DataConfig) -> dict[str, object]:
    c = target.config
    return {
        "target": target.path.name,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "config": asdict(cfg),
    }


def check_manifest(folder: Path, target: LoadedModel) -> None:
    """Refuse data made by a target of other sizes (ValueError)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{folder} has no {MANIFEST}: make it with 'specdec train data --target T --out {folder}'"
        )
    meta = json.loads(path.read_text())
    want = {k: v for k, v in _manifest(target, DataConfig()).items() if k not in ("config",)}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ValueError(f"{folder} was made by target {got}, not this one {want}")


def build_data(target: LoadedModel, out: Path, cfg: DataConfig, progress: bool = True) -> Iterator[int]:
    """Answer ``cfg.num_prompts`` prompts into ``out`` (skipping those done); yields the number of
    conversations written after each shard."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    if target.tokenizer is None:
        raise ValueError(f"{target.path} has no tokenizer: it cannot answer chat prompts")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if manifest.is_file():
        check_manifest(out, target)
    else:
        manifest.write_text(json.dumps(_manifest(target, cfg), indent=2) + "\n")
    done = done_keys(out)
    todo = [p for p in build_prompts(cfg.num_prompts, cfg.seed) if p.key not in done]
    shard = len(list(out.glob("shard-*.jsonl")))
    written = 0
    bar = tqdm(total=len(todo), desc="answering prompts", unit="conv", disable=not progress)
    for i in range(0, len(todo), cfg.batch_size):
        batch = todo[i : i + cfg.batch_size]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(batch[0].key, 16) % 1_000_003)
        start = time.perf_counter()
        records, hidden = answer_prompts(target, batch, cfg, generator)
        path = out / f"shard-{shard:05d}.jsonl"
        if cfg.save_hidden and hidden:
            save_file({k: v.contiguous() for k, v in hidden.items()}, str(path.with_suffix(".safetensors")))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records), encoding="utf-8")
        tmp.rename(path)
        kept = {r.key for r in records}
        skipped = [p.key for p in batch if p.key not in kept]
        if skipped:  # too long for --max-prompt-tokens: remembered so a rerun does not retry them
            with (out / "skipped.txt").open("a") as f:
                f.write("".join(k + "\n" for k in skipped))
        shard += 1
        written += len(records)
        new_tokens = sum(len(r.token_ids) - r.reply_start for r in records)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
        yield written
    bar.close()


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DataConfig()
    p.add_argument("--target", default="smollm2", help="the model that answers (name, GGUF file or folder)")
    p.add_argument("--out", type=Path, required=True, help="data folder (created; rerun to resume)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help="conversations in all")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest reply per turn")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="skip longer prompts")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="conversations per forward pass")
    p.add_argument(
        "--sampled-percent", type=int, default=d.sampled_percent, help="share answered by sampling"
    )
    p.add_argument("--temperature", type=float, default=d.temperature, help="of the sampled replies")
    p.add_argument("--top-p", type=float, default=d.top_p, help="of the sampled replies")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--no-hidden", action="store_true", help="store token ids only (trainers then recompute the features)"
    )
    p.add_argument("--dtype", default="float32", help="the target's dtype (float32, bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def require_data(folder: Path) -> None:
    """UserError unless ``folder`` holds data made by ``specdec train data``."""
    from specdec.cli import UserError

    if not (folder / "data.json").is_file():
        raise UserError(f"--data {folder}: no data.json; make it with 'specdec train data'")


def add_head_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every ``specdec train <head> --data D`` shares: the target and data that
    :func:`frozen_target` reads, where the head goes, the thread count."""
    p.add_argument("--target", default="smollm2", help="the frozen target (name, GGUF file or folder)")
    p.add_argument("--data", type=Path, required=True, help="folder from 'specdec train data'")
    p.add_argument("--out", type=Path, default=None, help="head folder (default: beside the target)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def frozen_target(args: argparse.Namespace, positive: tuple[str, ...]) -> LoadedModel:
    """What every ``specdec train <drafter> --data D`` does first: the flags named in
    ``positive`` checked >= 1, the data folder checked, torch's threads set, the target loaded
    in float32 (UserError for each user mistake)."""
    from specdec.cli import UserError
    from specdec.models.config import ModelLoadError
    from specdec.models.loading import load_model

    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    require_data(args.data)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return load_model(args.target, dtype="float32")
    except ModelLoadError as e:
        raise UserError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from specdec.cli import UserError
    from specdec.models.config import ModelLoadError
    from specdec.models.loading import load_model

    for name in ("num_prompts", "max_new_tokens", "max_prompt_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.sampled_percent <= 100 or args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise UserError("--sampled-percent must be in [0, 100], --temperature > 0, --top-p in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        target = load_model(args.target, dtype=args.dtype)
    except ModelLoadError as e:
        raise UserError(str(e)) from None
    cfg = DataConfig(
        args.num_prompts, args.max_new_tokens, args.max_prompt_tokens, args.batch_size,
        args.sampled_percent, args.temperature, args.top_p, args.seed, not args.no_hidden,
    )  # fmt: skip
    try:
        for _ in build_data(target, args.out, cfg):
            pass
    except ValueError as e:
        raise UserError(str(e)) from None
    records = read_records(args.out)
    tokens = sum(len(r.token_ids) for r in records)
    print(f"{len(records)} conversations, {tokens} tokens in {args.out}")
    return 0
