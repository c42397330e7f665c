"""Turn what a user names (a seqlab preset, a config.json, a public model) into an ArchSpec for the planner."""

from __future__ import annotations

from pathlib import Path

from seqlab.bench.memory import ArchSpec, public_specs
from seqlab.errors import ConfigError
from seqlab.models.config import ModelConfig

ANALYTIC_KINDS = ("A", "S", "M", "M2")


def _other_layers(config: ModelConfig, kinds: list[str]) -> tuple[int, int, int]:
    """(layers, parameters, state bytes per sequence) of the layers whose kind has no formula here, counted on
    modules built on the meta device (nothing is allocated)."""
    import torch

    from seqlab.mixers import MIXERS

    others = [i for i, kind in enumerate(kinds) if kind not in ANALYTIC_KINDS]
    params = state = 0
    with torch.device("meta"):
        for i in others:
            mixer = MIXERS[kinds[i]].from_config(config, i)
            params += sum(p.numel() for p in mixer.parameters()) + config.d_model  # + the block's pre-norm
            per_seq = mixer.state_bytes(1, 1, torch.float32)
            if mixer.state_bytes(1, 4096, torch.float32) != per_seq:
                raise ConfigError(f"memory: layer {i} ({kinds[i]!r}) has a state that grows with length; "
                                  "the planner has no formula for it")
            state += per_seq
    return len(others), params, state


def spec_from_config(config: ModelConfig, name: str | None = None) -> ArchSpec:
    """The ArchSpec of a seqlab ModelConfig: layer counts from its pattern, shapes from its fields."""
    from seqlab.mixers.mlp import default_d_ff

    kinds = config.layer_kinds()
    other_layers, other_params, other_state = _other_layers(config, kinds)
    channels = [config.channel_mixer(i) for i in range(config.n_layers)]
    k = config.shared_attention_every
    shared_uses = sum(1 for i in range(config.n_layers) if k and (i + 1) % k == 0)
    n_heads = config.n_heads
    n_kv = config.n_kv_heads or n_heads
    attn_layers = kinds.count("A")
    head_width = 2 * config.d_model if shared_uses and not attn_layers else config.d_model
    vocab = -(-config.vocab_size // config.pad_vocab_to_multiple) * config.pad_vocab_to_multiple
    return ArchSpec(
        name=name or config.preset,
        source="seqlab preset",
        d_model=config.d_model,
        n_layers=config.n_layers,
        vocab_size=vocab,
        tie_embeddings=config.tie_embeddings,
        attn_layers=attn_layers or shared_uses,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_width // n_heads,
        window=config.attn_window,
        shared_attention=bool(shared_uses and not attn_layers),
        mamba_layers=kinds.count("M"),
        d_state=config.d_state,
        expand=config.expand,
        d_conv=config.d_conv,
        dt_rank=None if config.dt_rank == "auto" else int(config.dt_rank),
        mamba2_layers=kinds.count("M2"),
        ssd_d_state=config.ssd_d_state,
        ssd_headdim=config.ssd_headdim,
        ssd_ngroups=config.ssd_ngroups,
        ssd_chunk_size=config.ssd_chunk_size,
        s4_layers=kinds.count("S"),
        s4_d_state=config.s4_d_state,
        other_layers=other_layers,
        other_params=other_params,
        other_state_bytes=other_state,
        d_ff=config.d_ff or default_d_ff(config.d_model),
        mlp_layers=channels.count("swiglu"),
        moe_layers=channels.count("moe"),
        n_experts=config.n_experts if "moe" in channels else 0,
        top_k=config.moe_top_k if "moe" in channels else 0,
    )


def resolve_spec(name: str, vocab_size: int = 50280) -> ArchSpec:
    """``name`` is a public model ("llama-3-8b"), a preset "NAME[:SIZE]" ("mamba:1.4b"), or a config.json path."""
    from seqlab.models.presets import PRESETS, preset_config

    public = public_specs()
    if name in public:
        return public[name]
    path = Path(name)
    if path.suffix == ".json" or path.is_dir():
        config_path = path / "config.json" if path.is_dir() else path
        try:
            config = ModelConfig.from_json(config_path).validate()
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"--model: {str(config_path)!r} is not a valid seqlab config ({err})") from err
        named = path.parent if path.name == "config.json" else path.with_suffix("") if path.suffix else path
        return spec_from_config(config, name=named.resolve().name)
    preset, _, size = name.partition(":")
    if preset not in PRESETS:
        raise ConfigError(
            f"--model: expected a public model ({', '.join(public)}), a seqlab preset NAME[:SIZE] "
            f"({', '.join(PRESETS)}) or a config.json path, got {name!r}"
        )
    config = preset_config(preset, size or "small", vocab_size=vocab_size)
    return spec_from_config(config, name=name)
