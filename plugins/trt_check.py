"""TensorRT check of one dspark plugin on a GPU: `python -m dspark_trt.plugins.trt_check MarkovSample`.

Builds a one-layer TensorRT network around the plugin's AOT implementation, runs it, and compares
with the torch reference (runtime/) on the same inputs. Exits non-zero on any difference. Used by the
`gpu`-marked tests (in a child process, as everything that creates TensorRT objects).
"""

from __future__ import annotations

import sys

import torch


def _run_network(plugin: str, attrs: dict, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from .trt import register

    register()
    dtypes = {torch.float32: trt.float32, torch.int32: trt.int32, torch.bfloat16: trt.bfloat16}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    tensors = [network.add_input(name, dtypes[t.dtype], tuple(t.shape)) for name, t in inputs.items()]
    layer = network.add_plugin(getattr(trtp.op.dspark, plugin)(*tensors, **attrs), aot=True)
    outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
    for i, out in enumerate(outputs):
        out.name = f"out{i}"
        network.mark_output(out)
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    results = []
    for name, tensor in inputs.items():
        context.set_tensor_address(name, tensor.data_ptr())
    torch_types = {v: k for k, v in dtypes.items()}
    for i in range(len(outputs)):
        shape = tuple(context.get_tensor_shape(f"out{i}"))
        results.append(torch.empty(shape, dtype=torch_types[engine.get_tensor_dtype(f"out{i}")], device="cuda"))
        context.set_tensor_address(f"out{i}", results[-1].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return results


def check(plugin: str) -> None:
    from ..runtime.dspark.base import sequential_heads
    from ..runtime.heads import ConfidenceHead, MarkovHead
    from ..runtime.scheduler import CostTable, schedule_paper
    from .launch import cost_table_tensors

    g = torch.Generator().manual_seed(0)
    batch, gamma, vocab, rank, dim = 8, 7, 4099, 256, 64
    w1, w2 = torch.randn(vocab, rank, generator=g) * 0.3, torch.randn(vocab, rank, generator=g) * 0.3
    hidden, base = torch.randn(batch, gamma, dim, generator=g), torch.randn(batch, gamma, vocab, generator=g) * 2
    anchors = torch.randint(0, vocab, (batch,), generator=g, dtype=torch.int32)
    conf = ConfidenceHead(torch.randn(1, dim + rank, generator=g) * 0.1, torch.randn(1, generator=g), True, None)
    ref = sequential_heads(MarkovHead("vanilla", w1, w2), conf, hidden, base, anchors.long(), [0.0] * batch,
                           [None] * batch)
    cuda = {"device": "cuda"}
    if plugin == "MarkovSample":
        zero = torch.zeros(1, **cuda)
        tokens, probs, _emb, _state = _run_network(plugin, {"kind": "vanilla", "noise_source": "philox"}, {
            "base_logits": base.to(**cuda), "hidden": hidden.to(**cuda), "anchors": anchors.to(**cuda),
            "temperatures": torch.zeros(batch, **cuda), "noise": torch.arange(batch, dtype=torch.int32, **cuda),
            "w1": w1.to(**cuda), "w2": w2.to(**cuda), "proj_weight": zero, "proj_bias": zero.clone()})
        assert torch.equal(tokens.cpu().long(), ref.tokens), "greedy tokens differ"
        assert torch.equal(probs.cpu(), ref.probs)
    elif plugin == "DSparkConfidence":
        prev = torch.cat([anchors.long()[:, None], ref.tokens[:, :-1]], dim=1)
        logits, confidence, survival = _run_network(plugin, {"with_markov": 1}, {
            "hidden": hidden.to(**cuda), "markov_emb": w1[prev].to(**cuda),
            "weight": conf.weight.reshape(-1).to(**cuda), "bias": conf.bias.to(**cuda),
            "sts_temperatures": torch.ones(gamma, **cuda)})
        torch.testing.assert_close(logits.cpu(), ref.conf_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(survival.cpu(), ref.survival, atol=1e-5, rtol=0)
    else:
        table = CostTable(token_counts=[1, 16, 64], step_time_ms=[4.0, 5.0, 12.0], fixed_overhead_ms=1.0)
        tensors = {k: v.to(**cuda) for k, v in cost_table_tensors(table).items()}
        (lengths,) = _run_network(plugin, {"mode": "paper"}, {
            "survival": ref.survival.to(**cuda), **tensors, "scalars": torch.tensor([1.0, 0.04], **cuda)})
        assert torch.equal(lengths.cpu().long(), schedule_paper(ref.survival, table))


if __name__ == "__main__":
    check(sys.argv[1])
    print(f"{sys.argv[1]}: TensorRT plugin matches the reference")
