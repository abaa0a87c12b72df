"""A memory-bound stand-in for a trained target: the same function, the cost of a large model.

The demo target (7M parameters) fits in a CPU's last-level cache, so on a CPU a pass over
k tokens is bound by arithmetic and costs about k times a one-token pass; speculative
decoding's premise (verifying k tokens costs about one step, because a step is bound by
reading the weights) does not hold for it. No larger *trained* pair ships with the project
and nothing is downloaded, so to measure the engine where that premise holds this module
writes a copy of a Llama folder whose MLPs are padded with zeros:

* ``gate_proj`` / ``up_proj`` get extra output rows of zeros, so the extra intermediate
  features are ``silu(0) * 0 = 0``;
* ``down_proj`` gets extra input columns of zeros, so they add exact zeros to each sum.

Every output is therefore that of the source model (up to the order of float additions in
the matrix products; tested token-for-token under greedy decoding), the draft model's
acceptance is the one measured on the source, while each step reads the bytes of the padded
model: with ``intermediate_size=32768`` the demo target becomes a ~154M-parameter model
(~310 MB in bfloat16), ten times the L3 cache of the machine the benchmarks ran on.

    python -m specdec.bench.widen --out runs/wide-target --intermediate-size 32768
    specdec bench --target runs/wide-target --draft demo-draft

Trained head folders (``medusa/``, ``eagle/``, ``early-exit/``) read hidden states that the
padding leaves unchanged, so they are copied along and stay valid (the EAGLE head's config
then names its own, unpadded, MLP width).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specdec.models.config import ModelLoadError
from specdec.models.loading import resolve_path

MLP = ".mlp."
HEAD_FOLDERS = ("medusa", "eagle", "early-exit")


class WidenError(ValueError):
    """A source that cannot be widened (not a single-file Llama folder, or a smaller size)."""


def widen_tensor(name: str, weight: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """``weight`` with its intermediate dimension zero-padded to ``intermediate_size``."""
    if name.endswith(("gate_proj.weight", "up_proj.weight")):  # [I, H] -> [I', H]
        pad = weight.new_zeros(intermediate_size - weight.shape[0], weight.shape[1])
        return torch.cat([weight, pad], dim=0)
    if name.endswith("down_proj.weight"):  # [H, I] -> [H, I']
        pad = weight.new_zeros(weight.shape[0], intermediate_size - weight.shape[1])
        return torch.cat([weight, pad], dim=1)
    return weight


def widen(source: str | Path, out: str | Path, intermediate_size: int) -> Path:
    """Write ``out``: ``source`` with every MLP zero-padded to ``intermediate_size``."""
    src, dst = resolve_path(source), Path(out)
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise WidenError(f"{src} is not a Llama model (model_type {config.get('model_type')!r})")
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise WidenError(f"{src} has no single model.safetensors (sharded folders are not supported here)")
    if intermediate_size < config["intermediate_size"]:
        raise WidenError(
            f"--intermediate-size {intermediate_size} is below the source's {config['intermediate_size']}"
        )
    if dst.resolve() == src:
        raise WidenError("--out must differ from the source folder")

    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with safe_open(weights, "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = f.get_tensor(name)
            tensors[name] = widen_tensor(name, tensor, intermediate_size) if MLP in name else tensor
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    source_intermediate = config["intermediate_size"]
    config["intermediate_size"] = intermediate_size
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in src.iterdir():
        if item.name in ("config.json", "model.safetensors"):
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)
        elif item.name in HEAD_FOLDERS:
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
            _pin_head_width(dst / item.name, source_intermediate)
    return dst


def _pin_head_width(folder: Path, intermediate_size: int) -> None:
    """An EAGLE head's decoder layer takes the target's MLP width unless its config names one:
    name the source's, which the copied weights have."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    meta = json.loads(config_path.read_text())
    if meta.get("method") == "eagle":
        meta.setdefault("intermediate_size", intermediate_size)
        config_path.write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specdec.bench.widen", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--source", default="demo-target", help="Llama folder or demo-target")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--intermediate-size", type=int, default=32768, help="padded MLP width")
    args = parser.parse_args(argv)
    try:
        path = widen(args.source, args.out, args.intermediate_size)
    except (WidenError, ModelLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({_parameters(path / 'model.safetensors') / 1e6:.1f}M parameters)")
    return 0


def _parameters(weights: Path) -> int:
    """Parameters in a safetensors file, from its header (the tensors are not read)."""
    with safe_open(weights, "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118


if __name__ == "__main__":
    raise SystemExit(main())
