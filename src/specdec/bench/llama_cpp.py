"""llama.cpp as a peer in ``specdec bench --llama-cpp DIR``, on the target's own GGUF file.

Three methods, each a program of a llama.cpp build (``scripts/build_llama_cpp.sh``):

* ``llama.cpp`` — plain decoding, timed by ``llama-bench -pg P,N -o json``: a prompt of the
  prompt's length and ``N`` generated tokens (random token ids: the time is what matters);
* ``llama.cpp-lookup`` — ``llama-lookup``, prompt lookup decoding (n-grams of the context);
* ``llama.cpp-spec`` — ``llama-speculative-simple --spec-type draft-simple`` with the draft GGUF.

The last two take the prompt as text (the chat template's rendering) and print their timings::

    encoded   45 tokens in    0.060 seconds, speed:  750.000 t/s
    decoded  129 tokens in    1.120 seconds, speed:  115.179 t/s
    n_draft      = 4
    n_predict    = 129
    n_drafted    = 120
    n_accept     = 80
    accept       = 66.667%

A run's time is encode + decode (prefill included, model loading not), as for our methods; its
CPU time is not measured (0: left out of the CPU-time ratios).
llama.cpp runs its own quantized kernels, so its tokens are not compared with plain decoding.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.bench.methods import GREEDY, Run
from specdec.sampling import SamplingParams

LLAMA_CPP_METHODS = ("llama.cpp", "llama.cpp-lookup", "llama.cpp-spec")
PROGRAMS = {"llama.cpp": "llama-bench", "llama.cpp-lookup": "llama-lookup", "llama.cpp-spec": "llama-speculative-simple"}
TIMEOUT_S = 600

_FLOAT = r"([0-9]+(?:\.[0-9]*)?)"
_ENCODED = re.compile(rf"encoded\s+(\d+) tokens in\s+{_FLOAT} seconds")
_DECODED = re.compile(rf"decoded\s+(\d+) tokens in\s+{_FLOAT} seconds")
# Log lines may carry a time stamp and level ("0.03.071.758 I n_drafted    = 20").
_COUNT = re.compile(r"\b(n_draft|n_predict|n_drafted|n_accept)\s*=\s*(\d+)")


class LlamaCppError(RuntimeError):
    """A llama.cpp program failed or printed what we cannot parse."""


@dataclass(frozen=True)
class SpecTimings:
    """What ``llama-lookup`` / ``llama-speculative-simple`` print at the end of a run."""

    prompt_tokens: int
    encode_s: float
    new_tokens: int
    decode_s: float
    n_draft: int | None  # the draft length asked for
    n_drafted: int | None
    n_accept: int | None

    @property
    def acceptance_rate(self) -> float | None:
        return (self.n_accept or 0) / self.n_drafted if self.n_drafted else None


@dataclass(frozen=True)
class BenchTiming:
    """One test of ``llama-bench -o json``."""

    n_prompt: int
    n_gen: int
    avg_s: float  # mean wall time of the test (prompt and generation together)
    avg_tokens_per_s: float  # (n_prompt + n_gen) / time, as llama-bench reports it
    n_threads: int
    model_type: str


def parse_spec_output(text: str) -> SpecTimings:
    """Parse the end of a ``llama-lookup`` or ``llama-speculative-simple`` run (stdout and stderr)."""
    encoded, decoded = _ENCODED.findall(text), _DECODED.findall(text)
    if not encoded or not decoded:
        raise LlamaCppError("no 'encoded/decoded N tokens in S seconds' lines in the output")
    counts = {name: int(value) for name, value in _COUNT.findall(text)}
    return SpecTimings(
        prompt_tokens=int(encoded[-1][0]),
        encode_s=float(encoded[-1][1]),
        new_tokens=int(decoded[-1][0]),
        decode_s=float(decoded[-1][1]),
        n_draft=counts.get("n_draft"),
        n_drafted=counts.get("n_drafted"),
        n_accept=counts.get("n_accept"),
    )


def parse_bench_json(text: str) -> list[BenchTiming]:
    """Parse ``llama-bench -o json`` (a JSON list of tests; ``-o jsonl``'s lines are read too)."""
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    try:
        if first is not None and lines[first].lstrip().startswith("["):  # the list, maybe logs after it
            tests, _ = json.JSONDecoder().raw_decode("".join(lines[first:]).lstrip())
        else:
            tests = [json.loads(line) for line in lines if line.lstrip().startswith("{")]
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench printed no JSON: {e}") from None
    if not tests:
        raise LlamaCppError("llama-bench printed no test")
    return [
        BenchTiming(
            n_prompt=int(t["n_prompt"]),
            n_gen=int(t["n_gen"]),
            avg_s=int(t["avg_ns"]) / 1e9,
            avg_tokens_per_s=float(t["avg_ts"]),
            n_threads=int(t["n_threads"]),
            model_type=str(t.get("model_type", "")),
        )
        for t in tests
    ]


def find_program(bin_dir: Path, program: str) -> Path:
    """``bin_dir/program``, or ``bin_dir/build/bin/program`` (the build script's layout)."""
    for candidate in (bin_dir / program, bin_dir / "bin" / program, bin_dir / "build" / "bin" / program):
        if candidate.is_file():
            return candidate
    raise LlamaCppError(f"no {program} in {bin_dir} (build it with scripts/build_llama_cpp.sh)")


def sampling_flags(sampling: SamplingParams, seed: int) -> list[str]:
    """llama.cpp's sampler set to ours: greedy, or temperature with only the cuts asked for."""
    if sampling.greedy:
        return ["--temp", "0"]
    return [
        "--temp", str(sampling.temperature), "--seed", str(seed), "--top-k", str(sampling.top_k or 0),
        "--top-p", str(sampling.top_p or 1.0), "--min-p", "0",
    ]  # fmt: skip


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise LlamaCppError(f"{Path(argv[0]).name} ran past {TIMEOUT_S} s") from None
    output = done.stdout + "\n" + done.stderr
    if done.returncode != 0:
        last = [line for line in output.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise LlamaCppError(f"{Path(argv[0]).name} exited with {done.returncode}: {last[0].strip()}")
    return output


class LlamaCppMethod:
    """One llama.cpp program on the target's GGUF file, behind the bench's ``generate`` call."""

    def __init__(
        self, name: str, bin_dir: Path, model: Path, draft: Path | None, num_draft_tokens: int, threads: int | None = None
    ) -> None:
        if name not in PROGRAMS:
            raise ValueError(f"unknown llama.cpp method {name!r}; choose from {', '.join(LLAMA_CPP_METHODS)}")
        if model.suffix != ".gguf":
            raise LlamaCppError(f"llama.cpp runs GGUF files; the target is {model}")
        if name == "llama.cpp-spec" and (draft is None or draft.suffix != ".gguf"):
            raise LlamaCppError("llama.cpp-spec needs a GGUF draft (--draft file.gguf)")
        self.name = name
        self.program = find_program(bin_dir, PROGRAMS[name])
        self.model, self.draft = model, draft
        self.num_draft_tokens = num_draft_tokens
        self.threads = threads or torch.get_num_threads()
        self.last_timings: SpecTimings | None = None

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        text: str | None = None,
    ) -> Run:
        """Run the program once; ``text`` is the prompt as text (lookup and speculative)."""
        if self.name == "llama.cpp":
            return self._bench(len(prompt_ids), max_new_tokens)
        if text is None:
            raise LlamaCppError(f"{self.name} needs the prompt as text (a prompt cut to fit the context has none)")
        context = len(prompt_ids) + max_new_tokens + 2 * self.num_draft_tokens + 64
        argv = [
            str(self.program), "-m", str(self.model), "-p", text, "-n", str(max_new_tokens), "-c", str(context),
            "-t", str(self.threads), "--spec-draft-n-max", str(self.num_draft_tokens), "--ignore-eos",
            *sampling_flags(sampling, seed),
        ]  # fmt: skip
        if self.name == "llama.cpp-spec":
            argv += ["-md", str(self.draft), "--spec-type", "draft-simple", "-td", str(self.threads)]
        timings = parse_spec_output(_run(argv))
        self.last_timings = timings
        wall = timings.encode_s + timings.decode_s
        return Run(None, wall, 0.0, None, new_tokens=timings.new_tokens, drafted=timings.n_drafted, accepted=timings.n_accept)

    def _bench(self, prompt_tokens: int, new_tokens: int) -> Run:
        argv = [
            str(self.program), "-m", str(self.model), "-p", "0", "-n", "0", "-pg", f"{prompt_tokens},{new_tokens}",
            "-r", "1", "-t", str(self.threads), "-o", "json",
        ]  # fmt: skip
        [timing] = parse_bench_json(_run(argv))
        return Run(None, timing.avg_s, 0.0, None, new_tokens=timing.n_gen)


def plain_tg_speed(bin_dir: Path, model: Path, new_tokens: int = 128, threads: int | None = None) -> BenchTiming:
    """``llama-bench -p 0 -n N``: llama.cpp's plain generation speed on ``model`` (no prompt)."""
    program = find_program(bin_dir, "llama-bench")
    argv = [str(program), "-m", str(model), "-p", "0", "-n", str(new_tokens), "-r", "3", "-t", str(threads or torch.get_num_threads()), "-o", "json"]
    [timing] = parse_bench_json(_run(argv))
    return timing


def check_bin_dir(path: Path) -> Path:
    """``path`` if it holds llama-bench (directly or under bin/ or build/bin/); else a clear error."""
    if not path.is_dir():
        raise LlamaCppError(f"--llama-cpp {path}: not a folder")
    find_program(path, "llama-bench")
    return path
