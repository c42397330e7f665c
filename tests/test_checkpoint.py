"""Specification of model checkpoints and inference-state files: a saved model gives the same logits after
loading; a saved state resumes a conversation exactly; an SSM state file does not grow with the conversation;
every damaged or mismatched file raises a CheckpointError that names it; `seqlab generate` runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import seqlab
from seqlab.cli import main
from seqlab.errors import CheckpointError
from seqlab.models import InferenceState, LanguageModel
from seqlab.models.presets import from_preset


def tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return from_preset(name, "tiny", initializer_range=0.2, **overrides).eval()


def ids_of(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("preset, overrides", [("mamba", {}), ("jamba", {}), ("zamba", {}), ("s4", {}),
                                               ("transformer", {"tie_embeddings": False})])
def test_checkpoint_round_trip_is_exact(tmp_path, preset, overrides):
    model = tiny(preset, **overrides)
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = LanguageModel.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = ids_of(2, 9, seed=1)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded.eval()(ids))
    assert (loaded.lm_head.weight is loaded.embedding.weight) == model.config.tie_embeddings


def test_saving_again_replaces_the_checkpoint(tmp_path):
    tiny("mamba", seed=0).save(tmp_path / "ckpt")
    second = tiny("mamba", seed=1)
    second.save(tmp_path / "ckpt")
    loaded = LanguageModel.load(tmp_path / "ckpt")
    assert torch.equal(loaded.embedding.weight, second.embedding.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_a_crash_between_the_two_renames_of_a_save_is_recovered(tmp_path, monkeypatch):
    """replace_dir moves the old checkpoint aside, then the new one in: a crash in between leaves neither at the
    path; recover_dir (run by resume and eval) puts the complete old one back and never takes a .tmp sibling."""
    from seqlab import io

    first = tiny("mamba", seed=0)
    first.save(tmp_path / "ckpt")
    target = tmp_path / "ckpt"

    def crash_before_the_new_version_lands(src, dst):
        if Path(dst) == target:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    real_replace = io.os.replace
    monkeypatch.setattr(io.os, "replace", crash_before_the_new_version_lands)
    with pytest.raises(KeyboardInterrupt):
        tiny("mamba", seed=1).save(tmp_path / "ckpt")
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert not (tmp_path / "ckpt").exists()
    (tmp_path / ".ckpt.tmp-half").mkdir()  # a half-written save that must not be taken
    assert io.recover_dir(tmp_path / "ckpt")
    assert torch.equal(LanguageModel.load(tmp_path / "ckpt").embedding.weight, first.embedding.weight)
    assert not io.recover_dir(tmp_path / "ckpt")  # present: nothing to do
    assert not io.recover_dir(tmp_path / "never-saved")


def test_saved_files_get_the_modes_a_plain_write_would(tmp_path):
    """Temp-file writes start owner-only; the finished checkpoint takes 0666/0777 less the umask, as config.json."""
    from seqlab import io

    tiny("mamba").save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~io._UMASK
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == 0o666 & ~io._UMASK, name


def test_missing_directory_or_files_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LanguageModel.load(tmp_path / "nowhere")
    tiny("mamba").save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LanguageModel.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        LanguageModel.load(tmp_path / "ckpt")


def test_truncated_files_raise_checkpoint_errors(tmp_path):
    tiny("mamba").save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        LanguageModel.load(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(CheckpointError, match="config.json"):
        LanguageModel.load(tmp_path / "ckpt")


def test_mismatched_shapes_and_keys_name_the_tensor(tmp_path):
    tiny("mamba").save(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "d_state": config["d_state"] * 2}))
    with pytest.raises(CheckpointError, match=r"A_log.*shape"):
        LanguageModel.load(tmp_path / "ckpt")
    config_path.write_text(json.dumps({**config, "n_layers": config["n_layers"] + 1}))
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers\.2\."):
        LanguageModel.load(tmp_path / "ckpt")
    config_path.write_text(json.dumps({**config, "flavour": "x"}))
    with pytest.raises(CheckpointError, match="flavour"):
        LanguageModel.load(tmp_path / "ckpt")


def test_checkpoints_are_never_pickles(tmp_path):
    tiny("mamba").save(tmp_path / "ckpt")
    head = (tmp_path / "ckpt" / "model.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # neither pickle nor torch zip


# ------------------------------------------------------------------------------------------ inference states


@pytest.mark.parametrize("preset", ["mamba", "mamba2", "s4", "transformer", "zamba"])
def test_resumed_conversation_continues_exactly(tmp_path, preset):
    model = tiny(preset)
    first, second = ids_of(1, 6, seed=2), ids_of(1, 4, seed=3)
    # one uninterrupted conversation: prompt, 5 replies, a new user turn, 5 replies
    state = model.allocate_state(1, 64)
    turn1 = seqlab.generate(model, first, 5, temperature=0, state=state)
    turn2 = seqlab.generate(model, second, 5, temperature=0, state=state)
    # the same, saving the state after turn 1 and resuming from the file
    state = model.allocate_state(1, 64)
    assert torch.equal(seqlab.generate(model, first, 5, temperature=0, state=state), turn1)
    state.save(tmp_path / "chat.safetensors")
    resumed = InferenceState.load(tmp_path / "chat.safetensors", model)
    assert resumed.offset == 11
    assert torch.equal(seqlab.generate(model, second, 5, temperature=0, state=resumed), turn2)
    # and the reference: the whole conversation as one greedy run over the full text
    full = torch.cat([turn1, second], dim=1)
    with torch.no_grad():
        ref = model(full)[:, -1, :259].argmax(-1)
    assert int(turn2[0, 4]) == int(ref)


@pytest.mark.parametrize("preset", ["mamba", "mamba2", "s4"])
def test_ssm_state_file_size_does_not_grow_with_the_conversation(tmp_path, preset):
    model = tiny(preset)
    sizes = []
    for length in (3, 40):
        state = model.allocate_state(1, 64)
        with torch.no_grad():
            model(ids_of(1, length, seed=4), state=state)
        state.save(tmp_path / f"s{length}.safetensors")
        sizes.append((tmp_path / f"s{length}.safetensors").stat().st_size)
    assert sizes[0] == sizes[1]


def test_kv_cache_file_holds_only_the_positions_used(tmp_path):
    model = tiny("transformer")
    sizes = []
    for length in (3, 40):
        state = model.allocate_state(1, 64)
        with torch.no_grad():
            model(ids_of(1, length, seed=4), state=state)
        state.save(tmp_path / f"s{length}.safetensors")
        sizes.append((tmp_path / f"s{length}.safetensors").stat().st_size)
    c = model.config
    grown = 37 * c.n_layers * 2 * c.d_model * 4  # 37 more positions of K and V, fp32
    assert abs((sizes[1] - sizes[0]) - grown) < 64  # up to the JSON header's length


def test_state_is_refused_by_another_model(tmp_path):
    state = tiny("mamba").allocate_state(1, 8)
    state.save(tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="another config"):
        InferenceState.load(tmp_path / "s.safetensors", tiny("mamba", d_state=4))
    with pytest.raises(CheckpointError, match="does not exist"):
        InferenceState.load(tmp_path / "missing.safetensors", tiny("mamba"))
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        InferenceState.load(tmp_path / "s.safetensors", tiny("mamba"))


def test_resuming_past_the_kv_capacity_needs_a_larger_allocation(tmp_path):
    model = tiny("transformer")
    state = model.allocate_state(1, 8)
    seqlab.generate(model, ids_of(1, 4, seed=5), 3, temperature=0, state=state)
    state.save(tmp_path / "s.safetensors")
    small = InferenceState.load(tmp_path / "s.safetensors", model)
    with pytest.raises(seqlab.errors.InputError, match="max_seqlen"):
        seqlab.generate(model, ids_of(1, 4, seed=6), 5, state=small)
    roomy = InferenceState.load(tmp_path / "s.safetensors", model, max_seqlen=32)
    out = seqlab.generate(model, ids_of(1, 4, seed=6), 5, temperature=0, state=roomy)
    assert out.shape == (1, 9)


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_generate_with_a_random_preset(capsys):
    assert main(["generate", "--preset", "mamba", "--size", "tiny", "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("hi")
    assert "5 tokens" in captured.err or "tokens in" in captured.err


def test_cli_generate_from_a_checkpoint_saves_and_resumes_state(tmp_path, capsys):
    model = from_preset("mamba2", "tiny")
    model.save(tmp_path / "ckpt")
    common = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--temperature", "0", "--max-new-tokens", "4"]
    state_file = str(tmp_path / "chat.safetensors")
    assert main([*common, "--prompt", "Hello", "--save-state", state_file]) == 0
    assert main([*common, "--prompt", " again", "--resume-state", state_file]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Hello") and out[1].startswith(" again")


def test_cli_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
