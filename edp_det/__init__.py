"""edp-det: EDP (Efficient Decomposition and Pruning) compression for torchvision ResNets and Faster R-CNN.

Layered API:
  * per layer: :class:`CompressedAwareConv2d` (``from_conv``), :mod:`edp_det.ops.graph` (channel graph),
  * plan/report: :class:`EDPRegularizer` (``penalty``, ``prox_step``, ``stats``), :class:`PMReport`,
    :class:`FlopsReport`,
  * one call: :func:`decompose`, :func:`prune_and_merge`, :func:`count_flops`, :func:`save_compressed` /
    :func:`load_compressed`; :func:`measure_time_per_flop` for the latency-aware budget,
  * after PM: :func:`carry_optimizer` (the optimizer over the pruned model, its state carried;
    :func:`transfer_optimizer_state` for an optimizer built by hand) and :func:`recalibrate_batchnorm`.
Importing this package has no side effects.
"""
import importlib

# public name -> module that defines it; imported on first use so that ``import edp_det`` (and the command-line
# tools' ``--help``) does not load torch
_PUBLIC = {
    "CompressedAwareConv2d": "edp_det.ops.block",
    "decompose": "edp_det.edp.decompose", "is_decomposed": "edp_det.edp.decompose",
    "iter_blocks": "edp_det.edp.decompose",
    "FlopsReport": "edp_det.ops.flops", "count_flops": "edp_det.ops.flops",
    "measure_time_per_flop": "edp_det.deploy.latency",
    "build_model": "edp_det.models",
    "PMReport": "edp_det.edp.pruning", "prune_and_merge": "edp_det.edp.pruning",
    "carry_optimizer": "edp_det.edp.pruning", "transfer_optimizer_state": "edp_det.edp.pruning",
    "recalibrate_batchnorm": "edp_det.edp.calibration",
    "EDPRegularizer": "edp_det.edp.regularizer",
    "load_compressed": "edp_det.deploy.serialization", "save_compressed": "edp_det.deploy.serialization",
}


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edp_det' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


__version__ = "0.1.0"

__all__ = ["CompressedAwareConv2d", "decompose", "is_decomposed", "iter_blocks", "EDPRegularizer",
           "prune_and_merge", "PMReport", "count_flops", "FlopsReport", "save_compressed", "load_compressed",
           "build_model", "measure_time_per_flop", "carry_optimizer", "transfer_optimizer_state",
           "recalibrate_batchnorm", "__version__"]
