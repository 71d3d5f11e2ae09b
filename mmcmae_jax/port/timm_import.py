"""`import_timm()`: timm and torch, importable beside a CPU-only torch.

timm imports torchvision. On a machine with a CPU-only torch and PyPI's CUDA torchvision (our CI, see
.ci/install_torch.sh), torchvision's compiled operators cannot load, and its Python side then fails on
registering two of them; defining their schemas lets it import without operators, which no ViT uses.
Used by the weight-port tests and by benchmarks/train_speed.py.
"""
from __future__ import annotations

_TORCHVISION_SCHEMAS = []  # the definitions live as long as these library objects


def import_timm():
    """(timm, torch), defining torchvision's two operator schemas first if its operators cannot load."""
    import torch
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.append(lib)
        import torchvision  # noqa: F401
    import timm
    return timm, torch
