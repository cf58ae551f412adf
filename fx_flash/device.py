"""What a device offers the kernels: shared memory per block (M), multiprocessors, capability.

Read once per device and cached. CPU tensors run the Triton interpreter, which has no shared
memory; they get ``INTERPRETER_PROFILE``, a documented stand-in: the 101376 bytes a consumer
Ada (RTX 40xx) block may opt into, the smallest M of current GPUs that still fits fp32 tiles at
head dim 256, so tiling runs the same code path as on a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceProfile:
    """Facts about one device that tiling and launching depend on.

    Attributes:
        name: human-readable device name.
        shared_memory: M, bytes of shared memory one program (block) may use, opt-in limit.
        multiprocessors: number of SMs (programs that run at once, at one per SM).
        capability: CUDA compute capability (major, minor); (0, 0) for the interpreter.
    """

    name: str
    shared_memory: int
    multiprocessors: int
    capability: tuple[int, int]


INTERPRETER_PROFILE = DeviceProfile(
    name="triton-interpreter", shared_memory=101376, multiprocessors=1, capability=(0, 0)
)


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph: nothing may be timed, and
    nothing a replay reads may come from memory outside the graph (launch.py, skipping.py)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cuda_profile(index: int) -> DeviceProfile:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0)
    if not shared:
        # Older torch builds lack the attribute; Triton's driver reads the same CUDA attribute.
        import triton

        shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return DeviceProfile(
        name=props.name,
        shared_memory=int(shared),
        multiprocessors=int(props.multi_processor_count),
        capability=(props.major, props.minor),
    )


def device_profile(device: torch.device) -> DeviceProfile:
    """The profile of ``device``: a CUDA device's own numbers, or the interpreter's stand-in."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_profile(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROFILE
