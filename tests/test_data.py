"""Text data: corpus discovery, the token cache, document splits, packing with seq_idx, resume, bits per byte."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from seqlab.data import TextData, encode_corpus, evaluate_text, find_documents
from seqlab.data.corpus import absolute_spec
from seqlab.data.tokenize import assign_splits
from seqlab.errors import ConfigError
from seqlab.models.presets import from_preset
from seqlab.tokenizer import ByteTokenizer

WORDS = "state space model attention token sequence memory scan kernel chunk layer gate".split()


def make_corpus(root, n_docs=12, seed=0, min_words=4, max_words=40):
    """n_docs small text files of random words (sizes vary so windows straddle several documents)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = int(rng.integers(min_words, max_words))
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, n)) + ".\n")
    return root


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


def test_stdlib_corpus_is_found_and_larger_than_1mb():
    found = find_documents("stdlib")
    assert len(found.paths) > 100
    assert all(p.suffix == ".py" for p in found.paths)
    assert not any("site-packages" in p.parts or "test" in p.parts for p in found.paths)
    assert found.total_bytes() > 1_000_000


def test_stream_holds_every_document_after_a_separator(corpus, tmp_path):
    streams, _ = encode_corpus(find_documents(str(corpus)), cache_dir=tmp_path / "cache")
    tok = ByteTokenizer()
    texts = {}
    for stream in streams.values():
        assert stream.tokens.dtype == np.uint16
        assert stream.tokens[-1] == tok.eos_id
        for i, name in enumerate(stream.names):
            doc = stream.tokens[stream.offsets[i] : stream.offsets[i + 1]]
            assert doc[0] == tok.eos_id
            texts[name] = tok.decode(doc[1:])
    assert texts == {p.name: p.read_text() for p in corpus.iterdir()}


def test_cache_is_reused_and_invalidated_when_a_file_changes(corpus, tmp_path, monkeypatch):
    import seqlab.data.tokenize as tokenize

    writes = []
    original = tokenize._write_cache
    monkeypatch.setattr(tokenize, "_write_cache", lambda *a: (writes.append(a[0]), original(*a)))
    _, first = encode_corpus(find_documents(str(corpus)), cache_dir=tmp_path / "cache")
    _, again = encode_corpus(find_documents(str(corpus)), cache_dir=tmp_path / "cache")
    assert again == first and len(writes) == 1
    (corpus / "doc03.txt").write_text("a changed document, longer than before.\n" * 3)
    streams, changed = encode_corpus(find_documents(str(corpus)), cache_dir=tmp_path / "cache")
    assert changed != first and len(writes) == 2
    text = b"".join(bytes(s.tokens[s.tokens < 256].astype(np.uint8)) for s in streams.values())
    assert b"a changed document" in text


def test_rebuilding_from_a_spec_warns_when_the_text_changed(corpus, tmp_path):
    spec = TextData(str(corpus), cache_dir=tmp_path / "cache").spec()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextData.from_spec(spec, cache_dir=tmp_path / "cache")  # unchanged: silent
    (corpus / "doc00.txt").write_text("edited\n")
    with pytest.warns(UserWarning, match="not the text it was"):
        TextData.from_spec(spec, cache_dir=tmp_path / "cache")


def test_train_and_validation_split_by_document_disjointly(tmp_path):
    root = make_corpus(tmp_path / "many", n_docs=60)
    data = TextData(str(root), cache_dir=tmp_path / "cache", validation_fraction=0.2)
    train, val = data.stream.names, data.for_split("validation").stream.names
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(p.name for p in root.iterdir())
    assert 0 < len(val) < len(train)
    assert assign_splits(train + val, 0.2) == assign_splits(train + val, 0.2)  # a pure function of the names
    # two documents: each split gets one
    assert sorted(assign_splits(["a.txt", "b.txt"], 0.05)) == ["train", "validation"]


@pytest.mark.parametrize("preset", ["mamba2", "transformer", "mamba"])
def test_packed_row_with_seq_idx_matches_each_document_alone(preset, tmp_path):
    corpus = make_corpus(tmp_path / "short", n_docs=40, max_words=10)
    data = TextData(str(corpus), cache_dir=tmp_path / "cache", seqlen=96, validation_fraction=0.25)
    batch = data.sample(3, 96, torch.Generator().manual_seed(1))
    assert batch.seq_idx.shape == batch.inputs.shape and int(batch.seq_idx.max()) >= 2
    torch.manual_seed(0)
    model = from_preset(preset, "tiny", ssd_chunk_size=16).eval()
    with torch.no_grad():
        packed = model(batch.inputs, seq_idx=batch.seq_idx)  # (B, L, V)
        for row in range(batch.inputs.shape[0]):
            ids = batch.seq_idx[row]
            for doc in ids.unique():
                span = (ids == doc).nonzero().flatten()
                alone = model(batch.inputs[row : row + 1, span])  # the document run from a fresh state
                torch.testing.assert_close(packed[row, span], alone[0], rtol=1e-4, atol=1e-4)  # fp32


def test_windows_are_next_token_pairs_of_the_stream(corpus, tmp_path):
    data = TextData(str(corpus), cache_dir=tmp_path / "cache")
    batch = data.sample(4, 32, torch.Generator().manual_seed(0))
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    tokens = torch.from_numpy(data.stream.tokens.astype(np.int64))
    for row in batch.inputs:
        starts = [s for s in range(len(tokens) - 32) if torch.equal(tokens[s : s + 32], row)]
        assert starts


def test_a_text_spec_stores_absolute_paths(corpus, tmp_path, monkeypatch):
    """A run started with a relative --data resumes from any working directory."""
    monkeypatch.chdir(corpus.parent)
    spec = TextData(corpus.name, cache_dir=tmp_path / "cache").spec()
    assert spec["data"] == str(corpus.resolve())
    monkeypatch.chdir(tmp_path)
    assert TextData.from_spec(spec, cache_dir=tmp_path / "cache").spec() == spec
    assert absolute_spec("stdlib") == "stdlib"
    assert absolute_spec(f"a.txt, {tmp_path}/*.md") == f"{tmp_path}/a.txt,{tmp_path}/*.md"


def test_resume_on_text_matches_an_uninterrupted_run(corpus, tmp_path):
    from seqlab.train import TrainConfig, Trainer

    def trainer(steps, out):
        torch.manual_seed(0)
        data = TextData(str(corpus), cache_dir=tmp_path / "cache")
        config = TrainConfig(steps=steps, batch_size=2, seqlen=32, warmup_steps=1, eval_batches=1, out_dir=str(out))
        return Trainer(from_preset("mamba2", "tiny", ssd_chunk_size=16), data, config, quiet=True)

    straight = trainer(6, tmp_path / "a").fit().losses
    first = trainer(6, tmp_path / "b")  # the same schedule, stopped after 3 steps
    assert [first.train_step()["loss"] for _ in range(3)] == straight[:3]
    first.save_checkpoint()
    resumed = trainer(6, tmp_path / "b")
    resumed.load_checkpoint(tmp_path / "b" / "checkpoint")
    assert resumed.fit().losses == straight[3:]


class UniformLogits(nn.Module):
    """Equal logits for the ``k`` first ids, -inf for the rest: p = 1/k for each of them."""

    def __init__(self, k: int, vocab: int = 264):
        super().__init__()
        self.k, self.vocab = k, vocab
        self.anchor = nn.Parameter(torch.zeros(()))  # a device for evaluate_text

    def forward(self, input_ids, seq_idx=None):
        logits = torch.full((*input_ids.shape, self.vocab), -math.inf)
        logits[..., : self.k] = 0.0
        return logits + self.anchor


def test_bits_per_byte_of_a_uniform_model_is_its_closed_form(corpus, tmp_path):
    data = TextData(str(corpus), cache_dir=tmp_path / "cache")
    stream = data.for_split("validation").stream
    # uniform over the 256 bytes, the separator-free part of the text: exactly 8 bits per byte of text; over the
    # 257 ids bytes + eos the separators cost log2(257) bits each too
    result = evaluate_text(UniformLogits(259), data, seqlen=16, batch_size=3)
    scored = len(stream.tokens) - 1
    assert result["tokens"] == scored
    assert result["bytes"] == stream.n_bytes == sum((corpus / n).stat().st_size for n in stream.names)
    assert result["loss"] == pytest.approx(math.log(259), rel=1e-6)
    assert result["bpb"] == pytest.approx(math.log2(259) * scored / stream.n_bytes, rel=1e-6)
    assert result["perplexity"] == pytest.approx(259, rel=1e-5)


def test_bits_per_byte_is_8_for_uniform_bytes_on_text_without_separators(tmp_path):
    """One document read from its first byte: every target but the closing separator is a byte."""
    root = tmp_path / "one"
    root.mkdir()
    (root / "a.txt").write_text("uniform bytes cost eight bits each. " * 10)
    data = TextData(str(root), cache_dir=tmp_path / "cache", validation_fraction=0.0)
    n_bytes = data.stream.n_bytes  # the only document, in the train split
    # stop before the closing separator
    result = evaluate_text(UniformLogits(256), data, seqlen=32, max_tokens=n_bytes - 1, split="train")
    assert result["tokens"] == result["bytes"] == n_bytes - 1
    assert result["bpb"] == pytest.approx(8.0, rel=1e-6)  # float32 log-softmax


def test_validation_score_is_deterministic(corpus, tmp_path):
    data = TextData(str(corpus), cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model = from_preset("mamba2", "tiny", ssd_chunk_size=16)
    first = evaluate_text(model, data, seqlen=32, batch_size=2)
    assert evaluate_text(model, data, seqlen=32, batch_size=5) == pytest.approx(first)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("{tmp}/missing.txt", "does not exist"), ("{tmp}/empty_dir", "holds no documents"),
     ("{tmp}/blank", "is empty"), ("{tmp}/*.nothing", "matches no files")],
)  # fmt: skip
def test_bad_corpus_paths_fail_with_clear_messages(spec, message, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(ConfigError, match=message):
        find_documents(spec.format(tmp=tmp_path))


def test_a_split_shorter_than_a_window_fails_before_training(tmp_path):
    root = make_corpus(tmp_path / "two", n_docs=2, max_words=6)
    data = TextData(str(root), cache_dir=tmp_path / "cache")
    shortest = min(len(data), len(data.for_split("validation")))
    data.sample(1, shortest - 1, torch.Generator())  # fits both splits
    with pytest.raises(ConfigError, match="split of .* fewer than seqlen"):
        data.sample(1, shortest, torch.Generator())  # refused at the first batch, whichever split is short


def _cli(*argv):
    from seqlab.cli import main

    return main([str(a) for a in argv])


def test_train_on_text_resumes_evaluates_and_generates(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEQLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    common = ("--batch-size", 2, "--seqlen", 32, "--quiet", "--device", "cpu")
    assert _cli("train", "--data", corpus, "--model", "mamba2", "--steps", 2, "--out", out, *common) == 0
    assert _cli("train", "--out", out, "--resume", "--steps", 3, "--quiet") == 0
    assert "resuming text from step 2" in capsys.readouterr().out
    assert _cli("eval", "--checkpoint", out, "--json") == 0
    row = __import__("json").loads(capsys.readouterr().out)["results"][0]
    assert row["bpb"] > 0 and row["seqlen"] == 32
    assert _cli("eval", "--checkpoint", out, "--data", corpus, "--split", "train", "--json") == 0
    row = __import__("json").loads(capsys.readouterr().out)["results"][0]
    assert row["tokens"] == len(TextData(str(corpus))) - 1  # the whole train stream, in order
    state = tmp_path / "state.safetensors"
    args = ("generate", "--checkpoint", out, "--max-new-tokens", 4, "--seed", 0)
    assert _cli(*args, "--prompt", "state", "--save-state", state) == 0
    assert _cli(*args, "--prompt", " space", "--resume-state", state) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [((), "pass exactly one"), (("--task", "mqar", "--data", "stdlib"), "pass exactly one"),
     (("--data", "{tmp}/nothing-here"), "does not exist"), (("--task", "mqar", "--tokenizer", "x"), "only applies")],
)  # fmt: skip
def test_train_data_arguments_fail_with_clear_messages(argv, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert _cli("train", "--model", "mamba", "--out", tmp_path / "o", *argv) == 2
    assert message in capsys.readouterr().err


def test_local_hf_tokenizer_gives_its_own_stream_and_bits_per_byte_by_bytes(corpus, tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<unk>", "<s>", "</s>", ".", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))

    words = TextData(str(corpus), tokenizer=str(tmp_path / "tok"), cache_dir=tmp_path / "cache")
    data_bytes = TextData(str(corpus), cache_dir=tmp_path / "cache")
    assert words.cache_folder != data_bytes.cache_folder and words.vocab_size == len(vocab)
    stream = words.for_split("validation").stream
    assert stream.tokens.dtype == np.uint16 and stream.tokens[0] == vocab.index("</s>")
    assert stream.n_bytes == data_bytes.for_split("validation").stream.n_bytes
    assert stream.n_text_tokens < stream.n_bytes / 3  # one token per word or full stop
    result = evaluate_text(UniformLogits(len(vocab)), words, seqlen=16)
    assert result["loss"] == pytest.approx(math.log(len(vocab)), rel=1e-6)
    assert result["bpb"] == pytest.approx(result["loss"] / math.log(2) * result["tokens"] / stream.n_bytes, rel=1e-6)
