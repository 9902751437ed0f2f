"""Benchmarks for pipemlaan (throughput and the torch.distributed.pipelining BP baseline)."""
