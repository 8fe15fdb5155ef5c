"""edp-det: EDP (Efficient Decomposition and Pruning) compression for torchvision ResNets and Faster R-CNN.

Layered API:
  * per layer: :class:`CompressedAwareConv2d` (``from_conv``), :mod:`edp_det.graph` (channel graph),
  * plan/report: :class:`EDPRegularizer` (``penalty``, ``prox_step``, ``stats``), :class:`PMReport`,
    :class:`FlopsReport`,
  * one call: :func:`decompose`, :func:`prune_and_merge`, :func:`count_flops`, :func:`save_compressed` /
    :func:`load_compressed`.
Importing this package has no side effects.
"""
from .block import CompressedAwareConv2d
from .decompose import decompose, is_decomposed, iter_blocks
from .flops import FlopsReport, count_flops
from .models import build_model
from .pruning import PMReport, prune_and_merge
from .regularizer import EDPRegularizer
from .serialization import load_compressed, save_compressed

__version__ = "0.1.0"

__all__ = ["CompressedAwareConv2d", "decompose", "is_decomposed", "iter_blocks", "EDPRegularizer",
           "prune_and_merge", "PMReport", "count_flops", "FlopsReport", "save_compressed", "load_compressed",
           "build_model", "__version__"]
