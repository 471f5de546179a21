"""Verification of a block of draft tokens against the target's output.

The target ran [x0, d_1, ..., d_l]; its output at position i predicts the token after it, so row
i - 1 judges d_i and row l gives the bonus token. Greedy verification needs only the target's
argmax at each position; rejection sampling needs its logits. Both rules return (accepted drafts, next token);
τ for the round is accepted + 1.
"""

from __future__ import annotations

import torch


def verify_greedy(drafts: torch.Tensor, choice: torch.Tensor) -> tuple[int, int]:
    """Accept while d_i is the target's argmax, then append the target's argmax (lossless at T = 0).
    `choice` [l + 1] holds the target's argmax at each verified position."""
    mismatch = (drafts != choice[: len(drafts)]).nonzero()
    accepted = int(mismatch[0]) if len(mismatch) else len(drafts)
    return accepted, int(choice[accepted])


def verify_sampling(drafts: torch.Tensor, draft_probs: torch.Tensor, target_logits: torch.Tensor, temperature: float,
                    generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative rejection sampling: the output keeps the target's distribution at any temperature.

    Accept d_i with probability min(1, p_t(d_i) / p_d(d_i)); at the first rejection draw from
    normalise(max(p_t - p_d, 0)) (p_t itself if that has no mass); after l acceptances draw the
    bonus token from p_t at the last position.
    """
    target_probs = torch.softmax(target_logits.float() / temperature, dim=-1)
    for i, token in enumerate(drafts.tolist()):
        p_t, p_d = target_probs[i, token], draft_probs[i, token]
        if p_d > 0 and torch.rand((), generator=generator) * p_d < p_t:
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        mass = residual.sum()
        dist = residual / mass if mass > 1e-12 else target_probs[i]
        return i, int(torch.multinomial(dist, 1, generator=generator)[0])
    return len(drafts), int(torch.multinomial(target_probs[len(drafts)], 1, generator=generator)[0])
