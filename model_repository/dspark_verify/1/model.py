"""dspark_verify: batched target forward with per-slot caches (dspark_trt.runtime.model_handlers)."""

import json

import triton_python_backend_utils as pb_utils

from dspark_trt.runtime.model_handlers import VerifyHandler

INPUTS = ("SLOTS", "START", "TOKENS", "COUNTS")


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if params["backend"] != "reference":
            raise pb_utils.TritonModelException(
                f"backend {params['backend']!r}: this build serves the reference backend; TensorRT-LLM engines "
                "are served by tensorrtllm_backend (see README, 'Deploying on GPUs')")
        self.handler = VerifyHandler(params["engine_dir"], num_slots=int(params["num_slots"]),
                                     max_len=int(params["max_len"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                inputs = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in INPUTS}
                outputs = self.handler.handle(inputs)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()]))
            except Exception as e:  # noqa: BLE001 - reported to the caller, the model stays up
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"dspark_verify: {e}")))
        return responses

    def finalize(self):
        self.handler.close()
