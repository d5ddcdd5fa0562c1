"""Distributed runs: N ranks on torch.distributed, each measured by the same runner and replay, with
the strategy ``--parallel`` names (``memprof.strategies``: DDP, FSDP2 ``fully_shard``, ZeRO-1 through
``ZeroRedundancyOptimizer``, DeepSpeed's ZeRO-1/2/3 engine), which sits below the runner.

* ``worker``: one rank; run by ``python -m torch.distributed.run`` (the launcher memprof starts) or
  inside a user's own ``torchrun`` launch.
* ``launch``: the parent: starts the ranks, merges their run records, makes a failed row for a rank
  that left none, and leaves no rank running.
* ``simulate``: one rank of any world size in this process (``memprof estimate --world-size``): a fake
  process group and fake tensors, the same strategies, runner and replay.
"""
