"""preprocessing: tokenise `TEXT_INPUT`, or pass `INPUT_IDS_IN` through; exactly one must be given."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = Tokenizer.from_file(params["tokenizer_dir"]["string_value"] + "/tokenizer.json")

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT_INPUT")
            ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS_IN")
            if (text is None) == (ids is None):
                error = pb_utils.TritonError("send exactly one of text_input and input_ids")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            if text is not None:
                value = text.as_numpy().reshape(-1)[0]
                value = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
                out = np.asarray(self.tokenizer.encode(value).ids, dtype=np.int32)
            else:
                out = ids.as_numpy().reshape(-1).astype(np.int32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("INPUT_IDS", out)]))
        return responses
