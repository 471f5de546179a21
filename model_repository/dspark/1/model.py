"""dspark: decoupled orchestrator running in-flight batched DSpark decoding (dspark_trt.runtime.serving).

The drafter runs where the `drafter` parameter says: in the dspark_draft model, called over BLS, or
in this process (the same handler and messages, without crossing processes each round).

It also keeps the models it depends on alive (runtime/watch.py, ModelWatch): when a process of one
dies, the live requests fail once with the reason, new ones are refused, and the model is unloaded
and loaded again through the Python backend's model-loading API (the server runs with explicit model
control, see builder/serve.py).
"""

import json
import threading
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from dspark_trt.runtime.loader import resolve_checkpoint
from dspark_trt.runtime.manifest import read_manifest
from dspark_trt.runtime.model_handlers import KEY_PARAMETER, DraftHandler, internal_key
from dspark_trt.runtime.protocol import ENDPOINTS
from dspark_trt.runtime.scheduler import CostTable
from dspark_trt.runtime.serving import (
    Limits,
    Orchestrator,
    ParamError,
    RemoteDrafter,
    RemoteTarget,
    parse_request,
    stats_json,
)
from dspark_trt.runtime.watch import ModelWatch

INPUTS = ("INPUT_IDS", "MAX_TOKENS", "TEMPERATURE", "SEED", "STOP", "STOP_IDS", "SPECULATION", "GAMMA")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Models whose processes hold request state: when one dies, the live requests are lost.
STATEFUL = ("dspark_verify", "dspark_draft")
PARAMETERS = {}  # {KEY_PARAMETER: the server's key}: proves to dspark_draft / dspark_verify that we call
IPC = threading.Lock()  # this process's messages to the server, one at a time (see ModelWatch)


def bls(model, inputs):
    """One call to an internal model (runtime/protocol.py names its inputs and outputs)."""
    outputs = ENDPOINTS[model].response.names()
    request = pb_utils.InferenceRequest(model_name=model, inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
                                        requested_output_names=outputs, parameters=PARAMETERS)
    with IPC:
        response = request.exec()
    if response.has_error():
        raise RuntimeError(response.error().message())
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def _tensors(tokens, prefix, finish_reason, stats):
    return [pb_utils.Tensor("OUTPUT_IDS", np.asarray(tokens, dtype=np.int32)),
            pb_utils.Tensor("PREFIX_IDS", np.asarray(prefix, dtype=np.int32)),
            pb_utils.Tensor("FINISH_REASON", np.asarray([(finish_reason or "").encode()], dtype=np.object_)),
            pb_utils.Tensor("STATS", np.asarray([stats_json(stats).encode()], dtype=np.object_))]


class TritonSink:
    def __init__(self, sender):
        self.sender = sender

    def send(self, tokens, prefix, finish_reason, stats):
        if finish_reason == "cancelled":  # nobody is listening any more: just close the stream
            with IPC:
                self.sender.send(flags=FINAL)
            return
        flags = FINAL if finish_reason is not None else 0
        response = pb_utils.InferenceResponse(_tensors(tokens, prefix, finish_reason, stats))
        with IPC:
            self.sender.send(response, flags=flags)

    def error(self, message):
        with IPC:
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

    def cancelled(self):
        return self.sender.is_cancelled()


class TritonMetrics:
    """DSpark metrics on Triton's metrics endpoint (Prometheus, port 8002 by default)."""

    def __init__(self, block_size):
        family = pb_utils.MetricFamily
        labels = {"model": "dspark"}
        # Families must outlive their metrics, so both are kept on the instance.
        self.families = {
            "tau": family("dspark_accepted_tokens_per_round", "Tokens committed per round (tau): accepted drafts + 1",
                          family.HISTOGRAM),
            "verified": family("dspark_verified_length", "Draft tokens verified per round", family.HISTOGRAM),
            "position_verified": family("dspark_position_verified_total", "Rounds that verified block position k",
                                        family.COUNTER),
            "position_accepted": family("dspark_position_accepted_total", "Rounds that accepted block position k",
                                        family.COUNTER),
            "calls": family("dspark_model_calls_total", "Draft and verify calls, prefills included",
                            family.COUNTER),
            "call_us": family("dspark_model_call_duration_us", "Time the orchestrator waited for its draft and verify "
                              "calls, process crossings included (microseconds)", family.COUNTER),
            "active": family("dspark_active_requests", "Requests being decoded", family.GAUGE),
            "queued": family("dspark_queued_requests", "Requests waiting for a slot", family.GAUGE),
        }
        f = self.families
        # One bucket per value (le = k + 0.5 holds k): τ is 1 .. γ + 1, a verified length 0 .. γ.
        self.tau = f["tau"].Metric(labels, buckets=[k + 0.5 for k in range(1, block_size + 2)])
        self.verified = f["verified"].Metric(labels, buckets=[k + 0.5 for k in range(block_size + 1)])
        self.position_verified = [f["position_verified"].Metric({**labels, "position": str(k + 1)})
                                  for k in range(block_size)]
        self.position_accepted = [f["position_accepted"].Metric({**labels, "position": str(k + 1)})
                                  for k in range(block_size)]
        self.calls = {m: f["calls"].Metric({**labels, "call": m}) for m in ENDPOINTS}
        self.call_us = {m: f["call_us"].Metric({**labels, "call": m}) for m in ENDPOINTS}
        self.active = f["active"].Metric(labels)
        self.queued = f["queued"].Metric(labels)
        self.pending_rounds, self.flushed, self.last_load = [], time.monotonic(), None
        self.pending_calls = {m: [0, 0.0] for m in ENDPOINTS}  # model -> [calls, microseconds]

    def call(self, model, seconds):
        pending = self.pending_calls[model]
        pending[0] += 1
        pending[1] += seconds * 1e6

    def round(self, verified, accepted):
        # Each metric update is a message to the server; buffer them and flush a few times a second.
        self.pending_rounds.append((verified, accepted))
        if time.monotonic() - self.flushed > 0.25:
            self.flush()

    def flush(self):
        with IPC:
            self._flush()

    def _flush(self):
        verified_counts, accepted_counts = [0] * len(self.position_verified), [0] * len(self.position_accepted)
        for verified, accepted in self.pending_rounds:
            self.tau.observe(accepted + 1)
            self.verified.observe(verified)
            for k in range(verified):
                verified_counts[k] += 1
            for k in range(accepted):
                accepted_counts[k] += 1
        counts = verified_counts + accepted_counts
        for metric, count in zip(self.position_verified + self.position_accepted, counts, strict=True):
            if count:
                metric.increment(count)
        for model, pending in self.pending_calls.items():
            if pending[0]:
                self.calls[model].increment(pending[0])
                self.call_us[model].increment(pending[1])
            pending[:] = [0, 0.0]
        self.pending_rounds.clear()
        self.flushed = time.monotonic()

    def load(self, active, queued):
        if active == 0:
            self.flush()  # idle: make every finished round visible
        if (active, queued) != self.last_load:
            with IPC:
                self.active.set(active)
                self.queued.set(queued)
            self.last_load = (active, queued)


class TritonPythonModel:
    def initialize(self, args):
        PARAMETERS[KEY_PARAMETER] = internal_key()
        torch.set_num_threads(1)  # the orchestrator does bookkeeping; the cores belong to draft and verify
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        manifest = read_manifest(resolve_checkpoint(Path(params["engine_dir"])), "checkpoint")
        dspark, slots = manifest["dspark"], int(params["num_slots"])
        tokenizer = Tokenizer.from_file(params["tokenizer_dir"] + "/tokenizer.json")
        self.limits = Limits(int(params["max_prompt_tokens"]), int(params["max_new_tokens"]), dspark["block_size"],
                             tokenizer.get_vocab_size(with_added_tokens=True))
        cost_table = CostTable.load(params["sps_table"]) if params["sps_table"] else None
        metrics = TritonMetrics(dspark["block_size"])
        transports = {"dspark_verify": bls, "dspark_draft": bls}
        self.stateful = STATEFUL
        if params["drafter"] == "orchestrator":  # the drafter's state then lives in this process
            handler = DraftHandler(params["engine_dir"], num_slots=slots, max_len=int(params["max_len"]),
                                   threads=int(params["draft_threads"]))
            transports["dspark_draft"] = lambda model, inputs: handler.handle(inputs)
            self.stateful = ("dspark_verify",)

        def call(model, inputs):
            began = time.perf_counter()
            outputs = transports[model](model, inputs)
            metrics.call(model, time.perf_counter() - began)
            return outputs

        self.orchestrator = Orchestrator(
            RemoteTarget(call), RemoteDrafter(call, slots, dspark["block_size"], dspark["target_layer_ids"]),
            num_slots=slots, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            metrics=metrics, cost_table=cost_table, scheduler=params["scheduler"],
            min_gain=float(params["min_gain"]), measure_costs=params.get("live_costs", "true") == "true",
            diagnose=lambda: self.watch.diagnose())
        self.watch = ModelWatch(pb_utils, self.stateful + ("preprocessing", "postprocessing"), IPC,
                                self._dependency_died, self._dependency_reloaded)
        self.orchestrator.start()
        self.watch.start()

    def _dependency_died(self, model, reason):
        if model in self.stateful:  # their processes held the live requests' state
            self.orchestrator.dependency_failed(reason)
            # Tell the clients before reloading: the reload holds this process's messages (IPC).
            self.orchestrator.wait_fault_handled(timeout=10)

    def _dependency_reloaded(self, model):
        if model in self.stateful:
            self.orchestrator.dependency_recovered()

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            cancel = pb_utils.get_input_tensor_by_name(request, "CANCEL")
            if cancel is not None:
                self.orchestrator.cancel(cancel.as_numpy().reshape(-1)[0].decode())
                sink.sender.send(flags=FINAL)
                continue
            inputs = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                decoding = parse_request(inputs, self.limits, json.loads(request.parameters() or "{}"))
            except ParamError as e:
                sink.error(str(e))
                continue
            self.orchestrator.submit(decoding, sink, request.request_id())
        return None

    def finalize(self):
        self.watch.stop()
        self.orchestrator.stop()
