"""The trainer: schedule, parameter groups, exact resume, checkpoint format, Ctrl-C, early stop, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from seqlab.errors import CheckpointError, ConfigError
from seqlab.tasks.base import IGNORE, Batch, Task
from seqlab.train import CHECKPOINT_NAME, TrainConfig, Trainer, lr_at, parameter_groups


class DelayedCopy(Task):
    """Predict the token seen two positions earlier (scored from position 2 on)."""

    name = "delayed_copy"
    vocab_size = 8
    default_seqlen = 12

    def sample(self, batch_size, seqlen, generator):
        inputs = torch.randint(0, self.vocab_size, (batch_size, seqlen), generator=generator)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, 1:] = inputs[:, :-1]  # next-token label = input one step back, i.e. two back from the predictor
        targets[:, :1] = IGNORE
        return Batch(inputs, targets)


class TinyGRU(nn.Module):
    """(B, L) ids -> (B, L, V) logits."""

    def __init__(self, vocab=8, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.A_log = nn.Parameter(torch.zeros(4, 4))

    def forward(self, ids):
        h, _ = self.rnn(self.embed(ids))  # (B, L, d)
        return self.head(self.norm(h))  # (B, L, V)


def make_trainer(tmp_path=None, callback=None, **overrides):
    torch.manual_seed(0)
    kwargs = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, device="cpu", eval_batches=1)
    kwargs.update(overrides)
    config = TrainConfig(out_dir=str(tmp_path) if tmp_path else None, **kwargs)
    return Trainer(TinyGRU(), DelayedCopy(), config, quiet=True, callback=callback)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warmup_then_decay_to_min_ratio(schedule):
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    middle = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), "linear": 0.55, "constant": 1.0}
    assert lr_at(60, cfg) == pytest.approx(middle[schedule])
    assert lr_at(110, cfg) == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_no_weight_decay_on_norms_biases_embeddings_and_ssm_params():
    model = TinyGRU()
    model.head.weight._no_weight_decay = True
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert id(model.rnn.weight_ih_l0) in decayed
    for p in (model.embed.weight, model.norm.weight, model.head.bias, model.A_log, model.head.weight):
        assert id(p) not in decayed
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))


def test_resume_gives_bit_identical_losses(tmp_path):
    straight = make_trainer(tmp_path / "a").fit().losses

    def stop_at_3(trainer, record):
        if trainer.step == 3:
            raise KeyboardInterrupt

    first = make_trainer(tmp_path / "b", callback=stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    resumed = make_trainer(tmp_path / "b")
    torch.manual_seed(123)  # a different global RNG and fresh weights must not matter after loading
    resumed.load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    assert resumed.step == 3
    rest = resumed.fit().losses
    assert losses[:3] + rest == straight  # exact float equality


def test_checkpoint_is_safetensors_and_json_only(tmp_path):
    make_trainer(tmp_path).fit()
    ckpt = tmp_path / CHECKPOINT_NAME
    names = sorted(p.name for p in ckpt.iterdir())
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.json"} <= set(names)
    info = json.loads((ckpt / "trainer.json").read_text())
    assert info["step"] == 6 and info["train_config"]["steps"] == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "acc", "lr", "tokens_per_s", "elapsed"} <= set(train_records[0])


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.safetensors", "trainer.json"])
def test_truncated_checkpoint_raises_checkpoint_error(tmp_path, damaged):
    make_trainer(tmp_path, steps=2).fit()
    path = tmp_path / CHECKPOINT_NAME / damaged
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=damaged.split(".")[0] if damaged != "trainer.json" else "trainer"):
        make_trainer(tmp_path).load_checkpoint(tmp_path / CHECKPOINT_NAME)


def test_missing_checkpoint_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        make_trainer().load_checkpoint(tmp_path / "nowhere")


def test_ctrl_c_writes_checkpoint_at_step_boundary(tmp_path):
    def interrupt(trainer, record):
        if trainer.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, callback=interrupt).fit()
    info = json.loads((tmp_path / CHECKPOINT_NAME / "trainer.json").read_text())
    assert info["step"] == 2


def test_early_stop_at_target_accuracy():
    trainer = make_trainer(steps=400, lr=1e-2, warmup_steps=5, eval_every=10, eval_batches=2, batch_size=16,
                           target_accuracy=0.9)  # fmt: skip
    result = trainer.fit()
    assert result.stopped == "target_accuracy"
    assert result.step < 400 and result.eval["accuracy"] >= 0.9


def test_time_limit_stops_and_says_so():
    result = make_trainer(steps=10_000, max_time_s=0.2).fit()
    assert result.stopped == "time_limit" and result.step < 10_000


def test_aux_loss_is_added_to_the_loss():
    class WithAux(TinyGRU):
        def forward(self, ids):
            self.aux_loss = torch.tensor(5.0) + 0 * self.head.weight.sum()
            return super().forward(ids)

    config = TrainConfig(steps=1, batch_size=2, warmup_steps=0, device="cpu")
    torch.manual_seed(0)
    plain = Trainer(TinyGRU(), DelayedCopy(), config, quiet=True)
    torch.manual_seed(0)
    aux = Trainer(WithAux(), DelayedCopy(), config, quiet=True)
    # the reported loss is the task loss; the aux term only changes gradients (here: none, it is constant)
    assert plain.train_step()["loss"] == aux.train_step()["loss"]


@pytest.mark.parametrize(
    "field, value",
    [("schedule", "step"), ("steps", -1), ("batch_size", 0), ("lr", 0.0), ("dtype", "fp8"), ("min_lr_ratio", 2.0)],
)
def test_bad_train_config_names_the_option(field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        TrainConfig(**{field: value}).validate()


def test_progress_line_is_silent_when_not_a_tty(capsys):
    make_trainer(steps=2).fit()
    assert capsys.readouterr().err == ""


def test_evaluate_is_a_function_of_the_seed():
    from seqlab.evaluate import evaluate_model

    model = TinyGRU()
    a = evaluate_model(model, DelayedCopy(), seqlen=10, samples=8, batch_size=3, seed=5, device="cpu")
    b = evaluate_model(model, DelayedCopy(), seqlen=10, samples=8, batch_size=8, seed=5, device="cpu")
    assert a["accuracy"] == b["accuracy"] and a["samples"] == 8 and a["length"] == 10
    assert 0 <= a["exact_match"] <= a["accuracy"] <= 1


def _cli(*argv):
    from seqlab.cli import main

    return main(list(argv))



# ---------------------------------------------------------------------- the verbs, end to end on a tiny model
def test_seqlab_train_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "mqar", "--model", "mamba", "--size", "tiny", "--steps", "3", "--batch-size", "4",
            "--task-arg", "seqlen=16", "--task-arg", "num_kv_pairs=2", "--task-arg", "vocab_size=16",
            "--set", "d_model=16", "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    assert _cli(*argv) == 0
    ckpt = out / CHECKPOINT_NAME
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    from seqlab.models import LanguageModel

    assert LanguageModel.load(ckpt).config.d_model == 16
    capsys.readouterr()
    assert _cli("eval", "--checkpoint", str(out), "--lengths", "16,32", "--samples", "8", "--seed", "3",
                "--json", "--device", "cpu") == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "mqar" and [r["length"] for r in report["results"]] == [16, 32]
    assert all(0 <= r["accuracy"] <= 1 for r in report["results"])
    # --resume with more steps continues from step 3
    assert _cli("train", "--out", str(out), "--resume", "--steps", "5", "--quiet", "--device", "cpu") == 0
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "nope", "--model", "mamba"], "--task: unknown task 'nope'"),
        (["train", "--task", "mqar", "--model", "nope"], "--model: unknown preset 'nope'"),
        (["train", "--task", "mqar", "--model", "mamba", "--size", "huge"], "--size: unknown size 'huge'"),
        (["train", "--task", "mqar", "--model", "mamba", "--set", "d_model"], "--set: expected key=value"),
        (["train", "--task", "mqar", "--model", "mamba", "--steps", "-2"], "--steps"),
        (["train", "--resume", "--out", "{tmp}/none"], "--resume: no checkpoint"),
        (["train", "--task", "mqar", "--model", "mamba", "--out", "/proc/seqlab-out"], "--out"),
        (["eval", "--checkpoint", "{tmp}/missing", "--task", "mqar"], "--checkpoint"),
        (["eval", "--checkpoint", "{tmp}", "--lengths", "a,b"], "--lengths"),
    ],
)
def test_bad_arguments_fail_fast_naming_the_option(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _cli(*argv) == 2
    assert message in capsys.readouterr().err
