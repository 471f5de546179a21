"""ONNX export of the Qwen3 drafter: checker, plugin nodes, onnxruntime against the torch drafter, polygraphy.

onnxruntime runs the dspark nodes through onnxruntime-extensions Python ops that launch the Triton
kernels (CPU interpreter). Tolerances: tokens exactly (greedy, and sampled with the same Philox
uniforms), probabilities / confidences 1e-5, context keys and values 1e-5 (float32 graphs against
the float32 reference, different op order).
"""

from __future__ import annotations

from dspark_trt.plugins.interpret import enable_interpreter

enable_interpreter()  # the onnxruntime custom ops launch the Triton kernels on CPU

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from dspark_trt.builder.cli_engine import export  # noqa: E402
from dspark_trt.builder.export_onnx import open_drafter  # noqa: E402
from dspark_trt.plugins import launch, onnx_ops  # noqa: E402
from dspark_trt.plugins.reference import gumbel_sequential_heads  # noqa: E402
from dspark_trt.runtime.dspark import base as drafter_module  # noqa: E402
from dspark_trt.runtime.dspark.qwen3 import Qwen3DSparkDrafter  # noqa: E402
from dspark_trt.runtime.scheduler import CostTable, schedule_production  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def exported(qwen3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "draft"
    result = CliRunner().invoke(export, [str(qwen3_ckpt), "-o", str(out), "--schedule-mode", "production"])
    assert result.exit_code == 0, result.output
    assert "full check passed" in result.output
    return out


@pytest.fixture(scope="module")
def drafter_with_context(qwen3_ckpt: Path):
    """A reference drafter with three slots of different context lengths."""
    drafter = Qwen3DSparkDrafter(qwen3_ckpt / "draft", num_slots=3, max_len=32)
    width = len(drafter.target_layer_ids) * drafter.config["hidden_size"]
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(n, width, generator=g) for n in (5, 11, 2)]
    for slot, f in enumerate(features):
        drafter.add_context(slot, f)
    return drafter, features


def feeds(drafter: Qwen3DSparkDrafter, anchors: list[int], temperatures: list[float], seeds: list[int]) -> dict:
    width = int(drafter.ctx_len.max())
    return {"anchors": np.array(anchors, dtype=np.int64), "ctx_lens": drafter.ctx_len.numpy().astype(np.int64),
            "past_keys": drafter.k_ctx[:, :3, :, :width].numpy(),
            "past_values": drafter.v_ctx[:, :3, :, :width].numpy(),
            "temperatures": np.array(temperatures, dtype=np.float32), "seeds": np.array(seeds, dtype=np.int32)}


def test_every_graph_passes_the_full_checker(exported: Path):
    onnx_ops.register_schemas()
    for name in ("draft", "context", "schedule"):
        onnx.checker.check_model(str(exported / f"{name}.onnx"), full_check=True)


def test_plugin_nodes_external_weights_dynamic_batch(exported: Path):
    model = onnx.load(str(exported / "draft.onnx"), load_external_data=False)
    nodes = {n.op_type: n for n in model.graph.node if n.domain == "dspark"}
    assert set(nodes) == {"MarkovSample", "DSparkConfidence"}
    for node in nodes.values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"dspark" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1
    assert {o.domain: o.version for o in model.opset_import}["dspark"] == 1
    big = [t for t in model.graph.initializer if t.name.endswith("embed_tokens__weight")]
    assert big and big[0].data_location == onnx.TensorProto.EXTERNAL
    assert (exported / "draft.onnx.data").stat().st_size > 1_000_000
    batch_dims = {i.name: i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input}
    assert batch_dims["anchors"] and batch_dims["anchors"] == batch_dims["temperatures"] == batch_dims["seeds"]


def test_onnxruntime_matches_torch_drafter_greedy(exported: Path, drafter_with_context):
    drafter, _ = drafter_with_context
    anchors = [3, 500, 77]
    ref = drafter.draft([0, 1, 2], anchors, [0.0] * 3, [None] * 3)
    tokens, probs, conf_logits, confidence, survival = onnx_ops.ort_session(exported / "draft.onnx").run(
        None, feeds(drafter, anchors, [0.0] * 3, [1, 2, 3]))
    assert np.array_equal(tokens, ref.tokens.numpy())
    # The graph's greedy rows are one-hot; the reference returns no distributions for an all-greedy batch.
    assert ref.probs.shape[-1] == 0 and np.array_equal(probs, np.eye(probs.shape[-1], dtype=probs.dtype)[tokens])
    np.testing.assert_allclose(conf_logits, ref.conf_logits.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(confidence, ref.confidence.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(survival, ref.survival.numpy(), atol=ATOL, rtol=0)


def test_onnxruntime_matches_torch_drafter_sampled(exported: Path, drafter_with_context, monkeypatch):
    """T > 0: the torch drafter with its draws replaced by Gumbel-max on the graph's Philox uniforms."""
    drafter, _ = drafter_with_context
    anchors, temperatures, seeds = [9, 10, 11], [0.8, 0.0, 1.3], [41, 42, 43]
    uniforms = launch.philox_uniforms(torch.tensor(seeds), drafter.block_size, drafter.config["vocab_size"])

    def gumbel_heads(markov, confidence, hidden, base_logits, anchors_, temps, generators):
        return gumbel_sequential_heads(markov, confidence, hidden, base_logits, anchors_, torch.tensor(temps),
                                       uniforms)[0]

    monkeypatch.setattr(drafter_module, "sequential_heads", gumbel_heads)
    ref = drafter.draft([0, 1, 2], anchors, temperatures, [None] * 3)
    tokens, probs, conf_logits, _, survival = onnx_ops.ort_session(exported / "draft.onnx").run(
        None, feeds(drafter, anchors, temperatures, seeds))
    assert np.array_equal(tokens, ref.tokens.numpy())
    np.testing.assert_allclose(probs, ref.probs.numpy(), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(survival, ref.survival.numpy(), atol=ATOL, rtol=0)


def test_context_graph_matches_add_context(exported: Path, drafter_with_context):
    drafter, features = drafter_with_context
    session = onnx_ops.ort_session(exported / "context.onnx")
    for slot, f in enumerate(features[:2]):
        keys, values = session.run(None, {"features": f[None].numpy(), "start": np.array([0], dtype=np.int64)})
        n = f.shape[0]
        np.testing.assert_allclose(keys[:, 0], drafter.k_ctx[:, slot, :, :n].numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(values[:, 0], drafter.v_ctx[:, slot, :, :n].numpy(), atol=ATOL, rtol=0)


def test_schedule_graph_matches_reference(exported: Path):
    survival = torch.rand(6, 7, generator=torch.Generator().manual_seed(3)).cumprod(1)
    table = CostTable(token_counts=[1, 8, 32], step_time_ms=[3.0, 3.5, 9.0], fixed_overhead_ms=1.0,
                      batch_sizes=[1, 8], batch_overhead_ms=[0.0, 0.5])
    inputs = {k: v.numpy() for k, v in launch.cost_table_tensors(table).items()}
    (lengths,) = onnx_ops.ort_session(exported / "schedule.onnx").run(None, {
        "survival": survival.numpy(), **inputs, "scalars": np.array([1.0, 0.04], dtype=np.float32)})
    assert np.array_equal(lengths, schedule_production(survival, table).numpy())


def test_polygraphy_lists_the_plugin_nodes(exported: Path):
    polygraphy = Path(sys.executable).with_name("polygraphy")
    done = subprocess.run([str(polygraphy), "inspect", "model", str(exported / "draft.onnx"), "--show", "layers"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "[Op: MarkovSample]" in done.stdout and "[Op: DSparkConfidence]" in done.stdout


def test_export_refuses_non_qwen3_or_missing_drafter(tmp_path: Path):
    from dspark_trt.runtime.errors import CheckpointError
    from dspark_trt.runtime.manifest import write_manifest

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_manifest(ckpt, "checkpoint", family="deepseek-v4", tp=1, dspark={"block_size": 5})
    with pytest.raises(CheckpointError, match="Qwen3 drafter only"):
        open_drafter(ckpt)
    result = CliRunner().invoke(export, [str(ckpt), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Qwen3 drafter only" in result.output
