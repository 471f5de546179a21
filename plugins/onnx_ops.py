"""The DSpark kernels as ONNX custom ops: schemas, torch export hooks and onnxruntime implementations.

ONNX node `dspark::MarkovSample` (and DSparkConfidence, DSparkSchedule) carries the attributes
TensorRT's ONNX parser uses to map a node to a plugin: the op type is the plugin name,
`plugin_namespace` = "dspark", `plugin_version` = "1", and `aot` = 1 selects the ahead-of-time
implementation (trt.py), so the engine needs no Python at run time.

- `register_schemas()` registers the op schemas with onnx (checker, shape inference);
- the torch custom ops `torch.ops.dspark.*` stand for the kernels inside the module that
  `builder/export_onnx.py` exports, and `TRANSLATIONS` turns them into the custom nodes;
- `register_ort_ops()` gives onnxruntime Python implementations (onnxruntime-extensions) that run the
  very Triton kernels (on CPU through Triton's interpreter), so an exported graph runs end to end.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import launch

DOMAIN = "dspark"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "dspark"
PLUGIN_VERSION = "1"
PLUGIN_ATTRS = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": 1}
NOISE_KINDS = ("philox", "uniforms")
SCHEDULE_MODES = ("paper", "production")

# name -> (inputs [(name, type)], outputs [(name, type)], op attributes {name: onnx AttrType name})
_WEIGHT = "W"  # float, bfloat16 or float16 weights
SIGNATURES: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, str]]] = {
    "MarkovSample": (
        [("base_logits", "tensor(float)"), ("hidden", _WEIGHT), ("anchors", "tensor(int32)"),
         ("temperatures", "tensor(float)"), ("noise", "N"), ("w1", _WEIGHT), ("w2", _WEIGHT),
         ("proj_weight", _WEIGHT), ("proj_bias", _WEIGHT)],
        [("tokens", "tensor(int32)"), ("probs", "tensor(float)"), ("markov_emb", "tensor(float)"),
         ("state", "tensor(float)")],
        {"kind": "STRING", "noise_source": "STRING"},
    ),
    "DSparkConfidence": (
        [("hidden", _WEIGHT), ("markov_emb", "tensor(float)"), ("weight", _WEIGHT), ("bias", _WEIGHT),
         ("sts_temperatures", "tensor(float)")],
        [("conf_logits", "tensor(float)"), ("confidence", "tensor(float)"), ("survival", "tensor(float)")],
        {"with_markov": "INT"},
    ),
    "DSparkSchedule": (
        [("survival", "tensor(float)"), ("token_counts", "tensor(float)"), ("step_time_ms", "tensor(float)"),
         ("batch_sizes", "tensor(float)"), ("batch_overhead_ms", "tensor(float)"), ("scalars", "tensor(float)")],
        [("lengths", "tensor(int32)")],
        {"mode": "STRING"},
    ),
}


@functools.cache
def register_schemas() -> None:
    """Register the dspark op schemas with onnx (idempotent)."""
    from onnx import defs
    from onnx.defs import OpSchema

    constraints = [("W", ["tensor(float)", "tensor(bfloat16)", "tensor(float16)"], "weights and activations"),
                   ("N", ["tensor(int32)", "tensor(float)"], "Philox seeds [B] or uniforms [B, γ, V]")]
    for name, (inputs, outputs, attrs) in SIGNATURES.items():
        if defs.has(name, DOMAIN):
            continue
        used = {t for _, t in inputs + outputs}
        attributes = [OpSchema.Attribute(attr, getattr(OpSchema.AttrType, kind), "") for attr, kind in attrs.items()]
        attributes += [OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace",
                                          required=False),
                       OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version",
                                          required=False),
                       OpSchema.Attribute("aot", OpSchema.AttrType.INT, "use the AOT implementation", required=False)]
        defs.register_schema(OpSchema(
            name, DOMAIN, OPSET_VERSION, doc=f"DSpark {name} (dspark_trt.plugins)",
            inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
            outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
            type_constraints=[c for c in constraints if c[0] in used], attributes=attributes))


# -- torch custom ops: what the export module calls; eager runs execute the Triton kernels --------------

@torch.library.custom_op("dspark::markov_sample", mutates_args=())
def markov_sample_op(base_logits: Tensor, hidden: Tensor, anchors: Tensor, temperatures: Tensor, noise: Tensor,
                     w1: Tensor, w2: Tensor, proj_weight: Tensor, proj_bias: Tensor, kind: str, noise_kind: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    projection = (None, None) if kind == "vanilla" else (proj_weight, proj_bias)
    out = launch.markov_sample(base_logits, hidden, anchors, temperatures, noise, w1, w2, *projection, kind=kind)
    return out.tokens, out.probs, out.markov_emb, out.state


@markov_sample_op.register_fake
def _(base_logits, hidden, anchors, temperatures, noise, w1, w2, proj_weight, proj_bias, kind, noise_kind):
    batch, gamma, vocab = base_logits.shape
    rank = w1.shape[1]
    return (base_logits.new_empty(batch, gamma, dtype=torch.int32), base_logits.new_empty(batch, gamma, vocab),
            base_logits.new_empty(batch, gamma, rank), base_logits.new_empty(batch, rank))


@torch.library.custom_op("dspark::confidence", mutates_args=())
def confidence_op(hidden: Tensor, markov_emb: Tensor, weight: Tensor, bias: Tensor, sts_temperatures: Tensor,
                  with_markov: int) -> tuple[Tensor, Tensor, Tensor]:
    out = launch.dspark_confidence(hidden, markov_emb if with_markov else None, weight, bias, sts_temperatures)
    return out.logits, out.confidence, out.survival


@confidence_op.register_fake
def _(hidden, markov_emb, weight, bias, sts_temperatures, with_markov):
    batch, gamma, _ = hidden.shape
    return tuple(hidden.new_empty(batch, gamma, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("dspark::schedule", mutates_args=())
def schedule_op(survival: Tensor, token_counts: Tensor, step_time_ms: Tensor, batch_sizes: Tensor,
                batch_overhead_ms: Tensor, scalars: Tensor, mode: str) -> Tensor:
    return launch.dspark_schedule(survival, token_counts, step_time_ms, batch_sizes, batch_overhead_ms,
                                  float(scalars[0]), float(scalars[1]), production=mode == "production")


@schedule_op.register_fake
def _(survival, token_counts, step_time_ms, batch_sizes, batch_overhead_ms, scalars, mode):
    return survival.new_empty(survival.shape[0], dtype=torch.int32)


# -- torch.onnx (dynamo) translations: torch op -> dspark custom node ------------------------------------

def translations() -> dict:
    """`custom_translation_table` for torch.onnx.export mapping the torch ops to dspark nodes."""
    from onnxscript import values

    register_schemas()
    opset = values.Opset(DOMAIN, OPSET_VERSION)

    def markov_sample(base_logits, hidden, anchors, temperatures, noise, w1, w2, proj_weight, proj_bias,
                      kind: str, noise_kind: str):
        return opset.MarkovSample(base_logits, hidden, anchors, temperatures, noise, w1, w2, proj_weight, proj_bias,
                                  kind=kind, noise_source=noise_kind, **PLUGIN_ATTRS, _outputs=4)

    def confidence(hidden, markov_emb, weight, bias, sts_temperatures, with_markov: int):
        return opset.DSparkConfidence(hidden, markov_emb, weight, bias, sts_temperatures, with_markov=with_markov,
                                      **PLUGIN_ATTRS, _outputs=3)

    def schedule(survival, token_counts, step_time_ms, batch_sizes, batch_overhead_ms, scalars, mode: str):
        return opset.DSparkSchedule(survival, token_counts, step_time_ms, batch_sizes, batch_overhead_ms, scalars,
                                    mode=mode, **PLUGIN_ATTRS)

    return {torch.ops.dspark.markov_sample.default: markov_sample, torch.ops.dspark.confidence.default: confidence,
            torch.ops.dspark.schedule.default: schedule}


# -- onnxruntime: Python implementations through onnxruntime-extensions ----------------------------------

@functools.cache
def register_ort_ops() -> str:
    """Register Python implementations of the dspark ops; returns the custom-op library path for
    `SessionOptions.register_custom_ops_library`. They launch the Triton kernels, so on CPU the process
    must run Triton's interpreter (`interpret.enable_interpreter()`). MarkovSample is registered with
    Philox seeds as its noise input, the form the exported draft graph uses."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    f, i32, i64, s = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string
    plugin = {"plugin_namespace": s, "plugin_version": s, "aot": i64}
    t = torch.from_numpy

    @onnx_op(op_type=f"{DOMAIN}::MarkovSample", inputs=[f, f, i32, f, i32, f, f, f, f], outputs=[i32, f, f, f],
             attrs={"kind": s, "noise_source": s, **plugin})
    def _markov_sample(base_logits, hidden, anchors, temperatures, noise, w1, w2, proj_w, proj_b, **attrs):
        kind = attrs["kind"]
        projection = (None, None) if kind == "vanilla" else (t(proj_w), t(proj_b))
        out = launch.markov_sample(t(base_logits), t(hidden), t(anchors), t(temperatures), t(noise), t(w1), t(w2),
                                   *projection, kind=kind)
        return out.tokens.numpy(), out.probs.numpy(), out.markov_emb.numpy(), out.state.numpy()

    @onnx_op(op_type=f"{DOMAIN}::DSparkConfidence", inputs=[f] * 5, outputs=[f] * 3,
             attrs={"with_markov": i64, **plugin})
    def _confidence(hidden, markov_emb, weight, bias, sts, **attrs):
        out = launch.dspark_confidence(t(hidden), t(markov_emb) if attrs["with_markov"] else None, t(weight), t(bias),
                                       t(sts))
        return out.logits.numpy(), out.confidence.numpy(), out.survival.numpy()

    @onnx_op(op_type=f"{DOMAIN}::DSparkSchedule", inputs=[f] * 6, outputs=[i32], attrs={"mode": s, **plugin})
    def _schedule(survival, token_counts, step_time_ms, batch_sizes, batch_overhead_ms, scalars, **attrs):
        return launch.dspark_schedule(t(survival), t(token_counts), t(step_time_ms), t(batch_sizes),
                                      t(batch_overhead_ms), float(scalars[0]), float(scalars[1]),
                                      production=attrs["mode"] == "production").numpy()

    return get_library_path()


def ort_session(model_path: str):
    """An onnxruntime CPU session for a model with dspark nodes (Python custom ops registered)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(register_ort_ops())
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
