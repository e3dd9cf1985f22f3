"""Tilings, autotuning, pinning and launching, for every Triton kernel of stitchops.

A family of kernels declares a ``TilingSpace``: the tilings its autotuner tries on a GPU,
the one tiling it runs under the CPU interpreter, and its fallbacks (a tiling per amount of
shared memory a GPU offers a block, each checked by tests/test_triton_compile.py to compile
and fit there at the family's most demanding arguments). Each kernel of the family is a
``TunedKernel``: its ``@triton.jit`` function, the family's space, the autotune key, and how
a tiling becomes its meta-parameters. A launch then runs

- the tiling pinned for the family (``space.pinned(tiling)``: tests, tuning by hand),
- else, with STITCHOPS_AUTOTUNE=0 on a GPU, the fallback that fits the GPU,
- else the autotuner's pick (kept in Triton's cache dir, so later processes skip the search).

A chosen tiling launches the JIT function directly, as the autotuner itself does with one
config: no search, no timing (Triton 3.6 would time even a lone config).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from stitchops._runtime import triton_autotune_enabled, triton_interpreting


class Tiling(NamedTuple):
    """How a launch tiles its work: block sizes, warps, pipeline stages and how many
    BLOCK_N-wide output column tiles one program covers in turn (for kernels whose meta
    says so; the others ignore it)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    column_tiles: int = 1


# STITCHOPS_AUTOTUNE=0 (read at import): every GPU launch runs its GPU's fallback tiling.
_FALLBACK_ONLY = not triton_interpreting() and not triton_autotune_enabled()
_pinned: dict[str, Tiling] = {}  # per TilingSpace name, set by TilingSpace.pinned


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    """Shared memory one block may opt into on this GPU: the limit Triton launches against."""
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


@functools.cache
def programs_to_fill(device: torch.device) -> int:
    """How many programs fill the device (2 per SM on a GPU; a few under the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def launch_sizes(gpu: dict[str, int], interpreted: dict[str, int]) -> dict[str, int]:
    """A fixed-size kernel's block sizes: ``interpreted`` under Triton's CPU interpreter, where
    a loop step costs its overhead whatever its size (fewer, larger steps), else ``gpu``."""
    return interpreted if triton_interpreting() else gpu


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for ``dtype``: PyTorch's own fp32 matmul setting, so fp32
    results match torch's."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@dataclass(frozen=True)
class TilingSpace:
    """The tilings of one family of kernels (see the module docstring)."""

    name: str
    tilings: tuple[Tiling, ...]  # the autotune space on a GPU
    interpreted: Tiling  # the one tiling under TRITON_INTERPRET=1
    # (shared memory per block a GPU must offer, tiling), most demanding first; the last
    # entry's requirement is 0: it is what every other GPU runs.
    fallbacks: tuple[tuple[int, Tiling], ...]

    def __post_init__(self) -> None:
        if not self.fallbacks or self.fallbacks[-1][0] != 0:
            raise ValueError(f"{self.name}: the last fallback must fit every GPU (0 bytes)")
        missing = [t for _, t in self.fallbacks if t not in self.tilings]
        if missing:
            raise ValueError(f"{self.name}: fallbacks {missing} are not in the autotune space")

    def search(self) -> tuple[Tiling, ...]:
        """The tilings an autotuner tries here: the space on a GPU, one under the interpreter."""
        return (self.interpreted,) if triton_interpreting() else self.tilings

    def fallback(self, device_index: int) -> Tiling:
        """The fallback tiling that fits the shared memory of GPU ``device_index``."""
        shared = _max_shared_memory(device_index)
        return next(tiling for needed, tiling in self.fallbacks if shared >= needed)

    def launch_tiling(self, device: torch.device) -> Tiling | None:
        """The tiling a launch on ``device`` runs, or None where the autotuner picks it."""
        pinned = _pinned.get(self.name)
        if pinned is not None:
            return pinned
        if _FALLBACK_ONLY and device.type == "cuda":
            return self.fallback(device.index)
        return None

    @contextlib.contextmanager
    def pinned(self, tiling: Tiling | Sequence[int]) -> Iterator[None]:
        """Run every kernel of the family with one tiling inside the block (a Tiling or a
        tuple of its fields): no autotuning, and the autotuner's cached picks stay as they
        were. Blocks nest."""
        saved = _pinned.get(self.name)
        _pinned[self.name] = Tiling(*tiling)
        try:
            yield
        finally:
            if saved is None:
                del _pinned[self.name]
            else:
                _pinned[self.name] = saved


class TunedKernel:
    """A ``@triton.jit`` function with its family's tilings, autotuned on ``key``.

    ``meta(tiling)`` gives the kernel's tile meta-parameters for a tiling (BLOCK_M, ...);
    tilings that give the same config are tried once.
    """

    def __init__(self, fn, space: TilingSpace, key: list[str], meta: Callable[[Tiling], dict]):
        self.fn = fn
        self.space = space
        self.meta = meta
        self.autotuned = triton.autotune(
            configs=[self.config(t) for t in self.tilings()],
            key=key,
            cache_results=True,  # the pick is kept in Triton's cache dir
        )(fn)

    def config(self, tiling: Tiling | Sequence[int]) -> triton.Config:
        tiling = Tiling(*tiling)
        return triton.Config(
            self.meta(tiling), num_warps=tiling.num_warps, num_stages=tiling.num_stages
        )

    def tilings(self, space: Sequence[Tiling] | None = None) -> tuple[Tiling, ...]:
        """The tilings of ``space`` (default: what the autotuner tries here) whose configs
        differ, first of each kept."""
        distinct: dict[tuple, Tiling] = {}
        for tiling in self.space.search() if space is None else space:
            config = self.config(tiling)
            identity = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
            distinct.setdefault(identity, tiling)
        return tuple(distinct.values())

    def launch(self, grid, device: torch.device, *args, **kwargs) -> None:
        """kernel[grid](*args, **kwargs), autotuned or with the family's chosen tiling."""
        tiling = self.space.launch_tiling(device)
        if tiling is None:
            self.autotuned[grid](*args, **kwargs)
        else:
            self.fn[grid](*args, **kwargs, **self.config(tiling).all_kwargs())
