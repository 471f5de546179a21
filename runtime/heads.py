"""DSpark's sequential heads, shared by every model family and used as the plugins' oracle.

Markov head (bias from the previous token), confidence head, and the draft sampling step. All act
on one block position at a time for a batch of requests, exactly like the `MarkovSample` and
`DSparkConfidence` kernels do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MARKOV_KINDS = ("none", "vanilla", "gated", "rnn")


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
    proj_weight: torch.Tensor | None = None  # gated: [r, d + r]; rnn: [3r, 2r + d]
    proj_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # [r, V]: one row of bias per step is `e @ w2_t`, faster on CPU than F.linear(e, w2) (x @ Wᵀ).
        self.w2_t = None if self.w2 is None else self.w2.t().contiguous()

    @property
    def rank(self) -> int:
        return 0 if self.w1 is None else self.w1.shape[1]

    def initial_state(self, batch: int) -> torch.Tensor | None:
        return torch.zeros(batch, self.rank, dtype=self.w1.dtype) if self.kind == "rnn" else None

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

    def logit(self, h: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([h, e], -1) if self.with_markov and e is not None else h
        return F.linear(x, self.weight, self.bias)[..., 0]

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, γ] logits -> calibrated confidences (σ(logit_k / T_k))."""
        if self.temperatures is None:
            return torch.sigmoid(logits)
        temps = torch.tensor(self.temperatures[: logits.shape[-1]], dtype=logits.dtype)
        return torch.sigmoid(logits / temps)


def sample(logits: torch.Tensor, temperatures: list[float], generators: list[torch.Generator | None]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and the distribution it was drawn from ([B], [B, V]).

    Temperature 0 means argmax (the distribution is then one-hot). Each row draws from its own
    generator so that a request's output depends only on its own seed, not on its batch mates.
    """
    tokens = logits.argmax(dim=-1)
    if all(t <= 0 for t in temperatures):  # the common serving case, in three ops
        return tokens, F.one_hot(tokens, logits.shape[-1]).float()
    greedy = torch.tensor([t <= 0 for t in temperatures], dtype=torch.bool)
    probs = torch.zeros_like(logits, dtype=torch.float32)
    probs[greedy] = F.one_hot(tokens[greedy], logits.shape[-1]).float()
    # Sampled rows one at a time: each has its own generator.
    for b in (~greedy).nonzero()[:, 0].tolist():
        probs[b] = torch.softmax(logits[b].float() / temperatures[b], dim=-1)
        tokens[b] = torch.multinomial(probs[b], 1, generator=generators[b])[0]
    return tokens, probs
