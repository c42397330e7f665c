"""Tensor parallelism with DTensor (``torch.distributed.tensor.parallel.parallelize_module``), Megatron-style:

    attention   q_proj, k_proj, v_proj column-wise (heads split across ranks), o_proj row-wise (all-reduce)
    SwiGLU      gate_proj, up_proj column-wise (d_ff split), down_proj row-wise
    MoE         every expert's SwiGLU as above; the router stays replicated (routing is identical on all ranks)

Each rank then holds n_heads / tp query heads and n_kv_heads / tp KV heads, so both must divide by the degree.
Embedding, norms and the head stay replicated; their gradients are identical on every rank (the column-wise
inputs' gradients are all-reduced by DTensor).

Not sharded (a clear error names the mixer): Mamba-2, Mamba, S4 and the recurrent families. Mamba-2's in_proj is
one fused [z, xBC, dt] projection and its depthwise conv, gated norm and out_proj follow the same head/group
layout; sharding it needs each segment split per head and per group (and ngroups divisible by the degree) --
the layout is known, the sharded forward is not written yet. Use data or context parallelism for SSM layers.
"""

from __future__ import annotations

from torch import nn

from seqlab.errors import ConfigError

SHARDABLE_MIXERS = ("Attention",)


def _check_divisible(what: str, value: int, tp: int, where: str) -> None:
    if value % tp:
        raise ConfigError(f"--tp {tp}: {what} = {value} in {where} must be divisible by the tensor-parallel degree")


def shard_attention(attn: nn.Module, mesh, where: str = "attention") -> None:
    """q/k/v column-wise, o row-wise; the module then works on its local heads (n_heads / tp, n_kv_heads / tp)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    _check_divisible("n_heads", attn.n_heads, tp, where)
    _check_divisible("n_kv_heads", attn.n_kv_heads, tp, where)
    parallelize_module(attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                    "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
    attn.n_heads //= tp
    attn.n_kv_heads //= tp


def shard_swiglu(mlp: nn.Module, mesh, where: str = "mlp") -> None:
    """gate/up column-wise, down row-wise (d_ff must divide by the degree)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    _check_divisible("d_ff", mlp.d_ff, mesh.size(), where)
    parallelize_module(mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                   "down_proj": RowwiseParallel()})
    mlp.d_ff //= mesh.size()


def parallelize_model(model: nn.Module, mesh) -> nn.Module:
    """Shard every attention, SwiGLU and MoE expert of a ``LanguageModel`` over the 1-D ``mesh`` in place.

    Raises ConfigError naming the first layer whose mixer cannot be sharded (checked before anything changes).
    """
    from seqlab.mixers.attention import Attention
    from seqlab.mixers.mlp import SwiGLU

    for i, block in enumerate(getattr(model, "layers", [])):
        if not isinstance(block.mixer, Attention):
            name = type(block.mixer).__name__
            raise ConfigError(
                f"--tp: layer {i} uses the {name} mixer, which tensor parallelism does not shard (only "
                f"{', '.join(SHARDABLE_MIXERS)} mixers with SwiGLU/MoE channel mixers are sharded); use "
                "--parallel ddp/fsdp (data parallelism) or context parallelism for SSM layers"
            )
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            shard_attention(module, mesh, where=name)
        elif isinstance(module, SwiGLU):
            shard_swiglu(module, mesh, where=name)
    return model
