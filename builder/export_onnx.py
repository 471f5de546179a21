"""`dspark-build export`: the Qwen3 DSpark drafter as ONNX, with the DSpark kernels as plugin nodes.

    OUT/draft.onnx (+ .data)     one drafting round for a batch: backbone + MarkovSample + DSparkConfidence
        inputs   anchors [B] i64, ctx_lens [B] i64, past_keys / past_values [layers, B, kv_heads, L, head_dim],
                 temperatures [B] f32, seeds [B] i32 (Philox; a request's draws depend only on its seed)
        outputs  tokens [B, γ] i32, probs [B, γ, V], conf_logits, confidence, survival [B, γ]
    OUT/context.onnx (+ .data)   target features of newly committed tokens -> the draft layers' keys/values
        inputs   features [B, n, len(target_layer_ids)·hidden], start [B] i64 (position of the first one)
        outputs  keys / values [layers, B, kv_heads, n, head_dim]   (append them to past_keys / past_values)
    OUT/schedule.onnx            DSparkSchedule: survival [R, γ] + SPS cost table -> verify lengths [R]
    OUT/manifest.json            format dspark-trt/onnx

Batch, context length and the cost-table sizes are dynamic; weights are external data. The maths is
the inference drafter's: both graphs call runtime/dspark/qwen3.py's `context_keys_values` /
`forward_backbone` (each checkpoint tensor applied on its own, `Qwen3DraftWeights.separate`), over
explicit cache tensors instead of the drafter's slots; the sequential heads are the `torch.ops.dspark.*`
custom ops, exported as `dspark::` nodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..plugins import onnx_ops
from ..runtime.dspark.qwen3 import Qwen3DraftWeights, Qwen3DSparkDrafter, context_keys_values, forward_backbone
from ..runtime.errors import CheckpointError
from ..runtime.manifest import read_manifest
from .families import family

OPSET = 20


class _Weights(nn.Module):
    """The drafter's tensors as named buffers (they become named ONNX initializers)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = {name: name.replace(".", "__") for name in tensors}
        for name, tensor in tensors.items():
            self.register_buffer(self.names[name], tensor.contiguous())

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, self.names[name])


class _Qwen3Graph(nn.Module):
    def __init__(self, drafter: Qwen3DSparkDrafter) -> None:
        super().__init__()
        d = drafter
        self.w = _Weights(d.w)
        self.config, self.rope, self.gamma, self.mask_token_id = d.config, d.rope, d.block_size, d.mask_token_id

    def weights(self) -> Qwen3DraftWeights:
        """The drafter's weights as the backbone applies them, each tensor an initializer of its own (made
        in `forward`, so that the traced graph reads the buffers)."""
        return Qwen3DraftWeights.separate(self.config, self.w)


class ContextGraph(_Qwen3Graph):
    """`Qwen3DSparkDrafter.add_context` for a batch: features -> each draft layer's keys / values."""

    def forward(self, features: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, new = features.shape[:2]
        positions = start[:, None] + torch.arange(new, device=features.device)
        cos, sin = (t.flatten(0, 1) for t in self.rope(positions))
        # [B · n, layers, kv_heads, head_dim] -> [layers, B, kv_heads, n, head_dim]
        k, v = (t.unflatten(0, (batch, new)).permute(2, 0, 3, 1, 4) for t in
                context_keys_values(self.weights(), features.flatten(0, 1), cos, sin))
        return k, v


class DraftGraph(_Qwen3Graph):
    """`Qwen3DSparkDrafter.draft` for a batch over explicit caches, heads as dspark custom ops."""

    def __init__(self, drafter: Qwen3DSparkDrafter) -> None:
        super().__init__(drafter)
        markov, confidence = drafter.markov, drafter.confidence
        if markov.kind not in ("vanilla", "gated", "rnn"):
            raise CheckpointError("draft/config.json", "MarkovSample needs a Markov head", found=markov.kind,
                                  subject="dspark.markov_head_type", expected="vanilla | gated | rnn")
        self.kind = markov.kind
        self.with_markov = int(bool(confidence.with_markov))
        temps = confidence.temperatures or [1.0] * self.gamma
        zero = torch.zeros(1, dtype=markov.w1.dtype)
        self.register_buffer("sts_temperatures", torch.tensor(temps[: self.gamma], dtype=torch.float32))
        self.register_buffer("proj_weight", zero if markov.proj_weight is None else markov.proj_weight)
        self.register_buffer("proj_bias", zero if markov.proj_bias is None else markov.proj_bias)
        self.register_buffer("conf_bias", zero if confidence.bias is None else confidence.bias.reshape(-1))

    def forward(self, anchors: torch.Tensor, ctx_lens: torch.Tensor, past_keys: torch.Tensor,
                past_values: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, gamma = self.w, self.gamma
        width = past_keys.shape[3]
        ids = torch.cat([anchors[:, None], torch.full_like(anchors[:, None], self.mask_token_id).expand(-1, gamma - 1)],
                        dim=1)
        positions = ctx_lens[:, None] + torch.arange(gamma, device=anchors.device)
        cos, sin = self.rope(positions)
        # Every block position sees the row's context (first ctx_len cache entries) and the whole block.
        in_context = torch.arange(width, device=anchors.device)[None, :] < ctx_lens[:, None]
        allowed = torch.cat([in_context, torch.ones_like(in_context[:, :1]).expand(-1, gamma)], dim=1)
        allowed = allowed[:, None, :].expand(-1, gamma, -1)

        def with_past(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([past_keys[layer], k], dim=2), torch.cat([past_values[layer], v.transpose(1, 2)], dim=2)

        hidden, logits = forward_backbone(self.weights(), ids, cos, sin, with_past, allowed[:, None])
        base_logits = logits.float()
        tokens, probs, emb, _ = torch.ops.dspark.markov_sample(
            base_logits, hidden, anchors.to(torch.int32), temperatures, seeds, w["markov_head.markov_w1.weight"],
            w["markov_head.markov_w2.weight"], self.proj_weight, self.proj_bias, self.kind, "philox")
        conf_logits, confidence, survival = torch.ops.dspark.confidence(
            hidden, emb, w["confidence_head.proj.weight"], self.conf_bias, self.sts_temperatures, self.with_markov)
        return tokens, probs, conf_logits, confidence, survival


class ScheduleGraph(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, survival: torch.Tensor, token_counts: torch.Tensor, step_time_ms: torch.Tensor,
                batch_sizes: torch.Tensor, batch_overhead_ms: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        return torch.ops.dspark.schedule(survival, token_counts, step_time_ms, batch_sizes, batch_overhead_ms,
                                         scalars, self.mode)


DRAFT_INPUTS = ["anchors", "ctx_lens", "past_keys", "past_values", "temperatures", "seeds"]
DRAFT_OUTPUTS = ["tokens", "probs", "conf_logits", "confidence", "survival"]
CONTEXT_INPUTS, CONTEXT_OUTPUTS = ["features", "start"], ["keys", "values"]
SCHEDULE_INPUTS = ["survival", "token_counts", "step_time_ms", "batch_sizes", "batch_overhead_ms", "scalars"]


def open_drafter(ckpt: Path) -> tuple[Qwen3DSparkDrafter, dict[str, Any]]:
    """The fp32 reference drafter of a converted Qwen3 checkpoint, and the checkpoint manifest."""
    from ..runtime.loader import resolve_checkpoint

    ckpt = resolve_checkpoint(Path(ckpt))
    manifest = read_manifest(ckpt, "checkpoint")
    if not family(manifest.get("family"), ckpt / "manifest.json").tensorrt_draft_plans:
        raise CheckpointError(ckpt / "manifest.json", "ONNX export covers the Qwen3 drafter only", subject="family",
                              found=manifest.get("family"), expected="qwen3")
    if not manifest.get("dspark") or not (ckpt / "draft" / "config.json").is_file():
        raise CheckpointError(ckpt / "manifest.json", "checkpoint has no drafter", subject="dspark",
                              expected="convert with --drafter")
    return Qwen3DSparkDrafter(ckpt / "draft", num_slots=1, max_len=1), manifest


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, Any]]) -> None:
    program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=inputs,
                                output_names=outputs, dynamic_shapes=dynamic,
                                custom_translation_table=onnx_ops.translations(), verbose=False)
    program.save(str(path), external_data=True)


def export_onnx(ckpt: Path, out: Path, *, force: bool = False, schedule_mode: str = "paper") -> dict[str, Any]:
    """Write draft.onnx, context.onnx and schedule.onnx for a converted Qwen3 checkpoint; returns the manifest."""
    from ..runtime.atomic import atomic_directory, check_output
    from ..runtime.manifest import write_manifest

    if schedule_mode not in onnx_ops.SCHEDULE_MODES:
        raise ValueError(f"schedule_mode must be one of {onnx_ops.SCHEDULE_MODES}, got {schedule_mode!r}")
    check_output(out, inputs=[ckpt], force=force)  # fail fast, before loading the drafter
    drafter, manifest = open_drafter(ckpt)
    onnx_ops.register_schemas()
    batch, dims = torch.export.Dim("batch", min=1, max=4096), {}
    d, gamma, layers = drafter, drafter.block_size, drafter.layers
    example_ctx = 3
    cache = torch.zeros(layers, 2, d.kv_heads, example_ctx, d.head_dim)
    draft_args = (torch.tensor([1, 2]), torch.tensor([example_ctx, 1]), cache, cache.clone(),
                  torch.tensor([0.0, 1.0]), torch.tensor([1, 2], dtype=torch.int32))
    ctx_dim, new_dim = torch.export.Dim("context", min=1, max=1 << 20), torch.export.Dim("new_tokens", max=1 << 20)
    dims["draft"] = {"anchors": {0: batch}, "ctx_lens": {0: batch}, "past_keys": {1: batch, 3: ctx_dim},
                     "past_values": {1: batch, 3: ctx_dim}, "temperatures": {0: batch}, "seeds": {0: batch}}
    features = torch.zeros(2, 3, len(d.target_layer_ids) * d.config["hidden_size"])
    dims["context"] = {"features": {0: batch, 1: new_dim}, "start": {0: batch}}
    rows, points, sizes = (torch.export.Dim(name, min=2, max=1 << 16) for name in ("rows", "points", "sizes"))
    schedule_args = (torch.full((2, gamma), 0.5), torch.tensor([1.0, 8.0]), torch.tensor([1.0, 2.0]),
                     torch.tensor([1.0, 4.0]), torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.04]))
    dims["schedule"] = {"survival": {0: rows}, "token_counts": {0: points}, "step_time_ms": {0: points},
                        "batch_sizes": {0: sizes}, "batch_overhead_ms": {0: sizes}, "scalars": {}}

    with atomic_directory(out, force=force, inputs=[ckpt]) as tmp:
        _export(DraftGraph(drafter), draft_args, tmp / "draft.onnx", DRAFT_INPUTS, DRAFT_OUTPUTS, dims["draft"])
        _export(ContextGraph(drafter), (features, torch.tensor([0, 5])), tmp / "context.onnx", CONTEXT_INPUTS,
                CONTEXT_OUTPUTS, dims["context"])
        _export(ScheduleGraph(schedule_mode), schedule_args, tmp / "schedule.onnx", SCHEDULE_INPUTS, ["lengths"],
                dims["schedule"])
        graphs = {name: plugin_nodes(tmp / f"{name}.onnx") for name in ("draft", "context", "schedule")}
        result = write_manifest(
            tmp, "onnx", family=manifest["family"], dspark=manifest["dspark"], opset=OPSET, schedule_mode=schedule_mode,
            plugins={"namespace": onnx_ops.PLUGIN_NAMESPACE, "version": onnx_ops.PLUGIN_VERSION,
                     "domain": onnx_ops.DOMAIN},
            graphs={name: {"file": f"{name}.onnx", "plugin_nodes": nodes} for name, nodes in graphs.items()},
            source_checkpoint=str(Path(ckpt).absolute()),
        )
    return result


def plugin_nodes(path: Path) -> list[dict[str, Any]]:
    """The dspark nodes of an ONNX file (op type and attributes), without loading its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = []
    for node in model.graph.node:
        if node.domain == onnx_ops.DOMAIN:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            nodes.append({"op": node.op_type, "name": node.name,
                          **{k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}})
    return nodes


def check_onnx(path: Path) -> None:
    """onnx.checker with full_check (schemas and shape inference included) on a saved model."""
    import onnx

    onnx_ops.register_schemas()
    onnx.checker.check_model(str(path), full_check=True)


def describe(manifest: dict[str, Any]) -> str:
    graphs = manifest["graphs"]
    return json.dumps({name: [n["op"] for n in g["plugin_nodes"]] for name, g in graphs.items()})
