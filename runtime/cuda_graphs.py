"""Decode-shaped verify steps replayed from CUDA graphs, so a step costs its kernels and not their launches.

A verify step of B requests carrying up to γ + 1 tokens each launches a few hundred small kernels; on a
GPU their launch overhead can exceed their work. `GraphedSteps` captures a target runner's `run` (the
part of a forward that reads nothing back to the host; see `qwen3.Step`) once per bucket

    (batch rounded up to a power of two, tokens rounded up to a power of two, keys rounded up to `key_block`)

and replays it with the step's inputs padded to the bucket: padding rows and tokens write into the cache's
scratch slot and their outputs are dropped. Steps larger than the biggest bucket (prefills) run eagerly.

Only `_capture` and `run` touch CUDA; the bucketing and padding are plain tensor code, checked on the CPU
by running the padded step eagerly against the unpadded one (tests/test_device.py). Off unless a runner's
`use_cuda_graphs()` is called; the served GPU layout turns it on (model_handlers).
"""

from __future__ import annotations

from typing import Any

import torch


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class GraphedSteps:
    def __init__(self, runner: Any, *, max_batch: int = 32, max_tokens: int = 16, key_block: int = 256) -> None:
        """`runner`: a target runner with `run(step, capture, logits)`, `scratch`, `max_len` (qwen3.Qwen3Target)."""
        self.runner, self.max_batch, self.max_tokens, self.key_block = runner, max_batch, max_tokens, key_block
        self.graphs: dict[tuple, tuple[Any, Any, Any]] = {}  # key -> (graph, static step, static outputs)
        self.pool: Any = None  # one memory pool shared by every graph of this runner

    def bucket(self, shape: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """The padded (batch, tokens, keys) a step of `shape` replays at; None: too big, run it eagerly."""
        batch, tokens, keys = shape
        if batch > self.max_batch or tokens > self.max_tokens:
            return None
        keys = min(-(-keys // self.key_block) * self.key_block, self.runner.max_len)
        return _pow2(batch), _pow2(tokens), keys

    def fits(self, step: Any) -> bool:
        return self.bucket(step.shape) is not None

    def padded(self, step: Any) -> Any:
        """`step` padded to its bucket (what a graph is captured and replayed with)."""
        return step.padded(*self.bucket(step.shape), scratch=self.runner.scratch)

    def run(self, step: Any, capture: tuple[int, ...], logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The runner's `run(step, capture, logits)`, replayed from the bucket's graph (captured on first use)."""
        padded = self.padded(step)
        key = (padded.shape, tuple(capture), logits)
        if key not in self.graphs:
            self.graphs[key] = self._capture(padded, capture, logits)
        graph, static, outputs = self.graphs[key]
        for name in ("ids", "positions", "valid", "read_slot", "write_slot"):
            getattr(static, name).copy_(getattr(padded, name))
        graph.replay()
        batch, tokens, _ = step.shape
        # Cloned: the next replay overwrites the graph's outputs.
        head, features = outputs
        return head[:batch, :tokens].clone(), None if features is None else features[:batch, :tokens].clone()

    def _capture(self, step: Any, capture: tuple[int, ...], logits: bool) -> tuple[Any, Any, Any]:
        # Warm-up on a side stream (as torch.cuda.graphs recommends) with the real inputs: it writes the same
        # keys / values the replay will, so running it is harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.runner.run(step, capture, logits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.runner.run(step, capture, logits)
        self.pool = graph.pool()
        return graph, step, outputs
