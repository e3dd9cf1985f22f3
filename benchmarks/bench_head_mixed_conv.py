"""Benchmark of SPViT's head-mixed stencil (stitchops.head_mixed_conv) and its search layer.

Rows, each implementation checked against a float64 reference in the same run:

- ``stencil``: forward + backward (out, dv, dmix) of the k×k stencil at DeiT-S's search
  shape on a GPU (B 128, 14×14 patches and a class token, 6 heads, d_h 64, bf16, k 1 and
  3), at B 16 fp32 on a CPU. ``official``: the official search path, ``v @ softmax`` as a
  [B, P, D, 9] tensor, zero-padded and gathered by its 3×3 index table, summed over the taps
  (autograd's scatter-add backward; k = 1: its centre column alone). ``torch`` (the
  stitchops reference), ``triton``, ``cuda``.
- ``layer``: one search step (forward + backward) of a UnifiedAttention layer with every
  gate open (MSA chosen, the convolutions computed for the gates only) against the official
  UnifiedAttention (a materialised attention map, all three branches with gradients, three
  output projections) and a plain SDPA attention layer (the floor).

Costs (s bytes per element, P = gh·gw, N = 1 + P): the stencil's forward B·P·k²·H·D
multiply-adds, its backward twice that; at least B·N·(2·H·D + D)·s + B·N·(H·D + D)·s bytes
(v read twice, out written, G read, dv written). Peak memory per implementation too.

    python benchmarks/bench_head_mixed_conv.py [--device cpu|cuda]
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
from stitchops.nn.spvit import UnifiedAttention
from stitchops.reference import head_mixed_conv as reference

GRID, HEADS, HEAD_DIM = (14, 14), 6, 64
SHAPES = {"cuda": (128, torch.bfloat16), "cpu": (16, torch.float32)}  # batch, dtype

TARGETS = (
    *(
        Target(
            op="head_mixed_conv",
            where={"work": "stencil", "k": k, "device": "cuda"},
            implementations=("triton", "cuda"),
            bounds=(
                ("vs_baseline", "min", 5.0),
                ("memory_vs_baseline", "min", 5.0),
                ("of_roofline", "min", 0.5),
            ),
            what=f"GPU: the {k}x{k} stencil fwd+bwd >= 5x the official formulation, >= 5x "
            "less memory, >= 50% of the memory roofline (B 128, 14x14, 6 heads, bf16)",
        )
        for k in (1, 3)
    ),
    Target(
        op="head_mixed_conv",
        where={"work": "layer", "device": "cuda"},
        implementations=("stitchops",),
        bounds=(("vs_baseline", "min", 2.0), ("vs_floor", "max", 1.25)),
        what="GPU: a UnifiedAttention search step >= 2x the official layer and <= 1.25x "
        "a plain SDPA attention layer's fwd+bwd",
    ),
    Target(
        op="head_mixed_conv",
        where={"work": "stencil", "k": 3, "device": "cpu"},
        implementations=("torch",),
        bounds=(("vs_baseline", "min", 2.0), ("memory_vs_baseline", "min", 3.0)),
        what="CPU: the torch stencil fwd+bwd >= 2x the official formulation with <= 1/3 "
        "of its peak memory (B 16, 14x14, 6 heads, fp32)",
    ),
)


def conv3x3_index(gh: int, gw: int, device) -> torch.Tensor:
    """The official gather table of a 3×3 kernel on the zero-padded (gh+2)×(gw+2) map: per
    padded position, its 9 (position, tap) pairs, taps p = a + 3·c (the official code builds
    it from a ConViT attention mask's support; tests/official_spvit.py checks they agree)."""
    width = gw + 2
    rows = []
    for i in range(gh + 2):
        for j in range(width):
            for p in range(9):
                y, x = min(max(i + p % 3 - 1, 0), gh + 1), min(max(j + p // 3 - 1, 0), gw + 1)
                rows.append((y * width + x, p))
    return torch.tensor(rows, device=device)


def official_stencil(v: torch.Tensor, mixed: torch.Tensor, k: int, index) -> torch.Tensor:
    """The official search path of the stencil over the patch tokens of v [B, N, H, D]."""
    b, d = v.shape[0], v.shape[3]
    gh, gw = GRID
    new_v = (v[:, 1:].permute(0, 1, 3, 2) @ mixed).permute(0, 1, 3, 2)  # [B, P, k², D]
    if k == 1:
        return new_v[:, :, 0]
    padded = F.pad(new_v.reshape(b, gh, gw, 9, d), pad=(0, 0, 0, 0, 1, 1, 1, 1))
    gathered = padded.flatten(1, 2)[:, index[:, 0], index[:, 1]]
    return gathered.view(b, gh + 2, gw + 2, 9, d)[:, 1:-1, 1:-1].sum(3).reshape(b, gh * gw, d)


def stencil_cases(k: int, device: str) -> list[Case]:
    batch, dtype = SHAPES["cuda" if device == "cuda" else "cpu"]
    n = 1 + GRID[0] * GRID[1]
    g = torch.Generator().manual_seed(k)
    v64 = torch.randn(batch, n, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    mix64 = (torch.randn(HEADS, k * k, generator=g, dtype=torch.float64) / 1e-2).softmax(0)
    grad64 = torch.randn(batch, n, HEAD_DIM, generator=g, dtype=torch.float64)
    truth = reference.head_mixed_conv_forward(v64, mix64, *GRID, 1)
    index = conv3x3_index(*GRID, device) if k == 3 else None
    v, mix, grad = (t.to(device=device, dtype=dtype) for t in (v64, mix64, grad64))
    leaf_v, leaf_mix = v.clone().requires_grad_(), mix.clone().requires_grad_()

    def ours(backend):
        def run():
            with stitchops.use_backend(backend):
                out = stitchops.head_mixed_conv(leaf_v, leaf_mix, GRID)
                out.backward(grad)
            return out

        return run

    def official():
        out = official_stencil(leaf_v, leaf_mix, k, index)
        out.backward(grad[:, 1:])
        return torch.cat([out.new_zeros(batch, 1, HEAD_DIM), out], dim=1)

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    backends = ["torch", "triton", "cuda"] if device == "cuda" else ["torch"]
    impls = {"official": official, **{b: ours(b) for b in backends}}
    size = torch.tensor([], dtype=dtype).element_size()
    elements = batch * n * (3 * HEADS * HEAD_DIM + 2 * HEAD_DIM)
    return [
        Case(
            {
                "work": "stencil",
                "k": k,
                "batch": batch,
                "grid": f"{GRID[0]}x{GRID[1]}",
                "heads": HEADS,
                "head_dim": HEAD_DIM,
                "dtype": str(dtype).removeprefix("torch."),
                "device": device,
            },
            {
                name: Impl(
                    fn, lambda fn=fn: runner.relative_error([fn().detach().cpu()], [truth], tol)
                )
                for name, fn in impls.items()
            },
            baseline="official",
            flops=3 * batch * GRID[0] * GRID[1] * k * k * HEADS * HEAD_DIM * 2,
            min_bytes=elements * size,
            dtype=str(dtype).removeprefix("torch."),
            peak_memory=True,
        )
    ]


def official_layer(x: torch.Tensor, layer: UnifiedAttention, index) -> torch.Tensor:
    """The official UnifiedAttention search forward, every gate open (MSA chosen), all three
    branches with gradients, as its code computes them."""
    b, n, c = x.shape
    heads, hd = layer.num_heads, layer.head_dim
    w_v, b_v = layer.qkv.weight[2 * c :], layer.qkv.bias[2 * c :]
    v_weight = F.linear(x, w_v)
    v = (v_weight + b_v).reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    qk = F.linear(x, layer.qkv.weight[: 2 * c], layer.qkv.bias[: 2 * c]).reshape(b, n, 2, heads, hd)
    q, k = qk.permute(2, 0, 3, 1, 4)
    attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1)
    msa = layer.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    mixed = layer.mixing()
    patches = v_weight[:, 1:].view(b, n - 1, heads, hd)
    conv3 = official_stencil(
        torch.cat([v_weight[:, :1].view(b, 1, heads, hd), patches], 1), mixed, 3, index
    )
    conv1 = official_stencil(
        torch.cat([v_weight[:, :1].view(b, 1, heads, hd), patches], 1), mixed[:, 4:5], 1, None
    )
    w_proj = layer.proj.weight.view(c, heads, hd)
    outs = []
    for y, bn, taps in ((conv1, layer.bn_1x1, [4]), (conv3, layer.bn_3x3, list(range(9)))):
        bias = (b_v.view(heads, hd).t() @ mixed[:, taps]).sum(-1)
        y = F.relu(bn((y + bias).transpose(1, 2).reshape(b, hd, *GRID))).flatten(2).transpose(1, 2)
        proj = torch.einsum("chd,h->cd", w_proj, mixed[:, taps].sum(1))
        outs.append(torch.cat([x[:, :1], F.linear(y, proj, layer.proj.bias)], 1))
    return msa + 0 * outs[0] + 0 * outs[1]  # gates (1, 1, 1): MSA's coefficient alone is 1


def layer_cases(device: str) -> list[Case]:
    batch, dtype = SHAPES["cuda" if device == "cuda" else "cpu"]
    dim, n = HEADS * HEAD_DIM, 1 + GRID[0] * GRID[1]
    torch.manual_seed(0)
    qkv, proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
    layer = UnifiedAttention(qkv, proj, HEADS, theta=30.0).to(device=device, dtype=dtype).train()
    layer.grid, layer.generator = GRID, torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, n, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, n, dim, device=device, dtype=dtype)
    index = conv3x3_index(*GRID, device)
    with torch.no_grad():
        truth = layer.msa(x.double().float().to(dtype)).float().cpu()

    def step(fn):
        def run():
            out = fn()
            out.backward(grad)
            layer.zero_grad(set_to_none=True)
            x.grad = None
            return out

        return run

    impls = {
        "official": step(lambda: official_layer(x, layer, index)),
        "stitchops": step(lambda: layer(x)),
        "sdpa_layer": step(lambda: layer.msa(x)),
    }
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    return [
        Case(
            {
                "work": "layer",
                "batch": batch,
                "tokens": n,
                "dim": dim,
                "heads": HEADS,
                "dtype": str(dtype).removeprefix("torch."),
                "device": device,
            },
            {
                name: Impl(
                    fn,
                    (
                        lambda fn=fn: runner.relative_error(
                            [fn().detach().float().cpu()], [truth], tol
                        )
                    )
                    if name != "sdpa_layer"
                    else None,
                )
                for name, fn in impls.items()
            },
            baseline="official",
            floor="sdpa_layer",
            peak_memory=True,
        )
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = args.device
    dtype = SHAPES["cuda" if device.startswith("cuda") else "cpu"][1]
    factories = [lambda k=k: stencil_cases(k, device) for k in (3, 1)]
    factories.append(lambda: layer_cases(device))
    runner.run(
        "head_mixed_conv", factories, device, 400.0, save=not args.no_save, ceilings_for=(dtype,)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
