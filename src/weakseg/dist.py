"""Tiny typed helpers for torchrun + DDP (gloo on CPU, nccl on CUDA, chosen automatically)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1). Returns True if distributed."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` in place across ranks (no-op when not distributed)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list, rank: int | None = None, world: int | None = None) -> list:
    """Rank `rank`'s share of `items` (strided, so every rank gets a similar mix)."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return items[rank::world]


def channels_last(obj):
    """A module or a 4-D tensor in channels-last memory format, anything else unchanged.

    Depthwise and pointwise convolutions (EfficientNet-Lite, MobileNet) run 20-40% faster this way on the CPU
    as on CUDA; the values are the same up to float rounding.
    """
    if isinstance(obj, torch.nn.Module):
        return obj.to(memory_format=torch.channels_last)
    if isinstance(obj, torch.Tensor) and obj.dim() == 4:
        return obj.contiguous(memory_format=torch.channels_last)
    return obj


class _Fp32DepthwiseConv2d(torch.nn.Conv2d):
    """A depthwise Conv2d that runs in fp32 inside an autocast region and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


@contextlib.contextmanager
def fp32_depthwise_convs(model: torch.nn.Module, enabled: bool = True):
    """Run `model`'s trainable depthwise convolutions in fp32 while the block lasts (-> how many).

    Under CPU bf16 autocast oneDNN's depthwise backward is 2-3x slower than in fp32 and dominates the step of
    EfficientNet-Lite models (docs/performance.md); the other layers keep bf16. Only plain `nn.Conv2d` modules
    with groups == in_channels > 1 and a weight that gets a gradient change (frozen ones run forward only, which
    bf16 speeds up); parameters and state-dict keys are untouched, and the classes are restored on exit.
    """
    swapped = [m for m in model.modules() if enabled and type(m) is torch.nn.Conv2d and m.groups > 1
               and m.groups == m.in_channels and m.weight.requires_grad]
    for m in swapped:
        m.__class__ = _Fp32DepthwiseConv2d
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            m.__class__ = torch.nn.Conv2d


# glibc mallopt parameters (malloc.h) and what keep_freed_heap_memory sets them to
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": (-1, 100_000 << 20), "MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20),
            "MALLOC_MMAP_MAX_": (-4, 0)}


def keep_freed_heap_memory() -> bool:
    """Let glibc serve every allocation from its heap and keep freed memory for reuse; True if applied.

    By default each large activation tensor is mapped fresh with mmap and unmapped when freed, and on a CPU pass
    over large inputs the kernel's page faults then cost as much time as the arithmetic (docs/performance.md).
    Here nothing is mmapped (glibc still falls back to mmap where its heap cannot grow) and the heap is never
    trimmed, so the process keeps its peak memory. Skipped where the user set any of the MALLOC_*_ variables
    above (their choice wins) and off glibc."""
    if any(name in os.environ for name in _MALLOPT):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([bool(mallopt(param, value)) for param, value in _MALLOPT.values()])


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loader_oversubscription(device: torch.device, num_workers: int) -> str | None:
    """Why `num_workers` DataLoader workers would slow a CPU job down, or None if they fit beside it.

    On the CPU every core already runs one of torch's intra-op threads; a worker process then takes a core from
    them, and each parallel region waits for the thread it preempted. Measured on 2 cores (docs/performance.md):
    1 worker beside 2 threads trains EfficientNet-Lite0 at 0.57-0.64 of the bare loop, 0 workers at 0.82-1.04.
    """
    threads, cores = torch.get_num_threads(), usable_cpu_count()
    if device.type != "cpu" or num_workers <= 0 or num_workers + threads <= cores:
        return None
    return (f"num_workers={num_workers} DataLoader worker(s) beside torch's {threads} intra-op thread(s) on "
            f"{cores} CPU core(s): the workers preempt the compute threads (measured ~0.6x the speed of "
            f"num_workers=0 on 2 cores); set num_workers=0, or fewer threads (OMP_NUM_THREADS) on a larger machine")


def warn_loader_oversubscription(stage: str, device: torch.device, num_workers: int) -> None:
    """A RuntimeWarning (rank 0) when `loader_oversubscription` finds the workers would slow `stage` down."""
    why = loader_oversubscription(device, num_workers)
    if why and is_main_process():
        warnings.warn(f"[{stage}] {why}", RuntimeWarning, stacklevel=2)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 autocast on CUDA devices that support it, else fp16 on CUDA, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        warnings.warn("precision=bf16 on a CPU without native bf16 instructions (avx512_bf16 / AMX): emulated, "
                      "so likely slower than fp32", RuntimeWarning, stacklevel=2)
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for a resolved precision (fp32: a no-op)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a CUDA request on a CPU-only machine is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RuntimeError(f"device={name!r} is not a device name; use device=auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was requested but this machine has no usable CUDA GPU; "
                           "set device=cpu (or device=auto).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device={name!r} was requested but this machine has {torch.cuda.device_count()} CUDA "
                           f"GPU(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}); set device=cuda or device=auto.")
    return dev


def gather_lists(items: list) -> list:
    """Concatenate every rank's list (picklable items), in rank order; identity when not distributed."""
    if not is_distributed():
        return list(items)
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def pool_context() -> mp.context.BaseContext:
    """Start method of the worker pools that run CPU-bound work (the dense CRF) beside this process: fork where the
    platform has it (workers inherit the dataset and the maker, nothing to pickle), else spawn (macOS / Windows:
    a pool's job is pickled once per worker)."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


@contextlib.contextmanager
def worker_pool(workers: int, what: str, rerun_with: str, initializer=None, initargs: tuple = ()):
    """A `ProcessPoolExecutor` of `workers` processes (`pool_context`'s start method) for the block. A worker that
    dies (killed, out of memory) fails the pending results with a RuntimeError naming `what` and `rerun_with` (the
    setting without workers), where a multiprocessing.Pool would wait for it forever; on any error the tasks not
    yet started are cancelled."""
    executor = ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=initializer, initargs=initargs)
    try:
        yield executor
    except BrokenProcessPool as e:
        raise RuntimeError(f"{what}: a worker process died ({e}); killed, or out of memory? Rerun with "
                           f"{rerun_with} to run it in this process") from e
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def threads_beside(workers: int):
    """torch's intra-op threads in this process cut by `workers` (to at least 1) for the block, for CPU-bound worker
    processes that run beside it: on 2 cores, 2 CRF workers and a 1-thread network predict ~1.4 x faster than
    beside a 2-thread one, whose threads wait for cores the workers hold (bench.crf_workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)
