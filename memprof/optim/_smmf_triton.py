"""Fused Triton kernels for SMMF: three launches update every parameter of a group.

1. ``_sums_kernel`` (2-D tiles of each n̂×m̂ view) rebuilds M_t and V_t from the old factors, the
   sign and the gradient, and atomically adds the row and column sums of |M_t| and V_t into a
   small fp32 scratch.
2. ``_update_kernel`` (blocks of consecutive elements, a multiple of 8 so that every sign byte
   belongs to one program) rebuilds M_t and V_t again and writes W_t and the new sign bits.
3. ``_finalize_kernel`` (one program per parameter) normalizes the new factors (Algorithm 4) into
   the state.

Full-size tensors are only read, or written in place: the gradient (read twice), the weight and
the sign. The step allocates 2·(n̂ + m̂) floats of scratch per parameter and a table of pointers;
rebuilding M_t and V_t twice costs arithmetic, which is cheaper than a full-size temporary.
All parameters of a group with the same device and dtypes share one launch of each kernel: a
program finds its parameter by binary search over the per-parameter prefix sums of its grid.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["smmf_step", "unsupported"]

# Tile of the sums kernel (rows × columns) and block of the update kernel (elements).
BLOCK_ROWS = 32
BLOCK_COLS = 64
BLOCK = 2048
FINALIZE_BLOCK = 1024
SUMS_WARPS = 4
UPDATE_WARPS = 4

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Columns of the per-parameter table (int64; betas stored as float64 bit patterns).
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
_INT_FIELDS = 13


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
    meta_ptr, prefix_ptr, n_params, p_ref, g_ref, weight_decay,
    HAS_M: tl.constexpr, PACKED: tl.constexpr, ADAM_DECAY: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    k = _param_index(prefix_ptr, pid, n_params, SEARCH_STEPS)
    row = meta_ptr + k * _FIELDS
    n = tl.load(row + _ROWS).to(tl.int32)
    m = tl.load(row + _COLS).to(tl.int32)
    tile = pid - tl.load(prefix_ptr + k).to(tl.int32)
    col_tiles = tl.cdiv(m, BLOCK_C)
    rows = (tile // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n
    col_ok = cols < m
    mask = row_ok[:, None] & col_ok[None, :]
    idx = rows[:, None] * m + cols[None, :]
    mm, v, g = _moments(row, idx, mask, rows[:, None], row_ok[:, None], cols[None, :], col_ok[None, :],
                        p_ref, g_ref, weight_decay, HAS_M, PACKED, ADAM_DECAY)
    tl.atomic_add(_vec(row, _NEW_ROW_V) + rows, tl.sum(v, axis=1), mask=row_ok)
    tl.atomic_add(_vec(row, _NEW_COL_V) + cols, tl.sum(v, axis=0), mask=col_ok)
    if HAS_M:
        a = tl.abs(mm)
        tl.atomic_add(_vec(row, _NEW_ROW_M) + rows, tl.sum(a, axis=1), mask=row_ok)
        tl.atomic_add(_vec(row, _NEW_COL_M) + cols, tl.sum(a, axis=0), mask=col_ok)


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
def _finalize_kernel(meta_ptr, HAS_M: tl.constexpr, BLOCK: tl.constexpr):
    row = meta_ptr + tl.program_id(0) * _FIELDS
    n = tl.load(row + _ROWS).to(tl.int32)
    m = tl.load(row + _COLS).to(tl.int32)
    _normalized_copy(_vec(row, _NEW_ROW_V), _vec(row, _NEW_COL_V), _vec(row, _ROW_V), _vec(row, _COL_V), n, m, BLOCK)
    if HAS_M:
        _normalized_copy(_vec(row, _NEW_ROW_M), _vec(row, _NEW_COL_M), _vec(row, _ROW_M), _vec(row, _COL_M), n, m, BLOCK)


def smmf_step(items: list[tuple[torch.Tensor, dict[str, Any], float, float]], group: dict[str, Any]) -> None:
    """Update each (parameter, state, β₁,t, β₂,t) of ``items`` in place (AdamW decay included)."""
    batches: dict[tuple, list] = {}
    for item in items:
        p, state = item[0], item[1]
        sign = state.get("sign")
        key = (p.device, p.dtype, p.grad.dtype, None if sign is None else sign.dtype)
        batches.setdefault(key, []).append(item)
    for batch in batches.values():
        _launch(batch, group)


def _launch(batch: list[tuple[torch.Tensor, dict[str, Any], float, float]], group: dict[str, Any]) -> None:
    batch = [item for item in batch if item[0].numel() > 0]
    if not batch:
        return
    p0, state0 = batch[0][0], batch[0][1]
    device = p0.device
    has_m = "sign" in state0
    packed = has_m and state0["sign"].dtype == torch.uint8
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    adam_decay = wd != 0.0 and group["weight_decay_mode"] == "adam"
    decay = 1.0 - lr * wd if wd != 0.0 and group["weight_decay_mode"] == "adamw" else 1.0

    # Scratch for the new factors: [r_M, c_M, r_V, c_V] per parameter (r_V, c_V only without M).
    sizes = [sum(item[1]["shape"]) * (2 if has_m else 1) for item in batch]
    scratch = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    base, offset = scratch.data_ptr(), 0
    ints, floats, tiles, blocks = [], [], [0], [0]
    for (p, state, beta1, beta2), size in zip(batch, sizes):
        n, m = state["shape"]
        new = base + 4 * offset
        offset += size
        if has_m:
            m_ptrs = [state["sign"].data_ptr(), state["row_m"].data_ptr(), state["col_m"].data_ptr()]
            new_ptrs = [new, new + 4 * n, new + 4 * (n + m), new + 4 * (2 * n + m)]
        else:
            m_ptrs = [0, 0, 0]
            new_ptrs = [0, 0, new, new + 4 * n]
        ints.append([p.data_ptr(), p.grad.data_ptr(), *m_ptrs, state["row_v"].data_ptr(), state["col_v"].data_ptr(), *new_ptrs, n, m])
        floats.append([beta1, 1.0 - beta1, beta2, 1.0 - beta2])
        tiles.append(tiles[-1] + triton.cdiv(n, BLOCK_ROWS) * triton.cdiv(m, BLOCK_COLS))
        blocks.append(blocks[-1] + triton.cdiv(n * m, BLOCK))
    table = torch.cat([torch.tensor(ints, dtype=torch.int64), torch.tensor(floats, dtype=torch.float64).view(torch.int64)], 1)
    host = torch.cat([table.view(-1), torch.tensor(tiles + blocks, dtype=torch.int64)])
    if device.type == "cuda":
        host = host.pin_memory()
    meta = host.to(device, non_blocking=True)
    n_params = len(batch)
    table_end = n_params * _FIELDS.value
    tile_prefix = meta[table_end : table_end + n_params + 1]
    block_prefix = meta[table_end + n_params + 1 :]
    search = max(1, n_params.bit_length())
    flags = dict(HAS_M=has_m, PACKED=packed, ADAM_DECAY=adam_decay, SEARCH_STEPS=search)

    _sums_kernel[(tiles[-1],)](
        meta, tile_prefix, n_params, p0, p0.grad, wd, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, num_warps=SUMS_WARPS, **flags
    )
    _update_kernel[(blocks[-1],)](
        meta, block_prefix, n_params, p0, p0.grad, lr, eps, wd, decay, BLOCK=BLOCK, num_warps=UPDATE_WARPS, **flags
    )
    _finalize_kernel[(n_params,)](meta, HAS_M=has_m, BLOCK=FINALIZE_BLOCK)
