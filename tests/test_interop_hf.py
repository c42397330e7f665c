"""Specification of seqlab.interop (Hugging Face checkpoints): for each supported transformers architecture a tiny
randomly initialised model saved with save_pretrained loads into seqlab with the same logits (fp32, 1e-4), the same
logits for packed documents as for separate runs, the same 32 greedy tokens, and writes back (to_hf) a checkpoint
transformers loads with the same logits. Config fields seqlab cannot represent are refused by name; `seqlab convert`
works both ways; `seqlab generate --tokenizer` reads a local tokenizer.json. Nothing downloads."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seqlab  # noqa: E402
from seqlab.cli import main  # noqa: E402
from seqlab.errors import CheckpointError, ConfigError  # noqa: E402
from seqlab.interop import SUPPORTED_ARCHITECTURES, HFTokenizer, config_from_hf, from_hf, to_hf  # noqa: E402
from seqlab.models.language_model import LanguageModel  # noqa: E402
from seqlab.models.presets import from_preset  # noqa: E402

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 96
ATOL = 1e-4  # fp32; logits are O(1) after _randomize


def _groups(module: str, norm_class: str) -> int:
    """SSM groups for a Mamba-2 layer's test config: 2, or 1 where the installed transformers normalises the gated
    RMSNorm over all groups at once (its norm then takes no group size; mamba_ssm and seqlab normalise each group, as
    later transformers releases do), so that the comparison tests the mapping rather than that difference."""
    import importlib
    import inspect

    norm = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), norm_class, None)
    grouped = norm is not None and "group_size" in inspect.signature(norm.__init__).parameters
    return 2 if grouped else 1


def _configs() -> dict:
    T = transformers
    common = dict(vocab_size=VOCAB, hidden_size=32)
    return {
        "mamba": T.MambaConfig(**common, state_size=8, num_hidden_layers=2),
        "falcon_mamba": T.FalconMambaConfig(**common, state_size=8, num_hidden_layers=2, tie_word_embeddings=False),
        "mamba2": T.Mamba2Config(
            **common, state_size=8, num_hidden_layers=2, num_heads=4, head_dim=16,
            n_groups=_groups("mamba2", "MambaRMSNormGated"), chunk_size=8,
        ),
        "llama": T.LlamaConfig(
            **common, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        ),
        "jamba": T.JambaConfig(
            **common, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2, mamba_d_state=8,
            use_mamba_kernels=False,
        ),
        "bamba": T.BambaConfig(
            **common, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            attn_layer_indices=[1], mamba_n_heads=4, mamba_d_state=8,
            mamba_n_groups=_groups("bamba", "BambaRMSNormGated"), mamba_chunk_size=8,
        ),
    }


ARCHS = list(_configs())


def _randomize(model, seed: int) -> None:
    """Every parameter away from its init (norm scales, D, conv biases included) so that each mapped tensor
    matters; scales keep logits O(1) and step sizes in the usual range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(1 + 7 * torch.rand(p.shape, generator=g)))
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                p.copy_(-1 - 4 * torch.rand(p.shape, generator=g))  # softplus -> dt in ~(0.007, 0.3)
            elif p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """arch -> (directory written by save_pretrained, the transformers model in eval mode)."""
    out = {}
    for i, (name, config) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        _randomize(model, seed=100 + i)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = (directory, model)
    return out


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _seqlab_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs)[..., : model.config.vocab_size]


# ------------------------------------------------------------------------------------------ import, forward


def test_supported_architectures_are_the_seven_families():
    assert set(SUPPORTED_ARCHITECTURES) == {
        "MambaForCausalLM", "FalconMambaForCausalLM", "Mamba2ForCausalLM", "LlamaForCausalLM", "JambaForCausalLM",
        "BambaForCausalLM", "RecurrentGemmaForCausalLM",
    }


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("mamba", dict(pattern="M", d_state=8, dt_rank=2, expand=2, tie_embeddings=True, bcdt_norm=False)),
        ("falcon_mamba", dict(bcdt_norm=True, bcdt_norm_weight=False, bcdt_norm_eps=1e-6, norm_eps=1e-5,
                              tie_embeddings=False)),
        ("mamba2", dict(pattern="M2", ssd_d_state=8, ssd_headdim=16, ssd_ngroups=_groups("mamba2", "MambaRMSNormGated"),
                        ssd_chunk_size=8)),
        ("llama", dict(pattern="A", mlp="swiglu", d_ff=64, n_heads=4, n_kv_heads=2, rope_theta=500.0,
                       rope_fraction=1.0, norm_eps=1e-6)),
        ("jamba", dict(pattern="MMAM", mlp="moe", moe_every=2, n_experts=4, moe_top_k=2, moe_renormalize=False,
                       rope_fraction=0.0, bcdt_norm=True, bcdt_norm_weight=True, d_ff=48)),
        ("bamba", dict(pattern="M2 A M2", mlp="swiglu", rope_fraction=0.5, ssd_headdim=16,
                       ssd_ngroups=_groups("bamba", "BambaRMSNormGated"))),
    ],
)
def test_config_fields_are_mapped_explicitly(hf_models, arch, expected):
    config = config_from_hf(hf_models[arch][0])
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.vocab_size, config.d_model, config.pad_vocab_to_multiple) == (VOCAB, 32, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(hf_models, arch):
    directory, hf = hf_models[arch]
    model = from_hf(directory).eval()
    assert model.config.vocab_size_padded == VOCAB
    ids = _ids(2, 21, seed=1)
    expected = _hf_logits(hf, ids)
    assert expected.std() > 0.3  # the comparison is not vacuous
    torch.testing.assert_close(_seqlab_logits(model, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_match_separate_transformers_runs(hf_models, arch):
    directory, hf = hf_models[arch]
    model = LanguageModel.from_hf(directory).eval()
    lengths = [5, 11, 7]
    docs = [_ids(1, n, seed=10 + j) for j, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)  # (1, 23): three documents in one row, no padding
    seq_idx = torch.cat([torch.full((1, n), j) for j, n in enumerate(lengths)], dim=1)
    expected = torch.cat([_hf_logits(hf, d) for d in docs], dim=1)
    torch.testing.assert_close(_seqlab_logits(model, packed, seq_idx=seq_idx), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_transformers_token_by_token(hf_models, arch):
    directory, hf = hf_models[arch]
    model = from_hf(directory).eval()
    prompt = _ids(1, 6, seed=3)
    ours = seqlab.generate(model, prompt, max_new_tokens=32, temperature=0)
    hf.generation_config.eos_token_id = None  # never stop early, never mask a token
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
    assert theirs.shape == (1, 38)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_to_hf_gives_the_same_logits_in_transformers(hf_models, arch, tmp_path):
    directory, hf = hf_models[arch]
    model = from_hf(directory)
    model.to_hf(tmp_path / "again")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(reloaded) is type(hf)
    ids = _ids(2, 13, seed=4)
    torch.testing.assert_close(_hf_logits(reloaded, ids), _hf_logits(hf, ids), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ seqlab -> transformers


@pytest.mark.parametrize(
    ("preset", "overrides", "arch"),
    [
        ("mamba", {}, "MambaForCausalLM"),
        ("falcon-mamba", {}, "FalconMambaForCausalLM"),
        ("mamba2", {}, "Mamba2ForCausalLM"),
        ("transformer", {"n_kv_heads": 1}, "LlamaForCausalLM"),
        ("jamba", {"rope_fraction": 0.0, "bcdt_norm": True, "bcdt_norm_weight": True, "moe_renormalize": False},
         "JambaForCausalLM"),
        ("hybrid", {"pattern": "M2 A", "mlp": "swiglu", "rope_fraction": 0.5}, "BambaForCausalLM"),
    ],
)
def test_seqlab_models_written_with_to_hf_give_the_same_logits_in_transformers(preset, overrides, arch, tmp_path):
    torch.manual_seed(0)
    model = from_preset(preset, "tiny", **overrides).eval()
    _randomize(model, seed=7)
    assert model.config.vocab_size_padded > model.config.vocab_size  # padding rows are dropped on export
    to_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_hf_logits(hf, ids), _seqlab_logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("preset", "overrides", "field"),
    [
        ("jamba", {}, "rope_fraction"),  # seqlab's jamba preset uses RoPE; JambaForCausalLM has none
        ("zamba", {}, "shared_attention_every"),
        ("s4", {}, "pattern"),
        ("transformer", {"attn_window": 4}, "attn_window"),
    ],
)
def test_export_refuses_models_transformers_cannot_hold(preset, overrides, field, tmp_path):
    model = from_preset(preset, "tiny", **overrides)
    with pytest.raises(ConfigError, match=field):
        to_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_to_an_unknown_architecture_lists_the_supported_ones(tmp_path):
    with pytest.raises(ConfigError, match="MambaForCausalLM"):
        to_hf(from_preset("mamba", "tiny"), tmp_path / "hf", arch="GPT2LMHeadModel")


# ------------------------------------------------------------------------------------------ refusals, files


def _edited_copy(src, dst, **fields):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(fields)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("arch", "fields", "named"),
    [
        ("mamba", {"hidden_act": "gelu"}, "hidden_act"),
        ("mamba", {"intermediate_size": 80}, "intermediate_size"),
        ("mamba2", {"time_step_limit": [0.0, 0.1]}, "time_step_limit"),
        ("bamba", {"time_step_limit": [0.001, 0.1]}, "time_step_limit"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters"),
        ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        ("llama", {"head_dim": 16}, "head_dim"),
        ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "rope_parameters"),
        ("jamba", {"expert_layer_offset": 0}, "expert_layer_offset"),
        ("jamba", {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_config_fields_are_refused_by_name(hf_models, arch, fields, named, tmp_path):
    directory = _edited_copy(hf_models[arch][0], tmp_path / arch, **fields)
    with pytest.raises(ConfigError, match=named):
        config_from_hf(directory)
    with pytest.raises(ConfigError, match=named):
        from_hf(directory)


def test_unsupported_architecture_is_refused_with_the_supported_list(hf_models, tmp_path):
    directory = _edited_copy(hf_models["llama"][0], tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="GPT2LMHeadModel") as err:
        from_hf(directory)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


def test_weights_that_contradict_the_config_are_refused(hf_models, tmp_path):
    directory = _edited_copy(hf_models["mamba"][0], tmp_path / "nobias", use_conv_bias=False)
    with pytest.raises(CheckpointError, match="conv1d.bias"):
        from_hf(directory)
    directory = _edited_copy(hf_models["mamba"][0], tmp_path / "wide", state_size=16)
    with pytest.raises(CheckpointError, match="x_proj.weight.* has shape"):
        from_hf(directory)


def test_missing_directory_and_missing_weights_are_clear_errors(hf_models, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_hf(tmp_path / "nowhere")
    directory = tmp_path / "config_only"
    directory.mkdir()
    shutil.copyfile(hf_models["mamba"][0] / "config.json", directory / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(directory)


def test_sharded_safetensors_and_pytorch_bin_load_the_same_weights(hf_models, tmp_path):
    _, hf = hf_models["mamba2"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = _ids(1, 9, seed=6)
    expected = _hf_logits(hf, ids)
    torch.testing.assert_close(_seqlab_logits(from_hf(tmp_path / "sharded"), ids), expected, atol=ATOL, rtol=0)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copyfile(hf_models["mamba2"][0] / "config.json", bin_dir / "config.json")
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, bin_dir / "pytorch_model.bin")
    torch.testing.assert_close(_seqlab_logits(from_hf(bin_dir), ids), expected, atol=ATOL, rtol=0)


def test_fused_expert_layout_loads_like_the_per_expert_one(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _edited_copy(hf_models["jamba"][0], tmp_path / "fused")
    tensors = load_file(directory / "model.safetensors")
    for prefix in sorted({k.split("experts.")[0] for k in tensors if ".experts." in k}):
        n = 4
        gate_up = [torch.cat([tensors.pop(f"{prefix}experts.{e}.{w}_proj.weight") for w in ("gate", "up")]) for e in
                   range(n)]
        down = [tensors.pop(f"{prefix}experts.{e}.down_proj.weight") for e in range(n)]
        tensors[f"{prefix}experts.gate_up_proj"] = torch.stack(gate_up)  # (E, 2F, d)
        tensors[f"{prefix}experts.down_proj"] = torch.stack(down)  # (E, d, F)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    ids = _ids(1, 9, seed=8)
    torch.testing.assert_close(
        _seqlab_logits(from_hf(directory), ids), _hf_logits(hf_models["jamba"][1], ids), atol=ATOL, rtol=0
    )


# ------------------------------------------------------------------------------------------ command line


def test_convert_command_both_directions(hf_models, tmp_path, capsys):
    directory, hf = hf_models["falcon_mamba"]
    assert main(["convert", "--from-hf", str(directory), "--out", str(tmp_path / "ckpt")]) == 0
    model = LanguageModel.load(tmp_path / "ckpt")
    ids = _ids(2, 10, seed=9)
    torch.testing.assert_close(_seqlab_logits(model, ids), _hf_logits(hf, ids), atol=ATOL, rtol=0)

    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(again).__name__ == "FalconMambaForCausalLM"
    torch.testing.assert_close(_hf_logits(again, ids), _hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_convert_command_errors_name_the_problem(hf_models, tmp_path, capsys):
    assert main(["convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    gpt2 = _edited_copy(hf_models["llama"][0], tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    assert main(["convert", "--from-hf", str(gpt2), "--out", str(tmp_path / "o")]) == 2
    assert "LlamaForCausalLM" in capsys.readouterr().err
    from_preset("s4", "tiny").save(tmp_path / "s4")
    assert main(["convert", "--to-hf", str(tmp_path / "s4"), "--out", str(tmp_path / "o")]) == 2
    assert "supported architectures" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ tokenizer


def _word_tokenizer(directory) -> list[str]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    return words


def test_local_tokenizer_encodes_decodes_and_finds_its_specials(tmp_path):
    words = _word_tokenizer(tmp_path)
    tok = HFTokenizer(tmp_path)
    assert tok.encode("the cat sat") == [words.index("the"), words.index("cat"), words.index("sat")]
    assert tok.decode(tok.encode("the cat sat on a mat")) == "the cat sat on a mat"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, len(words))
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in tok.encode("hello world")) + stream.flush() == "hello world"
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        HFTokenizer(tmp_path / "nowhere")


def test_tokenizer_ids_with_gaps_span_the_largest_id(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 3, "b": 7}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    assert HFTokenizer(tmp_path).vocab_size == 8


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model = from_preset("mamba", "tiny", vocab_size=32)
    to_hf(model, "~/exported")
    assert (tmp_path / "exported" / "config.json").is_file()
    assert torch.equal(from_hf("~/exported").embedding.weight, model.embedding.weight)
    _word_tokenizer(tmp_path)
    assert HFTokenizer("~").vocab_size == 12


def test_generate_command_with_a_local_tokenizer(hf_models, tmp_path, capsys):
    directory, _ = hf_models["llama"]
    _word_tokenizer(tmp_path)
    argv = ["generate", "--checkpoint", str(directory), "--tokenizer", str(tmp_path), "--prompt", "the cat",
            "--max-new-tokens", "6", "--temperature", "0", "--no-stop"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tok = HFTokenizer(tmp_path)
    ids = seqlab.generate(from_hf(directory), [tok.encode("the cat")], max_new_tokens=6, temperature=0)[0]
    assert printed == tok.decode(ids) + "\n"
    assert printed.startswith("the cat")


def test_half_precision_checkpoints_load_as_float32_parameters(hf_models, tmp_path):
    _, hf = hf_models["mamba"]
    half = transformers.AutoModelForCausalLM.from_pretrained(hf_models["mamba"][0], dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    model = from_hf(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    expected = half.backbone.layers[1].mixer.x_proj.weight.float()
    assert torch.equal(model.layers[1].mixer.x_proj.weight, expected)
