"""The global scratch memory of torch's CUDA reduction kernel, for an estimate made on fake tensors.

When several thread blocks (CTAs) reduce one output, ``gpu_reduce_kernel`` (``ATen/native/cuda/Reduce.cuh``)
asks the caching allocator for a staging buffer (``ReduceConfig::global_memory_size``) and a semaphore per
block column (``ReduceConfig::semaphore_size``), right after the op's result and freed as the launch returns
(the buffer first allocated, the semaphores first freed). Fake tensors run no kernel and allocate neither;
the real ones are large: a bias gradient of 2,048 rows into 3,072 fp32 columns stages 50,331,648 B, an
Adafactor ``mean(dim=-2)`` of the 32128 × 512 embedding 131,596,288 B (H200 histories, reports/gpu/traces-h200).

The launch configuration is torch's (2.11 measured, 2.14.1's header read), followed step by step below:
TensorIterator's layout of the reduction (``TensorIteratorBase::reorder_dimensions``, ``coalesce_dimensions``,
``can_use_32bit_indexing``, ``with_32bit_indexing``), then ``setReduceConfig``. It needs the GPU's SM count
and threads per SM (``memprof.gpus``). Ops modelled (``REDUCTIONS``): those whose CUDA kernel calls
``gpu_reduce_kernel`` with an accumulator this module knows; others (amax, max, argmax, any, prod…, and
``_foreach_norm``'s own per-chunk buffer) stage nothing here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memprof.gpus import Gpu
from memprof.measure.events import Allocation

INT32_MAX = 2**31 - 1
MAX_NUM_THREADS = 512  # Reduce.cuh mnt_wrapper (256 for complex double, not modelled)
MIN_VALUES_PER_THREAD = 16  # setReduceConfig (CUDA; ROCm's 128 not modelled)
MAX_VALUES_PER_THREAD = 256  # setReduceConfig
SEMAPHORE_BYTES = 4  # sizeof(int): ReduceConfig::semaphore_size

aten = torch.ops.aten


@dataclass(frozen=True)
class Kernel:
    """What ``gpu_reduce_kernel``'s template arguments fix: the accumulator (``arg_t``) and unrolling."""

    accumulator: dict  # input dtype -> sizeof(arg_t)
    vt0: int = 4
    input_vec_size_16bit: int = 4  # input_vec_size for 2-byte inputs (vt0 otherwise)
    accumulates_in_output: bool = True  # arg_t converts to the output type (fp16/bf16 in and out aside)


_OPMATH = {torch.float16: 4, torch.bfloat16: 4, torch.float32: 4, torch.float64: 8}
"""``at::opmath_type`` / ``acc_type<scalar_t, true>``: float for half, bfloat16 and float, double for double."""
_WELFORD = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 16, torch.float64: 32}
"""``WelfordData<acc_scalar_t, int32_t>`` (SharedReduceOps.h: mean, m2, n, nf): 4 fields of 4 B, or 8+8+4(+4)+8."""

SUM = Kernel(_OPMATH, input_vec_size_16bit=8)  # ReduceSumProdKernel.cu sum_functor: 16-bit inputs vectorize by 8
MEAN_NORM = Kernel(_OPMATH)  # ReduceMomentKernel.cu mean_kernel_impl (MeanOps); ReduceNormKernel.cu (Norm*Ops)
WELFORD = Kernel(_WELFORD, vt0=2, accumulates_in_output=False)  # ReduceMomentKernel.cu std_var_kernel_impl: gpu_reduce_kernel<.., 2>

REDUCTIONS: dict = {
    aten.sum.default: SUM, aten.sum.dim_IntList: SUM, aten.nansum.default: MEAN_NORM,
    aten.mean.default: MEAN_NORM, aten.mean.dim: MEAN_NORM, aten.linalg_vector_norm.default: MEAN_NORM,
    aten.var.correction: WELFORD, aten.std.correction: WELFORD,
    aten.var_mean.correction: WELFORD, aten.std_mean.correction: WELFORD,
}
"""The aten ops an estimate sees (the tracker's dispatch level) whose CUDA kernel is ``gpu_reduce_kernel``."""


@dataclass
class Iteration:
    """A reduction's TensorIterator: iteration shape and byte strides of the output and the input,
    fastest dimension first, reduced dimensions (output stride 0) in front."""

    shape: list[int]
    out: list[int]
    inp: list[int]

    @property
    def num_reduce_dims(self) -> int:
        return sum(1 for s in self.out if s == 0)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_outputs(self) -> int:  # TensorIteratorBase::num_output_elements
        return math.prod(n for n, s in zip(self.shape, self.out) if s != 0)


@dataclass(frozen=True)
class Launch:
    """The global memory one ``gpu_reduce_kernel`` launch asks the caching allocator for."""

    buffer: int  # ReduceConfig::global_memory_size
    semaphores: int  # ReduceConfig::semaphore_size


def scratch(func, args: tuple, kwargs: dict, out, gpu: Gpu) -> tuple[int, list[Launch]]:
    """What a reduction op allocates on CUDA besides its result: an accumulation buffer held across its
    launches (0: none) and each launch's global staging (empty: a kernel without, or not a modelled op)."""
    kernel = REDUCTIONS.get(func)
    if kernel is None:
        return 0, []
    source = args[0]
    result = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(source, torch.Tensor) or source.dtype not in kernel.accumulator or source.numel() == 0:
        return 0, []
    dims = _reduced_dims(func, args, kwargs, source.dim())
    iteration = layout(list(source.shape), list(source.stride()), dims, source.element_size(), result.element_size())
    arg_size = kernel.accumulator[source.dtype]
    vec = kernel.input_vec_size_16bit if source.element_size() == 2 else kernel.vt0
    launches = [launch(part, arg_size, source.element_size(), source.storage_offset(), vec, gpu)
                for part in split_32bit(iteration)]
    return _accumulation_buffer(iteration, kernel, arg_size, source, result), [x for x in launches if x.buffer]


def _reduced_dims(func, args: tuple, kwargs: dict, ndim: int) -> list[int]:
    """The dimensions an op reduces (all of them where it names none)."""
    if func in (aten.sum.default, aten.mean.default):
        return list(range(ndim))
    if func is aten.linalg_vector_norm.default:
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
    else:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % ndim for d in dims}) if ndim else []


def layout(sizes: list[int], strides: list[int], reduced: list[int], in_bytes: int, out_bytes: int) -> Iteration:
    """TensorIterator's view of reducing ``reduced`` of an input (sizes, element strides): the output is
    contiguous and broadcast (stride 0) over the reduced dimensions (``review_reduce_result``); dimensions
    are reversed, sorted (``reorder_dimensions``) and merged (``coalesce_dimensions``)."""
    kept = [1 if d in reduced else n for d, n in enumerate(sizes)]
    out_strides, step = [0] * len(sizes), 1
    for d in reversed(range(len(sizes))):
        out_strides[d] = step * out_bytes
        step *= kept[d]
    out = [0 if kept[d] == 1 and sizes[d] != 1 else out_strides[d] for d in range(len(sizes))]
    inp = [s * in_bytes for s in strides]
    order = list(reversed(range(len(sizes))))  # perm_ starts as n-1 … 0
    order = _sorted_dims(order, sizes, [out, inp])
    iteration = Iteration([sizes[d] for d in order], [out[d] for d in order], [inp[d] for d in order])
    return _coalesced(iteration) if iteration.shape else iteration


def _sorted_dims(perm: list[int], sizes: list[int], operands: list[list[int]]) -> list[int]:
    """``reorder_dimensions``: an insertion sort with ambiguous comparisons; reduced dims (output stride 0)
    first, then ascending strides, the first operand that tells deciding; on equal strides the smaller size."""
    def should_swap(d0: int, d1: int) -> int:
        for arg, strides in enumerate(operands):
            s0, s1 = strides[d0], strides[d1]
            if arg == 0 and (s0 == 0) != (s1 == 0):
                return 1 if s1 == 0 else -1
            if s0 == 0 or s1 == 0:
                continue
            if s0 != s1:
                return -1 if s0 < s1 else 1
            if sizes[d0] > sizes[d1]:
                return 1
        return 0

    perm = list(perm)
    for i in range(1, len(perm)):
        d1 = i
        for d0 in range(i - 1, -1, -1):
            comparison = should_swap(perm[d0], perm[d1])
            if comparison > 0:
                perm[d0], perm[d1] = perm[d1], perm[d0]
                d1 = d0
            elif comparison < 0:
                break
    return perm


def _coalesced(it: Iteration) -> Iteration:
    """``coalesce_dimensions``: merge neighbours that are one run of memory in every operand, or of size 1."""
    shape, strides = list(it.shape), [list(it.out), list(it.inp)]
    prev = 0
    for dim in range(1, len(shape)):
        if shape[prev] == 1 or shape[dim] == 1 or all(shape[prev] * s[prev] == s[dim] for s in strides):
            if shape[prev] == 1:
                for s in strides:
                    s[prev] = s[dim]
            shape[prev] *= shape[dim]
        else:
            prev += 1
            if prev != dim:
                for s in strides:
                    s[prev] = s[dim]
                shape[prev] = shape[dim]
    n = prev + 1
    return Iteration(shape[:n], strides[0][:n], strides[1][:n])


def _fits_32bit(it: Iteration) -> bool:
    """``can_use_32bit_indexing``: every operand's furthest byte offset fits an int32."""
    if it.numel > INT32_MAX:
        return False
    return all(1 + sum((n - 1) * s for n, s in zip(it.shape, strides)) <= INT32_MAX for strides in (it.out, it.inp))


def split_32bit(it: Iteration) -> list[Iteration]:
    """``with_32bit_indexing``: halve the dimension of largest extent (``get_dim_to_split``) until every part
    fits 32-bit indexing; each part is a launch of its own."""
    pending, parts = [it], []
    while pending:
        part = pending.pop(0)
        if _fits_32bit(part):
            parts.append(part)
            continue
        dim, widest = 0, -1
        for d in reversed(range(len(part.shape))):  # get_dim_to_split: the first strictly widest
            for strides in (part.out, part.inp):
                extent = (part.shape[d] - 1) * abs(strides[d])
                if part.shape[d] and extent > widest:
                    dim, widest = d, extent
        head = part.shape[dim] // 2
        for size in (head, part.shape[dim] - head):
            pending.append(Iteration([*part.shape[:dim], size, *part.shape[dim + 1:]], part.out, part.inp))
    return parts


def _accumulation_buffer(it: Iteration, kernel: Kernel, arg_size: int, source: torch.Tensor,
                        result: torch.Tensor) -> int:
    """``gpu_reduce_kernel``'s ``AccumulationBuffer``: where the output cannot accumulate (``arg_t`` does not
    convert to it, or fp16/bf16 in and out) and the reduction takes several launches, an ``arg_t`` twin of the
    output spanning them."""
    half_in_and_out = source.dtype == result.dtype and result.dtype in (torch.float16, torch.bfloat16)
    can_accumulate = kernel.accumulates_in_output and not half_in_and_out
    if can_accumulate or result.element_size() >= arg_size or _fits_32bit(it):
        return 0
    extent = max([result.element_size(), *(n * s for n, s in zip(it.shape, it.out))])
    return extent // result.element_size() * arg_size


def launch(it: Iteration, arg_size: int, scalar_size: int, offset: int, input_vec_size: int, gpu: Gpu) -> Launch:
    """``setReduceConfig`` for one 32-bit launch, down to ``global_memory_size`` and ``semaphore_size``."""
    num_outputs = it.num_outputs
    inputs_per_output = it.numel // num_outputs
    r = it.num_reduce_dims
    ndim = len(it.shape)
    if ndim:
        fastest = r == ndim or it.inp[0] < it.inp[r]
        dim0, dim1 = (inputs_per_output, num_outputs) if fastest else (num_outputs, inputs_per_output)
        moving_stride = it.inp[0] if fastest else it.inp[r]
    else:
        fastest, moving_stride, dim0, dim1 = True, scalar_size, 1, 1
    output_vec = 1
    if moving_stride == scalar_size:  # vectorize along the input, or along the output
        if fastest and dim0 >= 128 and r == 1:
            dim0 //= input_vec_size
        elif not fastest:
            output_vec = _output_vec_size(it, scalar_size, offset)
            dim0 //= output_vec
    width, height = _block_dimension(dim0, dim1, MAX_NUM_THREADS // output_vec, gpu.warp_size)
    step_input = step_output = 1
    block_x_reduce = ndim == 0 or fastest
    if block_x_reduce:
        step_input *= width
    else:
        step_output *= width
    values_per_thread = -(-inputs_per_output // step_input)
    split_across_warps = values_per_thread >= min(height * 16, MAX_VALUES_PER_THREAD)
    if split_across_warps:  # input_mult[1] = split_input(block_height): nonzero
        step_input *= height
    else:
        step_output *= height
    blocks_per_sm = gpu.threads_per_sm // (width * height)
    target_grid = gpu.sm_count * blocks_per_sm
    grid_x = -(-(num_outputs // output_vec) // step_output)
    values_per_thread = -(-inputs_per_output // step_input)
    if not (split_across_warps and values_per_thread >= MAX_VALUES_PER_THREAD and grid_x <= target_grid):
        return Launch(0, 0)
    ctas = min(max(-(-target_grid // grid_x), -(-values_per_thread // MAX_VALUES_PER_THREAD)),
               -(-values_per_thread // MIN_VALUES_PER_THREAD))  # std::clamp(ctas1, ctas3, ctas2)
    if ctas <= 1:
        return Launch(0, 0)
    buffer = arg_size * num_outputs * ctas * (1 if block_x_reduce else width * output_vec)
    return Launch(buffer, SEMAPHORE_BYTES * grid_x)


def _block_dimension(dim0: int, dim1: int, max_threads: int, warp: int) -> tuple[int, int]:
    """``ReduceConfig::set_block_dimension``: block width and height, powers of two."""
    dim0_pow2 = _last_pow2(dim0) if dim0 < max_threads else max_threads
    dim1_pow2 = _last_pow2(dim1) if dim1 < max_threads else max_threads
    width = min(dim0_pow2, warp)
    height = min(dim1_pow2, max_threads // width)
    return min(dim0_pow2, max_threads // height), height


def _last_pow2(n: int) -> int:
    """Reduce.cuh ``last_pow2``: the largest power of two not above ``n`` (at least 1)."""
    return max(1, 1 << (n.bit_length() - 1)) if n > 0 else 1


def _output_vec_size(it: Iteration, scalar_size: int, offset: int) -> int:
    """``get_output_vec_size``: 4, halved until it divides the input's address (in elements: the caching
    allocator's blocks are 512-B aligned, so its storage offset), the output dimension's size and every
    other input stride."""
    vec = 4
    output_index = it.num_reduce_dims
    for n in (offset, it.shape[output_index],
              *(s // scalar_size for j, s in enumerate(it.inp) if j != output_index)):
        while n % vec:
            vec //= 2
    return vec


def stage(tracker, func, args: tuple, kwargs: dict, out, gpu: Gpu) -> None:
    """Add a reduction's scratch to a fake tracker's allocations in the real order, after its result: the
    accumulation buffer around its launches; per launch the staging buffer, then the semaphores, freed in
    reverse (``gpu_reduce_kernel``'s ``DataPtr``s going out of scope)."""
    accumulation, launches = scratch(func, args, kwargs, out, gpu)
    if not launches and not accumulation:
        return
    held = _transient(tracker, accumulation)
    for one in launches:
        buffer, semaphores = _transient(tracker, one.buffer), _transient(tracker, one.semaphores)
        for alloc in (semaphores, buffer):
            if alloc is not None:
                alloc.end = tracker.now()
    if held is not None:
        held.end = tracker.now()


def _transient(tracker, nbytes: int) -> Allocation | None:
    if not nbytes:
        return None
    alloc = Allocation(ptr=-len(tracker.allocations) - 1, nbytes=tracker.block_bytes(nbytes), start=tracker.now(),
                       origin="gpu_reduce_kernel")
    tracker.allocations.append(alloc)
    return alloc
