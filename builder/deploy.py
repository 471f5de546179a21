"""Launching the TensorRT-LLM route on GPU hosts: one node with `docker run`, several with a
Kubernetes LeaderWorkerSet. Both are generated here from a converted checkpoint and started by the
same script inside NVIDIA's `tritonserver:<release>-trtllm-python-py3` container:

    install this package (no dependencies: the container has torch, TensorRT-LLM, tokenizers)
    dspark-build repo CKPT --backend tensorrt-llm --gpus N --trtllm-fields installed
                          --llmapi-model /app/all_models/llmapi/tensorrt_llm -o /tmp/dspark-repo
    dspark-build serve /tmp/dspark-repo --world-size N --host 0.0.0.0     (mpirun, one rank per GPU)

The repository is written inside the container so that model.yaml is checked against the
DSparkDecodingConfig of the TensorRT-LLM that will run it. Checkpoints are mounted read-only at the
paths the converted checkpoint's manifest records.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ..runtime.errors import CheckpointError
from ..runtime.loader import resolve_checkpoint
from ..runtime.manifest import read_manifest
from .trtllm import LLMAPI_DIR

# The one place the container release is pinned (`make deploy` and `dspark-build deploy` read it). It must
# carry a TensorRT-LLM with DSparkDecodingConfig (PR #15808, merged 2026-07-01; the pip release notes say
# 1.3.0rc27); `repo --trtllm-fields installed` inside the container fails with the missing field names if not.
TRITON_RELEASE = "26.08"
SOURCE_IN_CONTAINER = "/opt/dspark-trt/src"
REPO_IN_CONTAINER = "/tmp/dspark-repo"


def image(release: str = TRITON_RELEASE) -> str:
    return f"nvcr.io/nvidia/tritonserver:{release}-trtllm-python-py3"


def checkpoint_mounts(engine_dir: Path) -> tuple[Path, list[Path]]:
    """(converted checkpoint, every directory the container must see): the checkpoint and its sources."""
    ckpt = resolve_checkpoint(Path(engine_dir).absolute())
    sources = read_manifest(ckpt, "checkpoint").get("sources") or {}
    paths = [ckpt] + [Path(s["path"]) for s in sources.values() if s.get("path")]
    missing = [p for p in paths if not p.is_dir()]
    if missing:
        raise CheckpointError(missing[0], "a directory the server needs is not there", subject="sources",
                              expected="the checkpoints recorded in the converted checkpoint's manifest.json")
    return ckpt, paths


def container_script(ckpt: Path, *, world_size: int, source: str = SOURCE_IN_CONTAINER,
                     mpi_hosts: list[str] | None = None) -> str:
    """The shell script the container runs: install us, write the repository, serve it under mpirun."""
    repo = ["dspark-build", "repo", str(ckpt), "--backend", "tensorrt-llm", "--gpus", str(world_size),
            "--trtllm-fields", "installed", "--llmapi-model", LLMAPI_DIR, "-o", REPO_IN_CONTAINER, "--force"]
    serve = ["dspark-build", "serve", REPO_IN_CONTAINER, "--world-size", str(world_size), "--host", "0.0.0.0"]
    if mpi_hosts:
        serve += ["--mpi-hosts", ",".join(mpi_hosts)]
    steps = [f"cp -r {shlex.quote(source)} /tmp/dspark-trt-src",  # pip builds in the tree; the mount is read-only
             "pip install --no-deps /tmp/dspark-trt-src", shlex.join(repo), "exec " + shlex.join(serve)]
    return " && ".join(steps)


def docker_run_command(engine_dir: Path, *, gpus: int, release: str = TRITON_RELEASE, source: Path,
                       http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002) -> list[str]:
    """`docker run` serving the TensorRT-LLM route on this host's GPUs 0..gpus-1."""
    ckpt, mounts = checkpoint_mounts(engine_dir)
    command = ["docker", "run", "--rm", "--gpus", f'"device={",".join(str(g) for g in range(gpus))}"',
               "--ipc=host", "--shm-size=2g", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864",
               "-p", f"{http_port}:8000", "-p", f"{grpc_port}:8001", "-p", f"{metrics_port}:8002",
               "-v", f"{Path(source).absolute()}:{SOURCE_IN_CONTAINER}:ro"]
    for path in mounts:
        command += ["-v", f"{path}:{path}:ro"]
    return command + [image(release), "bash", "-c", container_script(ckpt, world_size=gpus)]


def lws_manifests(engine_dir: Path, *, nodes: int, gpus_per_node: int, source: Path, release: str = TRITON_RELEASE,
                  name: str = "dspark-trtllm", models_claim: str = "dspark-models",
                  image_name: str | None = None) -> list[dict[str, Any]]:
    """Kubernetes objects for `nodes` pods of `gpus_per_node` GPUs: a LeaderWorkerSet (kubernetes-sigs/lws)
    whose leader runs mpirun over every pod, the Service in front of the leader, and the account
    mpirun's `kubessh` agent uses to start ranks in the worker pods (pods/exec), as lws's
    TensorRT-LLM example does; NVIDIA's container has neither kubectl nor kubessh, so `image_name`
    must name one built from it with both (lws's example Dockerfile shows how). The checkpoints and
    this project's `source` tree come from the PersistentVolumeClaim `models_claim`, mounted at the
    same paths as on the machine that converted them."""
    ckpt, mounts = checkpoint_mounts(engine_dir)
    mounts = [*mounts, Path(source).absolute()]
    root = Path(*Path(ckpt).parts[:2])  # e.g. /models: the claim's mount point holding every checkpoint
    outside = [p for p in mounts if not p.is_relative_to(root)]
    if outside:
        raise CheckpointError(outside[0], f"not under {root}, where the {models_claim} claim is mounted",
                              expected="the converted checkpoint and its sources under one directory")
    world = nodes * gpus_per_node
    # LWS names pods NAME-<group>, NAME-<group>-<index>; group 0 is the only replica here.
    hosts = [f"{name}-0"] + [f"{name}-0-{i}" for i in range(1, nodes)]
    container = {"image": image_name or image(release), "resources": {"limits": {"nvidia.com/gpu": gpus_per_node}},
                 "volumeMounts": [{"name": "models", "mountPath": str(root), "readOnly": True},
                                  {"name": "dshm", "mountPath": "/dev/shm"}],
                 "env": [{"name": "OMPI_MCA_plm_rsh_agent", "value": "kubessh"}]}
    volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": models_claim, "readOnly": True}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    leader = {**container, "name": "leader", "ports": [{"containerPort": p} for p in (8000, 8001, 8002)],
              "command": ["bash", "-c", container_script(ckpt, world_size=world, source=str(Path(source).absolute()),
                                                         mpi_hosts=hosts)],
              "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8000}, "periodSeconds": 10}}
    worker = {**container, "name": "worker", "command": ["bash", "-c", "sleep infinity"]}  # ranks arrive by exec
    pod = {"serviceAccountName": name, "volumes": volumes}
    lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": {"name": name},
           "spec": {"replicas": 1, "leaderWorkerTemplate": {
               "size": nodes,
               "leaderTemplate": {"metadata": {"labels": {"role": "leader"}}, "spec": {**pod, "containers": [leader]}},
               "workerTemplate": {"spec": {**pod, "containers": [worker]}}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"selector": {"leaderworkerset.sigs.k8s.io/name": name, "role": "leader"},
                        "ports": [{"name": n, "port": p, "targetPort": p}
                                  for n, p in (("http", 8000), ("grpc", 8001), ("metrics", 8002))]}}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
                      {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name}],
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}}
    return [account, role, binding, lws, service]
