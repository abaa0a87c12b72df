"""Run every method on every prompt of every task, the Spec-Bench way (Xia et al. 2024).

Greedy (or, with ``sampling``, sampled with the same seeds for every method), batch 1, the
same prompts for every method. Each method is warmed up once, then
each prompt is generated ``runs`` times; a prompt's time is the median of its runs. Methods
are interleaved per prompt and run so that load from other processes hits them alike.
Throughput is new tokens / wall time of the whole ``generate`` call (prefill included), the
same clock for our methods and for ``transformers``. On a machine shared with other jobs the
wall clock also counts time the process waited for a core; with one torch thread the process
CPU time does not, so every figure is also given on CPU time (``cpu_*`` fields).

``plain`` is always run: it is the speed-up baseline and its first run's tokens are the
reference of the identical-output check (greedy only: sampled outputs follow the target's
distribution, which the losslessness tests check, but are not equal token for token).
Peers that do not return token ids (llama.cpp) are timed but not checked.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdec import kernels
from specdec.bench.methods import Method, Run, SpecdecMethod, build_method
from specdec.bench.tasks import Task, build_tasks, default_tasks, prompt_file_tasks, read_prompt_file
from specdec.engine import SpecStats
from specdec.models import ModelConfig, ModelLoadError, load_model
from specdec.models.loading import LoadedModel, resolve_path
from specdec.options import get_options
from specdec.sampling import SamplingParams

BASELINES = ("plain", "hf")
WARMUP_TOKENS = 16


@dataclass(frozen=True)
class BenchConfig:
    target: str = "demo-target"
    draft: str = "demo-draft"
    methods: tuple[str, ...] = ("hf", "hf-assisted", "plain", "draft", "adaptive")
    tasks: tuple[str, ...] = ()  # (): the code tasks on the demo pair, the real-task suite otherwise
    num_prompts: int | None = None  # None: 4 per code task, every prompt of a real task
    max_new_tokens: int | None = None  # None: the task's default
    runs: int = 3
    num_draft_tokens: int = 4
    draft_vocab: int | None = None  # drafters' draft vocabulary (None: the drafters' default)
    dtype: str = "auto"
    device: str = "cpu"
    prompts_file: str | None = None  # your own prompts instead of ``tasks`` (tasks.read_prompt_file)
    sampling: SamplingParams = SamplingParams()  # greedy (Spec-Bench's setting) unless asked
    llama_cpp: str | None = None  # a llama.cpp build folder: its methods join the run

    @property
    def greedy(self) -> bool:
        return self.sampling.greedy


@dataclass(frozen=True)
class Row:
    """One (task, method) cell of the results; ``task == "overall"`` sums over tasks."""

    task: str
    method: str
    prompts: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    tokens_per_s: float | None = None
    speedup_vs_plain: float | None = None
    speedup_vs_hf: float | None = None
    cpu_speedup_vs_plain: float | None = None  # the same ratios on process CPU time
    cpu_speedup_vs_hf: float | None = None
    decode_speedup_vs_plain: float | None = None  # the same ratio with each side's prefill time left out
    tau: float | None = None  # mean tokens committed per target verify pass
    acceptance_rate: float | None = None
    mean_draft_len: float | None = None  # draft tokens per verify pass (K actually used)
    time_split: dict[str, float] = field(default_factory=dict)  # fraction of generate time
    identical: bool | None = None  # every prompt's tokens equal plain greedy's (None when sampling)
    identical_fraction: float | None = None
    error: str | None = None

    @property
    def efficiency(self) -> float | None:
        """Wall-clock speed-up over plain divided by tau (1.0 = no overhead)."""
        if self.speedup_vs_plain is None or not self.tau:
            return None
        return self.speedup_vs_plain / self.tau

    @property
    def decode_efficiency(self) -> float | None:
        """:attr:`efficiency` of the decoding phase alone. Prefill costs the same with and
        without a drafter, so on a long prompt it caps the wall-clock ratio however cheap the
        drafting is; this one shows what the drafter and the bookkeeping cost."""
        if self.decode_speedup_vs_plain is None or not self.tau:
            return None
        return self.decode_speedup_vs_plain / self.tau


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    meta: dict[str, Any]
    rows: list[Row]
    sources: dict[str, list[str]]  # task -> where each prompt comes from


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    import transformers

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "isa": isa,
        "torch_threads": torch.get_num_threads(),
        "kernels": kernels.status(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _model_info(model: LoadedModel) -> dict[str, Any]:
    return {"path": str(model.path), "parameters": model.config.num_parameters}


def _draft_info(draft: str) -> dict[str, Any]:
    try:
        path = resolve_path(draft)
        if path.suffix == ".gguf":  # the configuration from the file's metadata, no weights read
            from specdec.models.gguf import config_from_metadata
            from specdec.models.gguf_file import read_gguf

            gguf = read_gguf(path)
            config = config_from_metadata(gguf.metadata, {t.name for t in gguf.tensors}, path)
            return {"path": str(path), "parameters": config.num_parameters}
        return {"path": str(path), "parameters": ModelConfig.from_folder(path).num_parameters}
    except ModelLoadError as e:
        return {"path": draft, "error": str(e)}


@dataclass
class _Cell:
    """Runs of one method on one task, collected per prompt."""

    runs: dict[int, list[Run]] = field(default_factory=dict)
    error: str | None = None


def _summarise(task: Task, method: str, cell: _Cell, reference: dict[int, list[int]] | None) -> Row:
    """``reference``: plain decoding's tokens per prompt (greedy), or None (sampled outputs are
    distributed as the target's, not equal token for token)."""
    if cell.error is not None or not cell.runs:
        return Row(task.name, method, error=cell.error or "no runs")
    new_tokens = sum(runs[0].num_tokens for runs in cell.runs.values())
    wall = sum(statistics.median(r.wall_s for r in runs) for runs in cell.runs.values())
    cpu = sum(statistics.median(r.cpu_s for r in runs) for runs in cell.runs.values())
    checked = reference is not None and all(runs[0].token_ids is not None for runs in cell.runs.values())
    same = [cell.runs[i][0].token_ids == reference[i] for i in cell.runs] if checked and reference else []
    stats = [r.stats for runs in cell.runs.values() for r in runs if r.stats is not None]
    tau = acceptance = draft_len = None
    split: dict[str, float] = {}
    drafted = sum(r.drafted or 0 for runs in cell.runs.values() for r in runs)
    if drafted:  # peers that print their counts only (llama.cpp)
        acceptance = sum(r.accepted or 0 for runs in cell.runs.values() for r in runs) / drafted
    if stats:
        total = SpecStats()
        for s in stats:
            total.verify_steps += s.verify_steps
            total.committed_tokens += s.committed_tokens
            total.draft_tokens += s.draft_tokens
            total.draft_positions += s.draft_positions
            total.accepted_tokens += s.accepted_tokens
        tau = total.mean_accepted_length
        acceptance = total.acceptance_rate if total.draft_positions else None
        draft_len = total.draft_tokens / total.verify_steps if total.verify_steps else None
        seconds = sum(s.total_s for s in stats)
        if seconds > 0:
            split = {
                "prefill": sum(s.prefill_s for s in stats) / seconds,
                "draft": sum(s.draft_s for s in stats) / seconds,
                "verify": sum(s.verify_s for s in stats) / seconds,
                "overhead": sum(s.overhead_s for s in stats) / seconds,
            }
    return Row(
        task=task.name,
        method=method,
        prompts=len(cell.runs),
        new_tokens=new_tokens,
        wall_s=wall,
        cpu_s=cpu,
        tokens_per_s=new_tokens / wall if wall > 0 else None,
        tau=tau,
        acceptance_rate=acceptance,
        mean_draft_len=draft_len,
        time_split=split,
        identical=all(same) if same else None,
        identical_fraction=sum(same) / len(same) if same else None,
    )


def _with_speedups(rows: list[Row]) -> list[Row]:
    from dataclasses import replace

    cell = {(r.task, r.method): r for r in rows}
    out = []
    for r in rows:
        ups: dict[str, Any] = {}
        for base in BASELINES:
            b = cell.get((r.task, base))
            if b is None or b.error or r.error:
                continue
            if r.wall_s > 0 and b.wall_s > 0:  # same tokens: the time ratio is the speed ratio
                ups[f"speedup_vs_{base}"] = (r.new_tokens / r.wall_s) / (b.new_tokens / b.wall_s)
            if r.cpu_s > 0 and b.cpu_s > 0:
                ups[f"cpu_speedup_vs_{base}"] = (r.new_tokens / r.cpu_s) / (b.new_tokens / b.cpu_s)
            if base == "plain" and "prefill" in r.time_split and "prefill" in b.time_split:
                decode_s, base_decode_s = (x.wall_s * (1.0 - x.time_split["prefill"]) for x in (r, b))
                if decode_s > 0 and base_decode_s > 0:
                    ups["decode_speedup_vs_plain"] = (r.new_tokens / decode_s) / (
                        b.new_tokens / base_decode_s
                    )
        out.append(replace(r, **ups))
    return out


def _overall(task_rows: list[Row], methods: list[str]) -> list[Row]:
    rows = []
    for method in methods:
        mine = [r for r in task_rows if r.method == method]
        if any(r.error for r in mine):
            rows.append(Row("overall", method, error=next(r.error for r in mine if r.error)))
            continue
        tokens, wall = sum(r.new_tokens for r in mine), sum(r.wall_s for r in mine)
        cpu = sum(r.cpu_s for r in mine)
        identical = [r.identical_fraction * r.prompts for r in mine if r.identical_fraction is not None]
        prompts = sum(r.prompts for r in mine)
        rows.append(
            Row(
                "overall",
                method,
                prompts=prompts,
                new_tokens=tokens,
                wall_s=wall,
                cpu_s=cpu,
                tokens_per_s=tokens / wall if wall > 0 else None,
                identical=all(r.identical for r in mine) if identical else None,
                identical_fraction=sum(identical) / prompts if prompts and identical else None,
            )
        )
    return rows


def _llama_cpp_info(bin_dir: Path, model: Path) -> dict[str, Any]:
    """The build used and llama-bench's plain generation speed on the target (128 tokens, no prompt)."""
    from specdec.bench.llama_cpp import LlamaCppError, plain_tg_speed

    info: dict[str, Any] = {"bin_dir": str(bin_dir)}
    if model.suffix != ".gguf":
        info["error"] = f"the target {model.name} is not a GGUF file"
        return info
    try:
        timing = plain_tg_speed(bin_dir, model)
    except LlamaCppError as e:
        info["error"] = str(e)
        return info
    info.update(tg_tokens=timing.n_gen, tg_tokens_per_s=timing.avg_tokens_per_s, threads=timing.n_threads)
    info["model_type"] = timing.model_type
    return info


def _reply_length(plain: object, task: Task, prompt: tuple[int, ...]) -> int:
    """Tokens every method decodes for ``prompt``: plain greedy decoding's reply up to and
    including its end-of-turn token for chat tasks (``Task.ends_with_reply``; at least 1), else
    the task's fixed count. Untimed."""
    if not task.ends_with_reply or not isinstance(plain, SpecdecMethod):
        return task.max_new_tokens
    from specdec.engine.chat import end_of_turn_ids

    generator = plain.generator
    tokenizer = generator.target.tokenizer
    stops = end_of_turn_ids(tokenizer) if tokenizer is not None else frozenset()
    out = generator.generate(list(prompt), max_new_tokens=task.max_new_tokens, stop_token_ids=stops)
    return min(task.max_new_tokens, len(out.token_ids) + (out.finish_reason != "length"))


def run_bench(config: BenchConfig, progress: bool = True) -> BenchResult:
    """Load the models, build the tasks and methods, time everything."""
    from tqdm import tqdm

    target = load_model(config.target, dtype=config.dtype, device=config.device)
    methods = list(dict.fromkeys(["plain", *config.methods]))
    vocab, context = target.config.vocab_size, target.max_seq_len
    if config.prompts_file is not None:
        records = read_prompt_file(config.prompts_file)
        tasks = prompt_file_tasks(records, target.tokenizer, vocab, context, config.max_new_tokens)
    else:
        names = list(config.tasks or default_tasks(Path(target.path), target.tokenizer))
        tasks = build_tasks(
            names, config.num_prompts, target.tokenizer, vocab, context, config.max_new_tokens
        )
    cut = [source for task in tasks for source in task.cut]
    if cut:
        print(
            f"specdec bench: {len(cut)} prompt(s) longer than the context allows were cut to their last tokens "
            "(listed in bench.md)",
            file=sys.stderr,
        )
    llama_cpp = Path(config.llama_cpp) if config.llama_cpp else None
    built: dict[str, Method] = {}
    errors: dict[str, str] = {}
    hf_cache: dict = {}  # type: ignore[type-arg]
    for name in methods:
        try:
            built[name] = build_method(
                name, target, config.draft, config.num_draft_tokens, hf_cache, config.draft_vocab, llama_cpp
            )
        except Exception as e:  # a drafter that cannot be built is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
    if "plain" not in built:
        raise RuntimeError(f"plain decoding failed to build: {errors['plain']}")

    first = list(tasks[0].prompts[0])
    for name, method in list(built.items()):
        try:
            method.generate(first, WARMUP_TOKENS, config.sampling, text=tasks[0].text(0))
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            del built[name]

    total = sum(len(t.prompts) for t in tasks) * config.runs * len(built)
    bar = tqdm(total=total, desc="bench", unit="gen", disable=not progress)
    rows: list[Row] = []
    for task in tasks:
        cells = {name: _Cell(error=errors.get(name)) for name in methods}
        reference: dict[int, list[int]] = {}
        for i, prompt in enumerate(task.prompts):
            new_tokens = _reply_length(built["plain"], task, prompt) if config.greedy else task.max_new_tokens
            for r in range(config.runs):
                seed = 1000 * i + r  # the same seeds for every method
                for name, method in built.items():
                    cell = cells[name]
                    bar.update(1)
                    if cell.error is not None:
                        continue
                    bar.set_postfix_str(f"{task.name}/{name}")
                    try:
                        run = method.generate(
                            list(prompt), new_tokens, config.sampling, seed, text=task.text(i)
                        )
                    except Exception as e:
                        cell.error = f"{type(e).__name__}: {e}"
                        continue
                    cell.runs.setdefault(i, []).append(run)
                    if run.token_ids is not None:
                        reference.setdefault(i, run.token_ids)  # plain runs first
        reference_or_none = reference if config.greedy else None
        rows += [_summarise(task, name, cells[name], reference_or_none) for name in methods]
    bar.close()
    rows = _with_speedups(rows + _overall(rows, methods))
    meta = machine_info()
    meta["dtype"] = "quantized" if target.quantized else str(target.dtype).removeprefix("torch.")
    if target.quantized and get_options().q8_rows:
        meta["dtype"] = "quantized, 8-bit rows"
    meta["target"] = _model_info(target)
    meta["draft"] = _draft_info(config.draft)
    meta["errors"] = errors
    meta["cut_prompts"] = cut
    meta["tasks"] = [t.name for t in tasks]
    if llama_cpp is not None:
        meta["llama_cpp"] = _llama_cpp_info(llama_cpp, Path(target.path))
    meta["parallel_threads"] = {  # parallel rows: the torch threads of the target and of the draft thread
        name: {"target": method.target_threads, "draft": method.generator.parallel.draft_threads}
        for name, method in built.items()
        if isinstance(method, SpecdecMethod)
        and method.generator.parallel is not None
        and method.target_threads is not None
    }
    meta["draft_vocab"] = {  # methods whose drafts score a reduced vocabulary: its size
        name: len(draft_vocab)
        for name, method in built.items()
        if isinstance(method, SpecdecMethod)
        and method.generator.drafter is not None
        and (draft_vocab := method.generator.drafter.capabilities.draft_vocab) is not None
    }
    return BenchResult(config, meta, rows, {t.name: list(t.sources) for t in tasks})
