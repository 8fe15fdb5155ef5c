"""Per-layer operations: the compressed-aware block, channel graph, FLOPs counting, the detector adapter and the surgery every structural change uses."""
