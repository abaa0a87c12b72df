"""CUDA graphs for the small passes of decoding (plain steps, verify passes, draft steps).

On a GPU a pass of a small model over a few tokens is bound by kernel launches, not by the
GPU: the demo target launches about ten kernels per layer, each a few microseconds of CPU
work, and the GPU waits for them. A CUDA graph records the launches of one pass once and
replays them with one call (the approach of gpt-fast's ``mode="reduce-overhead"`` and of
vLLM's decode graphs).

A graph replays fixed shapes on fixed memory, so a captured pass:

* reads its tokens and positions from static input tensors the caller's values are copied to;
* attends over a fixed number of cache slots, the pass's ``kv_len`` rounded up to a multiple
  of :data:`SLOT_BUCKET`, under the causal mask of its positions (the slots past the
  committed length are masked, whatever stale keys they hold);
* writes keys and values into the one :class:`~specdec.cache.KVCache` it was captured with.

Graphs are kept per cache, per number of tokens, slot bucket and output kind; a cache that is
dropped takes its graphs with it (:class:`GraphTable`). Graphed: a model's single-sequence
chain passes over at most :data:`MAX_TOKENS` tokens (:class:`GraphedPasses`, the target's and
a draft model's steps) and the drafting passes of the EAGLE head and of early exit
(:func:`chain_pass`); prefill, tree passes and batches run eagerly. The option ``cuda_graphs`` (``SPECDEC_CUDA_GRAPHS=0``) turns graphs off.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from specdec.cache import KVCache
from specdec.options import get_options

MAX_TOKENS = 32  # passes over more tokens per sequence run eagerly (prefill)
SLOT_BUCKET = 256  # attention reads the pass's slots rounded up to a multiple of this
GRAPH_KWARGS = {"num_logits", "return_hidden", "kv_len", "feature_layers"}

Outputs = tuple[torch.Tensor, ...]
# A capture takes the pass to record and returns its outputs (static tensors) and a replay.
Capture = Callable[[Callable[[], Outputs]], tuple[Outputs, Callable[[], None]]]


def enabled(device: torch.device) -> bool:
    """Whether passes on ``device`` are graphed: CUDA, unless the option ``cuda_graphs`` is off
    (:mod:`specdec.options`; ``SPECDEC_CUDA_GRAPHS=0``)."""
    return device.type == "cuda" and get_options().cuda_graphs


def cuda_capture(run: Callable[[], Outputs]) -> tuple[Outputs, Callable[[], None]]:
    """Record ``run`` as a CUDA graph after a warm-up on a side stream (as the PyTorch docs
    advise: the warm-up initialises lazy state such as cuBLAS workspaces outside the capture);
    the capture itself computes nothing, so one replay gives this pass's values."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    graph.replay()
    return outputs, graph.replay


def eager_capture(run: Callable[[], Outputs]) -> tuple[Outputs, Callable[[], None]]:
    """A stand-in for :func:`cuda_capture` that replays by running the pass again into the same
    output tensors: the static-shape pass and the bookkeeping around it, without a GPU (tests)."""
    outputs = run()

    def replay() -> None:
        for static, new in zip(outputs, run(), strict=True):
            static.copy_(new)

    return outputs, replay


def bucket_slots(kv_len: int, max_seq_len: int) -> int:
    """The cache slots a captured pass attends over: ``kv_len`` rounded up to a multiple of
    :data:`SLOT_BUCKET`, at most the cache's size."""
    return min(max_seq_len, SLOT_BUCKET * math.ceil(kv_len / SLOT_BUCKET))


@dataclass
class _Graph:
    inputs: tuple[torch.Tensor, ...]  # static inputs the caller's values are copied to
    outputs: Outputs  # static outputs
    replay: Callable[[], None]


class GraphTable:
    """Recorded passes over caches, each kept per cache and a key that fixes its shapes.

    ``run(cache, key, inputs, fn)`` returns ``fn(*inputs)``: the first time for a (cache, key),
    ``fn`` is recorded on static copies of ``inputs``; later, the inputs are copied into them
    and the recording replays. ``fn`` must take its shapes from the key and touch no other
    memory than its inputs, the cache and the model's weights."""

    def __init__(self, capture: Capture = cuda_capture) -> None:
        self.capture = capture
        self.captures = 0  # graphs recorded so far (tests and benchmarks read it)
        self._graphs: weakref.WeakKeyDictionary[KVCache, dict[tuple[Any, ...], _Graph]] = (
            weakref.WeakKeyDictionary()
        )

    def run(
        self,
        cache: KVCache,
        key: tuple[Any, ...],
        inputs: tuple[torch.Tensor, ...],
        fn: Callable[..., Outputs],
    ) -> Outputs:
        graphs = self._graphs.setdefault(cache, {})
        graph = graphs.get(key)
        if graph is None:
            statics = tuple(x.clone() for x in inputs)
            # The warm-up and the recorded pass write this pass's keys and values: the same
            # values into the same slots, so recording on the caller's inputs is harmless.
            outputs, replay = self.capture(lambda: fn(*statics))
            self.captures += 1
            graph = graphs[key] = _Graph(statics, outputs, replay)
        else:
            for static, value in zip(graph.inputs, inputs, strict=True):
                static.copy_(value)
            graph.replay()
        return tuple(out.clone() for out in graph.outputs)  # (the next replay overwrites them)


def chain_pass(
    table: GraphTable | None,
    cache: KVCache,
    kv_len: int,
    inputs: tuple[torch.Tensor, ...],
    fn: Callable[..., Outputs],
) -> Outputs:
    """A drafter's single-sequence pass ``fn(*inputs, slots=...)`` over ``cache``, whose
    ``inputs[0]`` is ``(1, T)``: eagerly (``slots=None``: ``fn`` attends over the ``kv_len``
    written slots its own way) without a table or for more than :data:`MAX_TOKENS` tokens,
    else recorded / replayed from ``table`` with ``slots`` = the bucket of ``kv_len``
    (``fn`` then attends over that many slots under the causal mask of its positions)."""
    T = inputs[0].shape[1]
    if table is None or T > MAX_TOKENS:
        return fn(*inputs, slots=None)
    slots = bucket_slots(kv_len, cache.max_seq_len)
    return table.run(cache, (T, slots), inputs, partial(fn, slots=slots))


class GraphedPasses:
    """The graphed passes of one model; call it like ``Transformer.forward`` where
    :meth:`applies` says so."""

    def __init__(self, module: torch.nn.Module, capture: Capture = cuda_capture) -> None:
        self.module = module
        self.table = GraphTable(capture)

    @property
    def captures(self) -> int:
        return self.table.captures

    @staticmethod
    def applies(tokens: torch.Tensor, kwargs: dict[str, Any]) -> bool:
        """A single-sequence pass over at most :data:`MAX_TOKENS` tokens whose ``kv_len`` the
        caller knows, with the default mask and cache slots (a chain)."""
        return (
            tokens.dim() == 2
            and tokens.shape[0] == 1
            and 0 < tokens.shape[1] <= MAX_TOKENS
            and kwargs.keys() <= GRAPH_KWARGS
            and kwargs.get("kv_len") is not None
        )

    def __call__(
        self,
        tokens: torch.Tensor,  # (1, T)
        input_pos: torch.Tensor,  # (T,) or (1, T)
        cache: KVCache,
        num_logits: int | None = None,
        return_hidden: bool = False,
        kv_len: int | None = None,
        feature_layers: tuple[int, ...] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from specdec.models.llama import causal_mask

        T = tokens.shape[1]
        assert kv_len is not None
        slots = bucket_slots(kv_len, cache.max_seq_len)
        module = self.module

        def run(static_tokens: torch.Tensor, static_positions: torch.Tensor) -> Outputs:
            mask = causal_mask(static_positions, slots)  # (1, 1, T, slots)
            out = module(
                static_tokens, static_positions, cache, attn_mask=mask, num_logits=num_logits,
                return_hidden=return_hidden, kv_len=slots, feature_layers=feature_layers,
            )  # fmt: skip
            return out if isinstance(out, tuple) else (out,)

        key = (T, slots, num_logits, return_hidden, feature_layers)
        outputs = self.table.run(cache, key, (tokens, input_pos.reshape(1, T)), run)
        return (outputs[0], outputs[1]) if return_hidden else outputs[0]
