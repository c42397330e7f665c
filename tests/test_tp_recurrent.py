"""Tensor parallelism of the Mamba-1 and S4 mixers (shard by channel) on 2 gloo processes over 127.0.0.1, and
resuming a tensor-parallel checkpoint at another degree.

Specs:
- one sharded Mamba mixer equals the unsharded one, forward and backward (input gradient, and the gathered full
  gradient of every parameter): plain; Jamba-style (bcdt_norm with learnable scales, projection biases) with
  packed documents; Falcon-style (weightless bcdt_norm);
- one sharded S4 mixer likewise (ZOH plain, bilinear with packed documents);
- decoding token by token (after a prefill) with the local shards' states equals the parallel forward, both mixers;
- ``state_dict()`` of a sharded mixer is the unsharded checkpoint (original names and layout) and loads back;
- a small model with the pattern "M2 M S" and SwiGLU under ``parallelize_model`` equals the unsharded model (logits
  and gathered gradients), and 2 AdamW steps with ``--tp 2`` give the parameters of one process;
- a checkpoint written at ``--tp 2`` (after 2 steps) resumes in one process (``--tp 1``): the weights equal the
  gathered ones exactly and the next step equals step 3 of the uninterrupted ``--tp 2`` run (so the resharded
  AdamW moments are right); a single-process checkpoint resumes at ``--tp 2`` and its next step equals the
  single process's; a checkpoint written by 2 data-parallel processes resumes at ``--tp 2`` exactly (weights,
  AdamW moments, and both TP ranks read data-parallel rank 0's stream);
- layers whose mixer is not sharded are refused by name; channels not divisible by the degree too.

Tolerances: float32 1e-5 absolute (sharded matmuls and all-reduced partial sums add in another order); training
2e-5 after AdamW steps at lr 1e-3; resharded checkpoints bit-exact.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_harness import WORLD, spawn_collect
from test_distributed import _check, _record

from seqlab.errors import ConfigError

TOL = 1e-5
PACKED = torch.tensor([[0] * 7 + [1] * 13, [0] * 20])


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _maxdiff(a, b) -> float:
    a = a.full_tensor() if hasattr(a, "full_tensor") else a
    return float((a.detach() - b.detach()).abs().max())


def _make(kind: str, variant: str):
    from seqlab.mixers.mamba import Mamba
    from seqlab.mixers.s4 import S4

    torch.manual_seed(21)
    if kind == "mamba":
        mixer = Mamba(16, d_state=8, d_conv=4, expand=2, dt_rank=4, **_variant_kw(variant))
        if variant == "jamba":  # non-trivial norm scales
            with torch.no_grad():
                for norm in (mixer.dt_norm, mixer.B_norm, mixer.C_norm):
                    norm.weight.uniform_(0.5, 1.5)
        return mixer
    return S4(16, d_state=8, discretization="bilinear" if variant == "bilinear" else "zoh")


def _shard(mixer):
    from seqlab.distributed.tp_recurrent import shard_mamba, shard_s4
    from seqlab.mixers.mamba import Mamba

    return (shard_mamba if isinstance(mixer, Mamba) else shard_s4)(mixer, _mesh())


def _mixer(kind: str, variant: str, packed: bool):
    """Forward, input gradient and every parameter's gathered gradient against the unsharded mixer."""
    mixer = _make(kind, variant)
    ref = copy.deepcopy(mixer)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 20, 16, generator=g)
    dy = torch.randn(2, 20, 16, generator=g)
    seq_idx = PACKED if packed else None
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref, seq_idx=seq_idx)
    (y_ref * dy).sum().backward()
    tp = _shard(mixer)
    x = x.clone().requires_grad_()
    y = tp(x, seq_idx=seq_idx)
    (y * dy).sum().backward()
    grads = tp.full_tensors({n: p.grad for n, p in tp.named_parameters()})
    refs = dict(ref.named_parameters())
    if sorted(grads) != sorted(refs):
        raise AssertionError(f"parameter names differ: {sorted(grads)} vs {sorted(refs)}")
    grad_err = max(_maxdiff(grads[n], refs[n].grad) / (1.0 + float(refs[n].grad.abs().max())) for n in refs)
    return {"y": _maxdiff(y, y_ref), "grad_x": _maxdiff(x.grad, x_ref.grad), "param_grad": grad_err}


def _decode(kind: str):
    mixer = _make(kind, "plain")
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        y_ref = mixer(x)
        tp = _shard(mixer)
        state = tp.allocate_state(2, 10)
        prefix = tp(x[:, :4], state=state)  # prefill, then one token at a time
        steps = [tp(x[:, t : t + 1], state=state) for t in range(4, 10)]
    local = state.nbytes() == tp.state_bytes(2) == mixer.state_bytes(2) // WORLD
    return {"y": _maxdiff(torch.cat([prefix, *steps], dim=1), y_ref), "state_bytes": float(not local)}


def _state_dict_roundtrip(kind: str, variant: str):
    mixer = _make(kind, variant)
    ref = {k: v.clone() for k, v in mixer.state_dict().items()}
    got = _shard(mixer).state_dict()
    err = float(sorted(got) != sorted(ref)) + max(_maxdiff(got[k], ref[k]) for k in ref)
    torch.manual_seed(99)  # a differently initialised shard, then the checkpoint loaded into it
    fresh = _shard(type(mixer)(16, d_state=8, **({"dt_rank": 4, **_variant_kw(variant)} if kind == "mamba" else {})))
    fresh.load_state_dict(ref)
    back = fresh.state_dict()
    return {"gathered": err, "loaded": max(_maxdiff(back[k], ref[k]) for k in ref)}


def _variant_kw(variant: str) -> dict:
    return {"plain": {}, "jamba": dict(bcdt_norm=True, bcdt_norm_weight=True, proj_bias=True),
            "falcon": dict(bcdt_norm=True)}[variant]


def _hybrid(vocab: int = 64):
    from seqlab.models.presets import from_preset

    torch.manual_seed(24)
    # Mamba-2 too: ngroups 1 < degree, so its B/C are replicated (local parameter names of their own)
    return from_preset("hybrid", "tiny", pattern="M2 M S", mlp="swiglu", vocab_size=vocab)


def _model():
    from seqlab.distributed.tensor_parallel import parallelize_model

    model = _hybrid()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    ref_logits = ref(ids)
    ref_logits.square().mean().backward()
    parallelize_model(model, _mesh())
    logits = model(ids)
    logits.square().mean().backward()
    refs = dict(ref.named_parameters())
    grads, sharded = {}, []
    for name, module in model.named_modules():  # the sharded mixers gather their own layout
        if hasattr(module, "full_tensors"):
            sharded.append(f"{name}.")
            grads.update({f"{name}.{k}": v for k, v in
                          module.full_tensors({n: p.grad for n, p in module.named_parameters()}).items()})
    for name, p in model.named_parameters():
        if not name.startswith(tuple(sharded)):
            grads[name] = p.grad
    if sorted(grads) != sorted(refs):
        raise AssertionError("parameter names differ from the unsharded model")
    return {"logits": _maxdiff(logits, ref_logits), "grad": max(_maxdiff(grads[n], refs[n].grad) for n in refs)}


def _train_config(tp: int, parallel: str = "none", steps: int = 2):
    from seqlab.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=2, seqlen=16, lr=1e-3, warmup_steps=1, eval_batches=1, log_every=1,
                       grad_clip=0.05, tp=tp, parallel=parallel, device="cpu")


def _task():
    from seqlab.tasks import make_task

    return make_task("mqar", seqlen=16, vocab_size=64)


def _training(out_dir: str):
    """2 AdamW steps at --tp 2 vs one process; save at step 2, then one more step (written for the parent)."""
    from seqlab.distributed.checkpoint import full_model_state
    from seqlab.io import save_tensors
    from seqlab.train import Trainer

    ref = Trainer(_hybrid(), _task(), _train_config(1), quiet=True)  # one process per rank, all identical
    ref.fit()
    want = {k: v.clone() for k, v in ref.raw_model.state_dict().items()}
    if dist.get_rank() == 0:
        ref.save_checkpoint(Path(out_dir, "plain-step2"))  # the single-process format
    dist.barrier()
    ref.train_step()
    # ... resumed at --tp 2: every rank keeps its shards and the single-process data stream
    from_plain = Trainer(_hybrid(), _task(), _train_config(2), quiet=True)
    from_plain.load_checkpoint(Path(out_dir, "plain-step2"))
    from_plain.train_step()
    plain_step3 = full_model_state(from_plain.raw_model)
    trainer = Trainer(_hybrid(), _task(), _train_config(2), quiet=True)
    trainer.fit()
    got = {k: v.clone() for k, v in full_model_state(trainer.raw_model).items()}  # (may alias live parameters)
    trainer.save_checkpoint(Path(out_dir, "tp2-step2"))
    trainer.train_step()
    step3 = full_model_state(trainer.raw_model)
    # a checkpoint of 2 data-parallel processes (full layout) resumes at --tp 2
    ddp = Trainer(_hybrid(), _task(), _train_config(1, "ddp"), quiet=True)
    ddp.fit()
    ddp.save_checkpoint(Path(out_dir, "ddp-step2"))
    want_ddp = full_model_state(ddp.raw_model)
    resumed = Trainer(_hybrid(), _task(), _train_config(2), quiet=True)
    resumed.load_checkpoint(Path(out_dir, "ddp-step2"))
    from_ddp = full_model_state(resumed.raw_model)
    stream = ddp.generator.get_state().clone()  # data-parallel rank 0's stream feeds the whole TP group
    dist.broadcast(stream, src=0)
    stream_err = float(not torch.equal(resumed.generator.get_state(), stream))
    moments = _full_moments(resumed.raw_model, resumed.optimizer)
    want_moments = {name: ddp.optimizer.state[p] for name, p in ddp.raw_model.named_parameters()}
    moment_err = max(_maxdiff(moments[n][k], want_moments[n][k]) for n in want_moments
                     for k in ("exp_avg", "exp_avg_sq"))
    if dist.get_rank() != 0:
        return {"params": 0.0, "plain_to_tp": 0.0, "ddp_to_tp": 0.0, "ddp_to_tp_moments": moment_err,
                "ddp_to_tp_stream": stream_err}
    save_tensors(Path(out_dir, "tp2-step3.safetensors"), step3)
    step3_ref = ref.raw_model.state_dict()
    return {"params": max(_maxdiff(got[k], want[k]) for k in want),
            "plain_to_tp": max(_maxdiff(plain_step3[k], step3_ref[k]) for k in step3_ref),
            "ddp_to_tp": max(_maxdiff(from_ddp[k], want_ddp[k]) for k in want_ddp), "ddp_to_tp_moments": moment_err,
            "ddp_to_tp_stream": stream_err}


def _full_moments(model, optimizer) -> dict[str, dict]:
    """AdamW state by parameter name in the unsharded layout (the sharded mixers gather their own)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "full_tensors"):
            params = dict(module.named_parameters())
            for key in ("exp_avg", "exp_avg_sq"):
                full = module.full_tensors({n: optimizer.state[p][key] for n, p in params.items()})
                for n, t in full.items():
                    out.setdefault(f"{name}.{n}", {})[key] = t
    sharded = tuple(f"{n}." for n, m in model.named_modules() if hasattr(m, "full_tensors"))
    for name, p in model.named_parameters():
        if not name.startswith(sharded):
            out[name] = {k: optimizer.state[p][k] for k in ("exp_avg", "exp_avg_sq")}
    return out


def _checks(rank, world, out_dir):
    results: dict = {}
    for kind, variant, packed in (("mamba", "plain", False), ("mamba", "jamba", True), ("mamba", "falcon", False),
                                  ("s4", "zoh", False), ("s4", "bilinear", True)):
        _record(results, f"mixer[{kind}-{variant}]", lambda k=kind, v=variant, p=packed: _mixer(k, v, p))
    for kind in ("mamba", "s4"):
        _record(results, f"decode[{kind}]", lambda k=kind: _decode(k))
    for kind, variant in (("mamba", "jamba"), ("s4", "zoh")):
        _record(results, f"state_dict[{kind}]", lambda k=kind, v=variant: _state_dict_roundtrip(k, v))
    _record(results, "model", _model)
    _record(results, "training", lambda: _training(out_dir))
    dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_recurrent")
    return out, spawn_collect(_checks, out)


@pytest.mark.parametrize("case", ["mamba-plain", "mamba-jamba", "mamba-falcon", "s4-zoh", "s4-bilinear"])
def test_sharded_mixer_matches_unsharded_forward_and_backward(run, case):
    """mamba-jamba and s4-bilinear run packed documents."""
    _check(run[1], f"mixer[{case}]", TOL)


@pytest.mark.parametrize("kind", ["mamba", "s4"])
def test_sharded_decode_matches_parallel_forward_with_local_states(run, kind):
    _check(run[1], f"decode[{kind}]", TOL)


@pytest.mark.parametrize("kind", ["mamba", "s4"])
def test_sharded_state_dict_is_the_unsharded_checkpoint(run, kind):
    _check(run[1], f"state_dict[{kind}]", 0.0)


def test_tensor_parallel_mamba2_mamba_s4_model_matches_unsharded(run):
    _check(run[1], "model", TOL)


def test_tensor_parallel_training_matches_one_process(run):
    """2 steps at --tp 2 == one process; a single-process checkpoint resumed at --tp 2 steps like one process."""
    _check(run[1], "training", 2e-5)
    assert all("plain_to_tp" in res["training"] for res in run[1])


def test_data_parallel_checkpoint_resumes_at_tp2_exactly(run):
    """Weights and AdamW moments of a 2-process DDP checkpoint, loaded at --tp 2 and gathered, are bit-exact, and
    both TP ranks continue data-parallel rank 0's data stream."""
    for res in run[1]:
        assert res["training"].get("ddp_to_tp") == 0.0, res["training"]
        assert res["training"].get("ddp_to_tp_moments") == 0.0, res["training"]
        assert res["training"].get("ddp_to_tp_stream") == 0.0, res["training"]


def test_tp2_checkpoint_resumes_at_tp1(run):
    from seqlab.io import load_tensors
    from seqlab.train import Trainer

    out = run[0]
    ckpt = out / "tp2-step2"
    assert (ckpt / "dcp" / ".metadata").is_file()
    trainer = Trainer(_hybrid(), _task(), _train_config(1), quiet=True)  # the schedule of the --tp 2 run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.load_checkpoint(ckpt)
    # one data-parallel rank before and after: the same data stream, so no warning about the data order
    assert not [w for w in caught if "resuming a run saved" in str(w.message)]
    assert trainer.step == 2
    full = load_tensors(ckpt / "model.safetensors")  # the gathered weights of the --tp 2 run
    for name, value in trainer.raw_model.state_dict().items():
        if name in full:
            assert torch.equal(value, full[name]), name
    # the AdamW moments, resharded: equal to the --tp 2 run's, gathered (they produce its step 3 below)
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {2.0}
    trainer.train_step()
    step3 = load_tensors(out / "tp2-step3.safetensors")
    for name, value in trainer.raw_model.state_dict().items():
        if name in step3:
            torch.testing.assert_close(value, step3[name], rtol=0, atol=2e-5, msg=name)


def test_unsharded_mixers_are_refused_by_name():
    from seqlab.distributed.tensor_parallel import parallelize_model
    from seqlab.models.presets import from_preset

    class Mesh:  # the checks run before any sharding
        def size(self):
            return 2

    model = from_preset("hybrid", "tiny", pattern="M G", vocab_size=64)
    with pytest.raises(ConfigError, match="layer 1 uses the GriffinRecurrent mixer, which tensor parallelism does"):
        parallelize_model(model, Mesh())

    class Mesh3(Mesh):
        def size(self):
            return 3

    with pytest.raises(ConfigError, match=r"--tp 3: d_inner = 64 in layers.0.mixer \(Mamba\) must be divisible"):
        parallelize_model(from_preset("mamba", "tiny", vocab_size=64), Mesh3())
    with pytest.raises(ConfigError, match=r"--tp 3: d_model = 32 in layers.0.mixer \(S4\) must be divisible"):
        parallelize_model(from_preset("s4", "tiny", vocab_size=64), Mesh3())
