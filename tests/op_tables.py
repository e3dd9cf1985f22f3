"""Each op's rows in the test machinery every op shares.

An op declares here what the shared runs take from it, and nothing of it is written into
those runs:
- ``test_file``: its tests. Those parametrised with ``backend="cuda"`` run on the host
  emulator without a GPU (conftest.py), once more under AddressSanitizer
  (test_cuda_emulated.py), and under compute-sanitizer on a GPU (test_cuda_sanitizer.py,
  with ``sanitizer_select``: a pytest ``-k`` expression per tool, racecheck being slow).
- ``kernels``: its module in kernels/; ``aot``: the specialisations tests/triton_aot.py
  compiles for real GPUs (every autotune config of each main one, the variants with a few).
- Its ThreadSanitizer driver is ``tests/cuda_emulator/racecheck_<name>.cpp`` (found by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AotKernel:
    """One TunedKernel of an op's kernels module, compiled at one specialisation."""

    attr: str  # its name in the module (a TunedKernel)
    flags: dict  # the launch's compile-time flags
    unit_strides: tuple[str, ...]  # strides that are 1 for contiguous inputs


@dataclass(frozen=True)
class AotVariant:
    """Another specialisation launches ask for, compiled in bf16 with a few configs."""

    name: str
    kernel: str  # an AotKernel's attr
    overrides: dict
    unit_strides: tuple[str, ...] | None = None  # None: the kernel's own


@dataclass(frozen=True)
class AotPlain:
    """A fixed-size, memory-bound kernel (a plain ``triton.jit`` function, no tensor cores):
    compiled for both archs and element widths with its launch's constants."""

    attr: str
    constants: dict
    num_warps: int = 4
    unit_strides: tuple[str, ...] = ()


def plain_variant(attr: str) -> str:
    """tests/triton_aot.py's variant name for an AotPlain kernel's rows."""
    return f"plain {attr}"


@dataclass(frozen=True)
class OpTests:
    name: str
    test_file: str
    kernels: str  # module of kernels/
    sanitizer_select: dict[str, str]
    # The cuda tests rerun under AddressSanitizer on the host emulator (ASan slows them ~3×).
    asan_select: str = "cuda"
    aot_kernels: tuple[AotKernel, ...] = ()
    aot_variants: tuple[AotVariant, ...] = ()
    # Flags at which the family's fallback tilings must fit every GPU they are for.
    aot_fallback_flags: dict = field(default_factory=dict)
    fp32_pointers: frozenset[str] = frozenset()  # pointer arguments that are always fp32
    aot_plain: tuple[AotPlain, ...] = ()
    # Arguments whose type is not the default (a pointer to the call's dtype, an int32 size):
    # e.g. {"index_ptr": "*i64", "inv_temperature": "fp32"}.
    arg_types: dict = field(default_factory=dict)
    cuda: bool = True  # has CUDA kernels (emulator, ASan, TSan and compute-sanitizer runs)


LORA = OpTests(
    name="lora_linear",
    test_file="test_lora.py",
    kernels="lora",
    # A few shapes cover every kernel instantiation kind (odd sizes, several K steps, the
    # widest rank) in fp32 and bf16, and the forward's column groups (fp32 and fp16).
    # Under ASan: every cuda test but the float16 / bfloat16 runs of the main case table (the
    # tensor-core kernels keep their edge shapes, column groups and strided inputs there).
    asan_select="cuda and not (test_matches_float64_reference and (fp16 or bf16))",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and (fp32 or bf16 or column_groups)",
        "racecheck": "cuda and ((T77-IN50 or IN96 or R70) and (fp32 or bf16) or column_groups)",
    },
    aot_kernels=(
        AotKernel(
            "LOWRANK_MATMUL",
            dict(HAS_LORA=True, HAS_BIAS=True, HAS_BIAS2=True, STORE_S=True, SPLIT_K=False,
                 BLOCK_R=16),
            ("stride_xk", "stride_wk", "stride_l1k", "stride_l2r", "stride_on"),
        ),
        AotKernel(
            "LORA_BACKWARD",
            dict(HAS_LORA=True, NEED_DX=True, NEED_DA=True, NEED_DB=True, NEED_BIAS=True,
                 BLOCK_R=16),
            ("stride_dyo", "stride_wi", "stride_ai", "stride_br", "stride_xi", "stride_dxi"),
        ),
    ),
    aot_variants=(
        AotVariant("forward no LoRA", "LOWRANK_MATMUL", dict(HAS_LORA=False, STORE_S=False)),
        AotVariant("forward rank 64", "LOWRANK_MATMUL", dict(BLOCK_R=64)),
        AotVariant("forward rank 128", "LOWRANK_MATMUL", dict(BLOCK_R=128)),
        AotVariant(
            "dW split-K", "LOWRANK_MATMUL",
            dict(HAS_LORA=False, HAS_BIAS=False, HAS_BIAS2=False, STORE_S=False, SPLIT_K=True),
            ("stride_xm", "stride_wn", "stride_on"),
        ),
        AotVariant("backward no LoRA", "LORA_BACKWARD",
                   dict(HAS_LORA=False, NEED_DA=False, NEED_DB=False)),
        AotVariant("backward rank 128", "LORA_BACKWARD", dict(BLOCK_R=128)),
        AotVariant("backward dx only", "LORA_BACKWARD",
                   dict(NEED_DA=False, NEED_DB=False, NEED_BIAS=False)),
        AotVariant("backward no dx", "LORA_BACKWARD", dict(NEED_DX=False)),
    ),
    aot_fallback_flags={"BLOCK_R": 128},  # the most shared memory: rank 128
    fp32_pointers=frozenset({"s_ptr", "da_part_ptr", "db_part_ptr", "dbias_part_ptr"}),
)  # fmt: skip

SPARSE_DELTA = OpTests(
    name="sparse_delta_linear",
    test_file="test_sparse_delta.py",
    kernels="sparse_delta",
    # Small kernels: every cuda test under ASan and memcheck; the split runs for the others.
    asan_select="cuda",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and token_splits",
        "racecheck": "cuda and (token_splits or deterministic)",
    },
    aot_plain=(
        AotPlain("_scatter_delta_kernel", {"BLOCK": 256}),
        AotPlain(
            "_sddmm_kernel", {"BLOCK_J": 64, "BLOCK_T": 32}, unit_strides=("stride_go", "stride_xi")
        ),
    ),
    fp32_pointers=frozenset({"part_ptr"}),
    arg_types={"index_ptr": "*i64"},
)

_BANDS = {name: "*i32" for name in ("pixel_start_ptr", "pixel_count_ptr", "centre_start_ptr",
                                    "centre_count_ptr", "cell_column_ptr",
                                    "column_start_ptr")}  # fmt: skip
TOKEN_CLUSTER = OpTests(
    name="token_cluster",
    test_file="test_token_cluster.py",
    kernels="token_cluster",
    # Small band kernels: every cuda test under ASan and memcheck, a few under the others.
    asan_select="cuda",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and 13x17",
        "racecheck": "cuda and (13x17-5x7-5-5 or deterministic)",
    },
    aot_plain=(
        AotPlain("_affinity_kernel", {"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_C": 32}),
        AotPlain(
            "_apply_kernel", {"ACCUMULATE": True, "BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_D": 32}
        ),
        AotPlain("_gather_kernel", {"M_STEP": True, "BLOCK_W": 1, "BLOCK_P": 32, "BLOCK_C": 32}),
        AotPlain("_band_dot_kernel", {"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_D": 32}),
    ),
    fp32_pointers=frozenset(
        {
            "s_ptr",
            "mean_ptr",
            "a_ptr",
            "y_ptr",
            "prev_ptr",
            "out_ptr",
            "totals_ptr",
            "dy_ptr",
            "v_ptr",
            "g_ptr",
        }
    ),
    arg_types={**_BANDS, "inv_temperature": "fp32", "total_floor": "fp32"},
)

_FOCUS_BLOCKS = {"BLOCK_Q": 32, "BLOCK_N": 64, "BLOCK_D": 32}
_FOCUS_SETS = {"BLOCK_Q": 16, "BLOCK_N": 16, "BLOCK_D": 32}
_POS = {"BLOCK_P": 256, "BLOCK_Q": 16, "BLOCK_N": 32}  # kernels.focus_attention.WIDE_POS
FOCUS_ATTENTION = OpTests(
    name="focus_attention",
    test_file="test_focus_attention.py",
    kernels="focus_attention",
    # SIMT kernels: every cuda test under ASan and memcheck, a few under the others.
    asan_select="cuda",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and float64_reference and fp32",
        "racecheck": "cuda and (deterministic or float64_reference and fp32)",
    },
    # D 32 and P 256 (FASeg: hidden 256, 8 heads); the shared-slot kernels in mask mode (its
    # extra loads), the per-query ones with their 3-D gathers and atomics.
    aot_plain=(
        AotPlain("_forward_kernel", {"MODE": 1, "DOT": "tf32", **_FOCUS_BLOCKS}),
        AotPlain("_forward_kernel", {"MODE": 3, "DOT": "tf32", **_FOCUS_SETS}),
        AotPlain("_mean_kernel", {"MODE": 2, "HAS_POS": True, "SCORES": True, "DOT": "tf32",
                                  **_FOCUS_BLOCKS, **_POS}),
        AotPlain("_delta_kernel", {"MODE": 1, "DOT": "tf32", **_FOCUS_BLOCKS, **_POS}),
        AotPlain("_dkdv_kernel", {"MODE": 1, "HAS_POS": True, "DOT": "tf32", **_FOCUS_BLOCKS,
                                  **_POS}),
        AotPlain("_dq_kernel", {"MODE": 2, "HAS_POS": True, "DOT": "tf32", **_FOCUS_BLOCKS,
                                **_POS}),
        AotPlain("_dpos_kernel", {"MODE": 1, "DOT": "tf32", **_FOCUS_BLOCKS, **_POS}),
        AotPlain("_query_sets_backward_kernel", {"HAS_POS": True, **_FOCUS_SETS, **_POS}),
    ),
    fp32_pointers=frozenset({"lse_ptr", "delta_ptr", "pos_out32_ptr", "colsum_ptr", "dk32_ptr",
                             "dv32_ptr", "dpos32_ptr"}),
    arg_types={"win_ptr": "*i32", "mask_ptr": "*i8", "reset_ptr": "*i8"},
)  # fmt: skip

OPS = (LORA, SPARSE_DELTA, TOKEN_CLUSTER, FOCUS_ATTENTION)
CUDA_OPS = tuple(op for op in OPS if op.cuda)

# Shared memory one block may use per arch (opt-in): A100 163 KB; RTX 30 / 40 / 50, L4, L40,
# A10 99 KB; H100 / H200 and B200 227 KB. tests/triton_aot.py compiles a family's fallback
# tiling for every arch whose shared memory makes it the one the family falls back to.
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                 100: 227 * 1024, 120: 99 * 1024}  # fmt: skip
SUM_RANGES = "sum_ranges"  # tests/triton_aot.py's rows of the shared kernels/partials.py


def fallback_variant(tiling) -> str:
    """tests/triton_aot.py's variant name for a fallback tiling's rows."""
    return f"fallback {tuple(tiling)}"


def fallback_archs(space, tiling) -> list[int]:
    """The archs on which a TilingSpace falls back to ``tiling``."""
    return [arch for arch, shared in SHARED_MEMORY.items()
            if next(t for needed, t in space.fallbacks if shared >= needed) == tiling]  # fmt: skip
