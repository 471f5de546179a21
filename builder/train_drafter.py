"""Train a DeepSpec `Qwen3DSparkModel` drafter against a frozen target.

The training forward computes, for many anchors of a sequence at once, exactly what
`runtime.dspark.qwen3.Qwen3DSparkDrafter.draft` computes for one anchor at inference: it calls the
same backbone (`context_keys_values` and `forward_backbone`) and the same heads (`runtime.heads`):

- an anchor p is the last committed token; its context is the target's features (HF
  `hidden_states[l + 1]` for l in `target_layer_ids`, concatenated) of positions 0..p-1, through
  `fc` and `hidden_norm`, fed straight into each draft layer's k_proj / v_proj (k_norm, RoPE at
  their own positions);
- its block is [x_p, MASK × (γ-1)] at positions p..p+γ-1: queries from the block, keys/values
  [context; block], no causal mask inside the block; `norm` + `lm_head` give base logits U_k;
- the Markov bias of position k comes from x_{k-1}, teacher-forced with the TRUE tokens
  x_p, x_{p+1}, ...; the confidence logit from [h_k; W1[x_{k-1}]].

All anchors of a batch share one attention call: queries are every anchor's block, keys are
[the sequence's context; every block], and a block-sparse mask lets block a see context positions
< p_a and its own block only (as DFlash trains).

Objective (DeepSpec): per block position k, 0.1 · CE(data token) + 0.9 · TV(p_draft, p_target)
+ 1.0 · BCE(confidence, 1 − TV), where TV = ½‖p_draft − p_target‖₁ (1 − TV is the chance that
rejection sampling at T = 1 accepts the draft), p_target is the frozen target's next-token
distribution at the same position; positions are weighted w_k = exp(−(k−1)/γ), normalised, so
early positions, which every later one depends on, count most.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..runtime.dspark.qwen3 import Qwen3DraftWeights, context_keys_values, forward_backbone
from ..runtime.heads import ConfidenceHead, MarkovHead
from ..runtime.qwen3 import qwen3_rope
from .corpus import WindowSampler, eval_windows
from .fixture_qwen3 import drafter_config as fixture_drafter_config
from .fixture_qwen3 import drafter_tensors as fixture_drafter_tensors
from .train_utils import StepBudget, adamw, console, learning_rate, progress_bar

if TYPE_CHECKING:
    from transformers import Qwen3ForCausalLM

FROZEN = ("embed_tokens.weight", "lm_head.weight")  # copies of the target's
LOSS_WEIGHTS = {"ce": 0.1, "tv": 0.9, "bce": 1.0}


@dataclass(frozen=True)
class DrafterRecipe:
    layers: int = 2
    block_size: int = 5
    target_layer_ids: tuple[int, ...] = (0, 1, 2)
    markov_rank: int = 64
    seq_len: int = 256
    batch: int = 16
    anchors: int = 48  # per sequence and step
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    eval_windows: int = 48
    # Self-distillation: this many windows whose tail the target wrote itself (greedy and sampled),
    # making up `distill_share` of every batch; what the drafter faces at inference is exactly that.
    distill_rows: int = 3072
    distill_share: float = 0.5
    distill_prompt: int = 64
    init_from_target: bool = True
    # Warm restarts: each cycle runs the step budget again from the last one's bf16 weights at half its peak lr.
    cycles: int = 2


def drafter_config(target_config: dict, mask_token_id: int, recipe: DrafterRecipe) -> dict:
    """The fixture's DeepSpec config (the target's, drafter fields added) with this recipe's sizes."""
    config = fixture_drafter_config(target_config, mask_token_id, "vanilla")
    config.update(num_hidden_layers=recipe.layers, block_size=recipe.block_size,
                  target_layer_ids=list(recipe.target_layer_ids), markov_rank=recipe.markov_rank,
                  num_anchors=recipe.anchors,  # DeepSpec's name for the anchors sampled per sequence
                  # Without a Markov head there is no W1 embedding to feed the confidence head.
                  confidence_head_with_markov=recipe.markov_rank > 0)
    if isinstance(target_config.get("layer_types"), list):
        config["layer_types"] = target_config["layer_types"][: recipe.layers]
    return config


def position_weights(gamma: int) -> torch.Tensor:
    w = torch.exp(-torch.arange(gamma, dtype=torch.float32) / gamma)
    return w / w.sum()


class DSparkDraftModel:
    """The drafter's tensors under their DeepSpec names, and its batched training forward."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.config = c = config
        self.w = {name: t.detach().float().clone() for name, t in tensors.items()}
        for name, t in self.w.items():
            t.requires_grad_(name not in FROZEN)
        self.gamma, self.mask_token_id = c["block_size"], c["mask_token_id"]
        self.rope = qwen3_rope(c, "drafter config")
        self.markov_kind = c["markov_head_type"] if c["markov_rank"] > 0 else "none"

    @classmethod
    def initialise(cls, config: dict, target: Qwen3ForCausalLM, seed: int, from_target: bool = True
                   ) -> DSparkDraftModel:
        """Embedding and head copied from the target; the rest drawn as the fixture draws it, or from the target.

        `from_target` starts the draft layers as copies of the target's last layers, with `fc` selecting the
        deepest feature layer and `hidden_norm` set to the first copied layer's input norm: the context's
        keys and values are then exactly what that target layer computes, and training starts from a
        drafter that already "continues" the target instead of from noise.
        """
        gen = torch.Generator().manual_seed(seed)
        embed, lm_head = (t.detach().to(torch.bfloat16) for t in (target.model.embed_tokens.weight,
                                                                   target.lm_head.weight))
        tensors = fixture_drafter_tensors({**config, "markov_rank": max(config["markov_rank"], 1)}, embed, lm_head,
                                          gen)
        if config["markov_rank"] == 0:  # the ablation: no Markov tensors, confidence from h_k alone
            tensors = {k: v for k, v in tensors.items() if not k.startswith("markov_head.")}
        else:  # the Markov bias starts at zero, so it only ever adds what the backbone cannot do
            tensors["markov_head.markov_w2.weight"] = torch.zeros_like(tensors["markov_head.markov_w2.weight"])
        if from_target:
            source = target.model.layers[-config["num_hidden_layers"]:]
            for i, layer in enumerate(source):
                for name, param in layer.named_parameters():
                    tensors[f"layers.{i}.{name}"] = param.detach().to(torch.bfloat16)
            ids, hidden = config["target_layer_ids"], config["hidden_size"]
            deepest = ids.index(max(ids))
            fc = torch.zeros(hidden, len(ids) * hidden)
            fc[:, deepest * hidden: (deepest + 1) * hidden] = torch.eye(hidden)
            tensors["fc.weight"] = fc.to(torch.bfloat16)
            tensors["hidden_norm.weight"] = source[0].input_layernorm.weight.detach().to(torch.bfloat16)
            tensors["norm.weight"] = target.model.norm.weight.detach().to(torch.bfloat16)
        return cls(config, tensors)

    def rounded(self) -> DSparkDraftModel:
        """A copy holding what a saved drafter holds: these weights rounded to bf16."""
        return DSparkDraftModel(self.config, {k: v.to(torch.bfloat16) for k, v in self.w.items()})

    def trainable(self) -> list[torch.Tensor]:
        return [t for name, t in self.w.items() if name not in FROZEN]

    def save(self, drafter_dir: Path) -> None:
        drafter_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in sorted(self.w.items())}
        save_file(tensors, str(drafter_dir / "model.safetensors"), metadata={"format": "pt"})

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draft every anchor of every sequence in one pass.

        tokens [B, L] long, features [B, L, n_layers · hidden], anchors [B, N] with 1 <= p <= L - γ.
        Returns hidden [B, N, γ, d], base logits U [B, N, γ, V], Markov bias [B, N, γ, V] (zeros
        without a head) and confidence logits [B, N, γ]; block position k predicts token p + k.
        """
        w, gamma = self.w, self.gamma
        batch, length = tokens.shape
        n = anchors.shape[1]
        offsets = torch.arange(gamma)
        block_pos = (anchors[:, :, None] + offsets).reshape(batch, n * gamma)
        ids = torch.full((batch, n, gamma), self.mask_token_id, dtype=torch.long)
        ids[:, :, 0] = tokens.gather(1, anchors)
        ids = ids.reshape(batch, n * gamma)

        # Block a sees context positions < p_a and the whole of its own block, nothing else.
        query_anchor = anchors.repeat_interleave(gamma, dim=1)  # [B, Nγ]
        sees_context = torch.arange(length)[None, None, :] < query_anchor[:, :, None]
        block_of = torch.arange(n).repeat_interleave(gamma)
        sees_block = (block_of[:, None] == block_of[None, :]).expand(batch, -1, -1)
        allowed = torch.cat([sees_context, sees_block], dim=2)

        # The inference drafter's backbone over the whole sequence's context: every position's keys and
        # values once, then every anchor's block attends to [context; all blocks] under `allowed`.
        weights = Qwen3DraftWeights.separate(self.config, w)
        ctx_cos, ctx_sin = (t.expand(batch, -1, -1).flatten(0, 1) for t in self.rope(torch.arange(length)[None]))
        k_ctx, v_ctx = (t.unflatten(0, (batch, length)) for t in
                        context_keys_values(weights, features.flatten(0, 1), ctx_cos, ctx_sin))

        def with_context(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys = torch.cat([k_ctx[:, :, layer].transpose(1, 2), k], dim=2)
            return keys, torch.cat([v_ctx[:, :, layer], v], dim=1).transpose(1, 2)

        cos, sin = self.rope(block_pos)
        hidden, base_logits = forward_backbone(weights, ids, cos, sin, with_context, allowed[:, None])
        hidden, base_logits = hidden.view(batch, n, gamma, -1), base_logits.view(batch, n, gamma, -1)

        # The sequential heads, position by position as at inference (an rnn head carries state),
        # with the true previous tokens in place of the drafted ones.
        prev = tokens.gather(1, block_pos).view(batch * n, gamma)
        flat = hidden.reshape(batch * n, gamma, -1)
        markov = MarkovHead.from_weights(self.markov_kind, w)
        confidence = ConfidenceHead.from_weights(w, bool(self.config["confidence_head_with_markov"]))
        biases, conf = [], []
        state = markov.initial_state(batch * n)
        for k in range(gamma):
            bias, e, state = markov.step(prev[:, k], flat[:, k], state)
            biases.append(torch.zeros_like(base_logits[:, :, 0]).flatten(0, 1) if bias is None else bias)
            conf.append(confidence.logit(flat[:, k], e))
        bias = torch.stack(biases, dim=1).view_as(base_logits)
        return hidden, base_logits, bias, torch.stack(conf, dim=1).view(batch, n, gamma)


def target_features(target: Qwen3ForCausalLM, tokens: torch.Tensor, layer_ids: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, L, n · hidden], logits [B, L, V]) of the frozen target; layer l is hidden_states[l + 1]."""
    with torch.no_grad():
        out = target(input_ids=tokens, output_hidden_states=True)
    features = torch.cat([out.hidden_states[layer + 1] for layer in layer_ids], dim=-1)
    return features.float(), out.logits.float()


def random_anchors(batch: int, count: int, length: int, gamma: int, gen: torch.Generator) -> torch.Tensor:
    """`count` distinct anchors per sequence in [1, length - γ - 1] (a full block of labels each), sorted."""
    candidates = length - gamma - 1
    picks = torch.rand(batch, candidates, generator=gen).argsort(dim=1)[:, :count] + 1
    return picks.sort(dim=1).values


def draft_loss(model: DSparkDraftModel, tokens: torch.Tensor, features: torch.Tensor, target_logits: torch.Tensor,
               anchors: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted DeepSpec objective and per-position statistics ([γ] each)."""
    gamma = model.gamma
    _, base, bias, conf = model.forward(tokens, features, anchors)
    positions = anchors[:, :, None] + torch.arange(gamma)  # block position k (0-based) predicts positions + 1
    labels = tokens.gather(1, (positions + 1).flatten(1)).view_as(positions)
    p_target = torch.softmax(target_logits[torch.arange(len(tokens))[:, None, None], positions], dim=-1)
    logits = (base + bias).float()
    log_draft = torch.log_softmax(logits, dim=-1)
    ce = -log_draft.gather(-1, labels[..., None])[..., 0]
    tv = 0.5 * (log_draft.exp() - p_target).abs().sum(-1)
    bce = F.binary_cross_entropy_with_logits(conf.float(), (1 - tv).detach(), reduction="none")
    per_position = {"ce": ce.mean((0, 1)), "tv": tv.mean((0, 1)), "bce": bce.mean((0, 1))}
    loss_k = sum(LOSS_WEIGHTS[name] * value for name, value in per_position.items())
    loss = (position_weights(gamma) * loss_k).sum()
    with torch.no_grad():
        # Teacher-forced acceptance proxies: greedy (argmax agreement) and T = 1 (1 - TV), and the
        # τ they imply when every position of an anchor must survive.
        agree = (logits.argmax(-1) == p_target.argmax(-1)).float()
        per_position["agree"] = agree.mean((0, 1))
        per_position["tau_t0"] = 1 + agree.cumprod(-1).sum(-1).mean()
        per_position["tau_t1"] = 1 + (1 - tv).cumprod(-1).sum(-1).mean()
    return loss, per_position


@torch.no_grad()
def evaluate(model: DSparkDraftModel, target: Qwen3ForCausalLM, windows: torch.Tensor, batch: int = 8
             ) -> dict[str, Any]:
    """Held-out loss and acceptance proxies, every position of every window an anchor."""
    gamma, length = model.gamma, windows.shape[1]
    anchors = torch.arange(1, length - gamma)[None]
    sums: dict[str, torch.Tensor] = {}
    chunks = windows.split(batch)
    for chunk in chunks:
        features, logits = target_features(target, chunk, tuple(model.config["target_layer_ids"]))
        loss, stats = draft_loss(model, chunk, features, logits, anchors.expand(len(chunk), -1))
        stats["loss"] = loss
        for name, value in stats.items():
            sums[name] = sums.get(name, 0) + value / len(chunks)
    return {name: [round(v, 4) for v in value.tolist()] if value.dim() else round(float(value), 4)
            for name, value in sums.items()}


@torch.no_grad()
def target_continuations(target: Qwen3ForCausalLM, stream: torch.Tensor, count: int, prompt_len: int,
                         length: int, seed: int, batch: int = 64, quiet: bool = False) -> torch.Tensor:
    """[count, length] windows: `prompt_len` corpus tokens, then the target's own continuation.

    Even rows continue greedily (what T = 0 decoding produces), odd rows sample at T = 1 (T = 1 decoding).
    """
    sampler = WindowSampler(stream, prompt_len, seed)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with progress_bar("continuations", quiet) as reporter:
        for start in range(0, count, batch):
            prompts = sampler.batch(min(batch, count - start))
            greedy = torch.arange(start, start + len(prompts)) % 2 == 0
            tokens = [prompts]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = target(input_ids=prompts, use_cache=True)
                for _ in range(length - prompt_len):
                    logits = out.logits[:, -1].float()
                    sampled = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
                    nxt = torch.where(greedy, logits.argmax(-1), sampled)[:, None]
                    tokens.append(nxt)
                    out = target(input_ids=nxt, cache=out.cache, use_cache=True)
            rows.append(torch.cat(tokens, dim=1))
            reporter.update(start + len(prompts), count, "")
    return torch.cat(rows)


def train_drafter(
    drafter_dir: Path,
    target: Qwen3ForCausalLM,
    config: dict,
    train_stream: torch.Tensor,
    heldout_stream: torch.Tensor,
    *,
    seed: int,
    recipe: DrafterRecipe,
    steps: int | Sequence[int] | None = None,
    minutes: float | None = None,
    quiet: bool = False,
    name: str = "drafter",
    first_cycle: int = 0,
) -> dict[str, Any]:
    """Train against the frozen `target`, save weights + config (bf16) to `drafter_dir`; return the record.

    `steps` (one count for every cycle, or one per cycle) and `minutes` are per cycle. Every cycle after
    the first is a warm restart: it starts from the previous cycle's weights rounded to bf16 (what a
    saved drafter holds), with a fresh optimiser, its own random streams and half the previous peak
    learning rate. So a run can be continued from a saved drafter (`first_cycle` > 0, weights already
    in `drafter_dir`) and equal an uninterrupted one.
    """
    import json

    torch.manual_seed(seed)
    if first_cycle:
        model = DSparkDraftModel(config, load_file(drafter_dir / "model.safetensors"))
    else:
        model = DSparkDraftModel.initialise(config, target, seed, from_target=recipe.init_from_target)
    distilled = (target_continuations(target, train_stream, recipe.distill_rows, recipe.distill_prompt,
                                      recipe.seq_len, seed + 3, quiet=quiet) if recipe.distill_rows else None)
    windows = eval_windows(heldout_stream, recipe.seq_len, recipe.eval_windows)
    per_cycle = list(steps) if isinstance(steps, Sequence) else [steps]
    per_cycle *= recipe.cycles if len(per_cycle) == 1 else 1
    if len(per_cycle) != recipe.cycles:
        raise ValueError(f"{len(per_cycle)} step counts for {recipe.cycles} cycles")
    cycles, started = [], time.monotonic()
    for cycle in range(first_cycle, recipe.cycles):
        if cycle:
            model = model.rounded()
        cycles.append(_train_cycle(model, target, train_stream, distilled, recipe, seed=seed + 10 * cycle,
                                   lr=recipe.lr * 0.5 ** cycle, budget=StepBudget(per_cycle[cycle], minutes),
                                   label=f"{name} {cycle + 1}/{recipe.cycles}", quiet=quiet))

    model.save(drafter_dir)
    (drafter_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Evaluate what ships: the bf16-rounded weights.
    heldout = evaluate(model.rounded(), target, windows)
    total = sum(c["steps"] for c in cycles)
    console.print(f"{name}: {total} steps in {(time.monotonic() - started) / 60:.1f} min, held-out loss "
                  f"{heldout['loss']:.4f}, teacher-forced τ̂ T=0 {heldout['tau_t0']:.2f} T=1 {heldout['tau_t1']:.2f}")
    return {
        "cycles": cycles,
        "parameters": sum(t.numel() for t in model.w.values()),
        "trainable_parameters": sum(t.numel() for t in model.trainable()),
        "heldout": heldout,
        "loss_weights": LOSS_WEIGHTS,
        "position_weights": [round(v, 4) for v in position_weights(model.gamma).tolist()],
        "recipe": asdict(recipe),
        "ce_perplexity_position_1": round(math.exp(heldout["ce"][0]), 3),
    }


def _train_cycle(model: DSparkDraftModel, target: Qwen3ForCausalLM, train_stream: torch.Tensor,
                 distilled: torch.Tensor | None, recipe: DrafterRecipe, *, seed: int, lr: float, budget: StepBudget,
                 label: str, quiet: bool) -> dict[str, Any]:
    """One warm-up + cosine cycle of optimiser steps on `model`, in place; returns its record."""
    params = model.trainable()
    optimizer = adamw(params, lr, recipe.weight_decay)
    sampler = WindowSampler(train_stream, recipe.seq_len, seed + 1)
    n_distilled = round(recipe.batch * recipe.distill_share) if distilled is not None else 0
    row_gen = torch.Generator().manual_seed(seed + 4)
    anchor_gen = torch.Generator().manual_seed(seed + 2)
    layer_ids = tuple(model.config["target_layer_ids"])
    curve: list[dict[str, float]] = []
    step, smooth = 0, None
    with progress_bar(label, quiet) as reporter:
        while budget.running(step):
            step_lr = learning_rate(step, budget.total, lr, recipe.warmup)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            tokens = sampler.batch(recipe.batch - n_distilled)
            if n_distilled:
                rows = torch.randint(len(distilled), (n_distilled,), generator=row_gen)
                tokens = torch.cat([tokens, distilled[rows]])
            anchors = random_anchors(recipe.batch, recipe.anchors, recipe.seq_len, model.gamma, anchor_gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                features, logits = target_features(target, tokens, layer_ids)
                loss, stats = draft_loss(model, tokens, features, logits, anchors)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            budget.after_step(step)
            value = loss.item()
            smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
            if step % 50 == 0:
                curve.append({"step": step, "loss": round(smooth, 4), "tau_t0_proxy": round(float(stats["tau_t0"]), 3)})
            reporter.update(step, budget.total,
                            f"loss {smooth:.3f} τ̂(T=0) {float(stats['tau_t0']):.2f} lr {step_lr:.2e}")
    return {"steps": step, "minutes": round(budget.elapsed_minutes, 2), "peak_lr": lr,
            "anchors_seen": step * recipe.batch * recipe.anchors, "train_curve": curve}
