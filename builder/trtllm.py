"""The TensorRT-LLM route: a Triton repository around tensorrtllm_backend's `llmapi` model.

TensorRT-LLM runs target and DSpark drafter in one engine on its PyTorch backend
(`DSparkDecodingConfig`, decoding_type `DSpark`, TensorRT-LLM PR #15808). Triton serves it through
tensorrtllm_backend's `all_models/llmapi/tensorrt_llm` Python model, which reads
`tensorrt_llm/1/model.yaml` = LLM API arguments plus a `triton_config` block; rank 0 of an MPI world
of TP size runs the engine, the other ranks wait (`dspark-build serve --world-size N`). What
`dspark-build repo ENGINE_DIR --backend tensorrt-llm` writes:

    preprocessing/    ours: prompt validation and token ids (as in the reference repository)
    dspark_llmapi/    ours: decoupled bridge from the client-facing request to the llmapi model
                      (sampling_param_* inputs, streaming) and back (text deltas, ids, stats)
    tensorrt_llm/     the llmapi model: config.pbtxt + 1/model.yaml generated here; 1/*.py copied
                      from tensorrtllm_backend (`--llmapi-model`, in NVIDIA's container
                      /app/all_models/llmapi/tensorrt_llm)
    ensemble/         the same client-facing inputs and outputs as the reference repository

The `speculative_config` uses TensorRT-LLM's own field names, checked against the field set of the
release it is written for (`fields_for`): the installed TensorRT-LLM's `DSparkDecodingConfig` when
there is one, else a named release. Confidence scheduling is written only where that release has
its fields (TensorRT-LLM main does not).
"""

from __future__ import annotations

import shutil
from importlib import import_module
from pathlib import Path
from typing import Any

from ..plugins.deps import TENSORRT_LLM_PYTORCH_INSTALL, MissingDependencyError, has_module
from ..runtime.atomic import atomic_directory
from ..runtime.calibration import CALIBRATION_FILE
from ..runtime.errors import CheckpointError
from ..runtime.loader import resolve_checkpoint
from ..runtime.manifest import read_manifest
from .families import family

# DSparkDecodingConfig's fields on TensorRT-LLM main since PR #15808 ("Add DeepSeek DSpark speculative
# decoding"; tensorrt_llm/llmapi/llm_args.py): its own and DecodingBaseConfig's that we may write.
# Pydantic StrictBaseModel: any other key is rejected when the LLM API parses model.yaml.
FIELDS_PR15808 = frozenset({
    "decoding_type", "max_draft_len", "speculative_model", "block_size", "mask_token_id", "target_layer_ids",
    "markov_rank", "markov_head_type", "attention_backend",
})
RELEASES = {"pr15808": FIELDS_PR15808}
# Confidence scheduling, named on a TensorRT-LLM development branch; written only when the release has them.
CONFIDENCE_FIELDS = ("enable_confidence_scheduling", "confidence_sts_path", "confidence_sps_table_path")
MODELS = ("preprocessing", "dspark_llmapi", "tensorrt_llm", "ensemble")
LLMAPI_DIR = "/app/all_models/llmapi/tensorrt_llm"  # tensorrtllm_backend's llmapi model in NVIDIA's container


def installed_fields() -> frozenset[str]:
    """The model fields of the installed TensorRT-LLM's DSparkDecodingConfig (imports it lazily)."""
    if not has_module("tensorrt_llm"):
        raise MissingDependencyError("TensorRT-LLM is not installed here: pass --trtllm-fields pr15808 (TensorRT-LLM "
                                     f"main) or install the release you serve with: {TENSORRT_LLM_PYTORCH_INSTALL}")
    import tensorrt_llm.llmapi.llm_args as llm_args

    config = getattr(llm_args, "DSparkDecodingConfig", None)
    if config is None:  # a release from before PR #15808: the container's TensorRT-LLM cannot serve DSpark
        version = getattr(import_module("tensorrt_llm"), "__version__", "?")
        raise MissingDependencyError(f"the installed TensorRT-LLM {version} has no DSparkDecodingConfig (added by "
                                     "PR #15808): serve with a release that has it (TRITON_RELEASE=... for "
                                     "make deploy)")
    return frozenset(config.model_fields)


def fields_for(release: str | None) -> tuple[str, frozenset[str]]:
    """(name, field set) of the TensorRT-LLM release the config is written for; None = the installed one,
    else TensorRT-LLM main (PR #15808) when none is installed."""
    if release is None:
        release = "installed" if has_module("tensorrt_llm") else "pr15808"
    if release == "installed":
        return release, installed_fields()
    if release not in RELEASES:
        raise ValueError(f"--trtllm-fields must be one of {['installed', *RELEASES]}, got {release!r}")
    return release, RELEASES[release]


def speculative_config(manifest: dict[str, Any], ckpt: Path, fields: frozenset[str], *,
                       sts: str | None = None, sps_table: str | None = None) -> dict[str, Any]:
    """The DSpark `speculative_config` of model.yaml for converted checkpoint `ckpt` (its manifest)."""
    dspark = manifest.get("dspark")
    if not dspark:
        raise CheckpointError(ckpt / "manifest.json", "the checkpoint has no drafter", subject="dspark",
                              expected="a checkpoint converted with its drafter")
    # V4's mtp.* drafter lives in the target checkpoint ("embedded"); a DeepSpec drafter is its own one.
    role = "target" if family(manifest["family"], ckpt / "manifest.json").embedded_drafter else "drafter"
    spec = {
        "decoding_type": "DSpark",
        "max_draft_len": dspark["block_size"],
        "speculative_model": _source(manifest, ckpt, role),
        "block_size": dspark["block_size"],
        "mask_token_id": dspark.get("mask_token_id"),
        "target_layer_ids": dspark.get("target_layer_ids"),
        "markov_rank": dspark.get("markov_rank"),
        "markov_head_type": dspark.get("markov_head_type", "vanilla"),
    }
    spec = {key: value for key, value in spec.items() if value is not None}
    if sts is not None or sps_table is not None:
        spec.update({"enable_confidence_scheduling": True, "confidence_sts_path": sts,
                     "confidence_sps_table_path": sps_table})
        spec = {key: value for key, value in spec.items() if value is not None}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise CheckpointError(ckpt / "manifest.json", "DSparkDecodingConfig of this TensorRT-LLM has no field(s) "
                              + ", ".join(unknown), subject="speculative_config", found=sorted(fields),
                              expected="a release with them (--trtllm-fields)")
    return spec


def model_yaml(manifest: dict[str, Any], ckpt: Path, *, gpus: int, fields: frozenset[str],
               sts: str | None = None, sps_table: str | None = None, max_batch_size: int = 64,
               max_seq_len: int | None = None) -> dict[str, Any]:
    """tensorrt_llm/1/model.yaml: LLM API arguments (PyTorch backend) plus the llmapi model's triton_config."""
    config: dict[str, Any] = {
        "model": _source(manifest, ckpt, "target"),
        "backend": "pytorch",
        "tensor_parallel_size": gpus,
    }
    if family(manifest["family"], ckpt / "manifest.json").expert_parallel:  # MoE: experts over the same GPUs
        config["moe_expert_parallel_size"] = gpus
    config["max_batch_size"] = max_batch_size
    if max_seq_len is not None:
        config["max_seq_len"] = max_seq_len
    config["speculative_config"] = speculative_config(manifest, ckpt, fields, sts=sts, sps_table=sps_table)
    # Streaming needs a decoupled model; batching happens inside TensorRT-LLM, not in Triton.
    config["triton_config"] = {"decoupled": True, "max_batch_size": 0}
    return config


def _source(manifest: dict[str, Any], ckpt: Path, role: str) -> str:
    """The Hugging Face checkpoint a converted checkpoint came from: TensorRT-LLM's PyTorch backend loads that
    layout, not our rank{N}.safetensors."""
    path = ((manifest.get("sources") or {}).get(role) or {}).get("path")
    if not path:
        raise CheckpointError(ckpt / "manifest.json", f"no source {role} checkpoint recorded",
                              subject=f"sources.{role}.path", expected="a checkpoint written by dspark-build convert")
    if not Path(path, "config.json").is_file():
        raise CheckpointError(path, f"the source {role} checkpoint is not there (TensorRT-LLM loads it)",
                              subject="config.json", expected="the Hugging Face checkpoint convert read")
    return str(path)


def build_trtllm_repo(engine_dir: Path, out: Path, *, gpus: int, release: str | None = None,
                      llmapi_model: Path | None = None, sps_table: Path | None = None,
                      max_batch_size: int = 64, max_prompt_tokens: int = 1024, max_new_tokens: int = 512,
                      force: bool = False) -> dict[str, Any]:
    """Write the Triton repository of the TensorRT-LLM route; returns the values it was filled with."""
    import yaml

    from .repo import fill_template

    engine_dir = Path(engine_dir).absolute()
    ckpt = resolve_checkpoint(engine_dir)
    manifest = read_manifest(ckpt, "checkpoint")
    release, fields = fields_for(release)
    out = Path(out).absolute()
    confidence = [f for f in CONFIDENCE_FIELDS if f in fields]
    sts_file = ckpt / "draft" / CALIBRATION_FILE
    if sps_table is not None and "confidence_sps_table_path" not in fields:
        raise CheckpointError(sps_table, f"TensorRT-LLM ({release}) has no confidence scheduling to give it to",
                              subject="--trtllm-sps-table", expected=f"a release whose DSparkDecodingConfig has "
                              f"{', '.join(CONFIDENCE_FIELDS)}")
    llmapi_files = _llmapi_files(llmapi_model)
    values = {"tokenizer_dir": str(ckpt / "tokenizer"), "preprocessing_instances": 1,
              "max_prompt_tokens": max_prompt_tokens, "max_new_tokens": max_new_tokens,
              "block_size": manifest["dspark"]["block_size"], "release": release}
    with atomic_directory(out, force=force, inputs=[engine_dir, ckpt, llmapi_model, sps_table]) as tmp:
        sts = sps = None
        if "confidence_sts_path" in confidence and sts_file.is_file():
            shutil.copyfile(sts_file, tmp / CALIBRATION_FILE)
            sts = str(out / CALIBRATION_FILE)
        if sps_table is not None:
            shutil.copyfile(sps_table, tmp / "trtllm_sps_table.json")
            sps = str(out / "trtllm_sps_table.json")
        config = model_yaml(manifest, ckpt, gpus=gpus, fields=fields, sts=sts, sps_table=sps,
                            max_batch_size=max_batch_size,
                            max_seq_len=max_prompt_tokens + max_new_tokens + manifest["dspark"]["block_size"] + 1)
        for model in MODELS:
            (tmp / model / "1").mkdir(parents=True)
            fill_template(model, tmp / model, values, flavour="llmapi")
        header = (f"# LLM API arguments for tensorrtllm_backend's llmapi model (TensorRT-LLM fields: {release}).\n"
                  "# Written by `dspark-build repo --backend tensorrt-llm`; triton_config must match config.pbtxt.\n")
        (tmp / "tensorrt_llm" / "1" / "model.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
        for source in llmapi_files:
            shutil.copyfile(source, tmp / "tensorrt_llm" / "1" / source.name)
    values["model_yaml"] = config
    values["llmapi_model"] = bool(llmapi_files)
    return values


def _llmapi_files(llmapi_model: Path | None) -> list[Path]:
    """tensorrtllm_backend's llmapi model files (model.py and its helpers), from its `tensorrt_llm` folder."""
    if llmapi_model is None:
        return []
    folder = Path(llmapi_model) / "1"
    if not (folder / "model.py").is_file():
        raise CheckpointError(llmapi_model, "not tensorrtllm_backend's llmapi model folder", subject="1/model.py",
                              expected=f"all_models/llmapi/tensorrt_llm (in NVIDIA's container: {LLMAPI_DIR})")
    return sorted(folder.glob("*.py"))


def check_trtllm_repo(repo: Path, world_size: int) -> dict[str, Any]:
    """The model.yaml of a TensorRT-LLM-route repository that `world_size` MPI ranks can serve, or CheckpointError."""
    import yaml

    model_yaml_path = Path(repo) / "tensorrt_llm" / "1" / "model.yaml"
    if not model_yaml_path.is_file():
        raise CheckpointError(repo, "not a TensorRT-LLM-route repository", subject="tensorrt_llm/1/model.yaml",
                              expected="the output of `dspark-build repo ENGINE_DIR --backend tensorrt-llm`")
    config = yaml.safe_load(model_yaml_path.read_text())
    tp = config.get("tensor_parallel_size", 1) * config.get("pipeline_parallel_size", 1)
    if world_size != tp:
        raise CheckpointError(model_yaml_path, f"--world-size {world_size}: TensorRT-LLM needs one MPI rank per GPU "
                              "of the model", subject="tensor_parallel_size", found=tp, expected=world_size)
    if not (Path(repo) / "tensorrt_llm" / "1" / "model.py").is_file():
        raise CheckpointError(repo, "tensorrtllm_backend's llmapi model is missing", subject="tensorrt_llm/1/model.py",
                              expected=f"its 1/*.py (repo --llmapi-model {LLMAPI_DIR})")
    return config


def mpirun_command(repo: Path, world_size: int, *, tritonserver: str = "tritonserver", host: str = "127.0.0.1",
                   http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                   mpi_hosts: list[str] | None = None) -> list[str]:
    """One tritonserver per MPI rank, as tensorrtllm_backend's scripts/launch_triton_server.py starts them.

    Each rank gets its own Python-backend shared-memory prefix. Rank 0 serves the whole repository on
    the given ports; the other ranks load only the llmapi model (whose non-zero ranks wait for rank 0's
    engine) and open no endpoints. --disable-auto-complete-config: config.pbtxt is authoritative.
    `mpi_hosts` (several nodes, rank 0's first) share the ranks equally, in order.
    """
    repo = Path(repo).absolute()
    command = ["mpirun", "--allow-run-as-root"]
    if mpi_hosts:
        if world_size % len(mpi_hosts):
            raise ValueError(f"--world-size {world_size} does not split over {len(mpi_hosts)} hosts")
        command += ["--host", ",".join(f"{h}:{world_size // len(mpi_hosts)}" for h in mpi_hosts)]
    for rank in range(world_size):
        if rank:
            command.append(":")
        command += ["-n", "1", tritonserver, f"--model-repository={repo}", "--disable-auto-complete-config",
                    f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank == 0:
            command += [f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
                        f"--grpc-port={grpc_port}", f"--metrics-address={host}", f"--metrics-port={metrics_port}"]
        else:
            command += ["--model-control-mode=explicit", "--load-model=tensorrt_llm", "--allow-http=false",
                        "--allow-grpc=false", "--allow-metrics=false"]
    return command
