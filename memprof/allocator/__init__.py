"""PyTorch's CUDA caching allocator, simulated: its settings (``config``) and its rules (``simulator``).

Pure Python, no torch: an estimate replays its allocations and frees through it to predict what
``torch.cuda.max_memory_reserved`` would say and which allocation would fail against a budget, and a real
run's recorded history is replayed through it to check it (benchmarks/allocator_replay.py).
"""
