"""`fmcore prepare`: inputs, cleaning counts, tokenizers (trained BPE and a given tokenizer.json), EOS
placement, shard sizes, the CLI, and the embedded stdlib default dataset."""

import gzip
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import fmcore
from fmcore.__main__ import main as fmcore_main
from fmcore.data import Loader, default_dataset, prepare, read_shard, verify_dataset
from fmcore.data.prepare import train_bpe

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n)) + "."


@pytest.fixture
def corpus(tmp_path):
    """A small corpus whose cleaning counts are known. Returns (root, kept texts, expected counts)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    kept = [sentence(rng, 30 + i) for i in range(12)]
    for i, text in enumerate(kept[:6]):
        (root / f"doc{i}.txt").write_text(text + "\n")
    (root / "sub" / "dup.txt").write_text(kept[0] + "\r\n")  # a duplicate after newline normalisation
    (root / "sub" / "empty.txt").write_text("  \n\n")
    (root / "sub" / "short.txt").write_text("tiny")
    (root / "sub" / "blob.bin").write_bytes(b"\x00\x01binary")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text(kept[1] + " hidden")  # hidden paths are not read
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(kept[6:10])]
    lines += [json.dumps({"text": kept[2]}), "{not json", json.dumps({"body": "no text field"}), ""]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(root / "more.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in kept[10:]) + "\n")
    counts = {"documents_in": 6 + 3 + 4 + 1 + 2, "duplicate": 2, "empty": 1, "too_short": 1, "binary_files": 1,
              "bad_json": 2, "kept": 12}
    return root, kept, counts


def documents(root, split):
    """Token lists of every document of a split, cut at the stored document starts."""
    manifest = json.loads((root / "manifest.json").read_text())
    docs = []
    for entry in manifest["splits"].get(split, {"shards": []})["shards"]:
        shard = read_shard(root / entry["file"], check_vocab=True)
        bounds = list(shard.doc_starts) + [shard.info.tokens]
        docs += [shard.tokens[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
    return docs


def test_prepare_trained_bpe(corpus, tmp_path):
    root, kept, counts = corpus
    out = prepare([root], tmp_path / "ds", vocab_size=300, val_fraction=0.2, workers=2)
    manifest = verify_dataset(out)
    for key, value in counts.items():
        assert manifest["cleaning"][key] == value, key
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = manifest["tokenizer"]["eos_id"]
    assert tok.id_to_token(eos) == "<|endoftext|>" and manifest["tokenizer"]["vocab_size"] == tok.get_vocab_size()
    texts = []
    for split in ("train", "val"):
        for doc in documents(out, split):
            assert doc[-1] == eos and eos not in doc[:-1]  # exactly one EOS, after each document
            texts.append(tok.decode(doc[:-1]))
    assert sorted(texts) == sorted(kept)  # byte-level BPE round-trips every kept document
    assert manifest["splits"]["val"]["documents"] >= 1 and manifest["splits"]["train"]["documents"] >= 1
    with pytest.raises(FileExistsError):
        prepare([root], out, vocab_size=300)


def test_prepare_given_tokenizer_and_filters(corpus, tmp_path):
    root, kept, _ = corpus
    tok = train_bpe(kept, 280)
    tok.save(str(tmp_path / "tok.json"))
    docs = ["a" * 200, "x" * 500, "#$%^&*" * 10 + "abc", "hello world " * 5]  # ok, too long, symbols, ok
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in docs))
    out = prepare([tmp_path / "f.jsonl", root / "doc0.txt"], tmp_path / "ds", tokenizer=tmp_path / "tok.json",
                  text_field="content", val_fraction=0.0, max_chars=300, max_symbol_fraction=0.5, workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["cleaning"]
    assert (c["documents_in"], c["too_long"], c["symbols"], c["kept"]) == (5, 1, 1, 3)
    assert list(manifest["splits"]) == ["train"]
    assert (out / "tokenizer.json").read_text() == (tmp_path / "tok.json").read_text()
    assert manifest["tokenizer"]["vocab_size"] == 280
    with pytest.raises(ValueError, match="no EOS token"):
        prepare([root], tmp_path / "ds2", tokenizer=tmp_path / "tok.json", eos_token="<missing>")


def test_a_tokenizer_replaced_after_prepare_is_refused(corpus, tmp_path):
    """A tokenizer.json copied over a dataset's decoded its run's samples and went into its export, silently."""
    from fmcore.data.shards import ShardError, load_manifest
    from fmcore.train.trainer import dataset_tokenizer

    root, kept, _ = corpus
    out = prepare([root], tmp_path / "ds", vocab_size=300, val_fraction=0.2, workers=1)
    assert dataset_tokenizer(out) == out / "tokenizer.json"
    train_bpe(kept, 290).save(str(out / "tokenizer.json"))
    with pytest.raises(ShardError, match=r"tokenizer\.json: crc32 .* not the tokenizer this dataset's shards"):
        dataset_tokenizer(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["crc32"] = "0x1234"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="tokenizer.crc32 must be an int"):
        load_manifest(out)


def test_large_jsonl_read_in_ranges(tmp_path, monkeypatch):
    """A JSON Lines file split into byte ranges (here of 100 bytes) yields every record exactly once."""
    prep = importlib.import_module("fmcore.data.prepare")  # the module (fmcore.data.prepare is the function)
    monkeypatch.setattr(prep, "JSONL_CHUNK_BYTES", 100)
    texts = [f"json lines record number {i} " + "x" * (i % 37) for i in range(60)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert len(prep._tasks([tmp_path / "big.jsonl"], prep.CleanConfig())) > 20
    out = prepare(tmp_path / "big.jsonl", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=2)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["documents_in"], c["kept"], c["duplicate"], c["bad_json"]) == (60, 60, 0, 0)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert sorted(tok.decode(d[:-1]) for d in documents(out, "train")) == sorted(t.strip() for t in texts)


def test_shard_sizes(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "c"
    root.mkdir()
    for i in range(40):
        (root / f"{i}.txt").write_text(sentence(rng, 50))
    out = prepare(root, tmp_path / "ds", vocab_size=300, shard_tokens=1000, val_fraction=0.0, workers=2)
    shards = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    sizes = [s["tokens"] for s in shards]
    assert len(sizes) > 3 and all(500 <= n <= 1500 for n in sizes[-2:]) and all(n == 1000 for n in sizes[:-2])
    total = sum(len(d) for d in documents(out, "train"))
    assert total == sum(sizes)
    with Loader(out, batch_size=2, seq_len=100, doc_boundaries=True) as loader:
        assert next(loader).cu_seqlens[-1] == 200


@pytest.mark.parametrize("argv, want", [([], 1_000_000), (["--shard-tokens", "100000000"], 100_000_000),
                                         (["--shard-tokens", "5000"], 5000), (["in.txt"], 100_000_000)])
def test_cli_shard_tokens(monkeypatch, tmp_path, argv, want):
    # The stdlib corpus's default (1M) applies only when --shard-tokens is not given: the value its
    # help text named as the default (100000000) was replaced by 1M when passed explicitly.
    seen = {}

    def fake_prepare(inputs, out, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop")

    monkeypatch.setattr(importlib.import_module("fmcore.data.prepare"), "prepare", fake_prepare)
    assert fmcore_main(["prepare", "--out", str(tmp_path / "ds")] + argv) == 2
    assert seen["shard_tokens"] == want


def test_inputs_need_an_out_dir(corpus, tmp_path, monkeypatch, capsys):
    # Without --out, a dataset of the user's inputs went to the embedded corpus's directory, which the
    # next `fmcore train` without data.dataset (default_dataset()) replaced with the corpus.
    root, _, _ = corpus
    monkeypatch.setenv("FMCORE_DATA", str(tmp_path / "data"))
    assert fmcore_main(["prepare", str(root), "--vocab-size", "300", "--workers", "1"]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="out_dir"):
        prepare(root, vocab_size=300, workers=1)


def test_cli(corpus, tmp_path, capsys):
    root, _, _ = corpus
    assert fmcore_main(["prepare", str(root), "--out", str(tmp_path / "cli"), "--vocab-size", "300",
                        "--min-chars", "4", "--workers", "1"]) == 0  # "tiny" now passes
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["cleaning"]["too_short"] == 0 and manifest["cleaning"]["min_chars"] == 4
    assert "train:" in capsys.readouterr().out
    # errors a user makes are one line and exit code 2, not a traceback
    assert fmcore_main(["prepare", str(root), "--out", str(tmp_path / "cli"), "--workers", "1"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert fmcore_main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "cli2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a bad tokenizer or vocabulary is refused before the inputs are read
    (tmp_path / "not-a-tokenizer.json").write_text('{"version": 1,')
    for tok, message in [("missing.json", "is not a file"), ("not-a-tokenizer.json", "is not an HF tokenizers")]:
        assert fmcore_main(["prepare", str(root), "--out", str(tmp_path / "cli3"), "--tokenizer",
                            str(tmp_path / tok)]) == 2
        assert f"tokenizer {tmp_path / tok} {message}" in capsys.readouterr().err
    for vocab in ("100", "0"):  # (0 took the default vocabulary silently)
        assert fmcore_main(["prepare", str(root), "--out", str(tmp_path / "cli3"), "--vocab-size", vocab]) == 2
        err = capsys.readouterr().err
        assert "vocab_size must be at least 257 for a byte-level BPE" in err and err.rstrip().endswith(f"got {vocab}")
    assert not (tmp_path / "cli3").exists()


@pytest.fixture(scope="session")
def stdlib_dataset(tmp_path_factory):
    """The embedded default dataset, built once per session (about 15 s on 2 busy cores)."""
    return default_dataset(tmp_path_factory.mktemp("fmcore_data"))


def test_default_dataset(stdlib_dataset):
    manifest = verify_dataset(stdlib_dataset, check_vocab=True)
    assert manifest["tokenizer"]["vocab_size"] == 4096
    assert manifest["splits"]["train"]["tokens"] > 500_000 and manifest["splits"]["val"]["tokens"] > 10_000
    # This Python's library, in this Python's directory: a corpus one Python prepared was once every other's too
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert manifest["source"].startswith(f"python {version}.") and "standard library" in manifest["source"]
    assert stdlib_dataset.name == f"stdlib-py{version}"
    mtime = (stdlib_dataset / "manifest.json").stat().st_mtime
    assert default_dataset(stdlib_dataset.parent) == stdlib_dataset  # found, not rebuilt
    assert (stdlib_dataset / "manifest.json").stat().st_mtime == mtime
    tok = Tokenizer.from_file(str(stdlib_dataset / "tokenizer.json"))
    with Loader(stdlib_dataset, "val", batch_size=4, seq_len=256, doc_boundaries=True) as loader:
        batch = next(loader)
        assert loader.vocab_size == 4096 and loader.eos_id == 0
    # Real Python source, not random tokens (in all four rows: one can be a module's docstring alone)
    text = "".join(tok.decode(row.tolist()) for row in batch.x)
    assert "def " in text or "import " in text or "self" in text


def train_docs(out):
    """(decoded texts without their EOS, the EOS id) of the train split, checking one EOS per document."""
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = json.loads((out / "manifest.json").read_text())["tokenizer"]["eos_id"]
    docs = documents(out, "train")
    assert all(d[-1] == eos and eos not in d[:-1] for d in docs)
    return [tok.decode(d[:-1]) for d in docs]


def test_out_is_free_or_a_dataset(corpus, tmp_path, capsys):
    """--overwrite replaces a dataset, nothing else: not the input corpus given as --out, not a file."""
    root, _, _ = corpus
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for extra in ([], ["--overwrite"]):
        assert fmcore_main(["prepare", str(root), "--out", str(root), "--workers", "1"] + extra) == 2
        assert "non-empty directory without manifest.json" in capsys.readouterr().err
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    (tmp_path / "a-file").write_text("keep me")
    assert fmcore_main(["prepare", str(root), "--out", str(tmp_path / "a-file"), "--overwrite"]) == 2
    assert f"output {tmp_path / 'a-file'} is an existing file" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "keep me"
    for under in ("sub", "sub/deeper"):  # (mkdir's "[Errno 17] File exists" once the inputs had been read)
        assert fmcore_main(["prepare", str(root), "--out", str(tmp_path / "a-file" / under)]) == 2
        assert f"cannot be written: {tmp_path / 'a-file'} is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # an empty directory is free
    args = ["prepare", str(root), "--out", str(tmp_path / "empty"), "--vocab-size", "300", "--workers", "1"]
    assert fmcore_main(args) == 0
    assert fmcore_main(args + ["--overwrite"]) == 0  # a dataset is replaced
    verify_dataset(tmp_path / "empty")


def test_jsonl_records_end_at_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 are allowed unescaped inside JSON strings; CRLF line ends are fine."""
    texts = [f"record {i} with a line\u2028separator, a\u2029paragraph and a \x85next line" for i in range(3)]
    (tmp_path / "a.jsonl").write_bytes("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n"
                                               for t in texts).encode())
    out = prepare(tmp_path / "a.jsonl", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["documents_in"], c["kept"], c["bad_json"]) == (3, 3, 0)
    assert sorted(train_docs(out)) == texts


@pytest.mark.parametrize("name", ["a.jsonl", "a.json"])
def test_a_text_field_no_record_has_names_the_file(tmp_path, name):
    """A wrong --text-field counted every record of a JSON Lines or .json file in bad_json, and prepare went on
    with the other inputs (a text file beside it) as if nothing was wrong: an error naming the file, as for a
    Parquet file without that column. Records lacking it beside others having it are still counted."""
    records = [{"body": f"an ordinary record number {i}", "id": i} for i in range(3)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_text("\n".join(map(json.dumps, records)) if name.endswith("l")
                                        else json.dumps(records))
    (tmp_path / "in" / "notes.txt").write_text("a text file beside the records, read whatever the field")
    with pytest.raises(ValueError, match=rf"input {tmp_path / 'in' / name}: no record has the field 'text' "
                                         r"\(--text-field\); the first record's fields are \['body', 'id'\]"):
        prepare(tmp_path / "in", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    out = prepare(tmp_path / "in", tmp_path / "ds", text_field="body", vocab_size=300, val_fraction=0.0, workers=1)
    assert json.loads((out / "manifest.json").read_text())["cleaning"]["kept"] == 4
    records[1] = {"id": 1}
    (tmp_path / "in" / name).write_text("\n".join(map(json.dumps, records)) if name.endswith("l")
                                        else json.dumps(records))
    out = prepare(tmp_path / "in", tmp_path / "ds", text_field="body", vocab_size=300, val_fraction=0.0, workers=1,
                  overwrite=True)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["kept"], c["bad_json"]) == (3, 1)


def test_jsonl_bad_records_are_counted(tmp_path):
    """A record Python's json cannot hold (an integer over the digit limit, nesting deeper than the recursion
    limit) is one bad_json, not the end of the run; a lone surrogate escape becomes U+FFFD."""
    good = [f"an ordinary record number {i}" for i in range(3)]
    lines = [json.dumps({"text": t}) for t in good]
    lines.append('{"text": "big number record", "n": ' + "7" * 5000 + "}")
    lines.append('{"text": "deep record", "a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    lines.append('{"text": "a broken emoji \\ud83d in this record"}')
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = prepare(tmp_path / "a.jsonl", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["documents_in"], c["kept"], c["bad_json"]) == (4, 4, 2)
    assert sorted(train_docs(out)) == sorted(good + ["a broken emoji \ufffd in this record"])


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_bad_gzip_input_names_the_file(tmp_path, capsys, damage):
    (tmp_path / "in").mkdir()
    data = gzip.compress(b"".join(json.dumps({"text": f"record {i} " * 20}).encode() + b"\n" for i in range(500)))
    bad = tmp_path / "in" / "part.jsonl.gz"
    bad.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not gzip at all\n")
    assert fmcore_main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "ds"), "--workers", "1"]) == 2
    assert f"fmcore prepare: error: input {bad}: not a valid gzip file" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_byte_order_mark_is_not_text(tmp_path):
    text = "a text file that starts with a byte order mark"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "in" / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first " + text}).encode())
    out = prepare(tmp_path / "in", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    assert json.loads((out / "manifest.json").read_text())["cleaning"]["bad_json"] == 0
    assert sorted(train_docs(out)) == [text, "first " + text]


def test_binary_file_is_sniffed_not_read_whole(tmp_path, monkeypatch):
    """A binary file (a checkpoint in the input directory) is classified from its first bytes only."""
    prep = importlib.import_module("fmcore.data.prepare")
    read = {}

    class Counting:  # a file that records how many bytes were read from it
        def __init__(self, path, mode):
            self.f, self.path = open(path, mode), path
            read[path] = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            read[self.path] += len(data)
            return data

    monkeypatch.setattr(prep, "open", Counting, raising=False)  # the module's open(), not builtins'
    (tmp_path / "model.ckpt").write_bytes(b"\0" * (1 << 20))
    text = "a text file longer than the sniffed bytes " * 1000
    (tmp_path / "a.txt").write_text(text)
    assert prep._read_text(tmp_path / "model.ckpt") is None
    assert read[tmp_path / "model.ckpt"] == prep.BINARY_SNIFF_BYTES
    assert prep._read_text(tmp_path / "a.txt") == text


def test_out_inside_an_input_is_not_read(tmp_path):
    """A rerun with --out inside the input directory reads neither its own output nor an older dataset."""
    root = tmp_path / "c"
    root.mkdir()
    for i in range(10):
        (root / f"{i}.txt").write_text(f"my corpus document number {i} with plain english words\n")
    for out, overwrite in [(root / "ds", False), (root / "ds", True), (root / "ds2", False)]:
        prepare(root, out, vocab_size=300, val_fraction=0.0, workers=1, overwrite=overwrite)
        c = json.loads((out / "manifest.json").read_text())["cleaning"]
        assert (c["documents_in"], c["kept"]) == (10, 10), out


def test_eos_text_inside_a_document_is_ordinary_text(tmp_path):
    texts = [f"record {i}: some ordinary english text here" for i in range(4)]
    texts.append("GPT-2 separates documents with <|endoftext|>, as in foo<|endoftext|>bar")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = prepare(tmp_path / "in.jsonl", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    assert sorted(train_docs(out)) == sorted(texts)  # one EOS per document, the literal text round-trips


def test_tokenizer_with_an_id_gap(tmp_path):
    """A tokenizer whose largest id (70000) is above get_vocab_size() (7): the vocab is max id + 1."""
    from tokenizers import models, pre_tokenizers

    vocab = {"hello": 0, "world": 1, "foo": 2, "bar": 3, "baz": 70000, "[UNK]": 4, "</s>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text("hello world foo bar baz " * 20)
    out = prepare(tmp_path / "a.txt", tmp_path / "ds", tokenizer=tmp_path / "tok.json", val_fraction=0.0, workers=1)
    manifest = verify_dataset(out, check_vocab=True)
    assert manifest["tokenizer"]["vocab_size"] == 70001 and manifest["tokenizer"]["eos_id"] == 5
    assert 70000 in documents(out, "train")[0]


def test_a_replace_killed_while_deleting_the_old_dataset_leaves_a_whole_one(corpus, tmp_path, monkeypatch):
    # --overwrite deleted the old dataset in place: killed inside that rmtree (a preempted job), out/ kept
    # its manifest and lost some shards, which `fmcore prepare` then refused to replace ("already holds a
    # dataset") and `fmcore train` read until "train_000046.bin: cannot open".
    prepare_module = importlib.import_module("fmcore.data.prepare")  # (fmcore.data.prepare is the function)
    root, _, _ = corpus
    out = tmp_path / "ds"
    prepare(root, out, vocab_size=300, shard_tokens=200, val_fraction=0.0, workers=1)
    real, calls = shutil.rmtree, []

    def killed_inside(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            next(Path(path).glob("train_*.bin")).unlink()
            raise KeyboardInterrupt
        real(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module.shutil, "rmtree", killed_inside)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, vocab_size=300, shard_tokens=200, val_fraction=0.0, workers=1, overwrite=True)
    monkeypatch.undo()
    verify_dataset(out)  # the old dataset or the new one, whole
    assert (out / ".fmcore-replaced").is_dir()  # what the killed deletion left
    prepare(root, tmp_path / "ds", vocab_size=300, shard_tokens=200, val_fraction=0.0, workers=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds"]
    assert not (out / ".fmcore-replaced").exists()  # the killed deletion's leftover is gone


def test_fmcore_prepare_killed_by_sigterm_deletes_its_temporary_directory(corpus, tmp_path):
    # SIGTERM (a preempted job) or SIGHUP (a closed terminal, the same handler) ended the process at once: its
    # temporary directory, up to a whole dataset's size, stayed next to --out as .ds.XXXXXXXX, never deleted.
    root, _, _ = corpus
    sig = "SIGTERM"
    # The signal from inside, at a known point: while the tokenizer is trained (the temporary directory exists).
    script = (f"import importlib, os, signal\n"
              f"p = importlib.import_module('fmcore.data.prepare')\n"
              f"real = p._train_bpe_file\n"
              f"def train_bpe_file(*a, **k):\n"
              f"    os.kill(os.getpid(), signal.{sig})\n"
              f"    return real(*a, **k)\n"
              f"p._train_bpe_file = train_bpe_file\n"
              f"raise SystemExit(p.main([{str(root)!r}, '--out', {str(tmp_path / 'ds')!r}, '--vocab-size', '300', "
              f"'--workers', '2']))\n")
    pkg_root = Path(fmcore.__file__).resolve().parent.parent  # the fmcore this test imports
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg_root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + getattr(signal, sig), done.stderr
    assert f"stopped by {sig}" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_json_files_hold_records(tmp_path):
    """.json is JSON Lines (datasets' to_json(), C4's and Dolma's *.json.gz) or an array of records; read as
    plain text, each file was one document of JSON syntax."""
    texts = [f"json record number {i} with ordinary words" for i in range(6)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "lines.json").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2]))
    with gzip.open(tmp_path / "in" / "c4-train.00000-of-01024.json.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in texts[2:4]))
    (tmp_path / "in" / "array.json").write_text(json.dumps([{"text": t} for t in texts[4:]] + [{"id": 1}], indent=2))
    out = prepare(tmp_path / "in", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["documents_in"], c["kept"], c["bad_json"]) == (6, 6, 1)
    assert sorted(train_docs(out)) == texts


def test_compressed_binary_and_unsupported_inputs(tmp_path, capsys):
    import bz2
    import lzma

    texts = [f"compressed record number {i} with ordinary words" for i in range(4)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt.bz2").write_bytes(bz2.compress(texts[0].encode()))
    (tmp_path / "in" / "b.jsonl.xz").write_bytes(lzma.compress("".join(json.dumps({"text": t}) + "\n"
                                                                       for t in texts[1:]).encode()))
    (tmp_path / "in" / "model.ckpt").write_bytes(b"\0\1\2" * 100)  # found in a directory: counted, skipped
    out = prepare(tmp_path / "in", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    assert json.loads((out / "manifest.json").read_text())["cleaning"]["binary_files"] == 1
    assert sorted(train_docs(out)) == texts
    # Named as an input, a binary file is an error: it was counted as binary_files and the run went on.
    assert fmcore_main(["prepare", str(tmp_path / "in" / "a.txt.bz2"), str(tmp_path / "in" / "model.ckpt"),
                        "--out", str(tmp_path / "ds2"), "--workers", "1"]) == 2
    assert f"input {tmp_path / 'in' / 'model.ckpt'}: a binary file" in capsys.readouterr().err
    # .zst (the Pile, RedPajama) was skipped as a binary file, its data lost with exit 0. (.parquet: below.)
    for name in ("part.jsonl.zst",):
        (tmp_path / "in" / name).write_bytes(b"\x28\xb5\x2f\xfd\0" + bytes(range(256)))
        assert fmcore_main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "ds3"), "--workers", "1"]) == 2
        assert f"input {tmp_path / 'in' / name}: .{name.rsplit('.', 1)[1]} files are not supported" \
            in capsys.readouterr().err
        (tmp_path / "in" / name).unlink()
    (tmp_path / "in" / "bad.txt.xz").write_bytes(b"not xz at all")
    assert fmcore_main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "ds3"), "--workers", "1"]) == 2
    assert f"input {tmp_path / 'in' / 'bad.txt.xz'}: not a valid xz file" in capsys.readouterr().err


def test_symlinked_directories_are_followed_once(tmp_path):
    """A directory linked into the input is read (it was skipped without a count); a link to an ancestor
    does not loop and a directory linked twice is read once."""
    (tmp_path / "elsewhere").mkdir()
    texts = [f"a document stored elsewhere, number {i}" for i in range(3)]
    for i, t in enumerate(texts):
        (tmp_path / "elsewhere" / f"{i}.txt").write_text(t)
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "local.txt").write_text("a document stored in the corpus itself")
    (root / "part1").symlink_to(tmp_path / "elsewhere")
    (root / "part1-again").symlink_to(tmp_path / "elsewhere")
    (root / "loop").symlink_to(root)
    out = prepare(root, tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["documents_in"], c["kept"], c["duplicate"]) == (4, 4, 0)
    assert sorted(train_docs(out)) == sorted(texts + ["a document stored in the corpus itself"])


def test_tokenizer_truncation_and_padding_are_not_applied(tmp_path):
    """A tokenizer.json saved with truncation (max_length 32) or padding cut every document to 32 tokens
    or padded it to the batch's longest with pad ids written as text."""
    texts = [f"document {i} " + "lorem ipsum dolor sit amet " * (5 + 20 * i) for i in range(4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_bpe(texts, 300)
    tok.enable_truncation(max_length=32)
    tok.enable_padding(pad_id=0, pad_token="<|endoftext|>")
    tok.save(str(tmp_path / "tok.json"))
    out = prepare(tmp_path / "a.jsonl", tmp_path / "ds", tokenizer=tmp_path / "tok.json", val_fraction=0.0,
                  workers=1)
    assert sorted(train_docs(out)) == sorted(t.strip() for t in texts)


def test_invalid_utf8_is_counted(tmp_path):
    """Invalid UTF-8 (a cp1252 file) becomes U+FFFD, as before, but no longer silently: the files are counted."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cp1252.txt").write_bytes("Café crème brûlée, naïve façade".encode("cp1252"))
    (tmp_path / "in" / "utf8.txt").write_text("Café crème brûlée, naïve façade, again")
    out = prepare(tmp_path / "in", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    assert json.loads((out / "manifest.json").read_text())["cleaning"]["invalid_utf8_files"] == 1
    assert sorted(train_docs(out)) == sorted(["Caf\ufffd cr\ufffdme br\ufffdl\ufffde, na\ufffdve fa\ufffdade",
                                              "Café crème brûlée, naïve façade, again"])


def test_eos_token_is_checked_before_the_inputs_are_read(tmp_path, monkeypatch):
    """A tokenizer without the EOS token failed only after every input was read and cleaned (hours for a
    large corpus); an eos_token the trained BPE lacks, only after training it."""
    from tokenizers import models

    prep = importlib.import_module("fmcore.data.prepare")
    monkeypatch.setattr(prep, "_tasks", lambda *a, **k: pytest.fail("inputs read before the EOS check"))
    Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text("hello " * 10)
    with pytest.raises(ValueError, match="no EOS token found"):
        prepare(tmp_path / "a.txt", tmp_path / "ds", tokenizer=tmp_path / "tok.json", workers=1)
    with pytest.raises(ValueError, match="eos_token '</s>' is not in the trained byte-level BPE"):
        prepare(tmp_path / "a.txt", tmp_path / "ds", eos_token="</s>", workers=1)


def test_tokenizer_trained_in_a_child_process_is_the_one_trained_in_process(tmp_path):
    # prepare() trains its BPE in a child process (so that a signal stops it): the same tokenizer.json as
    # train_bpe() here, whatever the documents hold (NUL, line separators, non-ASCII).
    rng = np.random.default_rng(0)
    texts = [sentence(rng, 20 + i) for i in range(40)]
    texts += ["a NUL \0 inside, a line\u2028separator and a CRLF\r\nin the text", "non-ASCII: é, 漢字 and 😀 " * 3]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = prepare(tmp_path / "docs.jsonl", tmp_path / "ds", vocab_size=400, val_fraction=0.0, workers=1)
    texts = [t.replace("\r\n", "\n") for t in texts]  # (cleaning normalises newlines)
    train_bpe(texts, 400, len(texts)).save(str(tmp_path / "here.json"))
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "here.json").read_bytes()


def test_tokenizer_training_failure_shows_the_child_process_error(tmp_path):
    prepare_module = importlib.import_module("fmcore.data.prepare")
    with pytest.raises(RuntimeError, match=r"training the BPE tokenizer .*failed: Exception: .*No such file"):
        prepare_module._train_bpe_file(["some text to train on"], 300, tmp_path / "missing" / "tokenizer.json")


def _child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # (a process that ended meanwhile)
            continue
        if ppid == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_fmcore_prepare_stops_at_once_while_training_the_tokenizer(tmp_path, sig):
    # The tokenizers BPE trainer runs in Rust and never checks for signals: a Ctrl-C or a SIGTERM while it
    # trained waited for it to finish (about a minute per 24M characters, here several seconds).
    rng = np.random.default_rng(0)
    (tmp_path / "corpus").mkdir()
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    (tmp_path / "corpus" / "random.txt").write_bytes(rng.choice(letters, size=6_000_000).tobytes())
    script = ("import signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)  # (ignored when started in the background)\n"
              "import time\n"
              "from fmcore.data.prepare import main\n"
              f"code = main([{str(tmp_path / 'corpus')!r}, '--out', {str(tmp_path / 'ds')!r}, "
              f"'--vocab-size', '30000', '--workers', '1'])\n"
              # (CLOCK_MONOTONIC, the same in every process; the interpreter's exit after it, with torch
              # imported, takes up to a second on a busy machine)
              "print(f'returned at {time.monotonic()}', file=sys.stderr)\n"
              "sys.exit(code)\n")
    pkg_root = Path(fmcore.__file__).resolve().parent.parent  # the fmcore this test imports
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg_root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".ds.*")):  # the temporary directory: made just before the tokenizer
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no temporary directory after 120 s"
            time.sleep(0.02)
        time.sleep(1.0)  # well inside training
        children = _child_pids(proc.pid)
        assert children  # (the trainer's process)
        sent = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig), stderr
    assert f"stopped by {sig}" in stderr and "Traceback" not in stderr
    took = float(stderr.rsplit("returned at ", 1)[1]) - sent
    assert took < 1.0, f"main() returned {took:.1f} s after the signal"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "a child process outlived prepare"


@pytest.mark.parametrize("name", ["data.tar.gz", "data.tar.xz", "data.tar.bz2", "data.txz"])
def test_tar_archives_are_refused_by_their_full_suffix(tmp_path, capsys, name):
    # "data.tar.gz" was refused as ".gz files are not supported" (the message offers .gz as supported), and
    # a .tar.xz / .tar.bz2 decompressed to tar's NUL-padded headers: in a directory, a binary file counted
    # and skipped with exit 0, its text lost, as .tar.gz's was before it was refused.
    import io
    import tarfile

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a plain text document long enough to be kept")
    mode = {"gz": "w:gz", "xz": "w:xz", "bz2": "w:bz2", "txz": "w:xz"}[name.rsplit(".", 1)[1]]
    with tarfile.open(tmp_path / "in" / name, mode) as t:
        data = b"a document inside the archive, long enough to be kept"
        info = tarfile.TarInfo("inner.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    suffix = "." + name.split(".", 1)[1]
    for args in ([str(tmp_path / "in")], [str(tmp_path / "in" / name)]):
        assert fmcore_main(["prepare", *args, "--out", str(tmp_path / "ds"), "--workers", "1"]) == 2
        assert f"input {tmp_path / 'in' / name}: {suffix} files are not supported" in capsys.readouterr().err


def test_tokenizer_training_finds_tokenizers_where_this_process_did(tmp_path, monkeypatch):
    # The child process imports tokenizers: from a sys.path entry this process added at run time (pip install
    # --target, a notebook), absent from sys.executable's own path, it failed "No module named 'tokenizers'".
    # Here sys.executable runs without its site-packages (-S), where tokenizers is installed.
    wrapper = tmp_path / "python-without-site"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    wrapper.chmod(0o755)
    assert subprocess.run([str(wrapper), "-c", "import tokenizers"], capture_output=True).returncode != 0
    monkeypatch.setattr(sys, "executable", str(wrapper))
    prepare_module = importlib.import_module("fmcore.data.prepare")
    texts = [f"some text to train on, number {i}" for i in range(20)]
    prepare_module._train_bpe_file(texts, 300, tmp_path / "tokenizer.json")
    train_bpe(texts, 300, len(texts)).save(str(tmp_path / "here.json"))
    assert (tmp_path / "tokenizer.json").read_bytes() == (tmp_path / "here.json").read_bytes()


def test_invalid_utf8_is_counted_once_per_file(tmp_path, monkeypatch):
    # A large JSON Lines file is read in byte ranges, one task each: a file with invalid UTF-8 in two of them
    # was counted twice in invalid_utf8_files.
    prepare_module = importlib.import_module("fmcore.data.prepare")
    monkeypatch.setattr(prepare_module, "JSONL_CHUNK_BYTES", 4096)
    lines = [json.dumps({"text": f"document number {i} " + "some words here " * 5}).encode() for i in range(200)]
    for i in (10, 150):  # a cp1252 byte in two ranges of the file
        lines[i] = lines[i].replace(b"some", b"s\xe9me", 1)
    (tmp_path / "one.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert len(prepare_module._tasks([tmp_path / "one.jsonl"], prepare_module.CleanConfig())) > 2
    out = prepare(tmp_path / "one.jsonl", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["kept"], c["invalid_utf8_files"]) == (200, 1)


def test_a_json_file_of_one_pretty_printed_record(tmp_path):
    # Read as JSON Lines, its text was lost with exit 0 and each of its lines counted in bad_json.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "record.json").write_text(json.dumps({"text": "one record, printed over several lines",
                                                             "id": 7}, indent=2))
    (tmp_path / "in" / "lines.json").write_text(json.dumps({"text": "a JSON Lines record in a .json file"}) + "\n"
                                                + json.dumps({"text": "and a second one, on its own line"}) + "\n")
    out = prepare(tmp_path / "in", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["kept"], c["bad_json"]) == (3, 0)
    assert sorted(train_docs(out)) == sorted(["one record, printed over several lines", "a JSON Lines record in a "
                                              ".json file", "and a second one, on its own line"])


def test_a_large_json_file_of_one_pretty_printed_record(tmp_path, monkeypatch):
    # A .json file larger than JSONL_CHUNK_BYTES (32 MiB) is cut into byte ranges unless its head shows one
    # JSON value: "[" did, a pretty-printed record did not (its ranges were bad JSON Lines, the text lost).
    prepare_module = importlib.import_module("fmcore.data.prepare")
    monkeypatch.setattr(prepare_module, "JSONL_CHUNK_BYTES", 256)
    text = " ".join(["one long record, printed over several lines"] * 20)
    (tmp_path / "record.json").write_text(json.dumps({"id": 7, "text": text}, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps({"text": f"record {i} of many " * 4}) + "\n"
                                                 for i in range(40)))
    cfg = prepare_module.CleanConfig()
    assert len(prepare_module._tasks([tmp_path / "record.json"], cfg)) == 1
    assert len(prepare_module._tasks([tmp_path / "lines.json"], cfg)) > 2  # JSON Lines: still in ranges
    out = prepare([tmp_path / "record.json", tmp_path / "lines.json"], tmp_path / "ds", vocab_size=300,
                  val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["kept"], c["bad_json"]) == (41, 0)
    assert text in train_docs(out)


def test_a_large_json_lines_file_is_read_in_ranges_whatever_its_first_line(tmp_path, monkeypatch):
    # _json_whole parsed the first line from byte 0: a blank first line, invalid UTF-8 or a bad record there
    # read a JSON Lines file of any size whole, by one worker; a deeply nested first record raised
    # RecursionError out of prepare, where the reader counts it in bad_json.
    prepare_module = importlib.import_module("fmcore.data.prepare")
    monkeypatch.setattr(prepare_module, "JSONL_CHUNK_BYTES", 1 << 16)
    lines = "".join(json.dumps({"text": f"record {i} of many " * 4}) + "\n" for i in range(2000)).encode()
    firsts = {"blank": b"\n  \n", "bom": b"\xef\xbb\xbf", "latin1": b'{"text": "caf\xe9 au lait"}\n',
              "bad": b'{"text": "cut off\n', "deep": b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
              "bigint": b'{"text": ' + b"9" * 5000 + b"}\n"}
    cfg = prepare_module.CleanConfig()
    for name, first in firsts.items():
        (tmp_path / f"{name}.json").write_bytes(first + lines)
        assert len(prepare_module._tasks([tmp_path / f"{name}.json"], cfg)) > 2, name
    out = prepare([tmp_path / "deep.json"], tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["kept"], c["bad_json"]) == (2000, 1)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_a_worker_count_below_one_is_refused(tmp_path, workers):
    # `workers or default_workers()`: 0 ran with every core, -2 with one process, both silently (as the
    # Loader's threads=0 once did); the count the caller set was not the one used.
    (tmp_path / "a.txt").write_text("some ordinary english text here " * 4)
    with pytest.raises(ValueError, match=r"workers must be None \(the usable cores\) or an int >= 1, got "):
        prepare(tmp_path / "a.txt", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=workers)
    assert not (tmp_path / "ds").exists()


def test_an_eos_token_that_is_ordinary_text_is_refused(tmp_path):
    """An EOS token the tokenizer produces for text (a plain vocab entry, not a special token) ended up inside
    the documents: the shards held more EOS ids than documents, and a model learned to end after that word."""
    from tokenizers import models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "stop": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text("hello world stop hello world " * 5)
    with pytest.raises(ValueError, match="the EOS token 'stop' \\(id 3\\) occurs inside a document"):
        prepare(tmp_path / "a.txt", tmp_path / "ds", tokenizer=tmp_path / "tok.json", eos_token="stop",
                val_fraction=0.0, workers=1)
    assert not (tmp_path / "ds").exists()
    (tmp_path / "a.txt").write_text("hello world hello world " * 5)  # never produced for the text: fine
    out = prepare(tmp_path / "a.txt", tmp_path / "ds", tokenizer=tmp_path / "tok.json", eos_token="stop",
                  val_fraction=0.0, workers=1)
    assert documents(out, "train") == [[1, 2] * 10 + [3]]


def test_cli_vocab_size_with_a_given_tokenizer_is_refused(corpus, tmp_path, capsys):
    # --vocab-size sizes the trained BPE only: with --tokenizer it was ignored, and the manifest's options
    # recorded it as if it had been used.
    root, kept, _ = corpus
    train_bpe(kept, 280).save(str(tmp_path / "tok.json"))
    args = ["prepare", str(root), "--out", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "tok.json"),
            "--workers", "1"]
    assert fmcore_main(args + ["--vocab-size", "4096"]) == 2
    assert "--vocab-size sizes the trained BPE" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
    # --max-input-chars caps the stdlib corpus only: with INPUTS it was ignored, every input read whole.
    assert fmcore_main(args + ["--max-input-chars", "10"]) == 2
    assert "--max-input-chars caps the embedded stdlib corpus; INPUTS are read whole" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
    assert fmcore_main(args) == 0


def test_an_empty_input_list_is_named(tmp_path):
    with pytest.raises(ValueError, match="inputs is empty: pass files or directories, or None"):
        prepare([], tmp_path / "ds", vocab_size=300)
    assert not (tmp_path / "ds").exists()


def _framed_tokenizer(path, template=None, bert=False):
    """A word-level tokenizer.json with <s>, </s>, [CLS], [SEP] and a post-processor adding them as template
    says (HF's notation, "<s> $A" is Llama 2's) or BERT's [CLS] $A [SEP]; None: no post-processor (GPT-2)."""
    from tokenizers import models, pre_tokenizers, processors

    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "[CLS]": 3, "[SEP]": 4}
    vocab = {**specials, **{w: 5 + i for i, w in enumerate(WORDS)}}
    if bert:
        del vocab["</s>"]  # (the EOS is [SEP] then, the last of prepare's candidates)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t in specials if t in vocab])
    if bert:
        tok.post_processor = processors.BertProcessing(("[SEP]", 4), ("[CLS]", 3))
    elif template:
        # Llama 3's tokenizer.json has a Sequence of ByteLevel and the template: the same ids.
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])])
    tok.save(str(path))
    return [vocab[w] for w in WORDS]


@pytest.mark.parametrize("template, bert, before, after, document", [
    (None, False, [], [2], "$text </s>"),  # GPT-2: nothing added, prepare's EOS after each document
    ("<s> $A", False, [1], [2], "<s> $text </s>"),  # Llama 2/3: <s> in front of each document (torchtitan's)
    ("<s> $A </s>", False, [1], [2], "<s> $text </s>"),  # the post-processor's </s> is the EOS, not a second one
    ("</s> $A", False, [], [2], "$text </s>"),  # OPT: the BOS is the EOS, which already separates the documents
    (None, True, [3], [4], "[CLS] $text [SEP]"),  # BERT: [CLS] text [SEP], [SEP] the EOS
])
def test_special_tokens_of_the_tokenizer_frame_each_document(tmp_path, template, bert, before, after, document):
    # Documents were encoded without the post-processor's tokens: a model trained with a Llama tokenizer.json
    # never saw the <s> that transformers puts in front of every prompt from the same tokenizer.json.
    ids = _framed_tokenizer(tmp_path / "tok.json", template, bert)
    texts = [" ".join(WORDS[i:i + 5]) for i in range(8)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = prepare(tmp_path / "in.jsonl", tmp_path / "ds", tokenizer=tmp_path / "tok.json", val_fraction=0.0,
                  workers=1)
    want = sorted(before + ids[i:i + 5] + after for i in range(8))
    assert sorted(documents(out, "train")) == want
    manifest = verify_dataset(out)
    assert manifest["tokenizer"]["bos_id"] == (before[0] if before else None)
    assert manifest["tokenizer"]["document"] == document
    with Loader(out, batch_size=1, seq_len=4) as loader:
        assert loader.bos_id == manifest["tokenizer"]["bos_id"]


def _small_corpus(root):
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"{i}.txt").write_text(f"my corpus document number {i} with plain english words\n")
    return root


def test_a_symlinked_out_is_written_where_it_points(tmp_path):
    # A link to a larger disk: the first prepare failed ("cannot create the dataset directory": a directory
    # cannot be renamed over a link), and --overwrite replaced the link by a directory, beside the old dataset.
    root = _small_corpus(tmp_path / "c")
    (tmp_path / "disk").mkdir()
    link = tmp_path / "ds"
    link.symlink_to(tmp_path / "disk" / "ds")
    for overwrite in (False, True):
        assert prepare(root, link, vocab_size=300, val_fraction=0.0, workers=1, overwrite=overwrite) == link
        assert link.is_symlink() and verify_dataset(tmp_path / "disk" / "ds")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "disk", "ds"]
        assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["ds"]
    (tmp_path / "parent").symlink_to(tmp_path / "disk")  # a linked parent directory
    for overwrite in (False, True):
        prepare(root, tmp_path / "parent" / "ds2", vocab_size=300, val_fraction=0.0, workers=1, overwrite=overwrite)
        assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["ds", "ds2"]


def test_overwrite_deletes_nothing_but_a_dataset(tmp_path):
    root = _small_corpus(tmp_path / "c")
    out = prepare(root, tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    kwargs = dict(vocab_size=300, val_fraction=0.0, workers=1, overwrite=True)
    # A user's file in the dataset directory (notes, their raw text) went with it.
    (out / "notes.txt").write_text("my notes")
    (out / "raw").mkdir()
    (out / "raw" / "more.txt").write_text("my raw text, kept beside the shards")
    with pytest.raises(FileExistsError, match=r"holds files that are not part of its dataset \(notes.txt, "
                                              r"raw/more.txt\); --overwrite .* would delete them"):
        prepare(root, out, **kwargs)
    with pytest.raises(FileExistsError, match="not part of its dataset"):  # (an input inside out, too)
        prepare(out / "raw", out, **kwargs)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "raw" / "more.txt").exists()
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "raw")
    # The dataset itself as an input (or a link to it): its files read as text, then deleted with it.
    (tmp_path / "link").symlink_to(out)
    for inp in (out, tmp_path / "link", out / "manifest.json"):
        with pytest.raises(ValueError, match=f"input {inp} is inside the output directory"):
            prepare(inp, out, **kwargs)
    verify_dataset(out)
    # Any directory with a manifest.json (a web app's, a browser extension's) was taken for a dataset.
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
    (app / "index.html").write_text("<html></html>")
    with pytest.raises(FileExistsError, match="holds a manifest.json that is not an fmcore dataset's"):
        prepare(root, app, **kwargs)
    assert sorted(p.name for p in app.iterdir()) == ["index.html", "manifest.json"]
    # A sibling directory named like the replaced dataset set aside (.ds.*.old) was deleted by every prepare.
    (tmp_path / ".ds.2024_jan.old").mkdir()
    (tmp_path / ".ds.2024_jan.old" / "keep.txt").write_text("a user's backup")
    prepare(root, out, **kwargs)
    assert (tmp_path / ".ds.2024_jan.old" / "keep.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer.json", "train_000000.bin"]


def test_parquet_and_arrow_without_pyarrow_name_it(tmp_path, monkeypatch, capsys):
    # The Hub's datasets are Parquet files: refused as "not supported", though pyarrow (which HF datasets needs)
    # reads them; without it, the error says what to install.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    for name in ("train-00000-of-00001.parquet", "data-00000-of-00001.arrow"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"PAR1" + bytes(range(256)))
        assert fmcore_main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "ds"), "--workers", "1"]) == 2
        assert f"input {tmp_path / 'in' / name}: reading .{name.rsplit('.', 1)[1]} files needs pyarrow (pip install " \
            "pyarrow)" in capsys.readouterr().err
        (tmp_path / "in" / name).unlink()


def test_parquet_and_arrow_files_are_read(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    prepare_module = importlib.import_module("fmcore.data.prepare")
    rng = np.random.default_rng(0)
    texts = [sentence(rng, 8 + i) for i in range(30)]
    (tmp_path / "hub").mkdir()
    # A Parquet file of the Hub (several row groups, split among the tasks below 32 MiB each), a null text counted
    # as empty; datasets' save_to_disk (an Arrow IPC stream beside its metadata files, which are no documents);
    # an Arrow IPC file.
    table = pa.table({"id": list(range(11)), "text": texts[:10] + [None]})
    pq.write_table(table, tmp_path / "hub" / "train-00000-of-00001.parquet", row_group_size=2)
    monkeypatch.setattr(prepare_module, "JSONL_CHUNK_BYTES", 200)
    assert len(prepare_module._arrow_spans(tmp_path / "hub" / "train-00000-of-00001.parquet")) > 1
    saved = tmp_path / "hub" / "saved"
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as f, \
            pa.ipc.new_stream(f, pa.schema([("text", pa.large_string())])) as w:
        w.write_table(pa.table({"text": pa.array(texts[10:20], pa.large_string())}))
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (saved / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    with pa.OSFile(str(tmp_path / "hub" / "file.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(pa.table({"id": list(range(10)), "text": texts[20:]}))
    out = prepare(tmp_path / "hub", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=2)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["documents_in"], c["empty"], c["bad_json"], c["kept"]) == (31, 1, 0, 30)
    assert sorted(train_docs(out)) == sorted(texts)
    # The text column is named by --text-field; one that is missing or not text is an error naming the file.
    path = tmp_path / "hub" / "train-00000-of-00001.parquet"
    with pytest.raises(ValueError, match=rf"input {path}: no column 'body' \(--text-field\); its columns are "
                                         r"\['id', 'text'\]"):
        prepare(path, tmp_path / "ds2", text_field="body", workers=1)
    with pytest.raises(ValueError, match=rf"input {path}: column 'id' \(--text-field\) holds int64, expected strings"):
        prepare(path, tmp_path / "ds2", text_field="id", workers=1)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=f"input {tmp_path / 'bad.parquet'}: not a valid Parquet file"):
        prepare(tmp_path / "bad.parquet", tmp_path / "ds2", workers=1)


def test_one_document_without_a_val_split_is_said(tmp_path, capsys):
    # A single input.txt (nanoGPT's Shakespeare) is one document: no val split, and `fmcore train` evaluated never.
    (tmp_path / "input.txt").write_text("\r\n".join(f"line {i} of the only play in the corpus" for i in range(50)))
    args = ["prepare", str(tmp_path / "input.txt"), "--vocab-size", "300", "--workers", "1"]
    assert fmcore_main(args + ["--out", str(tmp_path / "ds")]) == 0
    assert "note: no val split: the split is by document and all the text is one document" in capsys.readouterr().err
    assert fmcore_main(args + ["--out", str(tmp_path / "ds2"), "--val-fraction", "0"]) == 0
    assert "no val split" not in capsys.readouterr().err


def test_utf16_text_is_text(tmp_path, monkeypatch):
    # Windows' "Unicode" files (PowerShell 5's `>` and Out-File, Notepad) are UTF-16 with a byte order mark: a NUL
    # byte in every ASCII character, so they were skipped as binary files (or refused, named as inputs).
    prepare_module = importlib.import_module("fmcore.data.prepare")
    monkeypatch.setattr(prepare_module, "JSONL_CHUNK_BYTES", 64)  # (a large JSON Lines file: not cut in ranges)
    texts = [f"a document written on windows, number {i}, caf\u00e9 \u2713" for i in range(4)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(texts[0] + "\r\n", encoding="utf-16")  # (LE, with its BOM)
    (tmp_path / "in" / "b.txt").write_bytes(b"\x00\x00\xfe\xff" + texts[1].encode("utf-32-be"))
    records = "".join(json.dumps({"text": t}) + "\r\n" for t in texts[2:])
    (tmp_path / "in" / "c.jsonl").write_bytes(b"\xfe\xff" + records.encode("utf-16-be"))
    out = prepare(tmp_path / "in", tmp_path / "ds", vocab_size=300, val_fraction=0.0, workers=1)
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["binary_files"], c["bad_json"], c["invalid_utf8_files"], c["kept"]) == (0, 0, 0, 4)
    assert sorted(train_docs(out)) == sorted(texts)


def test_options_no_dataset_can_use_are_refused_by_name(tmp_path):
    (tmp_path / "a.txt").write_text("some ordinary english text here " * 4)
    for kwargs, message in (({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
                            ({"shard_tokens": 0}, "shard_tokens must be positive, got 0"),
                            ({"min_chars": -1}, "min_chars must be >= 0 and max_chars None or >= 1, got -1 and None"),
                            ({"max_chars": 0}, "min_chars must be >= 0 and max_chars None or >= 1, got 16 and 0"),
                            ({"max_symbol_fraction": 2.0}, r"max_symbol_fraction must be None or in \[0, 1\], got 2.0"),
                            ({"max_symbol_fraction": -0.5}, r"max_symbol_fraction .* got -0.5")):
        with pytest.raises(ValueError, match=message):
            prepare(tmp_path / "a.txt", tmp_path / "ds", vocab_size=300, workers=1, **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"no input files found in {tmp_path / 'empty'}$"):
        prepare(tmp_path / "empty", tmp_path / "ds", vocab_size=300, workers=1)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match=r"no documents left after cleaning .*short.txt: .*'too_short': 1"):
        prepare(tmp_path / "short.txt", tmp_path / "ds", vocab_size=300, workers=1)
    (tmp_path / "scalar.json").write_text('"a .json file of one string, not of records"\n')  # neither [ nor {
    with pytest.raises(ValueError, match=r"no documents left after cleaning .*scalar.json: .*'bad_json': 1"):
        prepare(tmp_path / "scalar.json", tmp_path / "ds", vocab_size=300, workers=1)
    assert not (tmp_path / "ds").exists()


def test_a_single_document_drawn_for_val_trains_instead(tmp_path):
    (tmp_path / "a.txt").write_text("some ordinary english text here " * 4)
    out = prepare(tmp_path / "a.txt", tmp_path / "ds", vocab_size=300, val_fraction=0.999, workers=1)
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert list(splits) == ["train"] and splits["train"]["documents"] == 1



def test_a_val_document_drawn_for_a_few_files_is_the_shortest(tmp_path):
    # No document's hash fell under val_fraction, so the one with the smallest hash became val: here the book,
    # 99% of the text, leaving train a README and notes too short for one window of fmcore train.
    (tmp_path / "book.txt").write_text("a long ordinary english sentence of the book. " * 1001)
    (tmp_path / "README.md").write_text("# the readme of my book")
    (tmp_path / "notes.txt").write_text("some notes about the book and its chapters")
    out = prepare(tmp_path, tmp_path / "ds", vocab_size=300, val_fraction=0.005, workers=1)
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert splits["val"]["documents"] == 1 and splits["train"]["documents"] == 2
    kept = sorted((tmp_path / name).read_text().strip() for name in ("book.txt", "notes.txt"))
    assert sorted(train_docs(out)) == kept

def test_the_embedded_corpus_goes_to_fmcore_data(tmp_path, monkeypatch, capsys):
    # `fmcore prepare` without inputs or --out: the directory default_dataset() reads
    from fmcore.data import default_dataset_dir, default_dataset_root

    monkeypatch.delenv("FMCORE_DATA", raising=False)
    assert default_dataset_root() == Path.home() / ".cache" / "fmcore" / "datasets"
    monkeypatch.setenv("FMCORE_DATA", str(tmp_path / "data"))
    assert default_dataset_root() == tmp_path / "data"
    assert fmcore_main(["prepare", "--max-input-chars", "100000", "--vocab-size", "300", "--workers", "1"]) == 0
    out = tmp_path / "data" / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    assert default_dataset_dir() == out
    assert capsys.readouterr().out.startswith(f"{out}: train: ")
    assert verify_dataset(out)["tokenizer"]["vocab_size"] == 300


def test_bpe_training_budget_takes_the_first_train_documents(tmp_path):
    # bpe_train_chars caps the text the BPE is trained on (a corpus of many GB): whole documents, until
    # the budget is spent
    texts = [f"document number {i} " * 8 for i in range(6)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = prepare(tmp_path / "docs.jsonl", tmp_path / "ds", vocab_size=300, val_fraction=0.0,
                  bpe_train_chars=2 * len(texts[0].strip()), workers=1)
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["source"] == \
        "byte-level BPE trained on 2 train documents"


def test_an_interpreter_without_sys_executable_trains_the_bpe_in_process(tmp_path, monkeypatch):
    # (an embedded interpreter has no executable to start the child process with)
    prepare_module = importlib.import_module("fmcore.data.prepare")
    texts = ["some ordinary english text here " * 4, "and some other text to train on " * 3]
    prepare_module._train_bpe_file(texts, 300, tmp_path / "child.json")
    monkeypatch.setattr(sys, "executable", "")
    prepare_module._train_bpe_file(texts, 300, tmp_path / "here.json")
    assert (tmp_path / "here.json").read_bytes() == (tmp_path / "child.json").read_bytes()


@pytest.mark.parametrize("child, message", [
    ("sys.exit(3)", "failed: exit status 3"),  # before reading its input: the parent's write breaks the pipe
    ("os.kill(os.getpid(), signal.SIGKILL)", r"failed: killed by SIGKILL \(out of memory\?\)$"),
    ("os.kill(os.getpid(), signal.SIGRTMIN + 1)", f"failed: killed by signal {signal.SIGRTMIN + 1}$"),
])
def test_a_bpe_child_that_dies_is_named(tmp_path, monkeypatch, child, message):
    from fmcore.data import _bpe

    prepare_module = importlib.import_module("fmcore.data.prepare")
    script = tmp_path / "child.py"
    script.write_text(f"import os, signal, sys\n{child}\n")
    monkeypatch.setattr(_bpe, "__file__", str(script))
    texts = ["some text to train on " * 1000] * 64  # more than a pipe holds
    with pytest.raises(RuntimeError, match=f"training the BPE tokenizer \\(in a child process\\) {message}"):
        prepare_module._train_bpe_file(texts, 300, tmp_path / "tokenizer.json")


@pytest.mark.parametrize("theirs", ["a dataset", "something else"])
def test_two_prepares_of_one_directory_at_once(tmp_path, monkeypatch, theirs):
    # (two `fmcore train` without data.dataset started together on a new machine both build the
    # embedded corpus) The one that finishes second keeps the first one's dataset; a directory filled
    # with anything else meanwhile is refused, not replaced.
    prepare_module = importlib.import_module("fmcore.data.prepare")
    out = tmp_path / "ds"
    real = prepare_module._train_bpe_file

    def the_other_one_finishes_first(*args):
        out.mkdir()
        (out / ("manifest.json" if theirs == "a dataset" else "notes.txt")).write_text("theirs")
        return real(*args)

    monkeypatch.setattr(prepare_module, "_train_bpe_file", the_other_one_finishes_first)
    (tmp_path / "a.txt").write_text("some ordinary english text here " * 4)
    if theirs == "a dataset":
        assert prepare(tmp_path / "a.txt", out, vocab_size=300, val_fraction=0.0, workers=1) == out
    else:
        with pytest.raises(FileExistsError, match=f"cannot create the dataset directory {out}: Directory not empty"):
            prepare(tmp_path / "a.txt", out, vocab_size=300, val_fraction=0.0, workers=1)
    assert [p.name for p in out.iterdir()] == ["manifest.json" if theirs == "a dataset" else "notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left
