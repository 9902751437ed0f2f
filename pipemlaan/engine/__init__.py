"""Execution: a stage's step order, P2P links, the LAM broadcaster, partitioning, the loop."""
