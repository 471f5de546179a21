"""The TensorRT-LLM route's repository: model.yaml against DSparkDecodingConfig's fields, the Triton
configs parsed by Triton's model-config protobuf, the request bridge, and a real tritonserver loading
every part that needs no GPU (preprocessing, the bridge, the ensemble)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tokenizers import Tokenizer
from tritonclient.grpc import model_config_pb2

from dspark_trt.builder.repo import build_repo
from dspark_trt.builder.trtllm import FIELDS_PR15808, build_trtllm_repo, fields_for, speculative_config
from dspark_trt.plugins.deps import MissingDependencyError, has_module
from dspark_trt.runtime.errors import CheckpointError
from dspark_trt.runtime.llmapi_bridge import BridgeError, TextStream, llmapi_inputs
from dspark_trt.runtime.manifest import read_manifest


def _config(repo: Path, model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def v4_ckpt(v4_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dspark_trt.builder.convert import convert

    out = tmp_path_factory.mktemp("v4ckpt") / "tp1"
    convert(v4_pair / "target", None, out, tp=1, show_progress=False)  # the drafter is the target's mtp.*
    return out


@pytest.mark.parametrize("family", ["qwen3", "deepseek-v4"])
def test_model_yaml_uses_tensorrt_llm_field_names(family: str, qwen3_ckpt: Path, v4_ckpt: Path, tmp_path: Path):
    ckpt = qwen3_ckpt if family == "qwen3" else v4_ckpt
    manifest = read_manifest(ckpt, "checkpoint")
    build_trtllm_repo(ckpt, tmp_path / "repo", gpus=8, release="pr15808")
    config = yaml.safe_load((tmp_path / "repo" / "tensorrt_llm" / "1" / "model.yaml").read_text())
    spec = config.pop("speculative_config")
    assert set(spec) <= FIELDS_PR15808  # DSparkDecodingConfig is a StrictBaseModel: other keys are rejected
    dspark = manifest["dspark"]
    assert spec["decoding_type"] == "DSpark" and spec["max_draft_len"] == spec["block_size"] == dspark["block_size"]
    assert spec["mask_token_id"] == dspark["mask_token_id"]
    assert spec["target_layer_ids"] == dspark["target_layer_ids"]
    assert (spec["markov_rank"], spec["markov_head_type"]) == (dspark["markov_rank"], dspark["markov_head_type"])
    target = manifest["sources"]["target"]["path"]
    assert config["model"] == target and config["backend"] == "pytorch" and config["tensor_parallel_size"] == 8
    if family == "deepseek-v4":  # mtp.* drafter embedded in the target; experts over the same GPUs
        assert spec["speculative_model"] == target and config["moe_expert_parallel_size"] == 8
    else:  # a standalone DeepSpec drafter
        assert spec["speculative_model"] == manifest["sources"]["drafter"]["path"]
        assert "moe_expert_parallel_size" not in config
    assert config["triton_config"] == {"decoupled": True, "max_batch_size": 0}
    # Servers run with --disable-auto-complete-config: config.pbtxt must say what triton_config says.
    core = _config(tmp_path / "repo", "tensorrt_llm")
    assert core.model_transaction_policy.decoupled and core.max_batch_size == 0
    assert [g.kind for g in core.instance_group] == [core.instance_group[0].KIND_MODEL]
    assert not (tmp_path / "repo" / "postprocessing").exists()


def test_ensemble_serves_the_reference_inputs_and_outputs(qwen3_ckpt: Path, tmp_path: Path):
    build_trtllm_repo(qwen3_ckpt, tmp_path / "trtllm", gpus=2, release="pr15808")
    build_repo(qwen3_ckpt, tmp_path / "reference")

    def interface(repo: Path) -> tuple:
        config = _config(repo, "ensemble")
        return ([(t.name, t.data_type, list(t.dims), t.optional) for t in config.input],
                [(t.name, t.data_type, list(t.dims)) for t in config.output])

    assert interface(tmp_path / "trtllm") == interface(tmp_path / "reference")
    steps = [s.model_name for s in _config(tmp_path / "trtllm", "ensemble").ensemble_scheduling.step]
    assert steps == ["preprocessing", "dspark_llmapi"]


def test_fields_come_from_a_named_release(qwen3_ckpt: Path, tmp_path: Path):
    manifest = read_manifest(qwen3_ckpt, "checkpoint")
    assert fields_for("pr15808") == ("pr15808", FIELDS_PR15808)
    with pytest.raises(ValueError, match="--trtllm-fields must be one of"):
        fields_for("1.2")
    if not has_module("tensorrt_llm"):
        assert fields_for(None)[0] == "pr15808"
        with pytest.raises(MissingDependencyError, match="--trtllm-fields pr15808"):
            fields_for("installed")
    # confidence scheduling is not in TensorRT-LLM main: asked for anyway, it is refused by name
    with pytest.raises(CheckpointError, match="has no field.*confidence_sps_table_path, enable_confidence"):
        speculative_config(manifest, qwen3_ckpt, FIELDS_PR15808, sps_table="/x.json")
    table = tmp_path / "table.json"
    table.write_text("{}")
    with pytest.raises(CheckpointError, match="has no confidence scheduling"):
        build_trtllm_repo(qwen3_ckpt, tmp_path / "r", gpus=2, release="pr15808", sps_table=table)
    # a release that has the fields gets them, with our STS file
    with_confidence = FIELDS_PR15808 | {"enable_confidence_scheduling", "confidence_sts_path",
                                        "confidence_sps_table_path"}
    spec = speculative_config(manifest, qwen3_ckpt, with_confidence, sts="/r/sts.json", sps_table="/r/t.json")
    assert spec["enable_confidence_scheduling"] is True and spec["confidence_sts_path"] == "/r/sts.json"


def test_llmapi_model_files_are_copied_from_tensorrtllm_backend(qwen3_ckpt: Path, tmp_path: Path):
    llmapi = tmp_path / "llmapi" / "tensorrt_llm"
    (llmapi / "1").mkdir(parents=True)
    (llmapi / "1" / "model.py").write_text("# tensorrtllm_backend's\n")
    (llmapi / "1" / "helpers.py").write_text("# helpers\n")
    build_trtllm_repo(qwen3_ckpt, tmp_path / "repo", gpus=1, release="pr15808", llmapi_model=llmapi)
    assert sorted(p.name for p in (tmp_path / "repo" / "tensorrt_llm" / "1").iterdir()) == \
        ["helpers.py", "model.py", "model.yaml"]
    with pytest.raises(CheckpointError, match="not tensorrtllm_backend's llmapi model folder"):
        build_trtllm_repo(qwen3_ckpt, tmp_path / "repo2", gpus=1, release="pr15808", llmapi_model=tmp_path)


def test_bridge_maps_requests_and_refuses_what_the_route_cannot_do():
    ids = np.arange(5, dtype=np.int32)
    limits = {"max_prompt_tokens": 8, "max_new_tokens": 32}
    out = llmapi_inputs({"INPUT_IDS": ids, "MAX_TOKENS": np.asarray([16], np.int32), "SEED": np.asarray([3]),
                         "STOP": np.asarray([b"\n"], dtype=np.object_)}, "def f(", **limits)
    assert out["text_input"].tolist() == [b"def f("] and out["streaming"].tolist() == [True]
    assert out["sampling_param_max_tokens"].tolist() == [16] and out["sampling_param_top_k"].tolist() == [1]
    assert out["sampling_param_seed"].dtype == np.uint64 and out["sampling_param_stop"].tolist() == [b"\n"]
    sampled = llmapi_inputs({"INPUT_IDS": ids, "TEMPERATURE": np.asarray([0.7], np.float32)}, "x", **limits)
    assert "sampling_param_top_k" not in sampled and sampled["sampling_param_temperature"].tolist() == [
        pytest.approx(0.7)]
    for extra, message in (({"SPECULATION": np.asarray([b"off"], dtype=np.object_)}, "SPECULATION 'off'"),
                           ({"GAMMA": np.asarray([3], np.int32)}, "GAMMA"),
                           ({"STOP_IDS": np.asarray([2], np.int32)}, "STOP_IDS"),
                           ({"MAX_TOKENS": np.asarray([99], np.int32)}, "MAX_TOKENS must be in 1..32"),
                           ({"INPUT_IDS": np.arange(9, dtype=np.int32)}, "the prompt has 9 tokens")):
        with pytest.raises(BridgeError, match=message):
            llmapi_inputs({"INPUT_IDS": ids, **extra}, "x", **limits)


def test_text_stream_turns_cumulative_text_into_deltas(qwen3_ckpt: Path):
    stream = TextStream(Tokenizer.from_file(str(qwen3_ckpt / "tokenizer" / "tokenizer.json")))
    pieces = [stream.update(text) for text in ("def", "def quick", "def quicksort(arr):")]
    assert [p[0] for p in pieces] == ["def", " quick", "sort(arr):"]
    assert sum(len(p[1]) for p in pieces) == stream.stats()["tokens"] > 0


@pytest.mark.slow
def test_tritonserver_loads_the_parts_that_need_no_gpu(qwen3_ckpt: Path, tmp_path: Path):
    """Explicit model control: preprocessing, dspark_llmapi and the ensemble load in a real tritonserver;
    a request then reaches the bridge, which reports that tensorrt_llm (GPU only) is not there."""
    from dspark_trt.builder.serve import find_tritonserver, prepare_backends, server_env
    from dspark_trt.client.stream import RequestError, complete
    from dspark_trt.runtime.tp import free_port

    repo = tmp_path / "repo"
    build_trtllm_repo(qwen3_ckpt, repo, gpus=1, release="pr15808")
    binary, backends = find_tritonserver()
    http, grpc = free_port(), free_port()
    cmd = [str(binary), f"--model-repository={repo}",
           f"--backend-directory={prepare_backends(binary, backends, tmp_path / 'cache')}",
           "--model-control-mode=explicit", "--load-model=preprocessing", "--load-model=dspark_llmapi",
           "--load-model=ensemble", "--disable-auto-complete-config", "--http-address=127.0.0.1",
           f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}", "--allow-metrics=false",
           "--exit-on-error=true", "--strict-readiness=true"]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(binary))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/ensemble/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"ensemble not ready: {log.read_text()[-3000:]}")
        with pytest.raises(RequestError, match="dspark_llmapi: tensorrt_llm: .*'tensorrt_llm' is not ready"):
            complete(f"127.0.0.1:{grpc}", "def f(x):", max_tokens=4)
        with pytest.raises(RequestError, match="SPECULATION 'fixed'"):
            complete(f"127.0.0.1:{grpc}", "def f(x):", max_tokens=4, speculation="fixed")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def served_repo(qwen3_ckpt: Path, tmp_path: Path) -> Path:
    """A TensorRT-LLM-route repository for 2 GPUs, with stand-in llmapi model files."""
    llmapi = tmp_path / "llmapi" / "tensorrt_llm"
    (llmapi / "1").mkdir(parents=True)
    (llmapi / "1" / "model.py").write_text("# stand-in for tensorrtllm_backend's model.py\n")
    build_trtllm_repo(qwen3_ckpt, tmp_path / "repo", gpus=2, release="pr15808", llmapi_model=llmapi)
    return tmp_path / "repo"


def _cli(*args: object):
    from click.testing import CliRunner

    from dspark_trt.builder.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_serve_world_size_is_one_tritonserver_per_rank_under_mpirun(served_repo: Path):
    import shlex

    result = _cli("serve", served_repo, "--world-size", 2, "--http-port", 9000, "--print-command")
    assert result.exit_code == 0, result.output
    command = shlex.split(result.output.strip())
    assert command[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(command[2:]).split(" : ")
    assert len(ranks) == 2
    for rank, args in enumerate(ranks):
        args = args.split()
        assert args[:2] == ["-n", "1"] and args[2].endswith("tritonserver")
        assert f"--model-repository={served_repo.absolute()}" in args and "--disable-auto-complete-config" in args
        assert f"--backend-config=python,shm-region-prefix-name=prefix{rank}_" in args
    assert "--http-port=9000" in ranks[0] and "--load-model" not in ranks[0]
    assert {"--model-control-mode=explicit", "--load-model=tensorrt_llm", "--allow-http=false", "--allow-grpc=false",
            "--allow-metrics=false"} <= set(ranks[1].split())
    result = _cli("serve", served_repo, "--world-size", 2, "--mpi-hosts", "a,b", "--print-command")
    assert "--host a:1,b:1" in result.output
    result = _cli("serve", served_repo, "--world-size", 4, "--print-command")
    assert result.exit_code == 1 and "tensor_parallel_size" in result.output and "--world-size 4" in result.output


def test_serve_world_size_needs_the_llmapi_model(qwen3_ckpt: Path, tmp_path: Path):
    build_trtllm_repo(qwen3_ckpt, tmp_path / "repo", gpus=2, release="pr15808")
    result = _cli("serve", tmp_path / "repo", "--world-size", 2, "--print-command")
    assert result.exit_code == 1 and "tensorrt_llm/1/model.py" in result.output and "--llmapi-model" in result.output


def test_deploy_docker_command(qwen3_ckpt: Path):
    import shlex

    from dspark_trt.builder.deploy import TRITON_RELEASE

    manifest = read_manifest(qwen3_ckpt, "checkpoint")
    result = _cli("deploy", qwen3_ckpt, "--gpus", 8, "--source", Path(__file__).parents[1])
    assert result.exit_code == 0, result.output
    command = shlex.split(result.output.strip())
    assert command[:3] == ["docker", "run", "--rm"]
    assert command[command.index("--gpus") + 1] == '"device=0,1,2,3,4,5,6,7"'
    assert f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-trtllm-python-py3" in command
    mounts = [command[i + 1] for i, a in enumerate(command) if a == "-v"]
    for path in (qwen3_ckpt, manifest["sources"]["target"]["path"], manifest["sources"]["drafter"]["path"]):
        assert f"{path}:{path}:ro" in mounts
    script = command[-1]
    assert f"dspark-build repo {qwen3_ckpt} --backend tensorrt-llm --gpus 8 --trtllm-fields installed " \
           "--llmapi-model /app/all_models/llmapi/tensorrt_llm" in script
    assert script.endswith("exec dspark-build serve /tmp/dspark-repo --world-size 8 --host 0.0.0.0")


def test_deploy_lws_manifest_for_two_nodes(qwen3_ckpt: Path, tmp_path: Path):
    source = tmp_path / "src"
    source.mkdir()
    out = tmp_path / "lws.yaml"
    result = _cli("deploy", qwen3_ckpt, "--gpus", 8, "--nodes", 2, "--source", source, "--lws", out,
                  "--image", "registry.example/dspark-trtllm:1")
    assert result.exit_code == 0, result.output
    objects = list(yaml.safe_load_all(out.read_text()))
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding", "LeaderWorkerSet", "Service"]
    lws = objects[3]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2 and lws["spec"]["replicas"] == 1
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    for container in (leader, worker):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert container["image"] == "registry.example/dspark-trtllm:1"
        assert {"name": "OMPI_MCA_plm_rsh_agent", "value": "kubessh"} in container["env"]
    script = leader["command"][-1]
    assert "--gpus 16" in script and "--world-size 16 --host 0.0.0.0 --mpi-hosts dspark-trtllm-0,dspark-trtllm-0-1" \
        in script and f"cp -r {source} " in script
    claim = template["leaderTemplate"]["spec"]["volumes"][0]
    assert claim["persistentVolumeClaim"]["claimName"] == "dspark-models"
    assert objects[4]["spec"]["selector"]["role"] == "leader"
    assert objects[1]["rules"][1] == {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}
    elsewhere = Path("/usr")  # exists, and is not under the checkpoint's top directory (/tmp here)
    result = _cli("deploy", qwen3_ckpt, "--nodes", 2, "--source", elsewhere, "--lws", out)
    assert result.exit_code == 1 and "dspark-models claim" in result.output


def test_installed_fields_are_read_from_the_installed_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`--trtllm-fields installed` reads DSparkDecodingConfig's model fields; a TensorRT-LLM from before
    PR #15808 is named as such. A minimal stand-in package (TensorRT-LLM needs a GPU host)."""
    import sys

    if has_module("tensorrt_llm"):
        pytest.skip("a real TensorRT-LLM is installed: the stand-in would shadow it")
    package = tmp_path / "site" / "tensorrt_llm"
    (package / "llmapi").mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "1.1.0"\n')
    (package / "llmapi" / "__init__.py").write_text("")
    (package / "llmapi" / "llm_args.py").write_text("class EagleDecodingConfig:\n    model_fields = {}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    def import_afresh() -> None:  # the next import reads the stand-in as it is now
        for name in [m for m in sys.modules if m.startswith("tensorrt_llm")]:
            monkeypatch.delitem(sys.modules, name)

    import_afresh()
    with pytest.raises(MissingDependencyError, match="TensorRT-LLM 1.1.0 has no DSparkDecodingConfig"):
        fields_for("installed")
    (package / "llmapi" / "llm_args.py").write_text(
        "class DSparkDecodingConfig:\n    model_fields = dict.fromkeys(['decoding_type', 'max_draft_len'])\n")
    import_afresh()
    assert fields_for("installed") == ("installed", frozenset({"decoding_type", "max_draft_len"}))
