"""Tensor parallelism of the Mamba-2 mixer (shard by head) on 2 gloo processes over 127.0.0.1.

Specs:
- one sharded Mamba2 mixer equals the unsharded one, forward and backward (input gradient, and every shard's
  parameter gradient equals the matching slice of the unsharded gradient): ngroups=1 (B/C replicated, the gated
  norm spans both ranks), ngroups=2 (B/C and the norm sharded by group), ngroups=3 with 6 heads over 2 ranks (B/C
  replicated, a group straddling the ranks), with packed documents;
- decoding token by token with the local shards' states equals the parallel forward;
- ``state_dict()`` of a sharded model is the unsharded checkpoint (original names and layout) and loads back;
- a whole ``mamba2`` tiny model, and a Mamba-2 + attention hybrid with SwiGLU, under ``parallelize_model`` equal
  the unsharded model (logits and gradients);
- 3 AdamW steps with ``--tp 2`` (clipping active) give the parameters of one process, and resuming from a
  step-2 checkpoint gives those of the uninterrupted run;
- nheads not divisible by the degree raises ConfigError naming it;
- ``torchrun --nproc-per-node 2 -m seqlab train --model hybrid --tp 2`` (Mamba-2, Mamba, S4, attention) runs, and
  ``seqlab train --resume --tp 1`` continues it in one process.

Tolerances: float32 1e-5 absolute (sharded matmuls and the all-reduced norm sum in another order); training 2e-5
after 3 AdamW steps at lr 1e-3.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_harness import WORLD, spawn_collect
from test_distributed import ROOT, _check, _record

from seqlab.errors import ConfigError

TOL = 1e-5
_D_MODEL = {1: 16, 2: 16, 3: 12}  # headdim 4, expand 2: 8, 8 and 6 heads


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _maxdiff(a, b) -> float:
    return float((a.detach() - b.detach()).abs().max())


def _shard_grad_error(sharded, ref) -> float:
    """Max |grad of each local shard - the matching slice of the unsharded gradient| (relative to its scale)."""
    from seqlab.distributed.tp_mamba import _REPLICATED_BC, _SHARDED

    full = dict(ref.named_parameters())
    err = 0.0
    for name, p in sharded.named_parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if name in _SHARDED:
            key, dim = _SHARDED[name]
            want = full[name].grad.index_select(dim, sharded.layout[key])
        elif name in _REPLICATED_BC:
            full_name, key = _REPLICATED_BC[name]
            want = full[full_name].grad.index_select(0, sharded.layout[key])
        else:
            want = full[name].grad
        err = max(err, _maxdiff(g, want) / (1.0 + float(want.abs().max())))
    return err


def _mixer(ngroups: int, packed: bool):
    from seqlab.distributed.tp_mamba import shard_mamba2
    from seqlab.mixers.mamba2 import Mamba2

    torch.manual_seed(11)
    mixer = Mamba2(_D_MODEL[ngroups], d_state=8, headdim=4, ngroups=ngroups, chunk_size=8, proj_bias=True)
    ref = copy.deepcopy(mixer)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 24, mixer.d_model, generator=g)
    dy = torch.randn(2, 24, mixer.d_model, generator=g)
    seq_idx = torch.tensor([[0] * 7 + [1] * 17, [0] * 24]) if packed else None
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref, seq_idx=seq_idx)
    (y_ref * dy).sum().backward()
    tp = shard_mamba2(mixer, _mesh())
    x = x.clone().requires_grad_()
    y = tp(x, seq_idx=seq_idx)
    (y * dy).sum().backward()
    return {"y": _maxdiff(y, y_ref), "grad_x": _maxdiff(x.grad, x_ref.grad), "param_grad": _shard_grad_error(tp, ref)}


def _decode(ngroups: int):
    from seqlab.distributed.tp_mamba import shard_mamba2
    from seqlab.mixers.mamba2 import Mamba2

    torch.manual_seed(13)
    mixer = Mamba2(_D_MODEL[ngroups], d_state=8, headdim=4, ngroups=ngroups, chunk_size=8)
    x = torch.randn(2, 10, mixer.d_model, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        y_ref = mixer(x)
        tp = shard_mamba2(mixer, _mesh())
        state = tp.allocate_state(2, 10)
        prefix = tp(x[:, :4], state=state)  # prefill, then one token at a time
        steps = [tp(x[:, t : t + 1], state=state) for t in range(4, 10)]
    return {"y": _maxdiff(torch.cat([prefix, *steps], dim=1), y_ref)}


def _state_dict_roundtrip(ngroups: int):
    from seqlab.distributed.tp_mamba import shard_mamba2
    from seqlab.mixers.mamba2 import Mamba2

    torch.manual_seed(15)
    mixer = Mamba2(_D_MODEL[ngroups], d_state=8, headdim=4, ngroups=ngroups, proj_bias=True)
    ref = {k: v.clone() for k, v in mixer.state_dict().items()}
    tp = shard_mamba2(mixer, _mesh())
    got = tp.state_dict()
    err = float(sorted(got) != sorted(ref)) + max(_maxdiff(got[k], ref[k]) for k in ref)
    fresh = shard_mamba2(Mamba2(_D_MODEL[ngroups], d_state=8, headdim=4, ngroups=ngroups, proj_bias=True), _mesh())
    fresh.load_state_dict(ref)
    back = fresh.state_dict()
    return {"gathered": err, "loaded": max(_maxdiff(back[k], ref[k]) for k in ref)}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _model(preset: str):
    from seqlab.distributed.tensor_parallel import parallelize_model
    from seqlab.distributed.tp_mamba import Mamba2TensorParallel
    from seqlab.models.presets import from_preset

    torch.manual_seed(16)
    kw = {"pattern": "M2 A", "mlp": "swiglu"} if preset == "hybrid" else {}
    model = from_preset(preset, "tiny", vocab_size=64, **kw)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    ref_logits = ref(ids)
    ref_logits.square().mean().backward()
    parallelize_model(model, _mesh())
    logits = model(ids)
    logits.square().mean().backward()
    refs = dict(ref.named_parameters())
    # Mamba-2 shards are compared slice by slice below
    sharded_mamba = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, Mamba2TensorParallel))
    grad_err = 0.0
    for name, p in model.named_parameters():
        if not name.startswith(sharded_mamba):  # replicated, or a DTensor of attention / SwiGLU
            grad_err = max(grad_err, _maxdiff(_full(p.grad), refs[name].grad))
    mixer_err = max(_shard_grad_error(b.mixer, r.mixer) for b, r in zip(model.layers, ref.layers)
                    if type(r.mixer).__name__ == "Mamba2")
    return {"logits": _maxdiff(logits, ref_logits), "grad": grad_err, "mixer_grad": mixer_err}


def _training(out_dir: str):
    """3 AdamW steps with --tp 2 (gradient clipping active) vs one process; then resume from a step-2 checkpoint."""
    from seqlab.distributed.checkpoint import full_model_state
    from seqlab.models.presets import from_preset
    from seqlab.tasks import make_task
    from seqlab.train import TrainConfig, Trainer

    def model():
        torch.manual_seed(17)
        return from_preset("mamba2", "tiny", vocab_size=64)

    def config(tp):
        return TrainConfig(steps=3, batch_size=2, seqlen=16, lr=1e-3, warmup_steps=1, eval_batches=1, log_every=1,
                           grad_clip=0.05, tp=tp, device="cpu")

    task = make_task("mqar", seqlen=16, vocab_size=64)
    ref = Trainer(model(), task, config(1), quiet=True)
    ref.fit()
    trainer = Trainer(model(), task, config(2), quiet=True)
    trainer.fit()
    got = full_model_state(trainer.raw_model)
    first = Trainer(model(), task, config(2), quiet=True)
    first.train_step()
    first.train_step()
    first.save_checkpoint(Path(out_dir, "step2"))
    second = Trainer(model(), task, config(2), quiet=True)
    second.load_checkpoint(Path(out_dir, "step2"))
    second.train_step()
    resumed = full_model_state(second.raw_model)  # on rank 0 only
    if dist.get_rank() != 0:
        return {"params": 0.0, "resume": 0.0}
    want = ref.raw_model.state_dict()
    return {"params": max(_maxdiff(got[k], want[k]) for k in want),
            "resume": max(_maxdiff(resumed[k], got[k]) for k in got)}


def _checks(rank, world, out_dir):
    results: dict = {}
    for ngroups in (1, 2, 3):
        for packed in (False, True):
            _record(results, f"mixer[g{ngroups}-{'packed' if packed else 'plain'}]",
                    lambda g=ngroups, p=packed: _mixer(g, p))
        _record(results, f"decode[g{ngroups}]", lambda g=ngroups: _decode(g))
        _record(results, f"state_dict[g{ngroups}]", lambda g=ngroups: _state_dict_roundtrip(g))
    for preset in ("mamba2", "hybrid"):
        _record(results, f"model[{preset}]", lambda p=preset: _model(p))
    _record(results, "training", lambda: _training(out_dir))
    dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_collect(_checks, tmp_path_factory.mktemp("tp_mamba"))


@pytest.mark.parametrize("packed", ["plain", "packed"])
@pytest.mark.parametrize("ngroups", [1, 2, 3])
def test_sharded_mamba2_mixer_matches_unsharded_forward_and_backward(results, ngroups, packed):
    _check(results, f"mixer[g{ngroups}-{packed}]", TOL)


@pytest.mark.parametrize("ngroups", [1, 2, 3])
def test_sharded_decode_matches_parallel_forward(results, ngroups):
    _check(results, f"decode[g{ngroups}]", TOL)


@pytest.mark.parametrize("ngroups", [1, 2, 3])
def test_sharded_state_dict_is_the_unsharded_checkpoint(results, ngroups):
    _check(results, f"state_dict[g{ngroups}]", 0.0)


@pytest.mark.parametrize("preset", ["mamba2", "hybrid"])
def test_tensor_parallel_mamba2_model_matches_unsharded(results, preset):
    """``mamba2`` tiny, and a hybrid of Mamba-2 and attention layers with SwiGLU (DTensor-sharded) after them."""
    _check(results, f"model[{preset}]", TOL)


def test_tensor_parallel_training_matches_one_process_and_resumes(results):
    _check(results, "training", 2e-5)


def test_nheads_not_divisible_by_degree_is_refused_by_name():
    from seqlab.distributed.tensor_parallel import parallelize_model
    from seqlab.models.presets import from_preset

    class Mesh:  # the check runs before any sharding
        def size(self):
            return 3

    model = from_preset("mamba2", "tiny", vocab_size=64)  # nheads = 64 / 16 = 4
    with pytest.raises(ConfigError, match=r"--tp 3: nheads = 4 in layers.0.mixer \(Mamba2\) must be divisible"):
        parallelize_model(model, Mesh())


def test_torchrun_train_with_tp_then_resume_in_one_process(tmp_path, monkeypatch):
    """``torchrun ... train --tp 2`` on a hybrid of every sharded mixer (Mamba-2, Mamba, S4, attention, SwiGLU), then
    ``seqlab train --resume --tp 1`` continues the run in one process from the resharded checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:0", "-m", "seqlab", "train", "--task", "mqar", "--model", "hybrid",
           "--set", "pattern=M2 M S A", "--set", "mlp=swiglu", "--size", "tiny", "--steps", "2", "--tp", "2",
           "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from seqlab.cli import main
    from seqlab.models import LanguageModel

    ckpt = tmp_path / "run" / "checkpoint"
    model = LanguageModel.load(ckpt)  # the gathered, unsharded checkpoint
    assert model.layers[0].mixer.in_proj.weight.shape == (2 * 64 + 2 * 16 + 4, 32)  # Mamba-2: z, x, B, C, dt
    assert model.layers[1].mixer.in_proj.weight.shape == (2 * 64, 32)  # Mamba: x, z
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--tp", "1", "--steps", "3", "--device", "cpu",
                 "--quiet"]) == 0
    info = json.loads((ckpt / "trainer.json").read_text())
    assert info["step"] == 3 and info["train_config"]["tp"] == 1
