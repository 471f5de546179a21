"""preprocessing: tokenise `TEXT_INPUT`, or pass `INPUT_IDS_IN` through; exactly one must be given.

It also keeps the orchestrator alive. `dspark` watches every other model (runtime/watch.py) but cannot
watch its own process, and when that dies Triton's Python backend neither restarts a decoupled model
nor stops reporting it ready (triton-inference-server/server#8604). So this model watches `dspark`
and unloads and loads it again, after which the server is ready again. Model-loading calls must not
overlap another message of the same process (see ModelWatch), so responses go out through the
response sender under the same lock instead of being returned.
"""

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from dspark_trt.runtime.watch import ModelWatch

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
IPC = threading.Lock()  # this process's messages to the server, one at a time (see ModelWatch)


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = Tokenizer.from_file(params["tokenizer_dir"]["string_value"] + "/tokenizer.json")
        self.watch = ModelWatch(pb_utils, ("dspark",), IPC)
        self.watch.start()

    def execute(self, requests):
        for request in requests:
            response = self._respond(request)
            with IPC:
                request.get_response_sender().send(response, flags=FINAL)
        return None

    def _respond(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "TEXT_INPUT")
        ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS_IN")
        if (text is None) == (ids is None):
            error = pb_utils.TritonError("send exactly one of text_input and input_ids")
            return pb_utils.InferenceResponse(error=error)
        if text is not None:
            value = text.as_numpy().reshape(-1)[0]
            value = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
            out = np.asarray(self.tokenizer.encode(value).ids, dtype=np.int32)
        else:
            out = ids.as_numpy().reshape(-1).astype(np.int32)
        return pb_utils.InferenceResponse([pb_utils.Tensor("INPUT_IDS", out)])

    def finalize(self):
        self.watch.stop()
