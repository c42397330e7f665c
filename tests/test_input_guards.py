"""Input guards: bad files, options and tensors fail early with a seqlab error naming the argument."""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import pickle
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import seqlab
from seqlab.errors import CheckpointError, ConfigError, InputError
from seqlab.train import CHECKPOINT_NAME, TrainConfig, Trainer, load_optimizer_state, optimizer_state

DCP_SINGLE_PROCESS = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
TINY = dict(d_model=16, vocab_size=16)
TASK_ARGS = dict(seqlen=16, num_kv_pairs=2, vocab_size=16)


@functools.cache
def _parser():
    from seqlab.cli import build_parser

    return build_parser()


def cli(*argv):
    """Run a verb as `seqlab` would, but let its SeqlabError propagate."""
    args = _parser().parse_args([str(a) for a in argv])
    return args._run(args)


def tiny_model():
    from seqlab.models.presets import from_preset

    torch.manual_seed(0)
    return from_preset("mamba", "tiny", **TINY)


def tiny_trainer(out_dir=None, callback=None, **overrides):
    from seqlab.tasks import make_task

    kwargs = dict(steps=2, batch_size=2, warmup_steps=1, eval_batches=1, log_every=1, device="cpu")
    kwargs.update(overrides)
    config = TrainConfig(out_dir=str(out_dir) if out_dir else None, **kwargs)
    task_spec = {"name": "mqar", "args": dict(TASK_ARGS)}
    return Trainer(tiny_model(), make_task("mqar", **TASK_ARGS), config, task_spec=task_spec, quiet=True,
                   callback=callback)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class OpensFile:
    """Unpickles into ``open(marker, 'w')``: creates the marker file as a side effect."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------ sharded (DCP) checkpoints
def save_dcp(trainer: Trainer, path: Path) -> Path:
    """The files a distributed run writes (sharded model/optimizer, trainer.json, RNG), from one process."""
    from seqlab.distributed import DistributedEnv
    from seqlab.distributed.checkpoint import save_sharded
    from seqlab.distributed.training import _gather_rng
    from seqlab.io import save_tensors, write_json

    rng = _gather_rng(trainer, DistributedEnv())

    def write(tmp: Path) -> None:
        write_json(tmp / "trainer.json", trainer._trainer_info())
        save_tensors(tmp / "trainer_state.safetensors", rng)

    return save_sharded(path, trainer.raw_model, trainer.optimizer, write)


@DCP_SINGLE_PROCESS
def test_dcp_checkpoint_round_trips_through_the_safe_reader(tmp_path):
    from seqlab.distributed.checkpoint import is_sharded_checkpoint

    first = tiny_trainer()
    first.train_step()
    first.train_step()
    path = save_dcp(first, tmp_path / CHECKPOINT_NAME)
    assert is_sharded_checkpoint(path)
    second = tiny_trainer()
    second.load_checkpoint(path)
    assert second.step == 2
    for (name, a), b in zip(first.raw_model.state_dict().items(), second.raw_model.state_dict().values()):
        assert torch.equal(a, b), name
    saved, loaded = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys()
    for index, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded["state"][index][name])), (index, name)
    assert first.train_step()["loss"] == second.train_step()["loss"]


@DCP_SINGLE_PROCESS
@pytest.mark.parametrize("reader", ["trainer", "load_sharded"])
def test_crafted_dcp_metadata_is_refused_without_running_it(tmp_path, reader):
    from seqlab.distributed.checkpoint import load_sharded

    trainer = tiny_trainer()
    trainer.train_step()
    path = save_dcp(trainer, tmp_path / CHECKPOINT_NAME)
    marker = tmp_path / "marker"
    payload = pickle.dumps(OpensFile(marker))
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(OpensFile(live))).close()
    assert live.exists()
    (path / "dcp" / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointError, match="dcp"):
        if reader == "trainer":
            tiny_trainer().load_checkpoint(path)
        else:
            load_sharded(path, tiny_model())
    assert not marker.exists()


@DCP_SINGLE_PROCESS
def test_crafted_dcp_optimizer_entry_is_refused_without_running_it(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from seqlab.distributed.checkpoint import optim_to_full_layout

    trainer = tiny_trainer()
    trainer.train_step()
    path = save_dcp(trainer, tmp_path / CHECKPOINT_NAME)
    marker = tmp_path / "marker"
    model_state, optim_state = get_state_dict(trainer.raw_model, trainer.optimizer)
    optim_to_full_layout(trainer.raw_model, optim_state)
    optim_state["param_groups"][0]["lr"] = OpensFile(marker)
    shutil.rmtree(path / "dcp")
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))
    with pytest.raises(CheckpointError, match="dcp"):
        tiny_trainer().load_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- seqlab convert
@pytest.fixture
def seqlab_checkpoint(tmp_path):
    return tiny_model().save(tmp_path / "ckpt")


@pytest.mark.parametrize("case", ["file", "holds source", "not a checkpoint"])
def test_convert_refuses_an_out_it_would_destroy(tmp_path, seqlab_checkpoint, case):
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.txt").write_text("keep")
    out = {"file": tmp_path / "notes.txt", "holds source": tmp_path, "not a checkpoint": tmp_path / "junk"}[case]
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="^--out: "):
        cli("convert", "--to-hf", seqlab_checkpoint, "--out", out)
    assert snapshot(tmp_path) == before


def test_convert_from_hf_refuses_an_out_holding_the_source(tmp_path, seqlab_checkpoint):
    hf = tmp_path / "hf"
    assert cli("convert", "--to-hf", seqlab_checkpoint, "--out", hf) == 0
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="^--out: .*holds the source"):
        cli("convert", "--from-hf", hf, "--out", tmp_path)
    assert snapshot(tmp_path) == before


def test_convert_refuses_a_run_directory_holding_the_source(tmp_path):
    run = tmp_path / "run"
    tiny_model().save(run / CHECKPOINT_NAME)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="^--out: "):
        cli("convert", "--to-hf", run, "--out", run)
    assert snapshot(tmp_path) == before


def test_convert_still_writes_a_new_an_empty_or_a_previous_output(tmp_path, seqlab_checkpoint):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", tmp_path / "new"):
        assert cli("convert", "--to-hf", seqlab_checkpoint, "--out", out) == 0
        assert (out / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- SIGTERM
@pytest.fixture
def default_signals():
    """SIGINT and SIGTERM as a plain Python process has them; the originals come back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_sigterm_and_sigint_handlers_are_installed_and_restored(default_signals):
    trainer = tiny_trainer()
    previous = trainer._install_sigint_handler()
    assert previous == {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    on_int, on_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert callable(on_term) and on_term is not signal.SIG_DFL and on_int is not signal.default_int_handler
    on_term(signal.SIGTERM, None)
    assert trainer._interrupt_requested
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is on_int
    Trainer._restore_sigint_handler(previous)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_first_ctrl_c_hands_the_next_one_back_to_python(default_signals):
    trainer = tiny_trainer()
    previous = trainer._install_sigint_handler()
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert trainer._interrupt_requested
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    Trainer._restore_sigint_handler(previous)


def test_handlers_owned_by_someone_else_are_left_alone(default_signals):
    def foreign(signum, frame):
        pass

    trainer = tiny_trainer()
    signal.signal(signal.SIGTERM, foreign)
    previous = trainer._install_sigint_handler()
    assert previous == {signal.SIGINT: signal.default_int_handler}
    assert signal.getsignal(signal.SIGTERM) is foreign
    Trainer._restore_sigint_handler(previous)
    signal.signal(signal.SIGINT, foreign)
    assert trainer._install_sigint_handler() is None
    Trainer._restore_sigint_handler(None)
    assert signal.getsignal(signal.SIGINT) is foreign and signal.getsignal(signal.SIGTERM) is foreign


def test_no_handlers_outside_the_main_thread(default_signals):
    trainer, result = tiny_trainer(), []
    thread = threading.Thread(target=lambda: result.append(trainer._install_sigint_handler()))
    thread.start()
    thread.join()
    assert result == [None]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_during_training_finishes_the_step_and_checkpoints(tmp_path, default_signals):
    def terminate(trainer, record):
        if trainer.step == 2:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "no SIGTERM handler during fit"
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(tmp_path, callback=terminate, steps=6).fit()
    info = json.loads((tmp_path / CHECKPOINT_NAME / "trainer.json").read_text())
    assert info["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------- damaged trainer checkpoints
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A `seqlab train` run of one step (no --size: the tiny default)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    task_args = [a for k, v in TASK_ARGS.items() for a in ("--task-arg", f"{k}={v}")]
    assert cli("train", "--task", "mqar", "--model", "mamba", "--steps", "1", "--batch-size", "2", *task_args,
               "--set", "d_model=16", "--out", out, "--device", "cpu", "--quiet") == 0
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def test_train_without_size_uses_tiny(trained_run):
    from seqlab.models import LanguageModel
    from seqlab.models.presets import from_preset

    loaded = LanguageModel.load(trained_run / CHECKPOINT_NAME)
    assert loaded.num_params() == from_preset("mamba", "tiny", **TINY).num_params()


def test_resume_drops_metrics_logged_after_the_checkpoint(run_copy):
    """A run killed after logging steps it never checkpointed: the resumed log reads as one run."""
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"step": 2, "loss": 9.0}) + "\n" + '{"step": 3, "lo')
    assert cli("train", "--out", run_copy, "--resume", "--steps", "2", "--quiet", "--device", "cpu") == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole
    assert [r["step"] for r in records] == [1, 1, 2, 2]  # each step: its training record and its evaluation
    assert 9.0 not in [r.get("loss") for r in records]


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(run_copy, capsys):
    before = snapshot(run_copy)
    assert cli("train", "--out", run_copy, "--resume", "--quiet", "--device", "cpu") == 0
    assert "nothing to train" in capsys.readouterr().out and snapshot(run_copy) == before


def test_a_file_given_as_a_checkpoint_is_named_as_a_file(tmp_path):
    from seqlab.models import LanguageModel

    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        LanguageModel.load(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="^--checkpoint: .* is a file"):
        cli("eval", "--checkpoint", tmp_path / "weights.bin")


def _edit_trainer_json(run: Path, edit) -> None:
    path = run / CHECKPOINT_NAME / "trainer.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


DAMAGED_TRAINER_JSON = {
    "missing task": lambda info: info.pop("task"),
    "task without name": lambda info: info.update(task={"args": {}}),
    "task args a list": lambda info: info.update(task={"name": "mqar", "args": [1]}),
    "step x": lambda info: info.update(step="x"),
    "step negative": lambda info: info.update(step=-1),
    "step float": lambda info: info.update(step=1.5),
    "train_config a list": lambda info: info.update(train_config=[1]),
    "step true": lambda info: info.update(step=True),
    "elapsed_s x": lambda info: info.update(elapsed_s="x"),
    "best_accuracy x": lambda info: info.update(best_accuracy="x"),
    "last_eval x": lambda info: info.update(last_eval="x"),
}
STORED_TASK_DAMAGE = {
    "unknown task": lambda info: info.update(task={"name": "nope", "args": {}}),
    "bad task args": lambda info: info["task"]["args"].update(seqlen="x"),
}


@pytest.mark.parametrize("damage", DAMAGED_TRAINER_JSON)
def test_damaged_trainer_json_is_a_checkpoint_error(run_copy, damage):
    _edit_trainer_json(run_copy, DAMAGED_TRAINER_JSON[damage])
    with pytest.raises(CheckpointError, match="trainer.json"):
        tiny_trainer().load_checkpoint(run_copy / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="trainer.json"):
        cli("train", "--out", run_copy, "--resume", "--quiet", "--device", "cpu")


@pytest.mark.parametrize("damage", STORED_TASK_DAMAGE)
def test_resume_of_a_stored_task_that_cannot_be_built_is_a_checkpoint_error(run_copy, damage):
    _edit_trainer_json(run_copy, STORED_TASK_DAMAGE[damage])
    with pytest.raises(CheckpointError, match="trainer.json.*task"):
        cli("train", "--out", run_copy, "--resume", "--quiet", "--device", "cpu")


@pytest.mark.parametrize("field, value", [("steps", "x"), ("lr", None), ("batch_size", [2]), ("betas", 3)])
def test_resume_with_a_bad_stored_train_config_is_a_checkpoint_error(run_copy, field, value):
    _edit_trainer_json(run_copy, lambda info: info["train_config"].update({field: value}))
    with pytest.raises(CheckpointError, match="train_config"):
        cli("train", "--out", run_copy, "--resume", "--quiet", "--device", "cpu")


def test_optimizer_tensor_of_the_wrong_shape_is_a_checkpoint_error(run_copy):
    from seqlab.io import load_tensors, save_tensors

    path = run_copy / CHECKPOINT_NAME / "optimizer.safetensors"
    tensors = load_tensors(path)
    first = next(iter(tensors))
    save_tensors(path, {**tensors, first: torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="optimizer"):
        tiny_trainer().load_checkpoint(run_copy / CHECKPOINT_NAME)


@pytest.fixture(scope="module")
def adamw_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer_state(optimizer)


@pytest.mark.parametrize("damage", [
    {"tensor": ("0.exp_avg", (2,))},
    {"tensor": ("7.exp_avg", (2,))},
    {"tensor": ("-1.exp_avg", (2,))},
    {"tensor": ("a.exp_avg", (2,))},
    {"steps": {"0": "x"}},
    {"steps": {"0": None}},
    {"steps": [1]},
    {"param_groups": []},
    {"param_groups": "x"},
])
def test_load_optimizer_state_refuses_damage(adamw_state, damage):
    model, (tensors, meta) = adamw_state
    tensors, meta = dict(tensors), dict(meta)
    if "tensor" in damage:
        key, shape = damage["tensor"]
        tensors[key] = torch.zeros(shape)
    else:
        meta.update(damage)
    with pytest.raises(CheckpointError, match="optimizer"):
        load_optimizer_state(torch.optim.AdamW(model.parameters()), tensors, meta, torch.device("cpu"))


def test_load_optimizer_state_still_loads_a_good_state(adamw_state):
    model, (tensors, meta) = adamw_state
    optimizer = torch.optim.AdamW(model.parameters())
    load_optimizer_state(optimizer, tensors, meta, torch.device("cpu"))
    assert [float(s["step"]) for s in optimizer.state.values()] == [1.0, 1.0]


# ------------------------------------------------------------------------------------------- seqlab train
@pytest.mark.parametrize("extra, named", [
    (["--model", "mamba"], "--model"),
    (["--size", "tiny"], "--size"),
    (["--task-arg", "seqlen=32"], "--task-arg"),
    (["--model", "mamba", "--size", "small"], "--model/--size"),
])
def test_resume_refuses_model_size_and_task_args(run_copy, extra, named):
    with pytest.raises(ConfigError, match=f"^{named}: "):
        cli("train", "--out", run_copy, "--resume", *extra, "--quiet", "--device", "cpu")


def test_check_output_file(tmp_path):
    from seqlab.commands.train import check_output_file

    with pytest.raises(ConfigError, match="^--json: .*directory"):
        check_output_file(tmp_path, "--json")
    check_output_file(None, "--json")
    check_output_file(tmp_path / "new" / "out.json", "--json")
    assert (tmp_path / "new").is_dir()


# ---------------------------------------------------------------------------- bench, generate, eval, memory
@pytest.fixture
def no_work(monkeypatch):
    """Any model build or measurement fails the test: the options must be refused first."""
    def started(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    for module, name in [("seqlab.bench.generate", "build_model"), ("seqlab.bench.roofline", "measure_bandwidth"),
                         ("seqlab.models.presets", "from_preset"), ("seqlab.commands.generate", "_load_model")]:
        monkeypatch.setattr(importlib.import_module(module), name, started)


@pytest.mark.parametrize("argv, named", [
    (["bench", "generate", "--models", "mamba:tiny", "--json", "{dir}"], "--json"),
    (["bench", "long-context", "--model", "mamba:tiny", "--json", "{dir}"], "--json"),
    (["bench", "scaling", "--models", "mamba:tiny", "--json", "{dir}"], "--json"),
    (["bench", "scaling", "--models", "mamba:tiny", "--plot", "{dir}"], "--plot"),
    (["bench", "scaling", "--models", "mamba:tiny", "--decode-steps", "0"], "--decode-steps"),
    (["bench", "scaling", "--models", "mamba:tiny", "--lengths", ","], "--lengths"),
    (["bench", "scaling", "--models", "mamba:tiny", "--time-limit", "0"], "--time-limit"),
    (["bench", "scaling", "--models", "mamba:tiny", "--time-limit", "nan"], "--time-limit"),
    (["bench", "long-context", "--model", "mamba:tiny,transformer:tiny"], "--model"),
    (["bench", "long-context", "--model", "nope"], "--model"),
    (["bench", "long-context", "--model", "mamba:tiny", "--compare", "mamba:huge"], "--compare"),
    (["bench", "scaling", "--models", ","], "--models"),
    (["bench", "scaling", "--models", "mamba:tiny,nope"], "--models"),
    (["bench", "generate", "--models", "mamba:tiny", "--prompt-len", "inf"], "--prompt-len"),
    (["generate", "--preset", "mamba", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "--preset", "mamba", "--prompt", "x", "--top-k", "0"], "--top-k"),
    (["generate", "--preset", "mamba", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["memory", "--model", "mamba:tiny", "--batch", "0"], "--batch"),
    (["train", "--task", "mqar", "--model", "mamba", "--seed", "-3", "--device", "cpu"], "--seed"),
    (["generate", "--preset", "mamba", "--prompt", "x", "--save-state", "{dir}"], "--save-state"),
    (["eval", "--checkpoint", "{dir}/missing", "--batch-size", "0"], "--batch-size"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, no_work, argv, named):
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    if argv[0] == "bench":
        argv += ["--device", "cpu"]
    with pytest.raises(ConfigError, match=f"^{named}: "):
        cli(*argv)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "1e400k", "infk", "nanm"])
def test_parse_count_refuses_non_finite_counts(text):
    from seqlab.bench.memory import parse_count

    with pytest.raises(ConfigError, match="^--context: "):
        parse_count(text, "--context")


def test_memory_refuses_non_finite_context():
    with pytest.raises(ConfigError, match="^--context: "):
        cli("memory", "--model", "mamba:tiny", "--context=nan")


@pytest.mark.parametrize("config", [{"d_model": "x"}, {"d_model": 64, "n_layers": "x"}, [1, 2]])
def test_memory_refuses_an_invalid_config_file(tmp_path, config):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="^--model: .*bad.json"):
        cli("memory", "--model", path)


# -------------------------------------------------------------------------------------- generation, ops
def test_generate_refuses_nan_temperature():
    ids = torch.randint(0, 16, (1, 3))
    with pytest.raises(InputError, match="^temperature: "):
        seqlab.generate(tiny_model(), ids, 2, temperature=math.nan)


def _scan_inputs():
    g = torch.Generator().manual_seed(0)
    batch, seqlen, dim, d_state = 1, 4, 3, 2
    return {
        "u": torch.randn(batch, seqlen, dim, generator=g),
        "delta": torch.randn(batch, seqlen, dim, generator=g),
        "A": -torch.rand(dim, d_state, generator=g),
        "B": torch.randn(batch, seqlen, d_state, generator=g),
        "C": torch.randn(batch, seqlen, d_state, generator=g),
        "D": torch.randn(dim, generator=g),
    }


@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D"])
def test_selective_scan_refuses_complex_tensors(name):
    from seqlab.ops import selective_scan

    kwargs = _scan_inputs()
    selective_scan(**kwargs)
    kwargs[name] = kwargs[name].to(torch.complex64)
    with pytest.raises(InputError, match=f"^{name}: expected a real floating-point tensor"):
        selective_scan(**kwargs)


def test_s4_ops_still_take_complex_A_C_and_state():
    from seqlab.ops.s4 import s4d_discretize, s4d_init, s4d_init_C, s4d_init_log_dt, s4d_kernel, s4d_step

    H = 3
    g = torch.Generator().manual_seed(0)
    A, C, log_dt = s4d_init(4, "lin", H=H), s4d_init_C(H, 2, generator=g), s4d_init_log_dt(H, generator=g)
    assert A.is_complex() and C.is_complex()
    kernel = s4d_kernel(log_dt, A, C, 5)
    assert kernel.shape == (H, 5) and not kernel.is_complex()
    dA, dB = s4d_discretize(log_dt, A)
    state = torch.zeros(2, H, 2, dtype=torch.complex64)
    y = s4d_step(state, torch.randn(2, H, generator=g), dA, dB, C, torch.randn(H, generator=g))
    assert y.shape == (2, H) and y.dtype == torch.float32
    with pytest.raises(InputError, match="^log_dt: "):
        s4d_kernel(log_dt.to(torch.complex64), A, C, 5)
    with pytest.raises(InputError, match="^u: "):
        s4d_step(state, torch.randn(2, H, dtype=torch.complex64), dA, dB, C, None)


def test_decode_linear_matches_f_linear():
    from seqlab.ops.decode_linear import decode_linear

    x, weight, bias, residual = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4), torch.randn(2, 4)
    torch.testing.assert_close(decode_linear(x, weight, bias), F.linear(x, weight, bias))
    torch.testing.assert_close(decode_linear(x, weight, bias, residual), F.linear(x, weight, bias) + residual)


@pytest.mark.parametrize("case, named", [
    ("wrong K", "x"),
    ("bias shape", "bias"),
    ("residual shape", "residual"),
    ("x dtype", "x"),
    ("x integer", "x"),
    ("weight 1-D", "weight"),
    ("weight complex", "weight"),
    ("bias dtype", "bias"),
    ("residual dtype", "residual"),
])
def test_decode_linear_names_the_bad_argument(case, named):
    from seqlab.ops.decode_linear import decode_linear

    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    kwargs = {
        "wrong K": dict(x=torch.randn(2, 6), weight=weight),
        "bias shape": dict(x=x, weight=weight, bias=torch.randn(5)),
        "residual shape": dict(x=x, weight=weight, residual=torch.randn(2, 5)),
        "x dtype": dict(x=x.double(), weight=weight),
        "x integer": dict(x=x.long(), weight=weight),
        "weight 1-D": dict(x=x, weight=torch.randn(4)),
        "weight complex": dict(x=x, weight=weight.to(torch.complex64)),
        "bias dtype": dict(x=x, weight=weight, bias=torch.randn(4).double()),
        "residual dtype": dict(x=x, weight=weight, residual=torch.randn(2, 4).double()),
    }[case]
    with pytest.raises(InputError, match=f"^decode_linear: {named}: "):
        decode_linear(**kwargs)


def test_selective_scan_reports_b_in_the_shape_it_was_given():
    from seqlab.ops import selective_scan

    u, delta, A = torch.randn(2, 8, 4), torch.rand(2, 8, 4), -torch.rand(4, 16)
    with pytest.raises(InputError, match=r"^B: .*got shape \(2, 8, 8\)$"):
        selective_scan(u, delta, A, torch.randn(2, 8, 8), torch.randn(2, 8, 8))
    with pytest.raises(InputError, match=r"^B: .*got shape \(2, 7, 16\)$"):
        selective_scan(u, delta, A, torch.randn(2, 7, 16), torch.randn(2, 7, 16))


def test_eval_of_a_task_with_more_ids_than_the_model_is_named(trained_run):
    with pytest.raises(ConfigError, match=r"^--task: mqar uses 64 token ids, the model has 16"):
        cli("eval", "--checkpoint", trained_run, "--task-arg", "vocab_size=64", "--device", "cpu")


@pytest.mark.parametrize("extra, named", [(["--max-tokens", "5"], "--max-tokens"), (["--split", "train"], "--split"),
                                          (["--tokenizer", "tok"], "--tokenizer")])
def test_eval_of_a_synthetic_task_refuses_text_options(trained_run, extra, named):
    with pytest.raises(ConfigError, match=f"^{named}: only apply to text"):
        cli("eval", "--checkpoint", trained_run, *extra, "--device", "cpu")
