"""Train the tiny Qwen3 target: a genuine `transformers.Qwen3ForCausalLM`, on CPU, in minutes.

Plain next-token cross-entropy on random windows of the train split, AdamW with warm-up and cosine
decay, bf16 autocast (the development machines have AMX, which makes bf16 matmuls about twice as
fast as fp32) over fp32 master weights. Saved in bf16 with `save_pretrained`, tokenizer alongside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .corpus import WindowSampler, eval_windows
from .train_utils import StepBudget, adamw, console, learning_rate, progress_bar

if TYPE_CHECKING:
    from transformers import Qwen3Config, Qwen3ForCausalLM


@dataclass(frozen=True)
class TargetRecipe:
    hidden: int = 256
    intermediate: int = 768
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    seq_len: int = 256
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_windows: int = 96


def target_config(vocab_size: int, token_ids: dict[str, int], recipe: TargetRecipe) -> Qwen3Config:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        head_dim=recipe.head_dim,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        # Qwen3 convention: <|endoftext|> is bos and pad, <|im_end|> ends a turn.
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
    )


@torch.no_grad()
def heldout_loss(model: Qwen3ForCausalLM, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over fixed held-out windows, in fp32."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        loss = model(input_ids=chunk, labels=chunk).loss
        n = chunk.numel() - chunk.shape[0]
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / count


def train_target(
    target_dir: Path,
    config: Qwen3Config,
    train_stream: torch.Tensor,
    heldout_stream: torch.Tensor,
    *,
    seed: int,
    recipe: TargetRecipe = TargetRecipe(),
    steps: int | None = None,
    minutes: float | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train from scratch and `save_pretrained` (bf16) into `target_dir`; returns the training record."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, recipe.lr, recipe.weight_decay)
    sampler = WindowSampler(train_stream, recipe.seq_len, seed)
    windows = eval_windows(heldout_stream, recipe.seq_len, recipe.eval_windows)
    budget = StepBudget(steps, minutes)
    losses: list[float] = []
    step, smooth = 0, None
    with progress_bar("target", quiet) as reporter:
        while budget.running(step):
            lr = learning_rate(step, budget.total, recipe.lr, recipe.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sampler.batch(recipe.batch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            budget.after_step(step)
            value = loss.item()
            smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
            if step % 50 == 0:
                losses.append(round(smooth, 4))
            reporter.update(step, budget.total, f"loss {smooth:.3f} lr {lr:.2e}")
    minutes_spent = budget.elapsed_minutes
    fp32_loss = heldout_loss(model, windows)

    # What ships is bf16; the drafter is trained against (and evaluated with) exactly that.
    model = model.to(torch.bfloat16)
    model.generation_config.do_sample = False
    model.save_pretrained(target_dir)
    shipped = load_target(target_dir)
    loss = heldout_loss(shipped, windows)
    console.print(f"target: {step} steps in {minutes_spent:.1f} min, held-out loss {loss:.4f} "
                  f"(perplexity {math.exp(loss):.2f}; fp32 weights {fp32_loss:.4f})")
    return {
        "steps": step,
        "minutes": round(minutes_spent, 2),
        "tokens_seen": step * recipe.batch * recipe.seq_len,
        "train_tokens": len(train_stream),
        "heldout_tokens": len(heldout_stream),
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "train_loss_curve_every_50_steps": losses,
        "final_train_loss_smoothed": round(smooth, 4),
        "heldout_loss": round(loss, 4),
        "heldout_perplexity": round(math.exp(loss), 3),
        "heldout_loss_fp32_weights": round(fp32_loss, 4),
        "recipe": asdict(recipe),
    }


def load_target(target_dir: Path) -> Qwen3ForCausalLM:
    """The saved (bf16) target, frozen, computing in fp32."""
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model
