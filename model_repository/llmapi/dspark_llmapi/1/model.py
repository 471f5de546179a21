"""dspark_llmapi: our client-facing request through tensorrtllm_backend's llmapi model (streaming BLS).

The translation is dspark_trt.runtime.llmapi_bridge; this file moves tensors and responses.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from dspark_trt.runtime.llmapi_bridge import TextStream, llmapi_inputs

INPUTS = ("INPUT_IDS", "TEXT_INPUT", "MAX_TOKENS", "TEMPERATURE", "SEED", "STOP", "STOP_IDS", "SPECULATION", "GAMMA")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text, ids, finish_reason="", stats=None):
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("TEXT", np.asarray([text.encode()], dtype=np.object_)),
        pb_utils.Tensor("OUTPUT_IDS", np.asarray(ids, dtype=np.int32)),
        pb_utils.Tensor("FINISH_REASON", np.asarray([finish_reason.encode()], dtype=np.object_)),
        pb_utils.Tensor("STATS", np.asarray([json.dumps(stats, sort_keys=True).encode() if stats else b""],
                                            dtype=np.object_))])


def _first(response, name):
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)
    return value[0].decode() if value.size and isinstance(value[0], bytes) else (str(value[0]) if value.size else None)


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = Tokenizer.from_file(params["tokenizer_dir"] + "/tokenizer.json")
        self.limits = {"max_prompt_tokens": int(params["max_prompt_tokens"]),
                       "max_new_tokens": int(params["max_new_tokens"])}
        self.pool = ThreadPoolExecutor(max_workers=int(params["max_streams"]))

    def execute(self, requests):
        for request in requests:
            inputs = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            self.pool.submit(self._stream, inputs, request.get_response_sender())
        return None

    def _stream(self, inputs, sender):
        try:
            text = inputs.get("TEXT_INPUT")
            prompt = (text.reshape(-1)[0].decode() if text is not None
                      else self.tokenizer.decode(inputs["INPUT_IDS"].astype(np.int64).tolist()))
            call = pb_utils.InferenceRequest(
                model_name="tensorrt_llm", requested_output_names=["text_output", "finish_reason"],
                inputs=[pb_utils.Tensor(k, v) for k, v in llmapi_inputs(inputs, prompt, **self.limits).items()])
            stream, finish_reason = TextStream(self.tokenizer), ""
            for response in call.exec(decoupled=True):
                if response.has_error():
                    raise RuntimeError(f"tensorrt_llm: {response.error().message()}")
                completion = _first(response, "text_output")
                if completion is None:  # the empty response that closes a decoupled stream
                    continue
                new_text, new_ids = stream.update(completion)
                finish_reason = _first(response, "finish_reason") or finish_reason
                if new_text:
                    sender.send(_response(new_text, new_ids))
            sender.send(_response("", [], finish_reason if finish_reason not in ("", "None") else "length",
                                  stream.stats()), flags=FINAL)
        except Exception as e:  # noqa: BLE001 - whatever failed, this request's stream is answered and closed
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"dspark_llmapi: {e}")), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
