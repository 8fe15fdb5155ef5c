"""The EDP method's machinery: decomposition, the group-sparsity regulariser, the FLOPs budget, pruning and merging (PM), BatchNorm re-estimation and compaction."""
