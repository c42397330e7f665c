"""Arena budgets: which models, at what size, on which tasks, for how many steps, tested at which lengths.

    cpu    (default) finishes in ~10 minutes on a 2-core CPU: short sequences, ~80K-parameter models, two runs
           side by side (one thread each), a per-run wall-clock cap; learning rates from a small sweep per
           family (recorded in results.json).
    gpu    one GPU, ~20 minutes: longer sequences, ~0.5-1M-parameter models, induction-heads extrapolation,
           a passkey length x depth grid.
    paper  the published settings (Mamba paper sec. 4.1, Mamba-2 App. D.1): hours to days on one GPU.
    smoke  seconds; for tests of the pipeline only (numbers mean nothing).

Models within a budget are matched on parameter count: each keeps its family's shape (layers, pattern, MoE)
and its width d_model is chosen so that its parameters land closest to the budget's ``target_params``
(see ``match_width``); the chosen shapes and counts go to results.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from seqlab.errors import ConfigError


@dataclass(frozen=True)
class ModelPlan:
    """A line-up entry: a preset and the config fields that define its shape for the budget."""

    preset: str
    size: str = "tiny"
    n_layers: int = 2
    overrides: dict = field(default_factory=dict)  # fixed fields (pattern, heads, state sizes, ...)
    widths: tuple[int, ...] = tuple(range(16, 257, 8))  # d_model candidates for matching
    ff_mult: float | None = 8 / 3  # d_ff = ff_mult * d_model rounded to 8 (smooth sizes); None: the preset's


@dataclass(frozen=True)
class TaskPlan:
    """How one task is trained and tested within a budget."""

    args: dict  # task constructor arguments (seqlen is the training length)
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_lengths: tuple[int, ...] = ()  # () -> the training length only
    depths: tuple[float, ...] = ()  # passkey: the depth axis of the length x depth grid
    eval_samples: int = 512
    eval_batch_size: int = 64
    lr_by_model: dict = field(default_factory=dict)  # per-model lr where one lr does not fit all
    target_accuracy: float | None = None  # stop a run early once test accuracy reaches this
    eval_every: int = 0


@dataclass(frozen=True)
class Budget:
    name: str
    description: str
    target_params: int
    models: dict[str, ModelPlan]
    tasks: dict[str, TaskPlan]
    default_models: tuple[str, ...]
    default_tasks: tuple[str, ...]
    run_time_s: float  # wall-clock cap per (task, model, seed) training run
    total_time_s: float  # the caps shrink so the whole arena stays under this
    device: str = "auto"
    jobs: int = 1  # runs trained side by side, one worker process each (on a GPU they share the device)
    threads_per_job: int | None = None  # CPU: torch threads per worker (None: cores // jobs)
    eval_reserve_s: float = 5.0  # per run: evaluation and checkpoint time kept out of the training cap

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- cpu
# Shapes every small line-up shares: 2 layers (Mamba paper's synthetic setting), small states.
_CPU_MODELS = {
    "transformer": ModelPlan("transformer", n_layers=2, overrides=dict(n_heads=4)),
    "s4": ModelPlan("s4", n_layers=2, overrides=dict(s4_d_state=32)),
    "mamba": ModelPlan("mamba", n_layers=2, overrides=dict(d_state=16)),
    "mamba2": ModelPlan("mamba2", n_layers=2, overrides=dict(ssd_d_state=32, ssd_headdim=16, ssd_chunk_size=32)),
    # Jamba-style: Mamba layers with one attention layer, MoE every other layer (4 layers instead of 8 on CPU,
# experts of width d_model so that 4 of them fit the parameter budget)
    "jamba": ModelPlan(
        "jamba", n_layers=4, ff_mult=1.0,
        overrides=dict(pattern="MMAM", n_heads=4, d_state=16, moe_every=2, n_experts=4, moe_top_k=2),
    ),
    # Zamba-style: Mamba backbone, one shared attention+MLP block every 2 layers
    "zamba": ModelPlan("zamba", n_layers=4, overrides=dict(n_heads=4, d_state=16, shared_attention_every=2)),
    # the newer recurrent families (not in the default line-up: the 10-minute limit holds five models);
    # RWKV counts two blocks (time mix + channel mix) per layer, Griffin needs 3 layers for its "G G A" pattern
    "linear-transformer": ModelPlan("linear-transformer", n_layers=2, overrides=dict(n_heads=4, la_chunk_size=32)),
    "rwkv6": ModelPlan("rwkv6", n_layers=4,
                       overrides=dict(rwkv_headdim=8, rwkv_lora_rank=8, rwkv_decay_rank=8, la_chunk_size=32)),
    "rwkv7": ModelPlan("rwkv7", n_layers=4, overrides=dict(rwkv_headdim=16, rwkv_lora_rank=8, rwkv_decay_rank=8,
                                                           rwkv_gate_rank=16, la_chunk_size=32)),
    "griffin": ModelPlan("griffin", n_layers=3, overrides=dict(n_heads=4, n_kv_heads=1, attn_window=32)),
    "mlstm": ModelPlan("mlstm", n_layers=2, overrides=dict(n_heads=4)),
}
NEW_FAMILIES = ("linear-transformer", "rwkv6", "rwkv7", "griffin", "mlstm")

CPU = Budget(
    name="cpu",
    description="2-core CPU, ~10 minutes: selective copying and MQAR at short lengths, ~80K-parameter models",
    target_params=80_000,
    models=_CPU_MODELS,
    tasks={
        # 8 data tokens among noise, copied in order at 8 markers; scored at the training length and at 2x
        "selective_copy": TaskPlan(args=dict(seqlen=32, n_tokens=8, vocab_size=16), steps=800, lr=3e-3,
                                   eval_lengths=(32, 64),
                                   lr_by_model={"s4": 1e-2, "mamba": 8e-3, "mamba2": 1e-2}),
        # 4 key-value pairs, then their 4 queries among random filler
        "mqar": TaskPlan(args=dict(seqlen=32, num_kv_pairs=4, vocab_size=32), steps=1600, lr=1e-3),
        "induction_heads": TaskPlan(args=dict(seqlen=64, vocab_size=16), steps=1000, lr=1e-3,
                                    eval_lengths=(64, 128, 256, 1024)),
        "passkey": TaskPlan(args=dict(seqlen=128, answer_len=2), steps=600, lr=1e-3, eval_lengths=(128, 256),
                            depths=(0.0, 0.5, 1.0), eval_samples=64),
    },
    default_models=("transformer", "s4", "mamba", "mamba2", "jamba"),
    default_tasks=("selective_copy", "mqar"),
    run_time_s=110.0,
    total_time_s=560.0,
    jobs=2,
    threads_per_job=1,
)

# ----------------------------------------------------------------------------------------------- gpu
_GPU_WIDTHS = tuple(range(32, 513, 16))
_GPU_MODELS = {
    "transformer": ModelPlan("transformer", n_layers=2, overrides=dict(n_heads=4), widths=_GPU_WIDTHS),
    "s4": ModelPlan("s4", n_layers=2, overrides=dict(s4_d_state=64), widths=_GPU_WIDTHS),
    "mamba": ModelPlan("mamba", n_layers=2, overrides=dict(d_state=16), widths=_GPU_WIDTHS),
    "mamba2": ModelPlan("mamba2", n_layers=2, overrides=dict(ssd_d_state=64, ssd_headdim=32, ssd_chunk_size=64),
                        widths=_GPU_WIDTHS),
    "jamba": ModelPlan("jamba", n_layers=8, overrides=dict(n_heads=4, d_state=16, n_experts=4, moe_top_k=2),
                       widths=_GPU_WIDTHS),
    "zamba": ModelPlan("zamba", n_layers=6, overrides=dict(n_heads=4, d_state=16, shared_attention_every=3),
                       widths=_GPU_WIDTHS),
    "linear-transformer": ModelPlan("linear-transformer", n_layers=2, overrides=dict(n_heads=4), widths=_GPU_WIDTHS),
    "rwkv6": ModelPlan("rwkv6", n_layers=4, overrides=dict(rwkv_headdim=16, rwkv_lora_rank=16, rwkv_decay_rank=16),
                       widths=_GPU_WIDTHS),
    "rwkv7": ModelPlan("rwkv7", n_layers=4, overrides=dict(rwkv_headdim=16, rwkv_lora_rank=16, rwkv_decay_rank=16,
                                                           rwkv_gate_rank=32), widths=_GPU_WIDTHS),
    "griffin": ModelPlan("griffin", n_layers=3, overrides=dict(n_heads=4, n_kv_heads=1, attn_window=128),
                         widths=_GPU_WIDTHS),
    "mlstm": ModelPlan("mlstm", n_layers=2, overrides=dict(n_heads=4), widths=_GPU_WIDTHS),
}

GPU = Budget(
    name="gpu",
    description="one GPU, ~20 minutes: longer sequences, ~0.8M-parameter models, extrapolation and passkey grids",
    target_params=800_000,
    models=_GPU_MODELS,
    tasks={
        "selective_copy": TaskPlan(args=dict(seqlen=256, n_tokens=16, vocab_size=16), steps=3000, batch_size=64,
                                   lr=2e-3, warmup_steps=200, target_accuracy=0.995, eval_every=250),
        # vocab 1024 rather than the paper's 8192: at ~0.8M parameters a 8192-token embedding leaves d_model ~80 and
        # no model learned the 32-pair task in the ~1.5K steps a run gets here (benchmarks/RESULTS.md, section 5)
        "mqar": TaskPlan(args=dict(seqlen=256, num_kv_pairs=16, vocab_size=1024), steps=3000, batch_size=64,
                         lr=3e-3, warmup_steps=200, eval_lengths=(256, 512), target_accuracy=0.995,
                         eval_every=250),
        "induction_heads": TaskPlan(args=dict(seqlen=256, vocab_size=16), steps=3000, batch_size=64, lr=1e-3,
                                    warmup_steps=200, eval_lengths=(256, 512, 1024, 4096, 16384, 65536),
                                    eval_batch_size=8, eval_samples=128),
        "passkey": TaskPlan(args=dict(seqlen=512, answer_len=5), steps=2000, batch_size=32, lr=1e-3,
                            warmup_steps=200, eval_lengths=(512, 1024, 2048, 4096), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                            eval_samples=64, eval_batch_size=16),
    },
    default_models=("transformer", "s4", "mamba", "mamba2", "jamba", "zamba", *NEW_FAMILIES),
    default_tasks=("selective_copy", "mqar", "induction_heads", "passkey"),
    run_time_s=60.0,
    # six runs share the GPU at a time (these models leave most of it idle): the whole line-up (11 models x 4
    # tasks) takes ~8 runs of 60 s + evaluation per process, well inside the 20 minutes; a shorter line-up
    # (--models) gives each run up to run_time_s
    total_time_s=1200.0,
    jobs=6,
)

# ----------------------------------------------------------------------------------------------- paper
# Mamba paper App. E.1: 2 layers, D = 64, selective copying at L = 4096 (16 tokens, vocab 16), 400K steps,
# batch 64, lr 1e-4 constant; induction heads: train at 256, test to 2^20, 100K... steps (here 50K, batch 8).
# Mamba-2 paper App. D.1 (MQAR): 2 layers, V = 8192, L = 256..1024 with L/4 pairs, d_model 32..256.
_PAPER_MODELS = {
    "transformer": ModelPlan("transformer", n_layers=2, overrides=dict(d_model=64, n_heads=2, mlp="none"),
                             widths=(64,)),
    "s4": ModelPlan("s4", n_layers=2, overrides=dict(s4_d_state=64, mlp="none"), widths=(64,)),
    "mamba": ModelPlan("mamba", n_layers=2, overrides=dict(d_state=16), widths=(64,)),
    "mamba2": ModelPlan("mamba2", n_layers=2, overrides=dict(ssd_d_state=64, ssd_headdim=32), widths=(64,)),
    "jamba": ModelPlan("jamba", n_layers=8, overrides=dict(n_heads=2, d_state=16, n_experts=4), widths=(64,)),
    "zamba": ModelPlan("zamba", n_layers=6, overrides=dict(n_heads=2, d_state=16, shared_attention_every=3),
                       widths=(64,)),
    # the newer families at the same 2-layer, D = 64 shape (RWKV: 2 layers = 4 blocks; Griffin: one "G G A" period)
    "linear-transformer": ModelPlan("linear-transformer", n_layers=2, overrides=dict(n_heads=2, mlp="none"),
                                    widths=(64,)),
    "rwkv6": ModelPlan("rwkv6", n_layers=4, overrides=dict(rwkv_headdim=32, rwkv_lora_rank=16, rwkv_decay_rank=16),
                       widths=(64,)),
    "rwkv7": ModelPlan("rwkv7", n_layers=4, overrides=dict(rwkv_headdim=32, rwkv_lora_rank=16, rwkv_decay_rank=16,
                                                           rwkv_gate_rank=32), widths=(64,)),
    "griffin": ModelPlan("griffin", n_layers=3, overrides=dict(n_heads=2, n_kv_heads=1, attn_window=1024),
                         widths=(64,)),
    "mlstm": ModelPlan("mlstm", n_layers=2, overrides=dict(n_heads=2), widths=(64,)),
}

PAPER = Budget(
    name="paper",
    description="published settings (Mamba sec. 4.1 / App. E.1, Mamba-2 App. D.1): 2 layers, D=64; days of GPU",
    target_params=0,  # widths fixed at D = 64 as published; parameters are recorded, not matched
    models=_PAPER_MODELS,
    tasks={
        "selective_copy": TaskPlan(args=dict(seqlen=4096, n_tokens=16, vocab_size=16), steps=400_000,
                                   batch_size=64, lr=1e-4, warmup_steps=0, eval_samples=1024),
        "induction_heads": TaskPlan(args=dict(seqlen=256, vocab_size=16), steps=50_000, batch_size=8, lr=1e-4,
                                    warmup_steps=0, eval_lengths=tuple(2**k for k in range(6, 21)),
                                    eval_samples=64, eval_batch_size=1),
        "mqar": TaskPlan(args=dict(seqlen=256, num_kv_pairs=64, vocab_size=8192), steps=20_000, batch_size=64,
                         lr=1e-3, eval_lengths=(256,)),
        "passkey": TaskPlan(args=dict(seqlen=4096, answer_len=5), steps=20_000, batch_size=16, lr=3e-4,
                            eval_lengths=(1024, 2048, 4096, 8192, 16384, 32768),
                            depths=(0.0, 0.25, 0.5, 0.75, 1.0), eval_samples=32, eval_batch_size=1),
    },
    default_models=("transformer", "s4", "mamba", "mamba2", "jamba", "zamba", *NEW_FAMILIES),
    default_tasks=("selective_copy", "induction_heads", "mqar"),
    run_time_s=float("inf"),
    total_time_s=float("inf"),
)

# ----------------------------------------------------------------------------------------------- smoke
SMOKE = Budget(
    name="smoke",
    description="seconds: exercises the whole pipeline on tiny models; the numbers mean nothing",
    target_params=20_000,
    models=_CPU_MODELS,
    tasks={
        "selective_copy": TaskPlan(args=dict(seqlen=16, n_tokens=2, vocab_size=6), steps=3, batch_size=4,
                                   warmup_steps=1, eval_samples=8, eval_batch_size=8),
        "mqar": TaskPlan(args=dict(seqlen=16, num_kv_pairs=2, vocab_size=16), steps=3, batch_size=4, warmup_steps=1,
                         eval_samples=8, eval_batch_size=8),
        "induction_heads": TaskPlan(args=dict(seqlen=16, vocab_size=8), steps=3, batch_size=4, warmup_steps=1,
                                    eval_lengths=(16, 32), eval_samples=8, eval_batch_size=8),
        "passkey": TaskPlan(args=dict(seqlen=96, answer_len=1), steps=2, batch_size=2, warmup_steps=1,
                            eval_lengths=(96,), depths=(0.0, 1.0), eval_samples=2, eval_batch_size=2),
    },
    default_models=("transformer", "mamba"),
    default_tasks=("selective_copy",),
    run_time_s=20.0,
    total_time_s=120.0,
)

BUDGETS: dict[str, Budget] = {b.name: b for b in (CPU, GPU, PAPER, SMOKE)}


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ConfigError(f"--budget: unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[name]


def model_config(plan: ModelPlan, d_model: int, vocab_size: int):
    """The ModelConfig of ``plan`` at width ``d_model`` for a task vocabulary."""
    from seqlab.models.presets import preset_config

    fields = {"n_layers": plan.n_layers, "vocab_size": vocab_size, **plan.overrides, "d_model": d_model}
    if plan.ff_mult is not None and "d_ff" not in plan.overrides:
        fields["d_ff"] = max(8, int(round(plan.ff_mult * d_model / 8)) * 8)
    return preset_config(plan.preset, plan.size, **fields)


def count_params(config) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (no memory, no init cost)."""
    import torch

    from seqlab.models import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(config)
    return model.num_params()


def match_width(plan: ModelPlan, target_params: int, vocab_size: int) -> tuple[int, int]:
    """(d_model, params): the candidate width whose parameter count is closest to ``target_params``.

    Widths a family cannot take (heads or head size not dividing it) are skipped.
    """
    best = None
    for width in plan.widths:
        try:
            params = count_params(model_config(plan, width, vocab_size))
        except (ConfigError, ValueError):
            continue
        gap = abs(params - target_params) if target_params else 0
        if best is None or gap < best[0]:
            best = (gap, width, params)
        if not target_params or params > 1.5 * target_params:
            break  # parameters grow with width: nothing further can be closer
    if best is None:
        raise ConfigError(f"budget: no width in {plan.widths} gives a valid {plan.preset!r} model")
    return best[1], best[2]
