"""Shard format: round trips, llm.c shards, and every malformed file raising ShardError (naming the file
and the offset) in both readers: Python's read_shard and the C++ loader, which must never crash."""

import json
import os
import re
import struct
import zlib

import numpy as np
import pytest

from fmcore.data import Loader, ShardError, read_shard, verify_dataset, write_dataset, write_llmc_shard, write_shard
from fmcore.data.shards import HEADER_BYTES, LLMC_HEADER_BYTES, encode_shard, load_manifest

RNG = np.random.default_rng(0)


def cpp_open(path, *, verify=False, check_vocab=False, seq_len=1, batches=1):
    """Open one shard with the C++ loader (through a one-shard manifest) and read a few batches."""
    path = path.resolve()
    root = path.parent / f"ds_{path.name}"
    root.mkdir(exist_ok=True)
    manifest = {"format": "fmcore-dataset", "version": 1, "tokenizer": {},
                "splits": {"train": {"shards": [{"file": str(path), "tokens": 1}]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with Loader(root, batch_size=2, seq_len=seq_len, threads=2, verify=verify, check_vocab=check_vocab) as loader:
        return [next(loader) for _ in range(batches)]


def both_raise(path, match, **kw):
    """Both readers raise ShardError whose message names the file and matches `match`."""
    with pytest.raises(ShardError, match=match) as e:
        read_shard(path, verify=kw.get("verify", True), check_vocab=kw.get("check_vocab", False))
    assert str(path.resolve()) in str(e.value) or str(path) in str(e.value)
    with pytest.raises(ShardError, match=match) as e:
        cpp_open(path, **kw)
    assert str(path.resolve()) in str(e.value)
    return str(e.value)


# ---- round trips


@pytest.mark.parametrize("vocab", [300, 65536, 70000])  # uint16 tokens, the uint16 edge, uint32 tokens
@pytest.mark.parametrize("with_docs", [False, True])
def test_round_trip(tmp_path, vocab, with_docs):
    tokens = RNG.integers(0, vocab, size=1001)  # odd count: the doc offsets need alignment padding
    starts = np.array([0, 7, 300, 1000]) if with_docs else None
    entry = write_shard(tmp_path / "a.bin", tokens, vocab_size=vocab, eos_id=vocab - 1, doc_starts=starts)
    shard = read_shard(tmp_path / "a.bin", verify=True, check_vocab=True)
    assert shard.info.token_bytes == (2 if vocab <= 65536 else 4)
    np.testing.assert_array_equal(shard.tokens, tokens)
    assert shard.info.eos_id == vocab - 1 and shard.info.vocab_size == vocab
    assert entry["tokens"] == 1001 and entry["bytes"] == (tmp_path / "a.bin").stat().st_size
    assert entry["crc32"] == zlib.crc32((tmp_path / "a.bin").read_bytes())
    if with_docs:
        np.testing.assert_array_equal(shard.doc_starts, starts)
        assert shard.info.docs_offset % 8 == 0
    else:
        assert shard.doc_starts is None


def test_header_bytes_are_as_documented(tmp_path):
    data = encode_shard(np.arange(5), vocab_size=1000, eos_id=3, doc_starts=[0, 2])
    magic, version, width, n, d, vocab, eos, pcrc = struct.unpack_from("<IHHQQIII", data, 0)
    assert (data[:4], version, width, n, d, vocab, eos) == (b"FMCS", 1, 2, 5, 2, 1000, 3)
    assert data[36:60] == bytes(24)
    assert struct.unpack_from("<I", data, 60)[0] == zlib.crc32(data[:60])
    assert pcrc == zlib.crc32(data[64:])
    assert len(data) == 80 + 16  # 64 + 5*2 = 74, padded to 80, then two uint64 offsets


def test_llmc_shard_read_by_both_readers(tmp_path):
    tokens = RNG.integers(0, 50257, size=2000)
    path = tmp_path / "fineweb_train_000001.bin"
    write_llmc_shard(path, tokens)
    shard = read_shard(path)
    assert shard.info.kind == "llmc" and shard.info.tokens_offset == LLMC_HEADER_BYTES
    np.testing.assert_array_equal(shard.tokens, tokens)
    # A directory of llm.c shards is a dataset without a manifest; GPT-2's vocab and EOS are known.
    write_llmc_shard(tmp_path / "fineweb_val_000000.bin", tokens[:500])
    manifest = load_manifest(tmp_path)
    assert sorted(manifest["splits"]) == ["train", "val"] and manifest["tokenizer"]["eos_id"] == 50256
    with Loader(tmp_path, batch_size=2, seq_len=64, threads=1) as loader:
        batch = next(loader)
        assert loader.vocab_size == 50257 and loader.eos_id == 50256
    np.testing.assert_array_equal(batch.x.numpy().ravel(), tokens[:128])
    np.testing.assert_array_equal(batch.y.numpy().ravel(), tokens[1:129])


def test_llmc_split_names_are_words(tmp_path):
    """Without a manifest, a name matching both *train*.bin and *val*.bin belongs to the split it names as a
    word: retrieval_train_000000.bin was in the val split too (train data evaluated as val)."""
    write_llmc_shard(tmp_path / "retrieval_train_000000.bin", np.arange(100))
    write_llmc_shard(tmp_path / "retrieval_val_000000.bin", np.arange(50))
    write_llmc_shard(tmp_path / "shakespeare_validation.bin", np.arange(50))  # one glob only: as before
    splits = load_manifest(tmp_path)["splits"]
    assert [e["file"] for e in splits["train"]["shards"]] == ["retrieval_train_000000.bin"]
    assert [e["file"] for e in splits["val"]["shards"]] == ["retrieval_val_000000.bin", "shakespeare_validation.bin"]
    write_llmc_shard(tmp_path / "train_val.bin", np.arange(50))
    with pytest.raises(ShardError, match=r"train_val.bin: the name matches both \*train\*.bin and \*val\*.bin"):
        load_manifest(tmp_path)


def test_fmcore_shards_without_manifest_keep_their_tokenizer(tmp_path):
    """fmcore shards whose manifest.json is missing: vocab size and EOS id come from their headers, not
    GPT-2's (check_vocab let ids up to 50256 through, doc_boundaries split at token 50256)."""
    tokens = np.arange(200) % 10
    root = write_dataset(tmp_path / "d", {"train": [tokens], "val": [tokens]}, vocab_size=10, eos_id=9)
    (root / "manifest.json").unlink()
    assert load_manifest(root)["tokenizer"]["vocab_size"] == 10
    with Loader(root, batch_size=1, seq_len=20, doc_boundaries=True) as loader:
        assert loader.vocab_size == 10 and loader.eos_id == 9
        assert next(loader).cu_seqlens.tolist() == [0, 10, 20]  # after the EOS at x[9]
    write_shard(root / "train_000001.bin", tokens, vocab_size=11, eos_id=9)
    with pytest.raises(ShardError, match="train_000001.bin: fmcore shard with vocab size 11 .* every shard must agree"):
        load_manifest(root)


@pytest.mark.parametrize("second", ["train_000000.bin", "./train_000000.bin", "link.bin"])
def test_shard_listed_twice(tmp_path, second):
    """A manifest listing one file twice (by name or through a symlink) raises; it was read twice per epoch."""
    root = write_dataset(tmp_path / "d", {"train": [np.arange(100), np.arange(50)]}, vocab_size=100)
    (root / "link.bin").symlink_to(root / "train_000000.bin")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1] = dict(manifest["splits"]["train"]["shards"][0], file=second)
    (root / "manifest.json").write_text(json.dumps(manifest))
    match = re.escape(f"splits.train.shards[1] ({second}) is the same file as shards[0] (train_000000.bin)")
    with pytest.raises(ShardError, match=match):
        Loader(root, batch_size=2, seq_len=8)
    with pytest.raises(ShardError, match=match):
        verify_dataset(root)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("listed", ["manifest", "llmc"])
def test_fifo_shard_raises(tmp_path, listed):
    """A named pipe where a shard should be: opening it for reading waited for a writer, forever."""
    if listed == "manifest":
        root = write_dataset(tmp_path / "d", {"train": [np.arange(100)]}, vocab_size=100)
        fifo = root / "train_000000.bin"
        fifo.unlink()
    else:
        root = tmp_path
        write_llmc_shard(root / "x_train_0.bin", np.arange(100))
        fifo = root / "x_train_1.bin"
    os.mkfifo(fifo)
    with pytest.raises(ShardError, match=re.escape(f"{fifo}: not a regular file")):
        Loader(root, batch_size=2, seq_len=8)
    with pytest.raises(ShardError, match=re.escape(f"{fifo}: not a regular file")):
        read_shard(fifo)


@pytest.mark.parametrize("case", ["loop", "dangling", "fifo"])
def test_unreadable_manifest_raises(tmp_path, case):
    """A manifest.json that is a looping or dangling symlink raised nothing: exists() said False and the
    shards were loaded as a manifest-less directory; a FIFO blocked the read forever."""
    root = write_dataset(tmp_path / "d", {"train": [np.arange(100)]}, vocab_size=100)
    manifest = root / "manifest.json"
    manifest.unlink()
    if case == "loop":
        manifest.symlink_to(manifest)
    elif case == "dangling":
        manifest.symlink_to(root / "gone.json")
    else:
        os.mkfifo(manifest)
    match = {"loop": "cannot read: Too many levels of symbolic links", "dangling": "cannot read: No such file",
             "fifo": "not a regular file"}[case]
    with pytest.raises(ShardError, match=re.escape(f"{manifest}: {match}")):
        Loader(root, batch_size=2, seq_len=8)


def test_verify_dataset_checks_manifest_checksums(tmp_path):
    root = write_dataset(tmp_path / "ds", {"train": [np.arange(100), np.arange(50)]}, vocab_size=100)
    verify_dataset(root)
    data = bytearray((root / "train_000001.bin").read_bytes())
    data[70] ^= 1
    (root / "train_000001.bin").write_bytes(bytes(data))
    with pytest.raises(ShardError, match="payload checksum mismatch"):
        verify_dataset(root)
    # A valid shard, but not the one the manifest lists (another dataset's, copied over it)
    write_shard(root / "train_000001.bin", np.arange(50)[::-1], vocab_size=100)
    with pytest.raises(ShardError, match=re.escape(f"{root / 'train_000001.bin'}: file checksum mismatch over bytes "
                                                   f"0..{HEADER_BYTES + 100}: crc32 0x") + ".*the manifest says 0x"):
        verify_dataset(root)
    write_shard(root / "train_000001.bin", np.arange(60), vocab_size=100)
    with pytest.raises(ShardError, match="train_000001.bin: token count 60 at offset 8, the manifest says 50"):
        verify_dataset(root)


# ---- malformed files


@pytest.fixture
def good(tmp_path):
    """A valid shard of 100 uint16 tokens with 3 documents, and its bytes."""
    path = tmp_path / "good.bin"
    write_shard(path, RNG.integers(0, 500, size=100), vocab_size=500, eos_id=0, doc_starts=[0, 10, 50])
    return path, path.read_bytes()


def _rewrite_header(data: bytes, offset: int, fmt: str, value) -> bytes:
    """Change a header field and fix the header checksum, so only that field is wrong."""
    head = bytearray(data[:60])
    struct.pack_into(fmt, head, offset, value)
    return bytes(head) + struct.pack("<I", zlib.crc32(head)) + data[64:]


def test_zero_length(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    both_raise(path, "truncated.*0 bytes.*offset 0")


@pytest.mark.parametrize("keep", [3, 40, HEADER_BYTES, HEADER_BYTES + 199, -8, -1])  # header, tokens, offsets cut
def test_truncated(good, keep):
    path, data = good
    path.write_bytes(data[:keep])
    both_raise(path, "truncated")


def test_bad_magic(good):
    path, data = good
    path.write_bytes(b"GPT2" + data[4:])
    msg = both_raise(path, "bad magic at offset 0")
    assert "expected 0x53434D46" in msg


def test_unknown_version(good):
    path, data = good
    path.write_bytes(_rewrite_header(data, 4, "<H", 2))
    both_raise(path, "unknown format version 2 at offset 4, expected 1")


def test_token_width(good):
    path, data = good
    path.write_bytes(_rewrite_header(data, 6, "<H", 3))
    both_raise(path, "token width 3 at offset 6")


def test_token_count_vs_size(good):
    path, data = good
    path.write_bytes(data + b"\0" * 8)  # extra bytes
    both_raise(path, "does not match the file size")
    path.write_bytes(_rewrite_header(data, 8, "<Q", 2**62))  # a count the size cannot hold, overflow-safe
    both_raise(path, "truncated.*offset 8")


@pytest.mark.parametrize("byte", range(HEADER_BYTES))
def test_header_bit_flip(good, byte):
    path, data = good
    flipped = bytearray(data)
    flipped[byte] ^= 0x10
    path.write_bytes(bytes(flipped))
    both_raise(path, "offset")


def test_payload_checksum(good):
    path, data = good
    flipped = bytearray(data)
    flipped[HEADER_BYTES + 11] ^= 0x01
    path.write_bytes(bytes(flipped))
    both_raise(path, "payload checksum mismatch.*offset 32", verify=True)
    cpp_open(path, verify=False)  # unverified, a flipped token is just another token: no crash


def test_token_out_of_vocab(tmp_path):
    path = tmp_path / "vocab.bin"
    tokens = np.arange(100) % 50
    tokens[37] = 60
    write_shard(path, tokens, vocab_size=0)  # vocab unknown: the writer cannot refuse it
    # Claim a vocab of 50 in the header (checksum fixed): token 37 (uint32 tokens: offset 64 + 4*37) is out of range.
    path.write_bytes(_rewrite_header(path.read_bytes(), 24, "<I", 50))
    msg = both_raise(path, "token id 60 at offset 212 .*>= the vocab size 50", check_vocab=True, seq_len=99)
    assert "token 37" in msg
    read_shard(path, check_vocab=False)  # only checked when asked


def test_bad_document_offsets(good):
    path, data = good
    docs_at = len(data) - 24
    bad = data[:docs_at] + struct.pack("<QQQ", 0, 60, 50)
    path.write_bytes(bad)
    both_raise(path, f"document start 50 at offset {docs_at + 16} \\(entry 2\\), expected > 60", verify=False)
    path.write_bytes(data[:docs_at] + struct.pack("<QQQ", 0, 10, 100))
    both_raise(path, "expected > 10 and < the token count 100|expected < the token count 100", verify=False)
    path.write_bytes(data[:docs_at] + struct.pack("<QQQ", 5, 10, 50))
    both_raise(path, f"document start 5 at offset {docs_at} \\(entry 0\\), expected 0", verify=False)


def test_a_shard_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(ShardError, match=re.escape(f"{tmp_path / 'missing.bin'}: cannot read: No such file")):
        read_shard(tmp_path / "missing.bin")


def test_window_longer_than_shard(good):
    path, _ = good
    with pytest.raises(ShardError, match="window longer than the shard.*101 tokens.*holds 100"):
        cpp_open(path, seq_len=100)
    cpp_open(path, seq_len=99)


def test_empty_dataset(tmp_path):
    with pytest.raises(ShardError, match="empty dataset"):
        Loader(tmp_path, batch_size=1, seq_len=1)
    write_dataset(tmp_path / "d", {"train": []}, vocab_size=10)
    with pytest.raises(ShardError, match="empty dataset"):
        Loader(tmp_path / "d", batch_size=1, seq_len=1)
    with pytest.raises(ShardError, match="no split 'val'"):
        Loader(write_dataset(tmp_path / "e", {"train": [np.arange(9)]}, vocab_size=10), "val")
    with pytest.raises(ShardError, match="not found"):
        Loader(tmp_path / "missing")


@pytest.mark.parametrize("case", ["header cut", "truncated", "extra", "version", "count"])
def test_llmc_malformed(tmp_path, case):
    path = tmp_path / "x_train.bin"
    write_llmc_shard(path, np.arange(100))
    data = path.read_bytes()
    if case == "header cut":
        path.write_bytes(data[:LLMC_HEADER_BYTES - 1])
        both_raise(path, f"truncated: file is {LLMC_HEADER_BYTES - 1} bytes, expected at least the "
                         f"{LLMC_HEADER_BYTES}-byte llm.c header")
    elif case == "truncated":
        path.write_bytes(data[:LLMC_HEADER_BYTES + 150])
        both_raise(path, "truncated.*offset 8")
    elif case == "extra":
        path.write_bytes(data + b"\0\0")
        both_raise(path, f"token count .*100 at offset 8.* {len(data)} bytes, file is {len(data) + 2}")
    elif case == "version":
        path.write_bytes(data[:4] + struct.pack("<i", 7) + data[8:])
        both_raise(path, "unknown llm.c version 7 at offset 4")
    else:
        path.write_bytes(data[:8] + struct.pack("<i", -5) + data[12:])
        both_raise(path, "negative token count -5 at offset 8")


def test_fuzz_never_crashes(good):
    """Random truncations and bit flips anywhere: a ShardError or a working loader, never a crash."""
    path, data = good
    rng = np.random.default_rng(1)
    for _ in range(40):
        mutated = bytearray(data[: rng.integers(0, len(data) + 1)] if rng.random() < 0.3 else data)
        for pos in rng.integers(0, max(len(mutated), 1), size=rng.integers(1, 4)):
            if mutated:
                mutated[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(mutated))
        for verify in (False, True):
            try:
                cpp_open(path, verify=verify, seq_len=8, batches=3)
            except ShardError:
                pass


@pytest.mark.parametrize("kw, match", [
    (dict(tokens=[2**32 + 5, 7], vocab_size=0), r"tokens: ids must be in \[0, 4294967296\)"),  # not wrapped to 5
    (dict(tokens=[-1, 7], vocab_size=10), r"tokens: ids must be in \[0, 10\)"),
    (dict(tokens=[1.5], vocab_size=10), "tokens must be integers"),
    (dict(tokens=[1], vocab_size=2**32), r"vocab_size must be an int in \[0, 2\^32\)"),  # the header's uint32
    (dict(tokens=[1], vocab_size=-1), "vocab_size must be"),
    (dict(tokens=[1], vocab_size="10"), "vocab_size must be"),
    (dict(tokens=[1], vocab_size=10, eos_id=-1), r"eos_id must be None or an int in \[0, 10\)"),
    (dict(tokens=[1], vocab_size=10, eos_id=10), r"eos_id must be None or an int in \[0, 10\)"),  # eos >= vocab
    (dict(tokens=[1], vocab_size=0, eos_id=2**32 - 1), r"eos_id .*\[0, 4294967295\)"),  # 0xFFFFFFFF means none
    (dict(tokens=[1], vocab_size=0, eos_id=2**32), "eos_id"),
    (dict(tokens=[1, 2, 3], vocab_size=10, doc_starts=[1]), "doc_starts must start at 0, increase strictly"),
    (dict(tokens=[1, 2, 3], vocab_size=10, doc_starts=[0, 2, 2]), "doc_starts must start at 0, increase strictly"),
    (dict(tokens=[1, 2, 3], vocab_size=10, doc_starts=[0, 3]), "and stay below the token count"),
])
def test_writer_validates_its_arguments(tmp_path, kw, match):
    tokens = kw.pop("tokens")
    with pytest.raises(ValueError, match=match):
        write_shard(tmp_path / "a.bin", tokens, **kw)
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize("tokens", [[70000, 5], [-1, 5], [50257]])  # uint16 overflow, negative, GPT-2 vocab + 1
def test_llmc_writer_validates_tokens(tmp_path, tokens):
    with pytest.raises(ValueError, match=r"GPT-2 ids, integers in \[0, 50257\)"):
        write_llmc_shard(tmp_path / "x_train.bin", tokens)
    write_llmc_shard(tmp_path / "x_train.bin", [0, 50256])
    assert read_shard(tmp_path / "x_train.bin").tokens.tolist() == [0, 50256]


def _edit(key, value):
    def edit(m):
        m[key] = value
    return edit


MANIFEST_DAMAGE = {
    "tokenizer null": (_edit("tokenizer", None), "tokenizer must be an object"),
    "entry without file": (lambda m: m["splits"]["train"]["shards"][0].pop("file"),
                           r"splits.train.shards\[0\].file must be a file name"),
    "NUL in file": (lambda m: m["splits"]["train"]["shards"][0].update(file="train_000000.bin\0x"),
                    r"splits.train.shards\[0\].file must be a file name"),
    "tokens a string": (lambda m: m["splits"]["train"]["shards"][0].update(tokens="1000"),
                        r"splits.train.shards\[0\].tokens must be a token count"),
    "entry a list": (lambda m: m["splits"]["train"]["shards"].__setitem__(0, []),
                     r"splits.train.shards\[0\] must be an object"),
    "split a list": (lambda m: m["splits"].update(train=[]), "splits.train must be an object with a \"shards\" list"),
    "splits null": (_edit("splits", None), "splits must be an object"),
    "vocab_size a string": (lambda m: m["tokenizer"].update(vocab_size="500"), "tokenizer.vocab_size must be"),
    "vocab_size 2^32": (lambda m: m["tokenizer"].update(vocab_size=2**32), "tokenizer.vocab_size must be"),
    "eos_id 2^32+3": (lambda m: m["tokenizer"].update(eos_id=2**32 + 3), r"tokenizer.eos_id .*\[0, 500\)"),
    "eos_id >= vocab": (lambda m: m["tokenizer"].update(eos_id=500), r"tokenizer.eos_id .*\[0, 500\)"),
    "eos_id negative": (lambda m: m["tokenizer"].update(eos_id=-1), "tokenizer.eos_id"),
    "top level list": (b"[]", "the top level must be a JSON object"),
    "not UTF-8": (b"\xff\xfe{}", "not UTF-8: byte 0xFF at offset 0"),
    "huge integer": (b'{"n": ' + b"1" * 5000 + b"}", "invalid JSON"),
    "cut short": (b'{"format": "fmcore-dataset", ', r"invalid JSON at offset 29: Expecting property name"),
    "version 2": (_edit("version", 2), "expected format 'fmcore-dataset' version 1, got 'fmcore-dataset' version 2"),
    "crc32 a string": (lambda m: m["splits"]["train"]["shards"][0].update(crc32="0x1234"),
                       r"splits.train.shards\[0\].crc32 must be an int"),
}


@pytest.mark.parametrize("case", MANIFEST_DAMAGE)
def test_malformed_manifest(tmp_path, case):
    """A hand-edited or damaged manifest: ShardError naming manifest.json and the field, from load_manifest
    and from the Loader, before the C++ loader sees a value (an eos_id >= 2^32 would be cut to 32 bits)."""
    root = write_dataset(tmp_path / "d", {"train": [np.arange(1000) % 500]}, vocab_size=500, eos_id=499)
    edit, match = MANIFEST_DAMAGE[case]
    if isinstance(edit, bytes):
        (root / "manifest.json").write_bytes(edit)
    else:
        manifest = json.loads((root / "manifest.json").read_text())
        edit(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=re.escape(f"{root / 'manifest.json'}: ") + match):
        load_manifest(root)
    with pytest.raises(ShardError, match=match):
        Loader(root, batch_size=2, seq_len=16)
