"""``--amp`` with ``--checkpointing`` in an estimate: a checkpointed block is recomputed in backward under the
autocast its forward had, CUDA's lists (``memprof.measure.cuda_autocast``) and not CPU autocast's, though the
fake tensors are CPU tensors."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from configs_for_tests import GPT2

from memprof.api import estimate
from memprof.measure import checkpointing
from memprof.measure.cuda_autocast import CudaAutocast
from memprof.taxonomy import PERSISTENT

TEXT = dict(batch_size=2, seq_len=32, steps=2, timeline=False)


class _Block(torch.nn.Module):
    """Ops CUDA's and CPU's autocast cast differently: softmax and layer_norm in fp32 under CUDA's lists, left
    in the lower precision under CPU's."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.norm = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.LayerNorm(8)

    def forward(self, x):
        h = torch.softmax(self.up(x), dim=-1)
        return x + self.norm(self.down(h))


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops each block ran in the forward, and each recomputation ran in backward, with their outputs'
    dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.recomputing, self.backward = 0, False, False
        self.forward: list[list[tuple[str, tuple]]] = []  # one list per block
        self.recomputed: list[list[tuple[str, tuple]]] = []  # one list per recomputation

    def enter_block(self, *_) -> None:
        if not self.backward:
            self.forward.append([])
            self.inside += 1

    def leave_block(self, *_) -> None:
        if not self.backward:
            self.inside -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtypes = tuple(t.dtype for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        if self.recomputing:
            self.recomputed[-1].append((str(func), dtypes))
        elif self.inside and not self.backward:
            self.forward[-1].append((str(func), dtypes))
        return out


class _Capture:
    """What checkpointing asks of the run's capture: the recomputation's window (here: the op log's)."""

    def __init__(self, ops: _Ops) -> None:
        self.ops = ops

    @contextlib.contextmanager
    def recomputing(self):
        self.ops.recomputing = True
        self.ops.recomputed.append([])
        try:
            yield
        finally:
            self.ops.recomputing = False

    def saved_outputs(self, outputs) -> None:
        pass


SOFTMAX = "aten._softmax.default"


@pytest.mark.parametrize("value", ["full", "selective"])
def test_a_recomputed_block_casts_as_its_forward_under_cudas_autocast(value):
    model = torch.nn.Sequential(_Block(), _Block())
    ops = _Ops()
    for block in model:
        block.register_forward_pre_hook(ops.enter_block)
        block.register_forward_hook(ops.leave_block)
    checkpointing.apply(model, value, _Capture(ops), "two blocks")
    x = torch.randn(4, 8, requires_grad=True)
    with ops:
        with CudaAutocast(torch.bfloat16):
            loss = model(x).float().sum()
        ops.backward = True
        loss.backward()  # recomputes each block (before the fix under CPU autocast's kernels: CheckpointError)
    assert len(ops.forward) == len(ops.recomputed) == 2
    kept = {str(op) for op in checkpointing.SAVED_OPS} if value == "selective" else set()
    for forward, recomputed in zip(reversed(ops.forward), ops.recomputed):  # backward goes last block first
        assert [dtypes for name, dtypes in forward if name == SOFTMAX] == [(torch.float32,)]  # CUDA's list (CPU: bf16)
        # The same ops (less the checkpoint's own detaches, and under selective checkpointing the ops whose
        # outputs it kept), in the same order, to the same dtypes, up to the last tensor backward needs.
        forward = [op for op in forward if op[0] != "aten.detach.default" and op[0] not in kept]
        recomputed = [op for op in recomputed if op[0] != "aten.detach.default"]
        assert (SOFTMAX, (torch.float32,)) in recomputed and recomputed == forward[:len(recomputed)]


@pytest.mark.parametrize("value", ["full", "selective", "every:2"])
def test_an_amp_estimate_of_a_checkpointed_gpt2_recomputes_in_cudas_casts(tmp_path, value):
    # Recomputed under CPU autocast's lists, a tensor GPT-2's block saves for backward came out in another dtype
    # than in its forward, and torch's checkpoint refused the block (CheckpointError).
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT2))
    (plain,) = estimate(str(path), ["adam"], amp="bf16", **TEXT)
    (record,) = estimate(str(path), ["adam"], amp="bf16", checkpointing=value, **TEXT)
    assert record.status == "ok", record.failure
    assert record.components("activations")["recomputed"] > 0
    for category in PERSISTENT:
        assert record.total(category) == plain.total(category), category
