"""dspark_verify: batched target forward with per-slot caches (dspark_trt.runtime.model_handlers);
its inputs and outputs are the messages of dspark_trt.runtime.protocol."""

import json

import triton_python_backend_utils as pb_utils

from dspark_trt.runtime.model_handlers import VerifyHandler, execute_batched, internal_key
from dspark_trt.runtime.placement import model_gpus, require_visible


class TritonPythonModel:
    def initialize(self, args):
        self.key = internal_key()  # only the orchestrator, which holds it, may call this model
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if params["backend"] != "reference":
            raise pb_utils.TritonModelException(
                f"backend {params['backend']!r}: this build serves the reference backend; TensorRT-LLM engines "
                "are served by tensorrtllm_backend (see README, 'Deploying on GPUs')")
        # GPU of each rank from this model's own config (one KIND_MODEL instance; see runtime/placement.py)
        gpus = model_gpus(params, "dspark_verify", int(params["tp"]))
        require_visible(gpus, "dspark_verify")
        self.handler = VerifyHandler(params["engine_dir"], num_slots=int(params["num_slots"]),
                                     max_len=int(params["max_len"]), gpus=gpus)

    def execute(self, requests):
        return execute_batched(self.handler, requests, pb_utils, self.key)

    def finalize(self):
        self.handler.close()
