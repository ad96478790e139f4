"""engine.data.text: tokenize-once cache, val split, input errors, and the stateless resumable window sampler."""
import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from engine.config import DataConfig
from engine.data.text import DataError, TokenWindows, expand_paths, load_prepared, prepare, token_dtype
from engine.data.tokenizer import Tokenizer
from tests.tokenizer_fixtures import CORPUS, write_tokenizer_dir

DOCS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello, world! How are you doing today?",
        "def train_step(model, batch):\n    return model(batch).loss\n" * 2]  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return Tokenizer.from_pretrained(gpt2_dir)


def write_docs(folder: Path, docs, suffix=".txt") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"doc{i:02d}{suffix}" for i in range(len(docs))]
    for path, text in zip(paths, docs):
        path.write_text(text, encoding="utf-8")
    return paths


def cfg(tmp_path, train, **kw) -> DataConfig:
    kw = {"seq_len": 8, "val_fraction": 0.0, "processed_dir": str(tmp_path / "processed"), **kw}
    return DataConfig(train=[str(t) for t in train], **kw)


def tokens_of(path: Path, dtype=np.uint16) -> list[int]:
    return np.fromfile(path, dtype=dtype).tolist()


# --- dtype -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab, dtype", [(400, np.uint16), (65536, np.uint16), (65537, np.uint32),
                                          (151936, np.uint32)])  # fmt: skip
def test_token_dtype_is_the_smallest_that_holds_every_id(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)


def test_vocab_over_65536_is_stored_as_uint32(tmp_path):
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 70000)}}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tok.json"))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    os.replace(tmp_path / "tok.json", tok_dir / "tokenizer.json")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    write_docs(tmp_path / "in", ["w5 w69999 w65536 w2 w3 w4 w5 w6 w7 w8"])
    data = prepare(cfg(tmp_path, [tmp_path / "in"]), Tokenizer.from_pretrained(tok_dir), tok_dir, progress=False)
    assert data.meta["dtype"] == "uint32"
    assert tokens_of(data.train_path, np.uint32) == [5, 69999, 65536, 2, 3, 4, 5, 6, 7, 8, 1]


def test_token_id_too_big_for_a_forced_dtype_names_the_file(tmp_path, gpt2, gpt2_dir):
    paths = write_docs(tmp_path / "in", DOCS)
    with pytest.raises(DataError, match=r"doc00\.txt: a token id does not fit uint8"):
        prepare(cfg(tmp_path, paths), gpt2, gpt2_dir, dtype=np.uint8, progress=False)


# --- layout: EOS, BOS, jsonl -------------------------------------------------------------------------------------


def test_eos_closes_every_document_in_file_order(tmp_path, gpt2, gpt2_dir):
    paths = write_docs(tmp_path / "in", DOCS)
    data = prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)
    eos = gpt2.eos_token_id
    expected = [t for d in DOCS for t in [*gpt2.encode(d, add_special_tokens=False), eos]]
    assert tokens_of(data.train_path) == expected
    assert data.meta["train_docs"] == 3 and data.meta["eos_token_id"] == eos and data.meta["dtype"] == "uint16"
    assert data.meta["train_files"] == [str(p.resolve()) for p in paths]


def test_bos_opens_each_document_when_the_tokenizer_adds_bos(tmp_path):
    tok_dir = write_tokenizer_dir(tmp_path / "llama", "llama")
    tok = Tokenizer.from_pretrained(tok_dir)
    write_docs(tmp_path / "in", DOCS[:2])
    data = prepare(cfg(tmp_path, [tmp_path / "in"]), tok, tok_dir, progress=False)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert tokens_of(data.train_path) == [t for d in DOCS[:2] for t in [bos, *tok.encode(d, False), eos]]


def test_jsonl_lines_are_documents_and_blank_lines_are_skipped(tmp_path, gpt2, gpt2_dir):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)]
    path.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    data = prepare(cfg(tmp_path, [path], text_field="body"), gpt2, gpt2_dir, progress=False)
    eos = gpt2.eos_token_id
    assert tokens_of(data.train_path) == [t for d in DOCS for t in [*gpt2.encode(d, False), eos]]
    assert data.meta["train_docs"] == 3


# --- cache -------------------------------------------------------------------------------------------------------


def test_unchanged_inputs_reuse_the_output_without_tokenizing(tmp_path, gpt2, gpt2_dir, monkeypatch):
    write_docs(tmp_path / "in", DOCS)
    first = prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: pytest.fail("re-tokenized"))
    again = prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)
    assert again.reused and not first.reused and again.dir == first.dir and again.meta == first.meta
    assert load_prepared(first.dir).meta == first.meta


def test_a_changed_file_or_tokenizer_rebuilds(tmp_path, gpt2, gpt2_dir):
    paths = write_docs(tmp_path / "in", DOCS)
    first = prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)
    paths[1].write_text("changed text, same file name")
    changed = prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)
    assert not changed.reused and changed.dir != first.dir
    assert changed.meta["train_tokens"] != first.meta["train_tokens"]
    other_dir = write_tokenizer_dir(tmp_path / "qwen", "qwen")
    retok = prepare(cfg(tmp_path, [tmp_path / "in"]), Tokenizer.from_pretrained(other_dir), other_dir, progress=False)
    assert not retok.reused and retok.dir not in (first.dir, changed.dir)


def test_a_crash_mid_prepare_leaves_nothing_that_gets_reused(tmp_path, gpt2, gpt2_dir, monkeypatch):
    write_docs(tmp_path / "in", DOCS)
    config = cfg(tmp_path, [tmp_path / "in"])
    with monkeypatch.context() as m:
        m.setattr(Tokenizer, "encode_batch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            prepare(config, gpt2, gpt2_dir, progress=False)
    assert list((tmp_path / "processed").iterdir()) == []  # no half dataset, no temp dir left
    assert not prepare(config, gpt2, gpt2_dir, progress=False).reused


def test_temp_dirs_left_by_a_killed_prepare_are_removed_on_the_next_run(tmp_path, gpt2, gpt2_dir):
    write_docs(tmp_path / "in", DOCS)
    config = cfg(tmp_path, [tmp_path / "in"])
    name = prepare(config, gpt2, gpt2_dir, progress=False).dir.name
    processed = tmp_path / "processed"
    shutil.rmtree(processed / name)
    for junk in (f".tmp-{name}-dead0001", f".old-{name}-dead0002"):  # a half-written temp dir, a half old copy
        (processed / junk).mkdir()
        (processed / junk / "train.bin").write_bytes(b"\0" * 6)
    (processed / ".tmp-0123456789abcdef-beef0003").mkdir()  # another cache's, as dead
    data = prepare(config, gpt2, gpt2_dir, progress=False)
    assert not data.reused and data.meta["train_docs"] == len(DOCS)
    assert sorted(p.name for p in processed.iterdir()) == [name]


def test_the_temp_dir_of_a_live_preparation_is_left_alone(tmp_path, gpt2, gpt2_dir):
    import fcntl

    write_docs(tmp_path / "in", DOCS)
    processed = tmp_path / "processed"
    (processed / ".tmp-0123456789abcdef-beef0003").mkdir(parents=True)
    fd = os.open(processed, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a process writing that temp dir holds (engine.data.cache)
        data = prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)
    finally:
        os.close(fd)
    assert sorted(p.name for p in processed.iterdir()) == [".tmp-0123456789abcdef-beef0003", data.dir.name]
    prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)  # its writer is gone now
    assert sorted(p.name for p in processed.iterdir()) == [data.dir.name]


def test_long_documents_are_tokenized_in_pieces_to_the_ids_of_the_whole(tmp_path, gpt2, gpt2_dir, monkeypatch):
    from engine.data import text

    long_doc = " ".join(CORPUS * 20) + "\n" + (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    write_docs(tmp_path / "in", [long_doc, "short one", long_doc[:3000]])
    (tmp_path / "in" / "lines.jsonl").write_text(json.dumps({"text": long_doc}) + "\n")
    monkeypatch.setattr(text, "PIECE_CHARS", 40)
    monkeypatch.setattr(text, "CHUNK_CHARS", 500)  # many encode_batch calls, documents spanning them
    calls = []
    real = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, texts, **k: calls.append(len(texts)) or real(self, texts, **k))
    data = prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)
    want = [t for d in (long_doc, "short one", long_doc[:3000], long_doc) for t in gpt2.encode(d) + [gpt2.eos_token_id]]
    assert tokens_of(data.train_path) == want and data.meta["train_docs"] == 4
    assert len(calls) > 20 and max(calls) > 1  # it was cut and batched, not tokenized whole


def test_a_tokenizer_that_cannot_be_cut_gets_whole_documents(tmp_path, monkeypatch):
    from engine.data import text

    tok_dir = write_tokenizer_dir(tmp_path / "tok", "llama_legacy")  # prepends "▁" to every encode call
    tok = Tokenizer.from_pretrained(tok_dir)
    doc = " ".join(CORPUS)
    write_docs(tmp_path / "in", [doc])
    monkeypatch.setattr(text, "PIECE_CHARS", 40)
    data = prepare(cfg(tmp_path, [tmp_path / "in"]), tok, tok_dir, progress=False)
    assert tokens_of(data.train_path) == tok.encode(doc) + [tok.eos_token_id]


# --- validation split --------------------------------------------------------------------------------------------


def test_val_fraction_holds_out_the_tail_at_a_document_boundary(tmp_path, gpt2, gpt2_dir):
    write_docs(tmp_path / "in", CORPUS)
    whole = prepare(cfg(tmp_path, [tmp_path / "in"]), gpt2, gpt2_dir, progress=False)
    split = prepare(cfg(tmp_path, [tmp_path / "in"], val_fraction=0.2), gpt2, gpt2_dir, progress=False)
    all_tokens, train, val = tokens_of(whole.train_path), tokens_of(split.train_path), tokens_of(split.val_path)
    assert train + val == all_tokens
    assert len(val) >= 0.2 * len(all_tokens) and train[-1] == gpt2.eos_token_id  # val starts a document
    assert split.meta["val_tokens"] == len(val) and split.meta["val_source"] == "fraction"
    assert split.meta["train_docs"] + split.meta["val_docs"] == len(CORPUS) and split.meta["val_docs"] >= 1


def test_val_fraction_cuts_inside_a_single_long_document(tmp_path, gpt2, gpt2_dir):
    write_docs(tmp_path / "in", [" ".join(CORPUS)])
    data = prepare(cfg(tmp_path, [tmp_path / "in"], val_fraction=0.25), gpt2, gpt2_dir, progress=False)
    n = data.meta["train_tokens"] + data.meta["val_tokens"]
    assert data.meta["val_tokens"] == int(np.ceil(0.25 * n)) and data.meta["train_docs"] == 0


def test_held_out_val_files_are_tokenized_apart_and_never_trained_on(tmp_path, gpt2, gpt2_dir):
    paths = write_docs(tmp_path / "in", DOCS)
    data = prepare(cfg(tmp_path, [tmp_path / "in" / "*.txt"], val=[str(paths[2])]), gpt2, gpt2_dir, progress=False)
    eos = gpt2.eos_token_id
    assert tokens_of(data.val_path) == [*gpt2.encode(DOCS[2], False), eos]
    assert tokens_of(data.train_path) == [t for d in DOCS[:2] for t in [*gpt2.encode(d, False), eos]]
    assert data.meta["val_files"] == [str(paths[2].resolve())] and len(data.meta["train_files"]) == 2


def test_val_smaller_than_one_window_is_an_error(tmp_path, gpt2, gpt2_dir):
    write_docs(tmp_path / "in", CORPUS)
    with pytest.raises(DataError, match=r"val split has \d+ tokens, fewer than one window .*seq_len"):
        prepare(cfg(tmp_path, [tmp_path / "in"], val_fraction=0.01, seq_len=256), gpt2, gpt2_dir, progress=False)
    # The tokens were kept: the same data with a smaller seq_len is reused, not re-tokenized.
    assert prepare(cfg(tmp_path, [tmp_path / "in"], val_fraction=0.01, seq_len=4), gpt2, gpt2_dir).reused
    with pytest.raises(DataError, match="train split has"):
        prepare(cfg(tmp_path, [tmp_path / "in"], seq_len=100_000), gpt2, gpt2_dir, progress=False)


# --- input errors ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_data_error_naming_the_file(tmp_path, gpt2, gpt2_dir):
    def run(train, **kw):
        return prepare(cfg(tmp_path, train, **kw), gpt2, gpt2_dir, progress=False)

    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"abc\0def")
    (tmp_path / "latin1.txt").write_bytes("ok then caf\xe9".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    cases = [([tmp_path / "missing.txt"], r"missing\.txt'?: no such file"),
             ([tmp_path / "nothing*.txt"], r"nothing\*\.txt'? matches no files"),
             ([tmp_path / "empty_dir"], "matches no files"),
             ([tmp_path / "empty.txt"], r"empty\.txt: empty corpus"),
             ([tmp_path / "blob.bin"], r"blob\.bin: binary file \(NUL byte at offset 3\)"),
             ([tmp_path / "latin1.txt"], r"latin1\.txt: invalid UTF-8 at byte offset 11"),
             ([tmp_path / "bad.jsonl"], r"bad\.jsonl:2: not valid JSON"),
             ([tmp_path / "nofield.jsonl"], r"nofield\.jsonl:3: expected a JSON object with a 'text' field")]
    for train, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            run(train)
    with pytest.raises(DataError, match=r"data\.val: .*nope"):
        run([tmp_path / "latin1.txt"], val=[str(tmp_path / "nope")])
    with pytest.raises(DataError, match="every file is also listed in data.val"):
        run([tmp_path / "empty.txt"], val=[str(tmp_path / "empty.txt")])
    no_eos = write_tokenizer_dir(tmp_path / "no_eos", "gpt2", eos_token=None)
    with pytest.raises(DataError, match="has no eos_token"):
        prepare(cfg(tmp_path, [tmp_path / "empty.txt"]), Tokenizer.from_pretrained(no_eos), no_eos, progress=False)


# --- inputs: globs, directories, {stdlib} ------------------------------------------------------------------------


def test_stdlib_placeholder_expands_to_the_standard_library(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert expand_paths(["{stdlib}/json/*.py"]) == sorted(p.resolve() for p in (stdlib / "json").glob("*.py"))
    assert expand_paths(["{stdlib}/json/__init__.py"]) == [(stdlib / "json" / "__init__.py").resolve()]


def test_directories_and_recursive_globs_list_files_sorted_without_hidden_ones(tmp_path):
    for name in ("b/z.txt", "b/a.py", "a.txt", ".git/config", "b/.hidden.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [p.relative_to(tmp_path.resolve()).as_posix() for p in expand_paths([str(tmp_path)])]
    assert found == ["a.txt", "b/a.py", "b/z.txt"]
    found = expand_paths([str(tmp_path / "**" / "*.txt"), str(tmp_path / "a.txt")])
    assert [p.name for p in found] == ["a.txt", "z.txt"]  # sorted per pattern, repeats dropped


# --- sampler -----------------------------------------------------------------------------------------------------


def ramp(tmp_path, n=1001, T=10) -> TokenWindows:
    # token i has value i, so a window's first input tells which window it is: x[:, 0] // T
    path = tmp_path / "ramp.bin"
    np.arange(n, dtype=np.uint16).tofile(path)
    return TokenWindows(path, T, np.uint16, seed=7)


def test_windows_are_memory_mapped_and_targets_are_inputs_shifted(tmp_path):
    w = ramp(tmp_path)
    assert isinstance(w.tokens, np.memmap) and len(w) == 100
    x, y = w.batch(0, batch_size=4)
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 0] % 10, torch.zeros(4, dtype=torch.int64))


def test_batches_depend_only_on_seed_step_micro_and_rank(tmp_path):
    a, b = ramp(tmp_path), ramp(tmp_path)
    kw = dict(batch_size=3, accum=2, world_size=2)
    run = [a.batch(s, m, rank=r, **kw)[0] for s in range(40) for m in range(2) for r in range(2)]  # > 2 epochs
    resumed = [b.batch(s, m, rank=r, **kw)[0] for s in range(25, 40) for m in range(2) for r in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(run[25 * 4:], resumed))  # a fresh sampler at step 25 replays
    other_seed = TokenWindows(a.tokens.filename, 10, np.uint16, seed=8)
    assert not torch.equal(other_seed.batch(0, batch_size=8)[0], a.batch(0, batch_size=8)[0])


def test_ranks_and_micro_batches_take_disjoint_slices_of_a_step(tmp_path):
    w = ramp(tmp_path)
    for step in (0, 3):
        ids = torch.cat([w.batch(step, m, batch_size=4, accum=2, rank=r, world_size=3)[0][:, 0] // 10
                         for m in range(2) for r in range(3)])  # fmt: skip
        assert len(set(ids.tolist())) == 24


@pytest.mark.parametrize("batch_size", [10, 7])  # 7 does not divide the 100 windows: batches straddle epochs
def test_every_window_is_seen_once_per_epoch_in_a_new_order(tmp_path, batch_size):
    w = ramp(tmp_path)
    seen = torch.cat([w.batch(s, batch_size=batch_size)[0][:, 0] // 10 for s in range(300 // batch_size + 1)])
    epochs = [seen[i * 100:(i + 1) * 100].tolist() for i in range(3)]
    assert all(sorted(e) == list(range(100)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert w.epoch_at(50, batch_size=2) == 1.0


def test_eval_batches_walk_every_window_in_order(tmp_path):
    w = ramp(tmp_path)
    starts = torch.cat([x[:, 0] for x, _ in w.eval_batches(batch_size=32)])
    assert starts.tolist() == list(range(0, 1000, 10))  # the last batch is short (4 windows)
    assert len(list(w.eval_batches(batch_size=32, max_batches=2))) == 2
    shards = [torch.cat([x[:, 0] for x, _ in w.eval_batches(8, rank=r, world_size=2)]) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(0, 1000, 10))


def test_prepared_splits_open_as_windows(tmp_path, gpt2, gpt2_dir):
    write_docs(tmp_path / "in", CORPUS)
    data = prepare(cfg(tmp_path, [tmp_path / "in"], val_fraction=0.2), gpt2, gpt2_dir, progress=False)
    train, val = data.windows("train", 8), data.windows("val", 8)
    assert len(train) == (data.meta["train_tokens"] - 1) // 8 and len(val) == (data.meta["val_tokens"] - 1) // 8
    x, _ = next(val.eval_batches(2))
    assert x[0].tolist() == tokens_of(data.val_path)[:8]
    with pytest.raises(DataError, match="fewer than one window"):
        data.windows("val", 10_000)
