"""DSpark drafters: `base` holds what every family shares (the draft, the per-slot context, the
sequential heads); one module per family holds that family's drafter (`qwen3`, `gemma4`,
`deepseek_v4`), whose backbone is what inference, training and export all call."""
