"""Specification of the synthetic tasks: deterministic, split-disjoint, solvable by a plain rule, leak-free."""

from __future__ import annotations

import re

import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.tasks import IGNORE, TASKS, make_task, published_results
from seqlab.tasks.metrics import LengthBreakdown, accuracy, accuracy_by_position, exact_match, score
from seqlab.tasks.state_tracking import cayley_table, compose, group_elements, is_even, prefix_products

SMALL = {
    "selective_copy": {"seqlen": 64, "n_tokens": 6},
    "induction_heads": {"seqlen": 64},
    "mqar": {"seqlen": 64, "vocab_size": 128, "num_kv_pairs": 8},
    "passkey": {"seqlen": 200},
    "state_tracking": {"seqlen": 24},
    "copy_digits": {"seqlen": 60},
}


def small(name: str, **overrides):
    return make_task(name, **{**SMALL[name], **overrides})


# ---- plain solvers: each reads the answer off the input by the rule in the task's docstring ---------------------

def solve_selective_copy(task, row):
    M, L = task.n_tokens, len(row)
    data = [x for x in row[: L - M] if x != task.NOISE]
    return {L - M + i: data[i] for i in range(M)}


def solve_induction_heads(task, row):
    p = row.index(task.trigger)
    return {len(row) - 1: row[p + 1]}


def solve_mqar(task, row):
    N = task.pairs(len(row))
    memory = {row[2 * i]: row[2 * i + 1] for i in range(N)}
    return {t: memory[row[t]] for t in range(2 * N, len(row), 2) if row[t] in memory}


def solve_passkey(task, row):
    text = bytes(x for x in row if x < 256).decode()
    answer = re.search(r"The magic word is (\w+)\.", text).group(1).encode()
    n = len(answer)
    return {len(row) - n - 1 + i: answer[i] for i in range(n)}


def solve_state_tracking(task, row):
    elements = group_elements(task.group)
    product, out = tuple(range(len(elements[0]))), {}
    for t, token in enumerate(row):
        product = compose(product, elements[token])
        out[t] = elements.index(product)
    return out


def solve_copy_digits(task, row):
    D, L = task.n_digits, len(row)
    return {L - D + i: row[i] for i in range(D)}


SOLVERS = {
    "selective_copy": solve_selective_copy,
    "induction_heads": solve_induction_heads,
    "mqar": solve_mqar,
    "passkey": solve_passkey,
    "state_tracking": solve_state_tracking,
    "copy_digits": solve_copy_digits,
}


def corrupt_key_info(name, task, inputs, generator):
    """Destroy the information the answer depends on (keeping the token format intact)."""
    x = inputs.clone()
    B, L = x.shape
    if name == "selective_copy":  # move every data token to the other end of the region, reversed
        for b in range(B):
            region = x[b, : L - task.n_tokens]
            data = region[region != task.NOISE]
            region[:] = task.NOISE
            region[: len(data)] = data.flip(0)
    elif name == "induction_heads":  # change the token after the first trigger
        for b in range(B):
            p = x[b].tolist().index(task.trigger)
            x[b, p + 1] = (x[b, p + 1] + 1) % (task.vocab_size - 1)
    elif name == "mqar":  # rotate the values among the stored pairs
        N = task.pairs(L)
        x[:, 1 : 2 * N : 2] = x[:, 1 : 2 * N : 2].roll(1, dims=1)
    elif name == "passkey":  # change the digits inside the needle (not the answer at the end)
        for b in range(B):
            row = x[b].tolist()
            text = bytes(v if v < 256 else 0 for v in row)
            start = text.index(b"The magic word is ") + len("The magic word is ")
            for i in range(task.answer_len):
                x[b, start + i] = ord("0") + (x[b, start + i] - ord("0") + 1) % 10
    elif name == "state_tracking":  # replace the first element by a different one
        x[:, 0] = (x[:, 0] + 1) % task.vocab_size
    elif name == "copy_digits":  # shift the number by one digit
        D = task.n_digits
        x[:, :D] = (x[:, :D] + 1) % 10
    return x


def solver_exact_match(name, task, inputs, targets):
    hits = []
    for row, target in zip(inputs.tolist(), targets.tolist()):
        answer = SOLVERS[name](task, row)
        scored = [t for t, y in enumerate(target) if y != IGNORE]
        assert scored, "every sample has scored positions"
        hits.append(all(answer.get(t) == target[t] for t in scored))
    return sum(hits) / len(hits)


# ---- the specification ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TASKS))
def test_plain_solver_achieves_exact_match(name):
    task = small(name)
    batch = next(task.batches(16, seed=3, split="test"))
    assert solver_exact_match(name, task, batch.inputs, batch.targets) == 1.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_solver_fails_when_key_information_is_corrupted(name):
    task = small(name)
    batch = next(task.batches(16, seed=4))
    corrupted = corrupt_key_info(name, task, batch.inputs, torch.Generator().manual_seed(0))
    assert solver_exact_match(name, task, corrupted, batch.targets) <= 0.25


@pytest.mark.parametrize("name", sorted(TASKS))
def test_targets_are_not_the_input_at_the_same_position(name):
    task = small(name)
    batch = next(task.batches(32, seed=5))
    scored = batch.targets != IGNORE
    same = (batch.targets == batch.inputs) & scored
    assert same.sum() / scored.sum() < 0.2
    # and the last input token alone does not give the answer: an "echo" predictor fails
    logits = torch.nn.functional.one_hot(batch.inputs, task.vocab_size).float()
    assert exact_match(logits, batch.targets) < 0.2


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shapes_dtypes_and_vocab_bounds(name):
    task = small(name)
    L = SMALL[name]["seqlen"]
    batch = next(task.batches(8, seed=0))
    assert batch.inputs.shape == batch.targets.shape == (8, L)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64
    assert 0 <= int(batch.inputs.min()) and int(batch.inputs.max()) < task.vocab_size
    scored = batch.targets[batch.targets != IGNORE]
    assert scored.numel() > 0 and 0 <= int(scored.min()) and int(scored.max()) < task.vocab_size
    assert task.metric in ("accuracy", "exact_match") and task.eval_lengths


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_stream_other_seed_other_stream(name):
    task = small(name)
    a, b, c = (next(task.batches(4, seed=s)) for s in (7, 7, 8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_and_test_streams_are_disjoint(name):
    task = small(name)
    stream = {split: task.batches(16, seed=0, split=split) for split in ("train", "test")}
    rows = {split: {tuple(r) for _ in range(3) for r in next(stream[split]).inputs.tolist()} for split in stream}
    assert not rows["train"] & rows["test"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_other_lengths_work_and_paper_config_builds(name):
    task = small(name)
    L = 2 * SMALL[name]["seqlen"]
    batch = task.sample(2, L, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (2, L)
    assert solver_exact_match(name, task, batch.inputs, batch.targets) == 1.0
    paper = make_task(name, paper=True)
    assert paper.config()  # JSON-ready constructor arguments


def test_published_setups_are_the_documented_constants():
    sc = make_task("selective_copy", paper=True)
    assert (sc.default_seqlen, sc.n_tokens, sc.vocab_size) == (4096, 16, 16)
    ih = make_task("induction_heads", paper=True)
    assert ih.default_seqlen == 256 and ih.vocab_size == 16
    assert (min(ih.eval_lengths), max(ih.eval_lengths)) == (64, 2**20)
    mq = make_task("mqar", paper=True)
    assert mq.vocab_size == 8192 and mq.pairs(256) == 64
    cd = make_task("copy_digits", paper=True)
    assert cd.n_digits == 20 and cd.default_seqlen in cd.eval_lengths  # tested at the length trained on
    assert {(p["task"], p["model"], p["value"]) for p in published_results()} >= {("selective_copy", "mamba", 99.8)}


def test_selective_copy_format():
    task = small("selective_copy")
    batch = task.sample(4, 64, torch.Generator().manual_seed(0))
    M = task.n_tokens
    assert (batch.inputs[:, -M:] == task.vocab_size - 1).all()  # markers
    assert ((batch.inputs[:, :-M] != task.NOISE).sum(1) == M).all()
    assert (batch.targets[:, :-M] == IGNORE).all()


def test_induction_heads_trigger_appears_twice_and_long_lengths_are_cheap():
    task = small("induction_heads")
    batch = task.sample(2, 2**16, torch.Generator().manual_seed(0))
    assert ((batch.inputs == task.trigger).sum(1) == 2).all() and (batch.inputs[:, -1] == task.trigger).all()


def test_mqar_keys_and_values_come_from_their_halves():
    task = small("mqar", filler="zero")
    batch = task.sample(8, 64, torch.Generator().manual_seed(0))
    half, N = task.vocab_size // 2, 8
    keys, values = batch.inputs[:, 0 : 2 * N : 2], batch.inputs[:, 1 : 2 * N : 2]
    assert ((keys >= 1) & (keys < half)).all() and (values >= half).all()
    assert all(len(set(r)) == N for r in keys.tolist())
    scored = batch.targets != IGNORE
    assert (scored.sum(1) == N).all() and (batch.inputs[:, 2 * N :][~scored[:, 2 * N :]] == 0).all()


def test_mqar_power_law_puts_queries_early():
    task = make_task("mqar", seqlen=256, vocab_size=256, num_kv_pairs=8)
    uniform = make_task("mqar", seqlen=256, vocab_size=256, num_kv_pairs=8, power_a=None)
    g = torch.Generator().manual_seed(0)
    pos = lambda t: (t.sample(64, 256, g).targets != IGNORE).nonzero()[:, 1].float().mean()
    assert pos(task) < pos(uniform)


def test_passkey_depth_places_the_needle():
    task = make_task("passkey", seqlen=1000)
    where = {}
    for length, depth, batch in task.grid(2, lengths=[1000], depths=[0.0, 0.5, 1.0]):
        assert batch.inputs.shape == (2, length)
        text = bytes(x for x in batch.inputs[0].tolist() if x < 256)
        where[depth] = text.index(b"The magic word is") / len(text)
    assert where[0.0] < 0.05 and 0.4 < where[0.5] < 0.6 and where[1.0] > 0.8


def test_group_orders_and_products():
    assert len(group_elements("S5")) == 120 and len(set(group_elements("S5"))) == 120
    assert len(group_elements("A5")) == 60 and all(is_even(p) for p in group_elements("A5"))
    assert group_elements("A5")[0] == (0, 1, 2, 3, 4)
    assert compose((1, 2, 3, 4, 0), (1, 2, 3, 4, 0)) == (2, 3, 4, 0, 1)  # a 5-cycle squared
    assert compose((1, 0, 2, 3, 4), (0, 2, 1, 3, 4)) == (2, 0, 1, 3, 4)  # a then b: i -> b[a[i]]
    for group in ("A5", "S5"):
        elements, table = group_elements(group), cayley_table(group)
        index = {p: k for k, p in enumerate(elements)}
        # closure: every product of two elements is an element of the group; the table agrees with compose
        for i, a in enumerate(elements):
            for j, b in enumerate(elements):
                assert index[compose(a, b)] == table[i, j]
        n = len(elements)
        assert (table[0] == torch.arange(n)).all() and (table[:, 0] == torch.arange(n)).all()  # identity
        assert all(sorted(row) == list(range(n)) for row in table.tolist())  # Latin square: inverses exist
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.randint(0, n, (500,), generator=g) for _ in range(3))
        assert (table[table[a, b], c] == table[a, table[b, c]]).all()  # associativity
        assert not (table == table.T).all()  # non-abelian
    assert set(group_elements("A5")) <= set(group_elements("S5"))


def test_prefix_products_match_a_sequential_fold():
    g = torch.Generator().manual_seed(1)
    for group in ("A5", "S5", "parity"):
        table = cayley_table(group)
        tokens = torch.randint(0, table.shape[0], (3, 37), generator=g)
        expected = tokens.clone()
        for t in range(1, 37):
            expected[:, t] = table[expected[:, t - 1], tokens[:, t]]
        assert torch.equal(prefix_products(tokens, group), expected)
    bits = torch.randint(0, 2, (4, 50), generator=g)
    assert torch.equal(prefix_products(bits, "parity"), bits.cumsum(1) % 2)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("nope", {}),
        ("mqar", {"bogus": 1}),
        ("selective_copy", {"n_tokens": 0}),
        ("selective_copy", {"seqlen": 10, "n_tokens": 8}),
        ("state_tracking", {"group": "A4"}),
        ("passkey", {"alphabet": "emoji"}),
        ("passkey", {"seqlen": 10}),
        ("mqar", {"vocab_size": 16, "num_kv_pairs": 8}),
        ("mqar", {"power_a": 2.0}),
        ("induction_heads", {"eval_lengths": 5}),
        ("copy_digits", {"seqlen": 30}),
    ],
)
def test_bad_arguments_raise_config_error(name, kwargs):
    with pytest.raises(ConfigError):
        make_task(name, **kwargs)


def test_bad_sample_arguments_raise_input_error():
    with pytest.raises(InputError, match="seqlen"):
        small("copy_digits").sample(2, 10, torch.Generator())
    with pytest.raises(InputError, match="batch_size"):
        small("mqar").sample(0, 64, torch.Generator())
    with pytest.raises(InputError, match="depth"):
        small("passkey").sample(1, 200, torch.Generator(), depth=1.5)


# ---- metrics ----------------------------------------------------------------------------------------------------

def test_metrics_count_scored_positions_only_and_ignore_padded_vocab():
    targets = torch.tensor([[IGNORE, 2, 3], [1, IGNORE, 0]])
    predicted = torch.tensor([[0, 2, 1], [1, 3, 0]])  # row 0: 1 of 2 right; row 1: 2 of 2 right
    logits = torch.nn.functional.one_hot(predicted, 6).float()
    assert accuracy(logits, targets) == pytest.approx(3 / 4)
    assert exact_match(logits, targets) == pytest.approx(1 / 2)
    logits[0, 2, 5] = 10.0  # a padded class wins the argmax unless the vocab is cut at 4
    assert score(logits, targets, vocab_size=4) == {"accuracy": pytest.approx(3 / 4), "exact_match": 0.5}
    assert accuracy(logits, targets) == pytest.approx(3 / 4)
    by_pos = accuracy_by_position(logits, targets, vocab_size=4)
    assert by_pos[0] == 1.0 and by_pos[1] == 1.0 and by_pos[2] == 0.5
    with pytest.raises(InputError):
        accuracy(logits, targets[:, :2])


def test_length_breakdown_accumulates_per_key():
    task = small("copy_digits")
    bd = LengthBreakdown(task.vocab_size)
    for length in (60, 80):
        batch = task.sample(4, length, torch.Generator().manual_seed(length))
        perfect = torch.nn.functional.one_hot(batch.targets.clamp(min=0), task.vocab_size).float()
        bd.add(perfect, batch.targets, length=length)
        bd.add(torch.zeros_like(perfect), batch.targets, length=length)  # always predicts digit 0
    rows = bd.rows()
    assert [r["length"] for r in rows] == [60, 80] and all(r["samples"] == 8 for r in rows)
    assert all(r["exact_match"] == pytest.approx(0.5) for r in rows)
    assert all(0.5 < r["accuracy"] < 0.6 for r in rows)  # half perfect + ~10% digit-0 hits


def test_split_seeds_give_different_torch_streams():
    from seqlab.tasks.base import split_seed

    draws = {s: torch.randint(0, 2**31, (4,), generator=torch.Generator().manual_seed(split_seed(7, s))).tolist()
             for s in ("train", "test")}
    assert draws["train"] != draws["test"]
    with pytest.raises(InputError):
        split_seed(-1, "train")
    with pytest.raises(InputError):
        split_seed(0, "validation")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_score_of_a_perfect_and_a_constant_predictor(name):
    task = small(name)
    batch = next(task.batches(8, seed=9, split="test"))
    padded = task.vocab_size + 7  # models pad their heads; padding must not count
    perfect = torch.nn.functional.one_hot(batch.targets.clamp(min=0), padded).float()
    perfect[..., task.vocab_size:] = -1.0
    assert task.score(perfect, batch.targets) == {"accuracy": 1.0, "exact_match": 1.0}
    constant = torch.zeros(*batch.targets.shape, padded)
    constant[..., 0] = 1.0
    assert task.score(constant, batch.targets)[task.metric] < 0.5
