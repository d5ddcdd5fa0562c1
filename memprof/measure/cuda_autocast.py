"""CUDA's autocast for an estimate on fake CPU tensors: CUDA's op lists and casts, run by the AutocastCPU key.

Without a GPU an estimate's fake tensors are CPU tensors (``runner._build_device``), and
``torch.autocast("cuda")`` disables itself ("CUDA is not available"): ``--amp`` took no effect. CUDA's
autocast is the AutocastCUDA dispatch key's kernels (``ATen/autocast_mode.cpp``, ``TORCH_LIBRARY_IMPL(aten,
Autocast, m)``): one cast policy per op, from the lists of ``ATen/autocast_mode.h`` (``AT_FORALL_LOWER_PRECISION_FP``,
``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``,
``AT_FORALL_PROMOTE``, copied below from torch 2.14's header), every other op falling through. CPU autocast
casts other ops (its lists cast ``cat``, ``stack`` and ``cross_entropy_loss`` but not ``layer_norm``, ``softmax``
or ``sum``). ``CudaAutocast`` enables CPU autocast, which puts the AutocastCPU key into a fake CPU tensor's
dispatch, and replaces the AutocastCPU kernels for its duration through ``torch.library`` (the mechanism of
``torch.library.register_autocast``): CUDA's policy for each op CUDA lists, a fallthrough for the ops only CPU
lists. The casts follow ``autocast_mode.h``'s ``WrapFunction_`` and ``cached_cast`` (fp32 leaf weights'
lower-precision copies cached until the region ends).

Activation checkpointing recomputes a block in backward, outside the forward's region, under the autocast
state its forward had, which ``torch.utils.checkpoint`` saves and restores by device type: on fake CPU tensors
that is CPU autocast, whose kernels are CPU's own again once the region has ended. ``recomputation`` gives the
recomputation CUDA's kernels back (``memprof.measure.checkpointing`` enters it), as a CUDA run recomputes
under CUDA's autocast.

Left as CPU autocast has them: ``linalg_matrix_sqrth`` (registered for both keys, in no list of the header)
and other libraries' ops (torchvision's ``roi_align``…), which register their own kernels for both keys.
The CUDA-only kernels (``cudnn_convolution``, ``cudnn_convolution_transpose``, ``_cudnn_rnn``) never see CPU tensors.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch

LOWER_PRECISION = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
)
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
FP32_SET_OPT_DTYPE = ("prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
                      "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
                      "sum.dim_IntList")
FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "tensordot", "scatter_add")
BANNED = {"binary_cross_entropy": (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast. Many models use a "
    "sigmoid layer right before the binary cross entropy layer. In this case, combine the two layers using "
    "torch.nn.functional.binary_cross_entropy_with_logits or torch.nn.BCEWithLogitsLoss.")}
KEPT_AS_CPU = ("linalg_matrix_sqrth",)

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_ACTIVE: list["CudaAutocast"] = []  # the regions entered and not left, innermost last


class CudaAutocast:
    """``torch.autocast("cuda", dtype)`` as a CUDA run would apply it, on fake CPU tensors (re-enterable)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._casts: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def __enter__(self) -> "CudaAutocast":
        self._library = torch.library.Library("aten", "IMPL")
        for name, (op, policy) in self._policies().items():
            self._library.impl(name, _kernel(op, policy), "AutocastCPU")
        for name in cpu_only_ops():
            self._library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        self._region = torch.autocast("cpu", dtype=self.dtype)
        self._region.__enter__()
        _ACTIVE.append(self)
        return self

    def _policies(self) -> dict[str, tuple[torch._ops.OpOverload, Callable]]:
        """Each op CUDA lists: the op its kernel calls (``norm``: the overload with a dtype) and its policy
        (an op this torch does not have is left out)."""
        policies = {**{name: (name, self._lower_precision) for name in LOWER_PRECISION},
                    **{name: (name, self._fp32) for name in FP32},
                    **{name: (name, self._fp32_set_opt_dtype) for name in FP32_SET_OPT_DTYPE},
                    **{name: (target, _fp32_append_dtype) for name, target in FP32_APPEND_DTYPE.items()},
                    **{name: (name, self._promote) for name in PROMOTE},
                    **{name: (name, _banned) for name in BANNED}}
        return {name: (_overload(calls), policy) for name, (calls, policy) in policies.items()
                if _overload(name) is not None}

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        self._region.__exit__(*exc)
        self._library._destroy()  # CPU autocast's own kernels are the ops' again
        self._casts.clear()  # as torch.autocast's exit clears its cast cache

    def cast(self, arg: Any, dtype: torch.dtype) -> Any:
        """``cached_cast``: an eligible tensor (floating, not fp64) in ``dtype``; an fp32 leaf that requires grad
        (a weight) is cast once per region into the lower precision; lists element by element."""
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.cast(item, dtype) for item in arg)
        if not _eligible(arg) or arg.dtype == dtype:
            return arg
        if not (dtype == self.dtype and arg.dtype == torch.float32 and arg.requires_grad and arg.is_leaf
                and not arg._is_view() and torch.is_autocast_cache_enabled()):
            return arg.to(dtype)
        source, cast = self._casts.get(id(arg), (None, None))
        if source is None or source() is not arg:
            cast = arg.to(dtype)
            self._casts[id(arg)] = (weakref.ref(arg), cast)
        return cast

    def _lower_precision(self, op, args, kwargs):
        return op(*self.cast(args, self.dtype), **{k: self.cast(v, self.dtype) for k, v in kwargs.items()})

    def _fp32(self, op, args, kwargs):
        return op(*self.cast(args, torch.float32), **{k: self.cast(v, torch.float32) for k, v in kwargs.items()})

    def _fp32_set_opt_dtype(self, op, args, kwargs):
        """fp32 output unless the call names a dtype (only where the first argument is eligible)."""
        if not _eligible(args[0]):
            return op(*args, **kwargs)
        index = next(i for i, a in enumerate(op._schema.arguments) if a.name == "dtype")
        if index < len(args):
            args = (*args[:index], torch.float32 if args[index] is None else args[index], *args[index + 1:])
        elif kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": torch.float32}
        return op(*args, **kwargs)

    def _promote(self, op, args, kwargs):
        """Every eligible tensor in the widest floating type among them (``promote_type``/``prioritize``)."""
        widest = self.dtype
        for item in torch.utils._pytree.tree_leaves((args, kwargs)):
            if _eligible(item) and torch.float32 in (widest, item.dtype):
                widest = torch.float32
            elif _eligible(item) and widest != item.dtype:
                raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
        return op(*self.cast(args, widest), **{k: self.cast(v, widest) for k, v in kwargs.items()})


def recomputation() -> contextlib.AbstractContextManager:
    """For a checkpointed call made now: the context its recomputation in backward runs in to cast as this
    forward does, CUDA's autocast where a ``CudaAutocast`` region is active (a fresh one: the recomputation has
    its own cast cache, as a CUDA run's has), else nothing."""
    return CudaAutocast(_ACTIVE[-1].dtype) if _ACTIVE else contextlib.nullcontext()


def in_lower_precision(*args: Any) -> tuple:
    """``scaled_dot_product_attention``'s policy (lower_precision_fp) applied to ``args`` in the active region,
    for ``cuda_choices.like_cuda``'s attention, which calls the CUDA kernels' own ops past the composite."""
    dtype = torch.get_autocast_dtype("cpu")
    return tuple(arg.to(dtype) if _eligible(arg) and arg.dtype != dtype else arg for arg in args)


def cpu_only_ops() -> list[str]:
    """The ops CPU autocast casts and CUDA's lets through (``cat``, ``stack``, ``cross_entropy_loss``…)."""
    listed = {*LOWER_PRECISION, *FP32, *FP32_SET_OPT_DTYPE, *FP32_APPEND_DTYPE, *PROMOTE, *BANNED, *KEPT_AS_CPU}
    registered = torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU")
    names = (name.removeprefix("aten::") for name in registered if name.startswith("aten::"))
    return [name for name in names if name not in listed]


def _kernel(op: torch._ops.OpOverload, policy: Callable) -> Callable:
    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):  # as WrapFunction_: the op runs below autocast
            return policy(op, args, kwargs)

    return kernel


def _overload(name: str) -> torch._ops.OpOverload | None:
    op, _, overload = name.partition(".")
    try:
        return getattr(getattr(torch.ops.aten, op), overload or "default")
    except AttributeError:
        return None


def _eligible(arg: Any) -> bool:
    """``is_eligible``: a floating tensor other than fp64 (every tensor of a CUDA run is on CUDA)."""
    return isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.dtype != torch.float64


def _fp32_append_dtype(op, args, kwargs):
    """``norm`` redispatched to its overload with a dtype: fp32 where the first argument is eligible."""
    return op(*args, **kwargs, dtype=torch.float32 if _eligible(args[0]) else args[0].dtype)


def _banned(op, args, kwargs):
    raise RuntimeError(BANNED[op._schema.name.removeprefix("aten::")])
