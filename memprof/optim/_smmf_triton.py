"""Fused Triton kernels for SMMF: three launches update every parameter of a group.

1. ``_sums_kernel`` rebuilds M_t and V_t from the old factors, the sign and the gradient, and adds
   the row and column sums of |M_t| and V_t into a small fp32 scratch. A program walks a strip of
   ``STRIP_ROWS`` rows × ``BLOCK_COLS`` columns of one n̂×m̂ view, so the column sums cost one
   atomic add per column per strip and the row sums one per row per column tile.
2. ``_update_kernel`` (blocks of consecutive elements, a multiple of 8 so that every sign byte
   belongs to one program) rebuilds M_t and V_t again and writes W_t and the new sign bits.
3. ``_finalize_kernel`` (one program per parameter) normalizes the new factors (Algorithm 4) into
   the state.

Full-size tensors are only read, or written in place: the gradient (read twice), the weight and
the sign. The step allocates 2·(n̂ + m̂) floats of scratch per parameter and a table of pointers;
rebuilding M_t and V_t twice costs arithmetic, which is cheaper than a full-size temporary.
All parameters of a group with the same device and dtypes share one launch of each kernel: a
program finds its parameter by binary search over the per-parameter prefix sums of the grid.
The table is built once per set of parameters (a ``_Plan``); a step only writes the gradient
pointers and the betas into a pinned copy of it.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["smmf_step", "unsupported"]

# Sums kernel: rows per program, rows per iteration, columns per program. Update kernel: elements
# per program (a multiple of 8).
STRIP_ROWS = 256
BLOCK_ROWS = 16
BLOCK_COLS = 128
BLOCK = 2048
FINALIZE_BLOCK = 1024
SUMS_WARPS = 4
UPDATE_WARPS = 4

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Columns of the per-parameter table (int64). Pointers, except the four new factors, which are
# element offsets into the step's scratch; betas are float64 bit patterns.
_PARAM = tl.constexpr(0)
_GRAD = tl.constexpr(1)
_SIGN = tl.constexpr(2)
_ROW_M = tl.constexpr(3)
_COL_M = tl.constexpr(4)
_ROW_V = tl.constexpr(5)
_COL_V = tl.constexpr(6)
_NEW_ROW_M = tl.constexpr(7)
_NEW_COL_M = tl.constexpr(8)
_NEW_ROW_V = tl.constexpr(9)
_NEW_COL_V = tl.constexpr(10)
_ROWS = tl.constexpr(11)
_COLS = tl.constexpr(12)
_BETA1 = tl.constexpr(13)  # β₁,t, 1 − β₁,t, β₂,t, 1 − β₂,t
_FIELDS = tl.constexpr(17)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unsupported(p: torch.Tensor) -> str | None:
    """Why the kernels cannot update ``p`` (None when they can)."""
    if p.dtype not in _DTYPES or p.grad.dtype not in _DTYPES:
        return f"dtype {p.dtype} (grad {p.grad.dtype}); supported: fp32, bf16, fp16"
    if not (p.is_contiguous() and p.grad.is_contiguous()):
        return "non-contiguous parameter or gradient"
    if p.numel() >= 2**31:
        return "more than 2**31 elements"
    return None


@triton.jit
def _param_index(prefix_ptr, pid, n_params, SEARCH_STEPS: tl.constexpr):
    # Largest k with prefix[k] <= pid.
    lo = pid * 0
    hi = n_params - 1 + lo
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        up = tl.load(prefix_ptr + mid) <= pid
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
    return lo


@triton.jit
def _f32(row, field):
    return tl.load(row + field).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def _vec(row, field):
    return tl.load(row + field).to(tl.pointer_type(tl.float32))


@triton.jit
def _load_signs(sign_ptr, idx, mask, PACKED: tl.constexpr):
    # S as 0/1 int32: bit (idx % 8) of byte idx // 8, or one byte per element.
    if PACKED:
        byte = tl.load(sign_ptr + (idx >> 3), mask=mask, other=0).to(tl.int32)
        return (byte >> (idx & 7)) & 1
    else:
        return tl.load(sign_ptr + idx, mask=mask, other=0).to(tl.int32)


@triton.jit
def _moments(row, idx, mask, rows, row_ok, cols, col_ok, p_ref, g_ref, weight_decay,
             HAS_M: tl.constexpr, PACKED: tl.constexpr, ADAM_DECAY: tl.constexpr):
    """M_t, V_t and G_t (fp32) at flat indices ``idx``, whose rows and columns broadcast to it.

    M_t is zeros when HAS_M is False.
    """
    g = tl.load(tl.load(row + _GRAD).to(g_ref.dtype) + idx, mask=mask, other=0.0).to(tl.float32)
    if ADAM_DECAY:
        # Algorithm 6: G_t ← G_t + c·W_{t−1}
        w = tl.load(tl.load(row + _PARAM).to(p_ref.dtype) + idx, mask=mask, other=0.0).to(tl.float32)
        g = g + weight_decay * w
    r_v = tl.load(_vec(row, _ROW_V) + rows, mask=row_ok, other=0.0)
    c_v = tl.load(_vec(row, _COL_V) + cols, mask=col_ok, other=0.0)
    v = r_v * c_v * _f32(row, _BETA1 + 2) + _f32(row, _BETA1 + 3) * g * g
    m = v * 0.0
    if HAS_M:
        sign = tl.load(row + _SIGN).to(tl.pointer_type(tl.uint8))
        s = _load_signs(sign, idx, mask, PACKED)
        beta1 = _f32(row, _BETA1)
        r_m = tl.load(_vec(row, _ROW_M) + rows, mask=row_ok, other=0.0)
        c_m = tl.load(_vec(row, _COL_M) + cols, mask=col_ok, other=0.0)
        m = r_m * c_m * tl.where(s != 0, beta1, -beta1) + _f32(row, _BETA1 + 1) * g
    return m, v, g


@triton.jit
def _sums_kernel(
    meta_ptr, prefix_ptr, n_params, scratch_ptr, p_ref, g_ref, weight_decay,
    HAS_M: tl.constexpr, PACKED: tl.constexpr, ADAM_DECAY: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    STRIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    k = _param_index(prefix_ptr, pid, n_params, SEARCH_STEPS)
    row = meta_ptr + k * _FIELDS
    n = tl.load(row + _ROWS).to(tl.int32)
    m = tl.load(row + _COLS).to(tl.int32)
    tile = pid - tl.load(prefix_ptr + k).to(tl.int32)
    col_tiles = tl.cdiv(m, BLOCK_C)
    first_row = (tile // col_tiles) * STRIP
    cols = (tile % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < m
    new_row_v = scratch_ptr + tl.load(row + _NEW_ROW_V)
    new_row_m = scratch_ptr + tl.load(row + _NEW_ROW_M)
    col_v = tl.zeros([BLOCK_C], dtype=tl.float32)
    col_m = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(first_row, tl.minimum(first_row + STRIP, n), BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n
        mask = row_ok[:, None] & col_ok[None, :]
        idx = rows[:, None] * m + cols[None, :]
        mm, v, g = _moments(row, idx, mask, rows[:, None], row_ok[:, None], cols[None, :], col_ok[None, :],
                            p_ref, g_ref, weight_decay, HAS_M, PACKED, ADAM_DECAY)
        tl.atomic_add(new_row_v + rows, tl.sum(v, axis=1), mask=row_ok)
        col_v += tl.sum(v, axis=0)
        if HAS_M:
            a = tl.abs(mm)
            tl.atomic_add(new_row_m + rows, tl.sum(a, axis=1), mask=row_ok)
            col_m += tl.sum(a, axis=0)
    tl.atomic_add(scratch_ptr + tl.load(row + _NEW_COL_V) + cols, col_v, mask=col_ok)
    if HAS_M:
        tl.atomic_add(scratch_ptr + tl.load(row + _NEW_COL_M) + cols, col_m, mask=col_ok)


@triton.jit
def _update_kernel(
    meta_ptr, prefix_ptr, n_params, p_ref, g_ref, lr, eps, weight_decay, decay,
    HAS_M: tl.constexpr, PACKED: tl.constexpr, ADAM_DECAY: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    k = _param_index(prefix_ptr, pid, n_params, SEARCH_STEPS)
    row = meta_ptr + k * _FIELDS
    m = tl.load(row + _COLS).to(tl.int32)
    numel = tl.load(row + _ROWS).to(tl.int32) * m
    start = (pid - tl.load(prefix_ptr + k).to(tl.int32)) * BLOCK
    # (BLOCK/8, 8): each row of the block is one sign byte
    byte = tl.arange(0, BLOCK // 8)
    bit = tl.arange(0, 8)
    idx = start + byte[:, None] * 8 + bit[None, :]
    mask = idx < numel
    rows = idx // m
    cols = idx - rows * m
    mm, v, g = _moments(row, idx, mask, rows, mask, cols, mask, p_ref, g_ref, weight_decay, HAS_M, PACKED, ADAM_DECAY)
    denom = tl.sqrt(v) + eps
    if HAS_M:
        update = mm / denom
        new_sign = ((mm >= 0) & mask).to(tl.int32)
        sign = tl.load(row + _SIGN).to(tl.pointer_type(tl.uint8))
        if PACKED:
            packed = tl.sum(new_sign << bit[None, :], axis=1).to(tl.uint8)
            tl.store(sign + start // 8 + byte, packed, mask=start + byte * 8 < numel)
        else:
            tl.store(sign + idx, new_sign.to(tl.uint8), mask=mask)
    else:
        update = g / denom
    w_ptr = tl.load(row + _PARAM).to(p_ref.dtype)
    w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    # Algorithm 7 (decay = 1 − η·c, or 1), then W_t = W_{t−1} − η·U
    w = w * decay - lr * update
    tl.store(w_ptr + idx, w.to(p_ref.dtype.element_ty), mask=mask)


@triton.jit
def _normalized_copy(src_r, src_c, dst_r, dst_c, n, m, BLOCK: tl.constexpr):
    # Algorithm 4: divide r by its sum when n <= m, else c; an all-zero vector stays zero.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if n <= m:
        for s in range(0, n, BLOCK):
            acc += tl.load(src_r + s + offs, mask=s + offs < n, other=0.0)
    else:
        for s in range(0, m, BLOCK):
            acc += tl.load(src_c + s + offs, mask=s + offs < m, other=0.0)
    total = tl.sum(acc, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    div_r = tl.where(n <= m, total, 1.0)
    div_c = tl.where(n <= m, 1.0, total)
    for s in range(0, n, BLOCK):
        ok = s + offs < n
        tl.store(dst_r + s + offs, tl.load(src_r + s + offs, mask=ok, other=0.0) / div_r, mask=ok)
    for s in range(0, m, BLOCK):
        ok = s + offs < m
        tl.store(dst_c + s + offs, tl.load(src_c + s + offs, mask=ok, other=0.0) / div_c, mask=ok)


@triton.jit
def _finalize_kernel(meta_ptr, scratch_ptr, HAS_M: tl.constexpr, BLOCK: tl.constexpr):
    row = meta_ptr + tl.program_id(0) * _FIELDS
    n = tl.load(row + _ROWS).to(tl.int32)
    m = tl.load(row + _COLS).to(tl.int32)
    new_r = scratch_ptr + tl.load(row + _NEW_ROW_V)
    new_c = scratch_ptr + tl.load(row + _NEW_COL_V)
    _normalized_copy(new_r, new_c, _vec(row, _ROW_V), _vec(row, _COL_V), n, m, BLOCK)
    if HAS_M:
        new_r = scratch_ptr + tl.load(row + _NEW_ROW_M)
        new_c = scratch_ptr + tl.load(row + _NEW_COL_M)
        _normalized_copy(new_r, new_c, _vec(row, _ROW_M), _vec(row, _COL_M), n, m, BLOCK)


def smmf_step(
    items: list[tuple[torch.Tensor, dict[str, Any], float, float]], group: dict[str, Any], plans: dict[tuple, "_Plan"]
) -> None:
    """Update each (parameter, state, β₁,t, β₂,t) of ``items`` in place (AdamW decay included).

    ``plans`` is the caller's cache of launch tables, kept between steps.
    """
    batches: dict[tuple, list] = {}
    for item in items:
        p, state = item[0], item[1]
        if p.numel() == 0:
            continue
        sign = state.get("sign")
        if sign is not None and sign.dtype not in (torch.uint8, torch.bool):
            raise TypeError(f"SMMF sign state must be uint8 or bool, got {sign.dtype}")
        key = (p.device, p.dtype, p.grad.dtype, None if sign is None else sign.dtype)
        batches.setdefault(key, []).append(item)
    for batch in batches.values():
        key = tuple(id(item[0]) for item in batch)
        plan = plans.get(key)
        if plan is None or not plan.matches(batch):
            plan = plans[key] = _Plan(batch)
        _launch(plan, batch, group)


class _Plan:
    """What a launch needs that changes only with the parameters and their state tensors."""

    def __init__(self, batch: list[tuple[torch.Tensor, dict[str, Any], float, float]]) -> None:
        state0 = batch[0][1]
        self.has_m = "sign" in state0
        self.packed = self.has_m and state0["sign"].dtype == torch.uint8
        # Identity of each parameter's state (load_state_dict replaces these tensors) and storage
        self.anchors = [item[1]["row_v"] for item in batch]
        self.weights = [item[0].data_ptr() for item in batch]
        rows, tiles, blocks, offset = [], [0], [0], 0
        for p, state, _, _ in batch:
            n, m = state["shape"]
            # Scratch offsets of the new [r_M, c_M, r_V, c_V] (r_V, c_V only without M)
            if self.has_m:
                m_ptrs = [state["sign"].data_ptr(), state["row_m"].data_ptr(), state["col_m"].data_ptr()]
                new = [offset, offset + n, offset + n + m, offset + 2 * n + m]
                offset += 2 * (n + m)
            else:
                m_ptrs, new = [0, 0, 0], [0, 0, offset, offset + n]
                offset += n + m
            rows.append([p.data_ptr(), 0, *m_ptrs, state["row_v"].data_ptr(), state["col_v"].data_ptr(), *new, n, m, 0, 0, 0, 0])
            tiles.append(tiles[-1] + _cdiv(n, STRIP_ROWS) * _cdiv(m, BLOCK_COLS))
            blocks.append(blocks[-1] + _cdiv(n * m, BLOCK))
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.prefixes = torch.tensor(tiles + blocks, dtype=torch.int64)
        self.tiles, self.blocks, self.scratch = tiles[-1], blocks[-1], offset
        self.key = (STRIP_ROWS, BLOCK_COLS, BLOCK)

    def matches(self, batch: list[tuple[torch.Tensor, dict[str, Any], float, float]]) -> bool:
        return (
            self.key == (STRIP_ROWS, BLOCK_COLS, BLOCK)
            and all(item[1]["row_v"] is anchor for item, anchor in zip(batch, self.anchors))
            and [item[0].data_ptr() for item in batch] == self.weights
        )


def _launch(plan: _Plan, batch: list[tuple[torch.Tensor, dict[str, Any], float, float]], group: dict[str, Any]) -> None:
    p0 = batch[0][0]
    device = p0.device
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    adam_decay = wd != 0.0 and group["weight_decay_mode"] == "adam"
    decay = 1.0 - lr * wd if wd != 0.0 and group["weight_decay_mode"] == "adamw" else 1.0

    n_params = len(batch)
    host = torch.empty(plan.table.numel() + plan.prefixes.numel(), dtype=torch.int64, pin_memory=device.type == "cuda")
    table = host[: plan.table.numel()].view(n_params, -1)
    table.copy_(plan.table)
    table[:, _GRAD.value] = torch.tensor([item[0].grad.data_ptr() for item in batch], dtype=torch.int64)
    betas = {(item[2], item[3]) for item in batch}
    if len(betas) == 1:  # the usual case: every parameter took the same number of steps
        rows = [[b1, 1.0 - b1, b2, 1.0 - b2] for b1, b2 in betas]
    else:
        rows = [[item[2], 1.0 - item[2], item[3], 1.0 - item[3]] for item in batch]
    table[:, _BETA1.value :] = torch.tensor(rows, dtype=torch.float64).view(torch.int64)
    host[plan.table.numel() :] = plan.prefixes
    meta = host.to(device, non_blocking=True)
    tile_prefix = meta[plan.table.numel() : plan.table.numel() + n_params + 1]
    block_prefix = meta[plan.table.numel() + n_params + 1 :]
    scratch = torch.zeros(plan.scratch, dtype=torch.float32, device=device)
    flags = dict(HAS_M=plan.has_m, PACKED=plan.packed, ADAM_DECAY=adam_decay, SEARCH_STEPS=max(1, n_params.bit_length()))

    _sums_kernel[(plan.tiles,)](
        meta, tile_prefix, n_params, scratch, p0, p0.grad, wd,
        STRIP=STRIP_ROWS, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, num_warps=SUMS_WARPS, **flags,
    )
    _update_kernel[(plan.blocks,)](
        meta, block_prefix, n_params, p0, p0.grad, lr, eps, wd, decay, BLOCK=BLOCK, num_warps=UPDATE_WARPS, **flags
    )
    _finalize_kernel[(n_params,)](meta, scratch, HAS_M=plan.has_m, BLOCK=FINALIZE_BLOCK)
