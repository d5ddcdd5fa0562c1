"""Shape functions that torch's fake tensors get wrong, set right for the duration of an estimate.

* ``aten::_grouped_mm`` (mixture-of-experts layers: transformers' default ``grouped_mm`` experts
  implementation, on CPU and on CUDA from sm80). Its schema is
  ``_grouped_mm(Tensor self, Tensor mat2, Tensor? offs=None, Tensor? bias=None, ScalarType? out_dtype=None)``;
  the kernels check their inputs with ``_grouped_mm_validate_inputs`` (``ATen/native/GroupedMMUtils.h``:
  fp32, bf16 or fp16, an output dtype equal to ``self``'s) and run fp32 through ``_grouped_mm_fallback``
  (one ``mm`` per group). torch's meta kernel (``torch._meta_registrations._meta_grouped_mm_common``)
  accepts only bf16 (and fp16 with cuBLASLt), so an fp32 MoE model failed to estimate while the real
  run worked. The replacement checks what the kernels check and builds the output with torch's own
  ``_create_grouped_mm_output_tensor`` (its last dimension padded to 16 bytes, as the kernels allocate).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

try:
    from torch._meta_registrations import _create_grouped_mm_output_tensor
except ImportError:  # a torch without _grouped_mm's meta helper (before 2.9): its own meta kernel stays
    _create_grouped_mm_output_tensor = None

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def fake_kernels_as_real() -> Iterator[None]:
    """Meta kernels that accept what the real kernels accept (the Meta key's registration, restored after)."""
    library = torch.library.Library("aten", "IMPL")
    try:
        if _create_grouped_mm_output_tensor is not None:
            library.impl("_grouped_mm", _grouped_mm_meta, "Meta")
        yield
    finally:
        library._destroy()  # the earlier (torch's) Meta kernel is the op's again


def _grouped_mm_meta(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``_grouped_mm_validate_inputs`` and ``_resolve_grouped_mm_out_dtype`` (GroupedMMUtils.h), then torch's
    own output layout."""
    for name, mat in (("mat_a", mat_a), ("mat_b", mat_b)):
        torch._check(mat.dtype in GROUPED_MM_DTYPES,
                     lambda: f"Expected {name} to be Float32, BFloat16 or Float16 matrix, got {mat.dtype}")
        torch._check(mat.dim() in (2, 3), lambda: f"{name} has to be 2 or 3d")
        _check_strides(mat)
    both_2d = mat_a.dim() == 2 and mat_b.dim() == 2
    if not both_2d:
        torch._check(mat_a.size(-1) == mat_b.size(-2), lambda: "contraction dimension of mat_a and mat_b must match")
    torch._check((offs is not None) == (mat_a.dim() == 2 or mat_b.dim() == 2),
                 lambda: "Have to provide offsets if there is a 2d matrix, or no offset if both matrices are 3d")
    if offs is not None:
        torch._check(offs.dim() == 1 and offs.dtype == torch.int32, lambda: "offs has to be a 1D int32 tensor")
    torch._check(bias is None, lambda: "Bias not supported yet")
    out_dtype = out_dtype or mat_a.dtype
    torch._check(out_dtype == mat_a.dtype, lambda: "Grouped gemm output dtype must match `mat_a` dtype")
    return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)


def _check_strides(mat: torch.Tensor) -> None:
    """``check_valid_strides_and_return_transposed``: one of the last two dimensions is contiguous and
    the other's stride is a multiple of 16 bytes."""
    alignment = 16 // mat.element_size()
    size, stride = mat.shape[-2:], mat.stride()[-2:]
    if stride[0] == 1 and stride[1] >= max(1, size[0]):
        torch._check(stride[1] % alignment == 0, lambda: "strides should be multiple of 16 bytes")
    elif stride[1] == 1 and stride[0] >= max(1, size[1]):
        torch._check(stride[0] % alignment == 0, lambda: "strides should be multiple of 16 bytes")
    else:
        torch._check(False, lambda: f"Invalid strides/sizes, got {list(mat.stride())} for strides and "
                                    f"{list(mat.shape)} for sizes")
