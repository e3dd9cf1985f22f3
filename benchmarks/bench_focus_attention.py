"""Benchmark of stitchops.focus_attention through ``nn.FocusCrossAttention`` (FASeg).

Two kinds of rows, each implementation checked against a float64 run of the official way
in the same run, hidden 256, 8 heads (D = 32), Q = 100 queries, B = 2:

The ``official`` baselines are ziplab/FASeg's algorithm as its code writes it
(``mask2former_transformer_decoder.py``), re-implemented from a reading of it, with its
sequence-first layouts ([N, B, C] tokens, [B, C, H, W] maps, as its decoder holds them):

- ``masked``: Mask2Former's masked cross-attention with both side outputs (DFPQ's A·K_pos,
  HRCA's key scores) at the 1/8 level of a 512² image (N = 64×64) and of 1024×2048
  (N = 128×256). ``official``: ``nn.MultiheadAttention`` with its default
  ``need_weights=True`` (the unfused path, the head-averaged A [B, Q, N]), A·K_pos as FASeg
  computes it, ``(A.permute(1, 2, 0).unsqueeze(-1) * pos.unsqueeze(0)).sum(1)`` (a
  [Q, N, B, C] product), and the key scores ``A.sum(1)``; ours: ``FocusCrossAttention``
  (mask mode, ``key_pos``, ``return_scores``) on the torch backend, and the Triton and CUDA
  kernels on a GPU.
- ``hrca``: high-resolution cross-attention at the 1/4 level of 512² (128×128, n = 256
  windows of 8×8, the top K = 8) and of 1024×2048 (256×512, n = 2048, K = 64).
  ``official``: FASeg's way: sort the scores, partition the whole [B, C, H, W] map (and its
  positions) into windows (``window_partition``: ``permute(0, 2, 4, 3, 5, 1).contiguous()``),
  gather the top K, ``nn.MultiheadAttention``; ours: ``FocusCrossAttention`` with
  ``windows`` [B, K]: only the chosen windows' tokens are gathered and projected;
  ``torch_project_map``: the alternative the module could take, project the whole map,
  then ``focus_attention`` reads the windows from it.

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
    *(
        Target(
            op="focus_attention",
            where={"kind": "hrca", "map": f"{hw[0]}x{hw[1]}", "work": "forward", "device": "cpu"},
            implementations=("torch",),
            bounds=(("memory_vs_baseline", "min", 3.0),),
            what=f"CPU: HRCA window mode holds <= 1/3 of the official way's peak memory "
            f"(1/4 map {hw[0]}x{hw[1]}, K {k})",
        )
        for hw, k in HRCA
    ),
    *(
        Target(
            op="focus_attention",
            where={"kind": "hrca", "map": f"{hw[0]}x{hw[1]}", "work": "forward", "device": "cuda"},
            implementations=("triton", "cuda"),
            bounds=(("vs_baseline", "min", 5.0), ("memory_vs_baseline", "min", 10.0)),
            what=f"GPU: HRCA >= 5x faster than the official way with >= 10x less memory "
            f"(1/4 map {hw[0]}x{hw[1]}, K {k})",
        )
        for hw, k in HRCA
    ),
    *(
        Target(
            op="focus_attention",
            where={
                "kind": "masked",
                "map": f"{hw[0]}x{hw[1]}",
                "work": "forward",
                "device": "cuda",
            },
            implementations=("triton", "cuda"),
            bounds=(("vs_baseline", "min", 3.0),),
            what=f"GPU: masked attention with both side outputs >= 3x faster than the "
            f"official way (1/8 map {hw[0]}x{hw[1]})",
        )
        for hw in MASKED
    ),
)


def layers(device, dtype):
    """(ours, the official nn.MultiheadAttention, sequence first) with the same weights."""
    torch.manual_seed(0)
    ours = FocusCrossAttention(E, HEADS).to(device=device, dtype=dtype)
    official = torch.nn.MultiheadAttention(E, HEADS).to(device=device, dtype=dtype)
    official.load_state_dict(ours.state_dict())
    return ours, official


def sequence_first(args):
    """Our [B, L, E] tensors as the official decoder holds them: [L, B, E]."""
    return [t.transpose(0, 1).contiguous() for t in args]


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
    """(out [Q, B, E], pos_out [Q, B, E], scores [B, N]) as the official decoder gets them,
    sequence-first inputs (query [Q, B, E], memory [N, B, E]), mask [B·heads, Q, N]."""
    out, attn = official(query + query_pos, memory + memory_pos, memory, attn_mask=mask)
    pos_out = (attn.permute(1, 2, 0).unsqueeze(-1) * memory_pos.unsqueeze(0)).sum(1)
    return out, pos_out, attn.sum(1)


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] → [B·n, size, size, C] windows, copied, as the official code."""
    b, c, height, width = x.shape
    x = x.view(b, c, height // size, size, width // size, size)
    return x.permute(0, 2, 4, 3, 5, 1).contiguous().view(-1, size, size, c)


def official_hrca(official, query, query_pos, fg_src, fg_pos, scores, k):
    """FASeg's HRCA as written: sort the window scores, partition the whole [B, C, H, W] map
    and positions, gather the top K windows, attend (query [Q, B, E]; out [Q, B, E])."""
    bs, c = fg_src.shape[:2]
    _, indexes = scores.sort(dim=-1, descending=True)
    window_size = int((fg_src.shape[-1] * fg_src.shape[-2] // scores.shape[-1]) ** 0.5)
    src_windows = window_partition(fg_src, window_size).view(bs, -1, window_size**2, c)
    pos_windows = window_partition(fg_pos, window_size).view(bs, -1, window_size**2, c)
    pick = indexes[..., :k][..., None, None].expand(-1, -1, window_size**2, c)
    src_windows = torch.gather(src_windows, 1, pick).view(bs, -1, c).permute(1, 0, 2)
    pos_windows = torch.gather(pos_windows, 1, pick).view(bs, -1, c).permute(1, 0, 2)
    return official(query + query_pos, src_windows + pos_windows, src_windows)[0]


def as_map(tokens: torch.Tensor, hw) -> torch.Tensor:
    """[B, N, E] → [B, E, H, W], as the official decoder's 1/4 map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], E, *hw).contiguous()


def masked_cases(hw, device) -> list[Case]:
    dtype = torch.float32
    ours, official = layers(device, dtype)
    _, official64 = layers("cpu", torch.float64)
    args = inputs(hw, device, dtype)
    args64 = [t.double().cpu() for t in args]
    mask = predicted_mask(hw, device)
    heads_mask = mask.repeat_interleave(HEADS, 0)  # [B·heads, Q, N], the decoder's own
    seq, seq64 = sequence_first(args), sequence_first(args64)
    with torch.no_grad():
        out, pos_out, scores = official_masked(official64, *seq64, heads_mask.cpu())
    truth = (out.transpose(0, 1), pos_out.transpose(0, 1), scores)
    n = hw[0] * hw[1]
    params = {"kind": "masked", "map": f"{hw[0]}x{hw[1]}", "keys": n, "device": device}

    def run_ours(backend):
        def run():
            with stitchops.use_backend(backend):
                r = ours(
                    args[0],
                    args[2],
                    args[1],
                    args[3],
                    mask=mask,
                    key_pos=args[3],
                    return_scores=True,
                )
            return r.out, r.pos_out, r.scores

        return run

    def run_official():
        out, pos_out, scores = official_masked(official, *seq, heads_mask)
        return out.transpose(0, 1), pos_out.transpose(0, 1), scores

    backends = ["torch", "triton", "cuda"] if device == "cuda" else ["torch"]
    return _rows(params, run_official, {b: run_ours(b) for b in backends}, truth, n, ours, official)


def hrca_cases(hw, k, device) -> list[Case]:
    dtype = torch.float32
    ours, official = layers(device, dtype)
    _, official64 = layers("cpu", torch.float64)
    args = inputs(hw, device, dtype, seed=2)
    args64 = [t.double().cpu() for t in args]
    count = (hw[0] // WINDOW) * (hw[1] // WINDOW)
    scores = torch.rand(BATCH, count, generator=torch.Generator().manual_seed(3)).to(device)
    query, query_pos = sequence_first(args[:2])
    fg_src, fg_pos = as_map(args[2], hw), as_map(args[3], hw)
    with torch.no_grad():
        q64, p64 = sequence_first(args64[:2])
        maps64 = as_map(args64[2], hw), as_map(args64[3], hw)
        truth = (official_hrca(official64, q64, p64, *maps64, scores.cpu(), k).transpose(0, 1),)
    params = {"kind": "hrca", "map": f"{hw[0]}x{hw[1]}", "windows": k, "device": device}

    def run_ours(backend):
        def run():
            top = scores.topk(k, dim=-1).indices
            with stitchops.use_backend(backend):
                r = ours(
                    args[0], args[2], args[1], args[3], windows=top, window_size=WINDOW, map_size=hw
                )
            return (r.out,)

        return run

    def run_official():
        return (
            official_hrca(official, query, query_pos, fg_src, fg_pos, scores, k).transpose(0, 1),
        )

    def run_project_map():
        top = scores.topk(k, dim=-1).indices
        query, query_pos, memory, memory_pos = args
        q = ours._project(query + query_pos, 0)
        keys, values = ours._project(memory + memory_pos, 1), ours._project(memory, 2)
        with stitchops.use_backend("torch"):
            r = stitchops.focus_attention(
                q, keys, values, windows=top, window_size=WINDOW, map_size=hw
            )
        return (ours.out_proj(r.out.transpose(1, 2).reshape(BATCH, QUERIES, E)),)

    backends = ["torch", "triton", "cuda"] if device == "cuda" else ["torch"]
    impls = {**{b: run_ours(b) for b in backends}, "torch_project_map": run_project_map}
    return _rows(params, run_official, impls, truth, k * WINDOW**2, ours, official)


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

    forward = {
        name: Impl(forward_only(fn), check(fn))
        for name, fn in {"official": official, **ours}.items()
    }
    train = {
        "official": Impl(trained(official, official_layer), None),
        **{name: Impl(trained(fn, our_layer), None) for name, fn in ours.items()},
    }
    return [
        Case(
            {**params, "work": "forward"},
            forward,
            baseline="official",
            flops=flops,
            dtype="float32",
            peak_memory=True,
        ),
        Case(
            {**params, "work": "train"},
            train,
            baseline="official",
            flops=3 * flops,
            dtype="float32",
            peak_memory=True,
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = args.device
    factories = [
        *(lambda hw=hw: masked_cases(hw, device) for hw in MASKED),
        *(lambda hw=hw, k=k: hrca_cases(hw, k, device) for hw, k in HRCA),
    ]
    runner.run("focus_attention", factories, args.device, 500.0, save=not args.no_save)
    return 0


def test_focus_attention(benchmark):
    ours, _ = layers("cpu", torch.float32)
    query, query_pos, memory, memory_pos = inputs((32, 32), "cpu", torch.float32)
    benchmark(lambda: ours(query, memory, query_pos, memory_pos, key_pos=memory_pos))


if __name__ == "__main__":
    sys.exit(main())
