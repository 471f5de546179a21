"""Where dspark_verify and dspark_draft run: the `gpus` parameter of their own Triton config.

`dspark-build repo --layout gpu` gives each of them ONE `KIND_MODEL` instance (Triton starts one
instance per GPU listed in a `KIND_GPU` group, which would mean eight unsynchronised verify copies)
and lists the GPU of each tensor-parallel rank in the `gpus` parameter: rank r on the r-th entry.
The CPU layout leaves it empty.
"""

from __future__ import annotations


class PlacementError(ValueError):
    """The `gpus` parameter of a model's config is malformed or cannot be served by its backend."""


def model_gpus(params: dict[str, str], model: str, ranks: int | None = None) -> list[int]:
    """GPU id of each rank from a model's `gpus` parameter ([] on the CPU). `ranks`: how many it must list."""
    text = params.get("gpus", "").strip()
    if not text:
        return []
    try:
        gpus = [int(g) for g in text.split(",")]
    except ValueError:
        raise PlacementError(f"{model}: parameter gpus={text!r} must be comma-separated GPU ids, e.g. '0,1'") from None
    ranks = len(gpus) if ranks is None else ranks
    if len(gpus) != ranks or len(set(gpus)) != ranks or min(gpus) < 0:
        raise PlacementError(f"{model}: parameter gpus={text!r} must list {ranks} distinct GPU id(s), one per rank")
    return gpus


def require_cpu(gpus: list[int], model: str, backend: str) -> None:
    """The reference runners compute on the CPU only: a GPU placement is refused with the routes that serve GPUs."""
    if gpus and backend == "reference":
        raise PlacementError(
            f"{model}: config places its ranks on GPUs {gpus}, but the reference backend runs on the CPU only. "
            "Build a CPU repository (`dspark-build repo ENGINE_DIR --layout cpu`), or serve GPUs with "
            "TensorRT-LLM (`dspark-build repo ENGINE_DIR --backend tensorrt-llm --gpus N`; "
            "README, 'Deploying on GPUs')")
