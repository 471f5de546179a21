"""postprocessing: incremental detokenisation (dspark_trt.runtime.detok.text_delta), stateless per chunk."""

import collections
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from dspark_trt.runtime.detok import text_delta


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        tokenizer = Tokenizer.from_file(params["tokenizer_dir"]["string_value"] + "/tokenizer.json")
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.cancelled = collections.deque(maxlen=1024)  # ids already reported, not to repeat the call

    def _cancel(self, request_id):
        """Triton cancelled this stream's ensemble: tell the orchestrator so that it frees the slot."""
        if not request_id or request_id in self.cancelled:
            return
        self.cancelled.append(request_id)
        cancel = pb_utils.Tensor("CANCEL", np.asarray([request_id.encode()], dtype=np.object_))
        for _ in pb_utils.InferenceRequest(model_name="dspark", inputs=[cancel], requested_output_names=[]).exec(
                decoupled=True):
            pass

    def execute(self, requests):
        responses = []
        for request in requests:
            if request.is_cancelled():
                self._cancel(request.request_id())
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)))
                continue
            new = pb_utils.get_input_tensor_by_name(request, "OUTPUT_IDS").as_numpy().reshape(-1).tolist()
            prefix = pb_utils.get_input_tensor_by_name(request, "PREFIX_IDS").as_numpy().reshape(-1).tolist()
            text = text_delta(self.decode, prefix, new) if new else ""
            out = np.asarray([text.encode("utf-8")], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", out)]))
        return responses
