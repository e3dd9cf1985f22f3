"""The pruned model of a plan: real convolutions, MSAs or nothing in place of the searched
attention layers, MLPs sliced to their kept units.

``finalize(model, plan)`` turns a searched model (``stitchops.spvit.apply``) into it, the
convolution kernels made from the mixing as Eq. 4.5-4.7 (K[o, ch, a, c] = Σ_h σ[h, a+k·c]·
W_v[h·d_h + o, ch]); in eval mode it gives the searched model's logits. ``prune(model, plan)``
builds the same structure on a plain model (fresh weights: a saved pruned model then loads
into it). ``count_flops(model)`` counts a pruned model's FLOPs module by module.
"""

from __future__ import annotations

import torch
from torch import nn

from stitchops.models.flops import model_flops
from stitchops.models.vit import Attention, Mlp
from stitchops.nn.spvit import ConvAttention, UnifiedAttention, UnifiedMlp
from stitchops.spvit.geometry import attention_flops, geometry, mlp_flops, of_config
from stitchops.spvit.plan import Plan
from stitchops.spvit.search import record_grid


class PrunedBlock(nn.Module):
    """A ViT block whose attention (``attn``) or MLP (``mlp``) may be gone (None): then its
    norm and residual branch are gone too."""

    def __init__(self, block: nn.Module, attn: nn.Module | None, mlp: nn.Module | None) -> None:
        super().__init__()
        self.norm1 = block.norm1 if attn is not None else None
        self.attn, self.ls1 = attn, block.ls1 if attn is not None else None
        self.norm2 = block.norm2 if mlp is not None else None
        self.mlp, self.ls2 = mlp, block.ls2 if mlp is not None else None

    def op(self) -> str:
        """The attention's op: "skip", "conv{k}x{k}" or "msa"."""
        if self.attn is None:
            return "skip"
        if isinstance(self.attn, ConvAttention):
            k = self.attn.conv.kernel_size[0]
            return f"conv{k}x{k}"
        return "msa"

    def flops(self, cfg, img_size=None, patch_size=None) -> int:
        """This block's FLOPs at an image and patch size (``models.flops``' convention)."""
        g = of_config(cfg, img_size, patch_size)
        kept = self.mlp.fc1.out_features if self.mlp is not None else 0
        return attention_flops(g, self.op()) + int(mlp_flops(g, kept))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.ls1(self.attn(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


def _kernel(op: str) -> int:
    return int(op.removeprefix("conv").split("x")[0])


def _sliced_mlp(fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, keep: list[int]) -> Mlp:
    mlp = Mlp(fc1.in_features, len(keep), device=fc1.weight.device, dtype=fc1.weight.dtype)
    mlp.act = act
    index = torch.tensor(keep, dtype=torch.long, device=fc1.weight.device)
    with torch.no_grad():
        mlp.fc1.weight.copy_(fc1.weight[index])
        mlp.fc1.bias.copy_(fc1.bias[index])
        mlp.fc2.weight.copy_(fc2.weight[:, index])
        mlp.fc2.bias.copy_(fc2.bias)
    return mlp


def _conv_attention(unified: UnifiedAttention, k: int) -> ConvAttention:
    """The k×k convolution of a searched layer, its kernel made from the mixing."""
    p = unified.proj.weight
    conv = ConvAttention(
        unified.dim, unified.head_dim, k, unified.prefix, device=p.device, dtype=p.dtype
    )
    with torch.no_grad():
        mix, bias, proj = unified.conv_weights(k)
        w_v = unified.qkv.weight[2 * unified.dim :].view(unified.num_heads, unified.head_dim, -1)
        kernel = torch.einsum("hp,hoc->ocp", mix, w_v).view(unified.head_dim, -1, k, k)
        conv.conv.weight.copy_(kernel.transpose(2, 3))  # tap p = a + k·c: row a, column c
        conv.conv.bias.copy_(bias)
        conv.bn.load_state_dict(getattr(unified, f"bn_{k}x{k}").state_dict())
        conv.proj.weight.copy_(proj)
        conv.proj.bias.copy_(unified.proj.bias)
    return conv


def _plain_attention(unified: UnifiedAttention) -> Attention:
    """The MSA again, around the searched layer's own qkv and proj."""
    w = unified.proj.weight
    attention = Attention(
        unified.dim, unified.num_heads, unified.qkv.bias is not None, device=w.device, dtype=w.dtype
    )
    attention.qkv, attention.proj = unified.qkv, unified.proj
    return attention


def finalize(model: nn.Module, plan: Plan) -> nn.Module:
    """The pruned model of ``plan`` from a searched ``model`` (in place; returned)."""
    g = geometry(model)
    plan.check_fits(len(model.blocks), g.hidden)
    convs = []
    for i, (block, choice) in enumerate(zip(model.blocks, plan.blocks, strict=True)):
        unified, gated = block.attn, block.mlp
        if not isinstance(unified, UnifiedAttention) or not isinstance(gated, UnifiedMlp):
            raise ValueError(f"block {i} is not a searched block (stitchops.spvit.apply)")
        attn = None
        if choice.op == "msa":
            attn = _plain_attention(unified)
        elif choice.op != "skip":
            attn = _conv_attention(unified, _kernel(choice.op))
            convs.append(attn)
        mlp = None
        if choice.mlp_keep:
            mlp = _sliced_mlp(gated.fc1, gated.act, gated.fc2, choice.mlp_keep)
        model.blocks[i] = PrunedBlock(block, attn, mlp).train(model.training)
    _replace_grid_hooks(model, convs)
    return model


def prune(model: nn.Module, plan: Plan) -> nn.Module:
    """The structure of ``plan`` on a plain ``model`` (in place; returned): convolutions and
    sliced MLPs with fresh weights, for a saved pruned model to load into."""
    g = geometry(model)
    plan.check_fits(len(model.blocks), g.hidden)
    convs = []
    for i, (block, choice) in enumerate(zip(model.blocks, plan.blocks, strict=True)):
        attn = block.attn if choice.op == "msa" else None
        if choice.op not in ("msa", "skip"):
            w = block.attn.proj.weight
            attn = ConvAttention(
                g.dim, g.head_dim, _kernel(choice.op), g.prefix, device=w.device, dtype=w.dtype
            )
            convs.append(attn)
        mlp = None
        if choice.mlp_keep:
            mlp = _sliced_mlp(block.mlp.fc1, block.mlp.act, block.mlp.fc2, choice.mlp_keep)
        model.blocks[i] = PrunedBlock(block, attn, mlp).train(model.training)
    _replace_grid_hooks(model, convs)
    return model


def _replace_grid_hooks(model: nn.Module, convs: list[ConvAttention]) -> None:
    record_grid(model, convs)  # replaces the search's (its modules are gone)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every pruned convolution's BatchNorm into its kernel (eval statistics)."""
    for module in model.modules():
        if isinstance(module, ConvAttention) and isinstance(module.bn, nn.BatchNorm2d):
            module.fold_batchnorm()
    return model


def count_flops(model: nn.Module) -> int:
    """A pruned model's FLOPs per image, counted block by block from its modules: it equals
    its plan's (``models.flops.model_flops``)."""
    return model_flops(model)
