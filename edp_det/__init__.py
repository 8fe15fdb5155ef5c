"""edp-det: EDP (Efficient Decomposition and Pruning) compression for torchvision ResNets and Faster R-CNN.

Layered API:
  * per layer: :class:`CompressedAwareConv2d` (``from_conv``), :mod:`edp_det.ops.graph` (channel graph),
  * plan/report: :class:`EDPRegularizer` (``penalty``, ``prox_step``, ``stats``), :class:`PMReport`,
    :class:`FlopsReport`,
  * one call: :func:`decompose`, :func:`prune_and_merge`, :func:`count_flops`, :func:`save_compressed` /
    :func:`load_compressed`; :func:`measure_time_per_flop` for the latency-aware budget.
Importing this package has no side effects.
"""
from edp_det.ops.block import CompressedAwareConv2d
from edp_det.edp.decompose import decompose, is_decomposed, iter_blocks
from edp_det.ops.flops import FlopsReport, count_flops
from edp_det.deploy.latency import measure_time_per_flop
from edp_det.models import build_model
from edp_det.edp.pruning import PMReport, prune_and_merge
from edp_det.edp.regularizer import EDPRegularizer
from edp_det.deploy.serialization import load_compressed, save_compressed

__version__ = "0.1.0"

__all__ = ["CompressedAwareConv2d", "decompose", "is_decomposed", "iter_blocks", "EDPRegularizer",
           "prune_and_merge", "PMReport", "count_flops", "FlopsReport", "save_compressed", "load_compressed",
           "build_model", "measure_time_per_flop", "__version__"]
