"""Where dspark_verify and dspark_draft run: the `gpus` parameter of their own Triton config.

`dspark-build repo --layout gpu` gives each of them ONE `KIND_MODEL` instance (Triton starts one
instance per GPU listed in a `KIND_GPU` group, which would mean eight unsynchronised verify copies)
and lists the GPU of each tensor-parallel rank in the `gpus` parameter: rank r on the r-th entry.
The CPU layout leaves it empty. The reference runners then put rank r on cuda:<r-th entry> (NCCL between
the ranks) and the drafter on its one GPU, verify's rank-0 GPU.
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


def rank_device(gpus: list[int]) -> str:
    """The device of a one-rank model (the drafter): its GPU, or the CPU when `gpus` is empty."""
    return f"cuda:{gpus[0]}" if gpus else "cpu"


def require_visible(gpus: list[int], model: str, visible: int | None = None) -> None:
    """Refuse, before anything loads, a placement on GPUs this process cannot see. `visible`: how many CUDA
    devices torch sees (asked when not given)."""
    if not gpus:
        return
    if visible is None:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if max(gpus) >= visible:
        raise PlacementError(
            f"{model}: config places its ranks on GPUs {gpus}, but this process sees {visible} CUDA device(s) "
            "(check CUDA_VISIBLE_DEVICES and the container's GPUs), or build a CPU repository "
            "(`dspark-build repo ENGINE_DIR --layout cpu`)")
