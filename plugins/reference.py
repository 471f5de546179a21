"""Torch oracles for the kernels where the reference backend's own code cannot be compared directly.

Greedy decoding, the confidence head and the schedulers are compared with `runtime/` as it is. Sampled
decoding cannot be: the reference draws with `torch.multinomial` from a per-request generator, while
the kernel uses the Gumbel-max trick on explicit uniforms (or Philox). Both are exact samplers of the
same distribution — for u_v i.i.d. U(0, 1), argmax_v(l_v / T − log(−log u_v)) is distributed as
softmax(l / T) — so the kernel is compared with `gumbel_sequential_heads`, which is the reference's
`sequential_heads` (same Markov head and confidence head objects, same loop) with only the draw
replaced by Gumbel-max on the SAME uniforms.
"""

from __future__ import annotations

import torch

from ..runtime.dspark.base import Draft
from ..runtime.heads import ConfidenceHead, MarkovHead


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """argmax(logits / T − log(−log u)) per row; rows with T <= 0 take argmax(logits). [B, V] -> [B]."""
    sampled = temperatures > 0
    safe_t = torch.where(sampled, temperatures, torch.ones_like(temperatures))[:, None]
    scores = torch.where(sampled[:, None], logits / safe_t - torch.log(-torch.log(uniforms)), logits)
    return scores.argmax(dim=-1)


def gumbel_sequential_heads(markov: MarkovHead, confidence: ConfidenceHead, hidden: torch.Tensor,
                            base_logits: torch.Tensor, anchors: torch.Tensor, temperatures: torch.Tensor,
                            uniforms: torch.Tensor) -> tuple[Draft, torch.Tensor]:
    """`runtime.dspark.base.sequential_heads` with Gumbel-max draws on `uniforms` [B, γ, V].

    Returns the Draft and W1[x_{k-1}] per position ([B, γ, r]), the kernel's `markov_emb` output.
    """
    batch, gamma, vocab = base_logits.shape
    temperatures = temperatures.float()
    tokens = torch.empty(batch, gamma, dtype=torch.long)
    probs = torch.empty(batch, gamma, vocab)
    conf_logits = torch.empty(batch, gamma)
    embs = torch.zeros(batch, gamma, markov.rank)
    prev, state = anchors.long(), markov.initial_state(batch)
    sampled = (temperatures > 0)[:, None]
    safe_t = torch.where(sampled[:, 0], temperatures, torch.ones_like(temperatures))[:, None]
    for k in range(gamma):
        bias, e, state = markov.step(prev, hidden[:, k], state)
        logits = base_logits[:, k] if bias is None else base_logits[:, k] + bias.float()
        tokens[:, k] = gumbel_argmax(logits, temperatures, uniforms[:, k])
        one_hot = torch.nn.functional.one_hot(tokens[:, k], vocab).float()
        probs[:, k] = torch.where(sampled, torch.softmax(logits.float() / safe_t, dim=-1), one_hot)
        conf_logits[:, k] = confidence.logit(hidden[:, k], e).float()
        if e is not None:
            embs[:, k] = e.float()
        prev = tokens[:, k]
    return Draft(tokens, probs, conf_logits, confidence.calibrated(conf_logits)), embs
