"""Benchmark of stitchops.focus_attention through ``nn.FocusCrossAttention`` (FASeg).

Two kinds of rows, each implementation checked against a float64 run of the official way
in the same run, hidden 256, 8 heads (D = 32), Q = 100 queries, B = 2:

- ``masked``: Mask2Former's masked cross-attention with both side outputs (DFPQ's A·K_pos,
  HRCA's key scores) at the 1/8 level of a 512² image (N = 64×64) and of 1024×2048
  (N = 128×256). ``official``: ``nn.MultiheadAttention(need_weights=True, attn_mask=...)``,
  which takes the unfused path and returns the head-averaged A [B, Q, N], then A·K_pos by
  bmm and the column sums of A; ours: ``FocusCrossAttention`` (mask mode, ``key_pos``,
  ``return_scores``) on the torch backend, and the Triton and CUDA kernels on a GPU.
- ``hrca``: high-resolution cross-attention at the 1/4 level of 512² (128×128, n = 256
  windows of 8×8, the top K = 8) and of 1024×2048 (256×512, n = 2048, K = 64).
  ``official``: FASeg's way: sort the scores, partition the whole map (and its positions)
  into windows (``permute().contiguous()``), gather the top K, ``nn.MultiheadAttention``;
  ours: ``FocusCrossAttention`` with ``windows`` [B, K]: only the chosen windows' tokens
  are gathered and projected; ``torch_project_map``: the alternative the module could take,
  project the whole map, then ``focus_attention`` reads the windows from it (the figures
  say which the module should do).

Time and peak memory (``peak_mb``) per implementation, forward only (``work``: forward) and
forward + backward (``work``: train). Costs: 4·B·Q·L·E FLOPs for the attention (L keys
attended: N, or K·64) plus the projections (2·B·(Q + 2L)·E²) and the output (2·B·Q·E²).

    python benchmarks/bench_focus_attention.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner
from runner import Case, Impl, Target

import stitchops
from stitchops.nn import FocusCrossAttention

E, HEADS, QUERIES, BATCH, WINDOW = 256, 8, 100, 2, 8
MASKED = ((64, 64), (128, 256))  # 1/8 of 512² and of 1024×2048
HRCA = (((128, 128), 8), ((256, 512), 64))  # 1/4 maps and their K = n / 32

TARGETS = (
    *(Target(op="focus_attention",
             where={"kind": "hrca", "map": f"{hw[0]}x{hw[1]}", "work": "forward",
                    "device": "cpu"},
             implementations=("torch",), bounds=(("memory_vs_baseline", "min", 3.0),),
             what=f"CPU: HRCA window mode holds <= 1/3 of the official way's peak memory "
                  f"(1/4 map {hw[0]}x{hw[1]}, K {k})")
      for hw, k in HRCA),
    *(Target(op="focus_attention",
             where={"kind": "hrca", "map": f"{hw[0]}x{hw[1]}", "work": "forward",
                    "device": "cuda"},
             implementations=("triton", "cuda"),
             bounds=(("vs_baseline", "min", 5.0), ("memory_vs_baseline", "min", 10.0)),
             what=f"GPU: HRCA >= 5x faster than the official way with >= 10x less memory "
                  f"(1/4 map {hw[0]}x{hw[1]}, K {k})")
      for hw, k in HRCA),
    *(Target(op="focus_attention",
             where={"kind": "masked", "map": f"{hw[0]}x{hw[1]}", "work": "forward",
                    "device": "cuda"},
             implementations=("triton", "cuda"), bounds=(("vs_baseline", "min", 3.0),),
             what=f"GPU: masked attention with both side outputs >= 3x faster than the "
                  f"official way (1/8 map {hw[0]}x{hw[1]})")
      for hw in MASKED),
)  # fmt: skip


def layers(device, dtype):
    """(ours, the official nn.MultiheadAttention) with the same weights."""
    torch.manual_seed(0)
    ours = FocusCrossAttention(E, HEADS).to(device=device, dtype=dtype)
    official = torch.nn.MultiheadAttention(E, HEADS, batch_first=True).to(device=device,
                                                                           dtype=dtype)  # fmt: skip
    official.load_state_dict(ours.state_dict())
    return ours, official


def inputs(hw, device, dtype, seed=0):
    """queries, their positions, the memory map [B, N, E] and its positions."""
    g = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return rand(BATCH, QUERIES, E), rand(BATCH, QUERIES, E), rand(BATCH, n, E), rand(BATCH, n, E)


def predicted_mask(hw, device) -> torch.Tensor:
    """Mask2Former's mask: each query's predicted mask (a smooth random field) < 0.5 blocked."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(BATCH, QUERIES, hw[0] // 8, hw[1] // 8, generator=g)
    field = F.interpolate(coarse, size=hw, mode="bilinear", align_corners=False)
    return (field.sigmoid() < 0.5).flatten(2).to(device)


def official_masked(official, query, query_pos, memory, memory_pos, mask):
    """(out, pos_out, scores) as the official code gets them."""
    out, weights = official(query + query_pos, memory + memory_pos, memory, need_weights=True,
                            attn_mask=mask.repeat_interleave(HEADS, 0))  # fmt: skip
    return out, torch.bmm(weights, memory_pos), weights.sum(1)


def window_partition(x: torch.Tensor, hw, size) -> torch.Tensor:
    """[B, N, C] map → [B, n, size², C] windows (row-major), copied, as the official code."""
    b, _, c = x.shape
    x = x.view(b, hw[0] // size, size, hw[1] // size, size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, -1, size * size, c)


def official_hrca(official, query, query_pos, memory, memory_pos, scores, hw, k):
    """FASeg's HRCA: sort the window scores, partition the whole map, gather, attend."""
    top = scores.sort(dim=-1, descending=True).indices[:, :k]  # [B, K]
    windows, positions = window_partition(memory, hw, WINDOW), window_partition(memory_pos, hw,
                                                                                WINDOW)  # fmt: skip
    pick = top[:, :, None, None].expand(-1, -1, WINDOW * WINDOW, E)
    keys = torch.gather(windows, 1, pick).flatten(1, 2)
    key_pos = torch.gather(positions, 1, pick).flatten(1, 2)
    return official(query + query_pos, keys + key_pos, keys)[0]


def masked_cases(hw, device) -> list[Case]:
    dtype = torch.float32
    ours, official = layers(device, dtype)
    _, official64 = layers("cpu", torch.float64)
    args = inputs(hw, device, dtype)
    args64 = [t.double().cpu() for t in args]
    mask = predicted_mask(hw, device)
    with torch.no_grad():
        truth = official_masked(official64, *args64, mask.cpu())
    n = hw[0] * hw[1]
    params = {"kind": "masked", "map": f"{hw[0]}x{hw[1]}", "keys": n, "device": device}

    def run_ours(backend):
        def run():
            with stitchops.use_backend(backend):
                r = ours(args[0], args[2], args[1], args[3], mask=mask, key_pos=args[3],
                         return_scores=True)  # fmt: skip
            return r.out, r.pos_out, r.scores

        return run

    def run_official():
        return official_masked(official, *args, mask)

    backends = ["torch", "triton", "cuda"] if device == "cuda" else ["torch"]
    return _rows(params, run_official, {b: run_ours(b) for b in backends}, truth, n,
                 ours, official)  # fmt: skip


def hrca_cases(hw, k, device) -> list[Case]:
    dtype = torch.float32
    ours, official = layers(device, dtype)
    _, official64 = layers("cpu", torch.float64)
    args = inputs(hw, device, dtype, seed=2)
    args64 = [t.double().cpu() for t in args]
    count = (hw[0] // WINDOW) * (hw[1] // WINDOW)
    scores = torch.rand(BATCH, count, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        truth = (official_hrca(official64, *args64, scores.cpu(), hw, k),)
    params = {"kind": "hrca", "map": f"{hw[0]}x{hw[1]}", "windows": k, "device": device}

    def run_ours(backend):
        def run():
            top = scores.topk(k, dim=-1).indices
            with stitchops.use_backend(backend):
                r = ours(args[0], args[2], args[1], args[3], windows=top, window_size=WINDOW,
                         map_size=hw)  # fmt: skip
            return (r.out,)

        return run

    def run_official():
        return (official_hrca(official, *args, scores, hw, k),)

    def run_project_map():
        top = scores.topk(k, dim=-1).indices
        query, query_pos, memory, memory_pos = args
        q = ours._project(query + query_pos, 0)
        keys, values = ours._project(memory + memory_pos, 1), ours._project(memory, 2)
        with stitchops.use_backend("torch"):
            r = stitchops.focus_attention(q, keys, values, windows=top, window_size=WINDOW,
                                          map_size=hw)  # fmt: skip
        return (ours.out_proj(r.out.transpose(1, 2).reshape(BATCH, QUERIES, E)),)

    backends = ["torch", "triton", "cuda"] if device == "cuda" else ["torch"]
    impls = {**{b: run_ours(b) for b in backends}, "torch_project_map": run_project_map}
    return _rows(params, run_official, impls, truth, k * WINDOW**2,
                 ours, official)  # fmt: skip


def _rows(params, official, ours: dict, truth, keys, our_layer, official_layer) -> list[Case]:
    """A forward row and a forward + backward row for the same implementations."""
    flops = 4 * BATCH * QUERIES * keys * E + 2 * BATCH * (2 * QUERIES + 2 * keys) * E * E

    def check(fn):
        return lambda: runner.relative_error([t.cpu() for t in fn()], list(truth), 1e-3)

    def trained(fn, layer):
        def run():
            loss = sum(t.float().square().mean() for t in fn()[:2])
            loss.backward()
            layer.zero_grad(set_to_none=True)

        return run

    def forward_only(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    forward = {name: Impl(forward_only(fn), check(fn))
               for name, fn in {"official": official, **ours}.items()}  # fmt: skip
    train = {
        "official": Impl(trained(official, official_layer), None),
        **{name: Impl(trained(fn, our_layer), None) for name, fn in ours.items()},
    }
    return [Case({**params, "work": "forward"}, forward, baseline="official", flops=flops,
                 dtype="float32", peak_memory=True),
            Case({**params, "work": "train"}, train, baseline="official", flops=3 * flops,
                 dtype="float32", peak_memory=True)]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = args.device
    factories = [*(lambda hw=hw: masked_cases(hw, device) for hw in MASKED),
                 *(lambda hw=hw, k=k: hrca_cases(hw, k, device) for hw, k in HRCA)]  # fmt: skip
    runner.run("focus_attention", factories, args.device, 500.0, save=not args.no_save)
    return 0


def test_focus_attention(benchmark):
    ours, _ = layers("cpu", torch.float32)
    query, query_pos, memory, memory_pos = inputs((32, 32), "cpu", torch.float32)
    benchmark(lambda: ours(query, memory, query_pos, memory_pos, key_pos=memory_pos))


if __name__ == "__main__":
    sys.exit(main())
