"""Tensor parallelism with DTensor (``torch.distributed.tensor.parallel.parallelize_module``), Megatron-style:

    attention   q_proj, k_proj, v_proj column-wise (heads split across ranks), o_proj row-wise (all-reduce)
    SwiGLU      gate_proj, up_proj column-wise (d_ff split), down_proj row-wise
    MoE         every expert's SwiGLU as above; the router stays replicated (routing is identical on all ranks)

Each rank then holds n_heads / tp query heads and n_kv_heads / tp KV heads, so both must divide by the degree.
Embedding, norms and the head stay replicated; their gradients are identical on every rank (the column-wise
inputs' gradients are all-reduced by DTensor).

    Mamba-2     shard by head (``seqlab.distributed.tp_mamba``): z/x/dt rows of in_proj, conv channels, A_log,
                dt_bias, D and norm per head; out_proj row-wise; B/C per group when ngroups divides by the degree,
                else replicated; the gated norm all-reduces its sums of squares when a group spans ranks

    Mamba, S4   shard by channel (``seqlab.distributed.tp_recurrent``): Mamba-1's d_inner channels (in_proj x and
                z rows, conv, dt_proj, A_log, D; x_proj and out_proj row-wise, all-reduced), S4's d_model channels
                (kernel parameters; out_proj row-wise before the GLU)

Not sharded (a clear error names the mixer): the other recurrent families (Griffin, linear attention, RWKV, mLSTM).
Use data or context parallelism for those layers.
"""

from __future__ import annotations

from torch import nn

from seqlab.errors import ConfigError

SHARDABLE_MIXERS = ("Attention", "Mamba2", "Mamba", "S4")


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
    """Shard every attention, Mamba-2, Mamba, S4 mixer, SwiGLU and MoE expert of a ``LanguageModel`` over the 1-D
    ``mesh`` in place (a Mamba-2 / Mamba / S4 mixer is replaced by its ``*TensorParallel`` shard).

    Raises ConfigError naming the first layer whose mixer cannot be sharded, or whose head or channel count does
    not divide by the degree (checked before anything changes).
    """
    from seqlab.distributed.tp_mamba import shard_mamba2
    from seqlab.distributed.tp_recurrent import shard_mamba, shard_s4
    from seqlab.mixers.attention import Attention
    from seqlab.mixers.mamba import Mamba
    from seqlab.mixers.mamba2 import Mamba2
    from seqlab.mixers.mlp import SwiGLU
    from seqlab.mixers.s4 import S4

    # mixer class -> (what must divide by the degree, its value, the sharding function)
    channel_sharded = {
        Mamba2: lambda m: ("nheads", m.nheads, shard_mamba2),
        Mamba: lambda m: ("d_inner", m.d_inner, shard_mamba),
        S4: lambda m: ("d_model", m.d_model, shard_s4),
    }
    layers = list(getattr(model, "layers", []))
    for i, block in enumerate(layers):
        kind = type(block.mixer)
        if kind in channel_sharded:
            what, value, _ = channel_sharded[kind](block.mixer)
            _check_divisible(what, value, mesh.size(), f"layers.{i}.mixer ({kind.__name__})")
        elif not isinstance(block.mixer, Attention):
            raise ConfigError(
                f"--tp: layer {i} uses the {kind.__name__} mixer, which tensor parallelism does not shard (only "
                f"{', '.join(SHARDABLE_MIXERS)} mixers with SwiGLU/MoE channel mixers are sharded); use "
                "--parallel ddp/fsdp (data parallelism) or context parallelism for those layers"
            )
    for i, block in enumerate(layers):
        kind = type(block.mixer)
        if kind in channel_sharded:
            block.mixer = channel_sharded[kind](block.mixer)[2](block.mixer, mesh, where=f"layers.{i}.mixer")
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            shard_attention(module, mesh, where=name)
        elif isinstance(module, SwiGLU):
            shard_swiglu(module, mesh, where=name)
    return model
