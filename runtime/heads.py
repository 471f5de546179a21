"""DSpark's sequential heads, shared by every model family and used as the plugins' oracle.

Markov head (bias from the previous token), confidence head, and the draft sampling step. All act
on one block position at a time for a batch of requests, exactly like the `MarkovSample` and
`DSparkConfidence` kernels do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .calibration import apply_sts
from .errors import CheckpointError

MARKOV_KINDS = ("none", "vanilla", "gated", "rnn")

# The Markov head's tensors inside a drafter, relative to the module holding them (`markov_head.` in a
# Qwen3 drafter, `mtp.{last}.markov_head.` in DeepSeek-V4), as DeepSpec names them in
# deepspec/modeling/dspark/markov_head.py: `markov_w1` (nn.Embedding, [V, r]), `markov_w2` (nn.Linear
# r -> V, [V, r]); GatedMarkovHead's `gate_proj` (nn.Linear d + r -> r, input [h_k; W1[x_{k-1}]]) and
# RNNHead's `joint_proj` (nn.Linear 2r + d -> 3r, input [s_{k-1}; W1[x_{k-1}]; h_k], output chunks
# gate / candidate / output), both with a bias.
MARKOV_PROJECTION = {"gated": "gate_proj", "rnn": "joint_proj"}
# Names that older checkpoints use for the same tensors -> DeepSpec's: this project's first gated / rnn
# drafters (`markov_gate`, `markov_rnn`) and older DeepSeek-V4 MTP stages (`embed`, `head`).
_OLD_MARKOV_NAME = re.compile(r"(^|\.)markov_head\.(markov_gate|markov_rnn|embed|head)\.(weight|bias)$")
_OLD_TO_DEEPSPEC = {"markov_gate": "gate_proj", "markov_rnn": "joint_proj", "embed": "markov_w1", "head": "markov_w2"}


def canonical_markov_name(name: str) -> str:
    """A tensor name with an older Markov-head name replaced by DeepSpec's; any other name unchanged."""
    m = _OLD_MARKOV_NAME.search(name)
    if m is None:
        return name
    return f"{name[: m.start(2)]}{_OLD_TO_DEEPSPEC[m.group(2)]}.{m.group(3)}"


def markov_tensor_shapes(kind: str, vocab: int, rank: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """DeepSpec's names (under `markov_head.`) and shapes of a `kind` Markov head's tensors, in the
    order DeepSpec's modules declare them; {} for no head."""
    if kind == "none" or rank == 0:
        return {}
    shapes = {"markov_w1.weight": (vocab, rank), "markov_w2.weight": (vocab, rank)}
    if kind == "gated":
        shapes |= {"gate_proj.weight": (rank, hidden + rank), "gate_proj.bias": (rank,)}
    elif kind == "rnn":
        shapes |= {"joint_proj.weight": (3 * rank, 2 * rank + hidden), "joint_proj.bias": (3 * rank,)}
    elif kind != "vanilla":
        raise ValueError(f"markov_head_type must be one of {MARKOV_KINDS[1:]}, got {kind!r}")
    return {f"markov_head.{name}": shape for name, shape in shapes.items()}


@dataclass
class MarkovHead:
    """B_k from x_{k-1} (and, for gated / rnn, from h_k). `w1` is [V_target, r], `w2` is [V_draft, r].

    vanilla  B = W2 · W1[x]
    gated    B = W2 · (σ(G [h; W1[x]] + g) ⊙ W1[x])                      G: (d + r) -> r
    rnn      z = [s; W1[x]; h] -> (g, c, o);  s' = σ(g) ⊙ s + (1 - σ(g)) ⊙ tanh(c);  B = W2 · tanh(o)
    """

    kind: str
    w1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    proj_weight: torch.Tensor | None = None  # gated `gate_proj`: [r, d + r]; rnn `joint_proj`: [3r, 2r + d]
    proj_bias: torch.Tensor | None = None

    @classmethod
    def from_weights(cls, kind: str, weights: Mapping[str, torch.Tensor], prefix: str = "",
                     source: str | Path = "drafter") -> MarkovHead:
        """The `kind` head held in a drafter's `weights` under `prefix` + `markov_head.` (DeepSpec's names
        or the older ones `canonical_markov_name` knows). `source` names the checkpoint in errors."""
        if kind == "none":
            return cls("none")
        names = {canonical_markov_name(n): n for n in weights if n.startswith(prefix)}
        wanted = [prefix + n for n in markov_tensor_shapes(kind, vocab=1, rank=1, hidden=1)]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise CheckpointError(source, f"missing {kind} Markov head tensor", subject=missing[0],
                                  expected=", ".join(wanted))
        w = {n: weights[names[n]] for n in wanted}
        proj = f"{prefix}markov_head.{MARKOV_PROJECTION[kind]}." if kind in MARKOV_PROJECTION else None
        return cls(kind, w[f"{prefix}markov_head.markov_w1.weight"], w[f"{prefix}markov_head.markov_w2.weight"],
                   None if proj is None else w[proj + "weight"], None if proj is None else w[proj + "bias"])

    def __post_init__(self) -> None:
        # [r, V]: one row of bias per step is `e @ w2_t`, faster on CPU than F.linear(e, w2) (x @ Wᵀ).
        self.w2_t = None if self.w2 is None else self.w2.t().contiguous()

    @property
    def rank(self) -> int:
        return 0 if self.w1 is None else self.w1.shape[1]

    def initial_state(self, batch: int) -> torch.Tensor | None:
        return torch.zeros(batch, self.rank, dtype=self.w1.dtype, device=self.w1.device) if self.kind == "rnn" else None

    def step(self, prev: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(bias [B, V] or None, W1[prev] [B, r] or None, next state) for one block position."""
        if self.kind == "none":
            return None, None, None
        e = F.embedding(prev, self.w1)
        if self.kind == "vanilla":
            return e @ self.w2_t, e, state
        if self.kind == "gated":
            gate = torch.sigmoid(F.linear(torch.cat([h, e], -1), self.proj_weight, self.proj_bias))
            return (gate * e) @ self.w2_t, e, state
        g, c, o = F.linear(torch.cat([state, e, h], -1), self.proj_weight, self.proj_bias).chunk(3, dim=-1)
        keep = torch.sigmoid(g)
        state = keep * state + (1 - keep) * torch.tanh(c)
        return torch.tanh(o) @ self.w2_t, e, state


@dataclass
class ConfidenceHead:
    """c_k = σ(wᵀ[h_k; W1[x_{k-1}]] + b), the W1 part only with `with_markov`; STS divides the logit by T_k."""

    weight: torch.Tensor  # [1, d (+ r)]
    bias: torch.Tensor | None
    with_markov: bool
    temperatures: list[float] | None = None

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], with_markov: bool, prefix: str = "",
                     temperatures: list[float] | None = None) -> ConfidenceHead:
        """The head held in a drafter's `weights` under `prefix` + `confidence_head.proj.` (DeepSpec's
        `AcceptRatePredictor`; the bias is optional)."""
        proj = f"{prefix}confidence_head.proj."
        return cls(weights[proj + "weight"], weights.get(proj + "bias"), with_markov, temperatures)

    def logit(self, h: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([h, e], -1) if self.with_markov and e is not None else h
        return F.linear(x, self.weight, self.bias)[..., 0]

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, γ] logits -> calibrated confidences (σ(logit_k / T_k))."""
        if self.temperatures is None:
            return torch.sigmoid(logits)
        return apply_sts(logits, self.temperatures[: logits.shape[-1]])


def sample(logits: torch.Tensor, temperatures: list[float], generators: list[torch.Generator | None]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and the distribution it was drawn from ([B], [B, V]).

    Temperature 0 means argmax (the distribution is then one-hot). Each row draws from its own
    generator so that a request's output depends only on its own seed, not on its batch mates.
    """
    tokens = logits.argmax(dim=-1)
    if all(t <= 0 for t in temperatures):  # the common serving case, in three ops
        return tokens, F.one_hot(tokens, logits.shape[-1]).float()
    greedy = torch.tensor([t <= 0 for t in temperatures], dtype=torch.bool, device=logits.device)
    probs = torch.zeros_like(logits, dtype=torch.float32)
    probs[greedy] = F.one_hot(tokens[greedy], logits.shape[-1]).float()
    # Sampled rows one at a time: each has its own generator, and draws where that generator lives (the
    # host, for a drafter on a GPU whose rows are not drawn by the MarkovSample kernel).
    for b in [b for b, t in enumerate(temperatures) if not t <= 0]:
        probs[b] = torch.softmax(logits[b].float() / temperatures[b], dim=-1)
        draw_from = probs[b] if generators[b] is None else probs[b].to(generators[b].device)
        tokens[b] = torch.multinomial(draw_from, 1, generator=generators[b])[0]
    return tokens, probs
