"""``stitchops demo spvit``: SPViT end to end on a laptop CPU (thesis ch. 4, Table 4.1 in
small).

A ViT pretrained on the bundled digits is searched at 60% of its FLOPs (``stitchops train
--mode spvit``: every attention layer a single-path choice of skip / 1×1 conv / 3×3 conv /
MSA made of its own weights, MLP units gated, CE + λ·(F_target − F)²), its pruned model
fine-tuned, and compared with a uniform baseline at the same FLOPs: the same number of
attention heads and MLP units kept in every block (the largest by weight norm), fine-tuned
as long. Printed: accuracy, MFLOPs, parameters and latency of the dense, searched,
fine-tuned and baseline models, and the searched blocks' ops; written: ``spvit.json`` and
``spvit.png`` (each block's gate probabilities and the model's FLOPs over the search).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stitchops import spvit
from stitchops.demos.common import pyplot, table, timing_note
from stitchops.models.flops import model_flops
from stitchops.spvit.geometry import of_config
from stitchops.train.data import load_dataset
from stitchops.train.evaluate import median_latency_ms, validation_accuracy
from stitchops.train.loop import TrainConfig, load_trained, train

DESCRIPTION = "SPViT's search and fine-tuning at 60% of a digits ViT's FLOPs (runs/demo-spvit)"
OPTIONS = ("anchor_epochs", "stitch_epochs")

BACKBONE = "vit_small_test:embed_dim=64,depth=4,num_heads=4"
TARGET = 0.6
SEARCH_EPOCHS = 10
ARCH_LR = 0.02  # the gates move within a few hundred steps here (official: 5e-4 on ImageNet)


class NarrowAttention(nn.Module):
    """Multi-head attention keeping ``heads`` of its heads (the baseline's)."""

    def __init__(self, attention: nn.Module, keep: list[int]) -> None:
        super().__init__()
        dim, heads = attention.proj.in_features, attention.num_heads
        head_dim = dim // heads
        rows = torch.tensor([h * head_dim + i for h in keep for i in range(head_dim)])
        qkv_rows = torch.cat([rows + part * dim for part in range(3)])
        self.num_heads, self.head_dim = len(keep), head_dim
        self.qkv = nn.Linear(dim, 3 * len(rows))
        self.proj = nn.Linear(len(rows), dim)
        with torch.no_grad():
            self.qkv.weight.copy_(attention.qkv.weight[qkv_rows])
            self.qkv.bias.copy_(attention.qkv.bias[qkv_rows])
            self.proj.weight.copy_(attention.proj.weight[:, rows])
            self.proj.bias.copy_(attention.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class NarrowBlock(nn.Module):
    """A ViT block with fewer heads and MLP units; counts its own FLOPs (models.flops)."""

    def __init__(self, block: nn.Module, heads: list[int], units: list[int]) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = (
            block.norm1,
            NarrowAttention(block.attn, heads),
            block.norm2,
        )
        index = torch.tensor(units)
        self.fc1, self.fc2 = (
            nn.Linear(block.mlp.fc1.in_features, len(units)),
            nn.Linear(len(units), block.mlp.fc2.out_features),
        )
        with torch.no_grad():
            self.fc1.weight.copy_(block.mlp.fc1.weight[index])
            self.fc1.bias.copy_(block.mlp.fc1.bias[index])
            self.fc2.weight.copy_(block.mlp.fc2.weight[:, index])
            self.fc2.bias.copy_(block.mlp.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def flops(self, cfg, img_size=None, patch_size=None) -> int:
        g = of_config(cfg, img_size, patch_size)
        inner = self.attn.num_heads * self.attn.head_dim
        attention = 4 * g.tokens * g.dim * inner + 2 * g.tokens**2 * inner
        return 10 * g.tokens * g.dim + attention + 2 * g.tokens * g.dim * self.fc1.out_features


def uniform_baseline(model: nn.Module, target_flops: float) -> nn.Module:
    """The same heads count and MLP width in every block (the largest by weight norm), for
    ``target_flops``: heads in proportion, the MLP width then fitted to the target."""
    g = of_config(model.cfg)
    depth, ratio = len(model.blocks), target_flops / model_flops(model)
    heads = max(1, round(g.heads * ratio))
    inner = heads * g.head_dim
    per_block = (target_flops - g.embed_flops - g.tail_flops) / depth
    fixed = 10 * g.tokens * g.dim + 4 * g.tokens * g.dim * inner + 2 * g.tokens**2 * inner
    units = int(min(g.hidden, max(1, (per_block - fixed) // (2 * g.tokens * g.dim))))
    for i, block in enumerate(model.blocks):
        w = block.attn.proj.weight.view(g.dim, g.heads, g.head_dim)
        keep_heads = sorted(w.norm(dim=(0, 2)).topk(heads).indices.tolist())
        score = block.mlp.fc1.weight.norm(dim=1) * block.mlp.fc2.weight.norm(dim=0)
        keep_units = sorted(score.topk(units).indices.tolist())
        model.blocks[i] = NarrowBlock(block, keep_heads, keep_units)
    return model


def _finetune(model: nn.Module, epochs: int, lr: float, seed: int) -> None:
    """AdamW with a cosine decay on the digits (the baseline's fine-tuning, as the loop's)."""
    data = load_dataset("digits", "train", model.cfg.img_size, model.cfg.in_chans)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=64, shuffle=True, drop_last=True, generator=generator
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    total, step = epochs * len(loader), 0
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = 1e-5 + 0.5 * (lr - 1e-5) * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
    model.eval()


def _row(name: str, model: nn.Module, flops: int) -> dict:
    model.eval()
    images = torch.stack([load_dataset("digits", "val", 8, 1)[i][0] for i in range(64)])
    with torch.no_grad():
        latency = median_latency_ms(model, images, None, 10)
    return {
        "model": name,
        "accuracy": validation_accuracy(model, "digits", "cpu"),
        "mflops": flops / 1e6,
        "params": sum(p.numel() for p in model.parameters()),
        "latency_ms": latency,
    }


def _plot(gates_log: Path, target: float, path: Path) -> None:
    records = [json.loads(line) for line in gates_log.read_text().splitlines()]
    steps = [r["step"] for r in records]
    plt = pyplot()
    blocks = len(records[0]["gates"])
    fig, axes = plt.subplots(1, blocks + 1, figsize=(3.2 * (blocks + 1), 3.2))
    for b, ax in enumerate(axes[:-1]):
        for j, label in enumerate(("not skip", "3x3 over 1x1", "MSA over 3x3")):
            ax.plot(steps, [r["gates"][b][j] for r in records], label=label)
        ax.plot(steps, [r["mlp_kept"][b] for r in records], "--", label="MLP units kept")
        ax.axhline(0.5, color="grey", lw=0.6)
        ax.set_ylim(0, 1)
        ax.set_title(f"block {b}")
        ax.set_xlabel("search step")
    axes[0].set_ylabel("gate probability")
    axes[0].legend(fontsize=7, loc="lower left")
    axes[-1].plot(steps, [1e3 * r["gflops"] for r in records], label="model")
    axes[-1].axhline(target / 1e6, color="red", lw=0.8, label="target")
    axes[-1].set_title("FLOPs (deterministic gates)")
    axes[-1].set_ylabel("MFLOPs")
    axes[-1].set_xlabel("search step")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    out="runs/demo-spvit",
    anchor_epochs=30,
    stitch_epochs=15,
    progress=True,
    seed=0,
    search_epochs=SEARCH_EPOCHS,
) -> dict:
    """Run the demo (``stitch_epochs``: the fine-tuning epochs); returns its rows."""
    out, start = Path(out), time.time()
    common = dict(batch_size=64, progress=progress, seed=seed, warmup_steps=10)
    print(f"[demo spvit] pretraining {BACKBONE} on the digits", flush=True)
    dense_cfg = TrainConfig(
        mode="anchor",
        anchors=[BACKBONE],
        out=str(out / "dense"),
        epochs=anchor_epochs,
        lr=2e-3,
        **common,
    )
    pretrained = str(train(dense_cfg, overwrite=True))
    print(f"[demo spvit] SPViT: search at {TARGET:.0%} of the FLOPs, then fine-tuning", flush=True)
    options = {"target_ratio": TARGET, "search_epochs": search_epochs, "spvit_arch_lr": ARCH_LR}
    final = train(
        TrainConfig(
            mode="spvit",
            anchors=[BACKBONE],
            anchor_weights=[pretrained],
            out=str(out / "spvit"),
            epochs=stitch_epochs,
            lr=5e-4,
            mode_options=options,
            **common,
        ),
        overwrite=True,
    )
    plan = spvit.Plan.load(out / "spvit" / "search" / "plan.json")
    dense, _ = load_trained(pretrained)
    searched, _ = load_trained(out / "spvit" / "search" / "checkpoint.safetensors")
    tuned, _ = load_trained(final)
    print(
        f"[demo spvit] baseline: uniform heads and MLP units at {plan.flops / 1e6:.2f} MFLOPs",
        flush=True,
    )
    baseline = uniform_baseline(load_trained(pretrained)[0], plan.flops)
    _finetune(baseline, stitch_epochs, 5e-4, seed)
    rows = [
        _row("dense", dense, model_flops(dense)),
        _row("searched", searched, plan.flops),
        _row("fine-tuned", tuned, model_flops(tuned)),
        _row("uniform", baseline, model_flops(baseline)),
    ]
    cells = [
        (
            r["model"],
            f"{100 * r['accuracy']:.1f}%",
            f"{r['mflops']:.2f}",
            f"{r['params']:,}",
            f"{r['latency_ms']:.2f}",
        )
        for r in rows
    ]
    print(table(("model", "accuracy", "MFLOPs", "params", "ms/batch"), cells, (11, 9, 7, 8, 9)))
    print(timing_note())
    print("searched blocks:\n" + plan.table(of_config(dense.cfg)))
    _plot(out / "spvit" / "search" / "gates.jsonl", plan.dense_flops * TARGET, out / "spvit.png")
    summary = {
        "rows": rows,
        "plan": plan.to_dict(),
        "seconds": round(time.time() - start, 1),
        "plot": str(out / "spvit.png"),
    }
    (out / "spvit.json").write_text(json.dumps(summary, indent=1))
    print(
        f"[demo spvit] {summary['seconds']} s; wrote {out / 'spvit.json'} and {out / 'spvit.png'}",
        flush=True,
    )
    return summary
