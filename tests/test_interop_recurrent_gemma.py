"""RecurrentGemmaForCausalLM checkpoints load into seqlab's griffin family exactly: a tiny random model built with
transformers, saved to a temporary directory and read back gives the same logits (fp32, 1e-4) and the same greedy
continuation, and writes back to the same model; what either side cannot represent is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from seqlab import generate
from seqlab.errors import ConfigError
from seqlab.interop import from_hf, to_hf
from seqlab.models.presets import from_preset

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _tiny_recurrent_gemma(directory, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    fields = dict(num_hidden_layers=4, vocab_size=VOCAB, hidden_size=32, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=1, lru_width=32, attention_window_size=6, conv1d_width=4, pad_token_id=0)
    fields.update(overrides)
    model = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(**fields)).eval()
    with torch.no_grad():  # random everything: zero biases or norm weights would hide a missing conversion
        for name, p in model.named_parameters():
            if name.endswith("recurrent_param"):
                p.uniform_(-1.0, 3.0)
            elif p.dim() == 1 or name.endswith("gate_bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("recurrent_gemma")
    return directory, _tiny_recurrent_gemma(directory)


def test_imported_recurrent_gemma_gives_transformers_logits(checkpoint):
    directory, hf = checkpoint
    model = from_hf(directory).eval()
    assert model.config.preset == "griffin" and "".join(model.config.layer_kinds()) == "GGAG"
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))  # longer than the window
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        got = model(ids)[..., :VOCAB]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_imported_recurrent_gemma_greedy_decoding_matches_transformers(checkpoint):
    directory, hf = checkpoint
    model = from_hf(directory).eval()
    prompt = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    got = generate(model, prompt, max_new_tokens=16, temperature=0)
    assert got.tolist() == expected.tolist()


def test_recurrent_gemma_decode_step_by_step_matches_the_parallel_forward(checkpoint):
    model = from_hf(checkpoint[0]).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        state = model.allocate_state(2, 12)
        steps = torch.cat([model(ids[:, t:t + 1], state=state) for t in range(12)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fields, named", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_activation="relu"), "hidden_activation"),
    (dict(block_types=["recurrent", "mlp"]), "block_types"),
    (dict(head_dim=16), "head_dim"),
])  # fmt: skip
def test_unrepresentable_recurrent_gemma_fields_are_refused_by_name(checkpoint, tmp_path, fields, named):
    directory = tmp_path / "edited"
    shutil.copytree(checkpoint[0], directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=named):
        from_hf(directory)


def test_recurrent_gemma_round_trip_through_to_hf_gives_the_same_logits_in_transformers(checkpoint, tmp_path):
    directory, hf = checkpoint
    to_hf(from_hf(directory), tmp_path / "again")  # the architecture is inferred from the config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, hf(ids, use_cache=False).logits,
                                   atol=1e-5, rtol=1e-5)


def test_griffin_preset_export_to_recurrent_gemma_names_every_difference(tmp_path):
    with pytest.raises(ConfigError, match="lru_reset_input must be True") as err:
        to_hf(from_preset("griffin", "tiny"), tmp_path / "out", arch="RecurrentGemmaForCausalLM")
    for field in ("mlp_act", "lru_heads", "embed_scale", "logit_softcap", "attn_out_bias"):
        assert field in str(err.value)
    assert not (tmp_path / "out").exists()


def test_imported_recurrent_gemma_packed_documents_equal_separate_runs(checkpoint):
    """seq_idx restarts every document exactly as a fresh sequence (RecurrentGemma's position-0 reset included)."""
    model = from_hf(checkpoint[0]).eval()
    gen = torch.Generator().manual_seed(5)
    first, second = torch.randint(0, VOCAB, (1, 7), generator=gen), torch.randint(0, VOCAB, (1, 11), generator=gen)
    seq_idx = torch.tensor([[0] * 7 + [1] * 11])
    with torch.no_grad():
        packed = model(torch.cat([first, second], dim=1), seq_idx=seq_idx)
        separate = torch.cat([model(first), model(second)], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
