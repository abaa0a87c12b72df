"""The verify cost curve: time of one target forward over k tokens, k = 1..32.

Speculative decoding pays off when a forward over k + 1 tokens costs little more than over
one token, i.e. when decoding is memory-bound (Leviathan et al. 2023, Sec. 3.3; Chen et al.
2023, Sec. 2). This measures that curve on random-weight Llama targets of about 100M, 300M
and 700M parameters (vocabulary 32000, built directly from a :class:`ModelConfig`), and
compares plain decoding's time per token with the memory-bandwidth floor

    floor = bytes of the weights one token streams / memory bandwidth

(every weight matrix once, the embedding table excepted: a lookup reads one row). The
bandwidth is the better of a large tensor copy (read + write bytes / time) and a sum over a
large tensor (read bytes / time): the stricter floor.

On a GPU (``--device cuda``) the clock is the wall clock with the device synchronised around
each timing, and plain decoding is timed twice: with CUDA graphs (the engine's default there)
and eagerly (``SPECDEC_CUDA_GRAPHS=0``).

Results go to ``cost_curve.json`` one (size, dtype) entry at a time; a rerun skips the
entries already there, so an interrupted measurement resumes.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from specdec import kernels
from specdec.models import LoadedModel, ModelConfig, Transformer
from specdec.models.llama import rope_inv_freq

CONTEXT = 128  # tokens already in the cache when the k tokens are scored


def llama_config(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=CONTEXT + 128,
    )


SIZES: dict[str, ModelConfig] = {
    "100M": llama_config(768, 8, 2048, 12, 12),
    "300M": llama_config(1024, 18, 2816, 16, 16),
    "700M": llama_config(1536, 24, 4096, 12, 4),
}


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu") -> Transformer:
    """A Transformer with N(0, 0.02) weights and unit norms, built without a checkpoint (drawn on
    the CPU, so every device gets the same weights)."""
    with torch.device("meta"):
        module = Transformer(cfg)
    module = module.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    module.inv_freq = rope_inv_freq(cfg)
    module = module.to(device).eval().requires_grad_(False)
    module.fuse()
    return module


def streamed_weight_bytes(module: Transformer) -> int:
    """Bytes one decoding step reads from the weights (the embedding table counts one row)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    emb = module.model.embed_tokens.weight
    if emb is not module.lm_head.weight:
        total -= emb.numel() * emb.element_size()
    return total


def _sync() -> None:
    """Wait for queued GPU work (a no-op where CUDA was never used)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """``(wall, cpu)`` seconds of ``fn()``; with one thread the CPU time leaves out time spent
    waiting for a core that other processes hold. GPU work is waited for on both sides."""
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _best_seconds(fns: list[Any], clock: str, repeats: int) -> float:
    """The fastest of ``repeats`` timed runs of each of ``fns`` (after one untimed run each) on
    ``clock``, ``wall`` or ``cpu``: background load only ever adds time."""
    index = ("wall", "cpu").index(clock)
    best = float("inf")
    for fn in fns:
        fn()
        best = min(best, *(_timed(fn)[index] for _ in range(repeats)))
    return best


def copy_bandwidth(clock: str = "wall", megabytes: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes per second of a large tensor copy, counting the read and the write."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _best_seconds([lambda: dst.copy_(src)], clock, repeats)


def read_bandwidth(clock: str = "wall", megabytes: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes per second of reading a large tensor: the faster of a sum (reads every byte,
    writes one number) and a one-row product with it as a weight matrix (what decoding does)."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    matrix, row = src.view(-1, 4096), torch.ones(1, 4096, device=device)
    seconds = _best_seconds([src.sum, lambda: kernels.linear(row, matrix)], clock, repeats)
    return src.numel() * src.element_size() / seconds


@torch.inference_mode()
def forward_times(module: Transformer, ks: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """Median ``wall`` and ``cpu`` seconds of one forward over k tokens after ``CONTEXT``
    cached tokens, as ``{"wall": {k: s}, "cpu": {k: s}}``."""
    device = module.lm_head.weight.device
    cache = module.new_cache(1, CONTEXT + max(ks) + 1)
    context = torch.randint(0, module.config.vocab_size, (1, CONTEXT), device=device)
    module(context, torch.arange(CONTEXT, device=device), cache, num_logits=1)
    module(context[:, :1], torch.arange(CONTEXT, CONTEXT + 1, device=device), cache)  # warm-up
    times: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
    for k in ks:
        tokens = torch.randint(0, module.config.vocab_size, (1, k), device=device)  # (1, k)
        pos = torch.arange(CONTEXT, CONTEXT + k, device=device)
        runs = [_timed(lambda: module(tokens, pos, cache)) for _ in range(repeats)]  # noqa: B023
        times["wall"][str(k)] = statistics.median(r[0] for r in runs)
        times["cpu"][str(k)] = statistics.median(r[1] for r in runs)
    return times


def plain_decode_time(module: Transformer, cfg: ModelConfig, new_tokens: int, graphs: bool = True) -> dict[str, float]:
    """Seconds per token of plain greedy decoding with our engine, prefill excluded (the
    engine's own timing, wall clock, best of three runs); stored under both clocks. Without
    ``graphs`` every pass runs eagerly (on a GPU; elsewhere there are none)."""
    from specdec.engine import SpeculativeGenerator

    model = LoadedModel(module, cfg, None, Path("random"))
    if not graphs:
        model.graphs = None
    generator = SpeculativeGenerator(model)
    prompt = torch.randint(0, cfg.vocab_size, (CONTEXT,)).tolist()

    def per_token() -> float:  # decoding only: the engine's stats leave the prefill out
        stats = generator.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).stats
        return (stats.total_s - stats.prefill_s) / new_tokens

    per_token()  # warm-up (and, on a GPU, the graphs' recording)
    best = min(per_token() for _ in range(3))  # background load only ever adds time
    return {"wall": best, "cpu": best}


def measure(
    out: Path,
    sizes: list[str],
    dtypes: list[str],
    ks: list[int],
    repeats: int = 3,
    new_tokens: int = 16,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure every (size, dtype) not yet in ``out/cost_curve.json``; return all entries.

    ``clock`` is ``cpu`` when torch runs one thread (robust to other processes), else ``wall``;
    ratios and plots use it; both clocks are stored.
    """
    from tqdm import tqdm

    from specdec.models.loading import resolve_device

    device = str(resolve_device(device))  # a clear error before any measurement
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cost_curve.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"entries": {}}
    if "bandwidth_bytes_per_s" not in data:
        data["torch_threads"] = torch.get_num_threads()
        data["device"] = device if device == "cpu" else torch.cuda.get_device_name(device)
        data["clock"] = "cpu" if data["torch_threads"] == 1 and device == "cpu" else "wall"
        data["copy_bandwidth_bytes_per_s"] = copy_bandwidth(data["clock"], device=device)
        data["read_bandwidth_bytes_per_s"] = read_bandwidth(data["clock"], device=device)
        # The floor uses the faster of the two: the lower (stricter) floor.
        data["bandwidth_bytes_per_s"] = max(
            data["copy_bandwidth_bytes_per_s"], data["read_bandwidth_bytes_per_s"]
        )
    clock = data["clock"]
    todo = [(s, d) for s in sizes for d in dtypes if f"{s}/{d}" not in data["entries"]]
    for size, dtype in tqdm(todo, desc="cost curve", disable=not progress):
        cfg = SIZES[size]
        torch.manual_seed(0)
        module = random_model(cfg, getattr(torch, dtype), device)
        weight_bytes = streamed_weight_bytes(module)
        times = forward_times(module, ks, repeats)
        per_token = plain_decode_time(module, cfg, new_tokens)
        eager = plain_decode_time(module, cfg, new_tokens, graphs=False) if device != "cpu" else None
        floor = weight_bytes / data["bandwidth_bytes_per_s"]
        data["entries"][f"{size}/{dtype}"] = {
            "size": size,
            "dtype": dtype,
            "parameters": cfg.num_parameters,
            "streamed_weight_bytes": weight_bytes,
            "forward_wall_s": times["wall"],
            "forward_cpu_s": times["cpu"],
            "plain_wall_s_per_token": per_token["wall"],
            "plain_cpu_s_per_token": per_token["cpu"],
            "bandwidth_floor_s": floor,
            "plain_over_floor": per_token[clock] / floor,
        }
        if eager is not None:  # a GPU: plain decoding without CUDA graphs too
            data["entries"][f"{size}/{dtype}"]["plain_eager_wall_s_per_token"] = eager["wall"]
        del module
        path.write_text(json.dumps(data, indent=1))
    path.write_text(json.dumps(data, indent=1))
    return data


def to_markdown(data: dict[str, Any]) -> str:
    bandwidth = data["bandwidth_bytes_per_s"] / 1e9
    clock = data["clock"]
    kinds = (("copy", "read + write bytes"), ("read", "sum or one-row product, read bytes"))
    measured = (
        " and ".join(
            f"a {kind} ({what}, {data[f'{kind}_bandwidth_bytes_per_s'] / 1e9:.1f})"
            for kind, what in kinds
            if f"{kind}_bandwidth_bytes_per_s" in data
        )
        or "a copy (read + write bytes)"
    )
    digits = 1 if bandwidth < 200 else 3  # a GPU's times are fractions of a millisecond
    device = data.get("device", "cpu")

    def eager(e: dict[str, Any]) -> str:  # a GPU: plain decoding without CUDA graphs in brackets
        return f" ({e['plain_eager_wall_s_per_token'] * 1e3:.{digits}f} eager)" if "plain_eager_wall_s_per_token" in e else ""

    lines = [
        f"Device: {device}. Bandwidth: {bandwidth:.1f} GB/s, the best of {measured}, {data['torch_threads']} thread(s); "
        f"times on the {clock} clock (wall clock of t(k=1) in brackets).",
        "",
        "| model | dtype | params | t(k=1) ms | t(4)/t(1) | t(8)/t(1) | t(16)/t(1) | t(32)/t(1) "
        "| plain ms/token | floor ms | plain / floor |",
        "|" + "---|" * 11,
    ]
    for e in data["entries"].values():
        t = {int(k): v for k, v in e[f"forward_{clock}_s"].items()}
        wall_1 = e["forward_wall_s"].get("1", 0.0) * 1e3
        ratios = [f"{t[k] / t[1]:.2f}" if k in t and 1 in t else "–" for k in (4, 8, 16, 32)]
        lines.append(
            f"| {e['size']} | {e['dtype']} | {e['parameters'] / 1e6:.0f}M | {t.get(1, 0) * 1e3:.{digits}f} "
            f"({wall_1:.{digits}f}) | "
            + " | ".join(ratios)
            + f" | {e[f'plain_{clock}_s_per_token'] * 1e3:.{digits}f}{eager(e)} | {e['bandwidth_floor_s'] * 1e3:.{digits}f} "
            f"| {e['plain_over_floor']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Forward time against k (absolute and relative to k = 1); plain decoding against the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(data["entries"].values())
    clock = data["clock"]
    fig, (ax_abs, ax_rel, ax_floor) = plt.subplots(1, 3, figsize=(15, 4))
    for e in entries:
        ks = sorted(int(k) for k in e[f"forward_{clock}_s"])
        ts = [e[f"forward_{clock}_s"][str(k)] * 1e3 for k in ks]
        label = f"{e['size']} {e['dtype']}"
        ax_abs.plot(ks, ts, marker=".", label=label)
        ax_rel.plot(ks, [t / ts[0] for t in ts], marker=".", label=label)
    ax_abs.set(
        xlabel="tokens per forward (k)",
        ylabel=f"ms per forward ({clock} time)",
        yscale="log",
        title="target forward",
    )
    ax_rel.set(xlabel="tokens per forward (k)", ylabel="t(k) / t(1)", title="cost relative to k = 1")
    ax_abs.legend(fontsize="small")
    labels = [f"{e['size']}\n{e['dtype']}" for e in entries]
    xs = range(len(entries))
    ax_floor.bar(
        [x - 0.2 for x in xs], [e[f"plain_{clock}_s_per_token"] * 1e3 for e in entries], 0.4, label="plain"
    )
    ax_floor.bar([x + 0.2 for x in xs], [e["bandwidth_floor_s"] * 1e3 for e in entries], 0.4, label="floor")
    ax_floor.set_xticks(list(xs), labels, fontsize="small")
    ax_floor.set(ylabel="ms per token", title="plain decoding vs bandwidth floor")
    ax_floor.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
