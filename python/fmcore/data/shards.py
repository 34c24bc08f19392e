"""Token shards: the on-disk format, a writer, a validating reader, and dataset manifests.

fmcore shard (``.bin``), format version 1. All integers little-endian.

====== ===== ====================================================================================
offset bytes field
====== ===== ====================================================================================
0      4     magic, uint32 0x53434D46 (the bytes ``b"FMCS"``)
4      2     format version, uint16 = 1
6      2     token width in bytes, uint16: 2 (uint16 tokens, vocab <= 65536) or 4 (uint32 tokens)
8      8     token count N, uint64
16     8     document count D, uint64 (0: no document offsets stored)
24     4     vocab size V, uint32 (0: unknown; every token id must be < V when V > 0)
28     4     EOS token id, uint32 (0xFFFFFFFF: none)
32     4     payload CRC-32 (zlib's crc32) of every byte after the header (tokens, padding, offsets)
36     24    reserved, zero
60     4     header CRC-32 of bytes 0..59
64     N*w   tokens
.      0..7  zero padding up to a multiple of 8
.      D*8   document start offsets, uint64 token indices: first 0, strictly increasing, each < N
====== ===== ====================================================================================

The file size is exactly ``64 + N*w`` when D = 0 and ``align8(64 + N*w) + 8*D`` otherwise. A document
may continue from the previous shard; the offset 0 then marks where its remainder starts.

llm.c shards are read too: a 256 x int32 header (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]``
token count N, the rest unused) then N uint16 GPT-2 tokens (vocab 50257, EOS 50256), no checksums.

A dataset is a directory holding the shards and ``manifest.json``::

    {"format": "fmcore-dataset", "version": 1,
     "tokenizer": {"file": "tokenizer.json", "crc32": ..., "vocab_size": V, "eos_id": E, "eos_token": "...",
                   "bos_id": B or null, "document": "<s> $text </s>", "source": "..."},
     "splits": {"train": {"tokens": .., "documents": .., "shards": [{"file": "train_000000.bin",
                "tokens": N, "documents": D, "bytes": ..., "crc32": ...}, ...]}, "val": {...}},
     "cleaning": {"documents_in": .., "kept": .., "duplicate": .., "empty": .., ...}, ...}

A directory of llm.c shards without a manifest also works: ``*train*.bin`` / ``*val*.bin`` files form
the splits (a name matching both belongs to the split it names as a word: ``retrieval_train.bin`` is train).
fmcore shards there keep the vocab size and EOS id of their headers. The C++ loader (csrc/data/shard.cpp)
validates exactly the same things before it maps a file.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 0x53434D46
VERSION = 1
HEADER_BYTES = 64
NO_EOS = 0xFFFFFFFF
LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_BYTES = 256 * 4
GPT2_VOCAB, GPT2_EOS = 50257, 50256
MANIFEST = "manifest.json"

# magic, version, token width, N, D, V, eos, payload crc, then 24 reserved bytes (header crc follows).
_HEAD = struct.Struct("<IHHQQIII24x")
assert _HEAD.size == 60


class ShardError(ValueError):
    """A shard or dataset that cannot be used; the message names the file, the offset and what was expected."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    kind: str  # "fmcore" or "llmc"
    token_bytes: int
    tokens: int
    documents: int
    vocab_size: int  # 0 when unknown
    eos_id: int | None
    payload_crc32: int | None  # None for llm.c shards
    tokens_offset: int
    docs_offset: int
    file_bytes: int


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _token_dtype(token_bytes: int):
    return np.dtype("<u2") if token_bytes == 2 else np.dtype("<u4")


def encode_shard(tokens: np.ndarray, *, vocab_size: int, eos_id: int | None = None,
                 doc_starts: np.ndarray | None = None) -> bytes:
    """The bytes of an fmcore shard holding ``tokens`` (any integer array) and optional document starts."""
    tokens = np.asarray(tokens)
    # The header stores V and the EOS id as uint32, EOS 0xFFFFFFFF meaning none: a value outside would be
    # cut to its low 32 bits (or make struct.pack fail) instead of raising.
    if not _is_int(vocab_size) or not 0 <= vocab_size < 2**32:
        raise ValueError(f"vocab_size must be an int in [0, 2^32), got {vocab_size!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < (vocab_size or NO_EOS)):
        raise ValueError(f"eos_id must be None or an int in [0, {vocab_size or NO_EOS}), got {eos_id!r}")
    if tokens.size and tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    token_bytes = 2 if 0 < vocab_size <= 65536 else 4
    limit = vocab_size or 2**32  # vocab 0 (unknown): uint32 tokens, any id that fits
    if tokens.size and (tokens.min() < 0 or tokens.max() >= limit):
        raise ValueError(f"tokens: ids must be in [0, {limit}), got range [{tokens.min()}, {tokens.max()}]")
    body = tokens.astype(_token_dtype(token_bytes), copy=False).tobytes()
    docs = b""
    n_docs = 0
    if doc_starts is not None and len(doc_starts):
        starts = np.asarray(doc_starts, dtype=np.int64)
        if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= tokens.size:
            raise ValueError("doc_starts must start at 0, increase strictly and stay below the token count")
        pad = _align8(HEADER_BYTES + len(body)) - HEADER_BYTES - len(body)
        body += b"\0" * pad
        docs = starts.astype("<u8").tobytes()
        n_docs = starts.size
    payload = body + docs
    eos = NO_EOS if eos_id is None else eos_id
    head = _HEAD.pack(MAGIC, VERSION, token_bytes, tokens.size, n_docs, vocab_size, eos, zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def write_shard(path, tokens, *, vocab_size: int, eos_id: int | None = None, doc_starts=None) -> dict:
    """Write an fmcore shard; returns its manifest entry (file, tokens, documents, bytes, crc32)."""
    data = encode_shard(tokens, vocab_size=vocab_size, eos_id=eos_id, doc_starts=doc_starts)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # a crash never leaves a half-written shard under the final name
    n_docs = struct.unpack_from("<Q", data, 16)[0]
    return {"file": path.name, "tokens": int(np.asarray(tokens).size), "documents": int(n_docs),
            "bytes": len(data), "crc32": zlib.crc32(data)}


def write_llmc_shard(path, tokens) -> None:
    """Write an llm.c GPT-2 shard (used by tests and by users converting data)."""
    tokens = np.asarray(tokens)
    # uint16 tokens read back as GPT-2 (vocab 50257): an id outside would wrap or fail check_vocab later.
    if tokens.size and (tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() >= GPT2_VOCAB):
        raise ValueError(f"tokens of an llm.c shard must be GPT-2 ids, integers in [0, {GPT2_VOCAB}), got dtype "
                         f"{tokens.dtype} range [{tokens.min()}, {tokens.max()}]")
    if tokens.size >= 2**31:
        raise ValueError(f"an llm.c shard holds fewer than 2^31 tokens (an int32 count), got {tokens.size}")
    head = np.zeros(256, dtype="<i4")
    head[:3] = (LLMC_MAGIC, LLMC_VERSION, tokens.size)
    Path(path).write_bytes(head.tobytes() + tokens.astype("<u2").tobytes())


def read_header(path) -> ShardInfo:
    """Validate a shard's header and size against each other (not the payload); raise ShardError."""
    path = Path(path)
    try:
        st = path.stat()
        # Checked before open(): opening a FIFO for reading blocks until a writer appears (forever).
        if not stat.S_ISREG(st.st_mode):
            raise ShardError(f"{path}: not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(LLMC_HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read: {e.strerror}") from e
    if len(head) < 4:
        raise ShardError(f"{path}: truncated: file is {size} bytes, expected at least a {HEADER_BYTES}-byte "
                         f"header starting with the magic at offset 0")
    magic = struct.unpack_from("<I", head, 0)[0]
    if magic == MAGIC:
        return _fmcore_header(path, head, size)
    if magic == LLMC_MAGIC:
        return _llmc_header(path, head, size)
    raise ShardError(f"{path}: bad magic at offset 0: got 0x{magic:08X}, expected 0x{MAGIC:08X} (fmcore shard) "
                     f"or {LLMC_MAGIC} (llm.c shard)")


def _fmcore_header(path: Path, head: bytes, size: int) -> ShardInfo:
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: file is {size} bytes, expected at least the {HEADER_BYTES}-byte header")
    magic, version, width, n, d, vocab, eos, pcrc = _HEAD.unpack_from(head, 0)
    if version != VERSION:
        raise ShardError(f"{path}: unknown format version {version} at offset 4, expected {VERSION}")
    stored = struct.unpack_from("<I", head, 60)[0]
    computed = zlib.crc32(head[:60])
    if stored != computed:
        raise ShardError(f"{path}: header checksum mismatch at offset 60: stored 0x{stored:08X}, "
                         f"crc32 of bytes 0..59 is 0x{computed:08X}")
    if width not in (2, 4):
        raise ShardError(f"{path}: token width {width} at offset 6, expected 2 or 4")
    tokens_end = HEADER_BYTES + n * width
    docs_offset = _align8(tokens_end) if d else tokens_end
    expected = docs_offset + 8 * d
    if size < expected:
        raise ShardError(f"{path}: truncated: file is {size} bytes, but the header (token count {n} at offset 8, "
                         f"document count {d} at offset 16) needs {expected} bytes")
    if size > expected:
        raise ShardError(f"{path}: token count {n} at offset 8 does not match the file size: expected {expected} "
                         f"bytes, file is {size}")
    return ShardInfo(path, "fmcore", width, n, d, vocab, None if eos == NO_EOS else eos, pcrc,
                     HEADER_BYTES, docs_offset, size)


def _llmc_header(path: Path, head: bytes, size: int) -> ShardInfo:
    if size < LLMC_HEADER_BYTES:
        raise ShardError(f"{path}: truncated: file is {size} bytes, expected at least the {LLMC_HEADER_BYTES}-byte "
                         f"llm.c header")
    version, n = struct.unpack_from("<ii", head, 4)
    if version != LLMC_VERSION:
        raise ShardError(f"{path}: unknown llm.c version {version} at offset 4, expected {LLMC_VERSION} (GPT-2 uint16)")
    if n < 0:
        raise ShardError(f"{path}: negative token count {n} at offset 8")
    expected = LLMC_HEADER_BYTES + 2 * n
    if size < expected:
        raise ShardError(f"{path}: truncated: file is {size} bytes, but the token count {n} at offset 8 needs "
                         f"{expected} bytes")
    if size > expected:
        raise ShardError(f"{path}: token count {n} at offset 8 does not match the file size: expected {expected} "
                         f"bytes, file is {size}")
    return ShardInfo(path, "llmc", 2, n, 0, GPT2_VOCAB, GPT2_EOS, None, LLMC_HEADER_BYTES, expected, size)


@dataclass
class Shard:
    info: ShardInfo
    tokens: np.ndarray  # (N,) uint16/uint32 memmap, read-only
    doc_starts: np.ndarray | None  # (D,) uint64, or None


def read_shard(path, *, verify: bool = True, check_vocab: bool = False) -> Shard:
    """Open a validated shard. verify: check the payload CRC (fmcore shards); check_vocab: every token < V."""
    info = read_header(path)
    if verify and info.payload_crc32 is not None:
        crc = 0
        with open(info.path, "rb") as f:
            f.seek(info.tokens_offset)
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
        if crc != info.payload_crc32:
            raise ShardError(f"{info.path}: payload checksum mismatch: crc32 of bytes {info.tokens_offset}.."
                             f"{info.file_bytes} is 0x{crc:08X}, the header at offset 32 says 0x{info.payload_crc32:08X}")
    dtype = _token_dtype(info.token_bytes)
    tokens = (np.memmap(info.path, dtype=dtype, mode="r", offset=info.tokens_offset, shape=(info.tokens,))
              if info.tokens else np.zeros(0, dtype))
    starts = None
    if info.documents:
        starts = np.fromfile(info.path, dtype="<u8", count=info.documents, offset=info.docs_offset)
        _check_doc_starts(info, starts)
    if check_vocab and info.vocab_size and info.tokens:
        bad = np.flatnonzero(tokens >= info.vocab_size)
        if bad.size:
            i = int(bad[0])
            raise ShardError(f"{info.path}: token id {int(tokens[i])} at offset {info.tokens_offset + i * info.token_bytes} "
                             f"(token {i}) is >= the vocab size {info.vocab_size}")
    return Shard(info, tokens, starts)


def _check_doc_starts(info: ShardInfo, starts: np.ndarray) -> None:
    bad = None
    if starts[0] != 0:
        bad, want = 0, "0"
    else:
        dec = np.flatnonzero(np.diff(starts.astype(np.int64)) <= 0) if starts.size > 1 else np.zeros(0, int)
        if dec.size:
            bad, want = int(dec[0]) + 1, f"> {int(starts[dec[0]])}"
        elif starts[-1] >= info.tokens:
            bad, want = starts.size - 1, f"< the token count {info.tokens}"
    if bad is not None:
        raise ShardError(f"{info.path}: document start {int(starts[bad])} at offset {info.docs_offset + 8 * bad} "
                         f"(entry {bad}), expected {want}")


# ---- datasets


def dataset_tokenizer_file(root: Path, manifest: dict) -> Path | None:
    """The dataset's tokenizer file, None when it names none. ShardError when the file there is not the one
    its shards were tokenized with (the manifest's crc32, written by `fmcore prepare` since 2026-12-08): a
    tokenizer.json copied over it decoded a run's samples and went into its Hugging Face export, silently."""
    tok = manifest.get("tokenizer") or {}
    if not tok.get("file"):
        return None
    path = Path(root) / tok["file"]
    if "crc32" in tok and path.is_file() and (crc := file_crc32(path)) != tok["crc32"]:
        raise ShardError(f"{path}: crc32 0x{crc:08X}, the manifest says 0x{tok['crc32']:08X}: not the tokenizer "
                         "this dataset's shards were tokenized with; restore it, or prepare the dataset again")
    return path


def file_crc32(path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def load_manifest(dataset) -> dict:
    """The dataset's manifest; for a directory of llm.c shards without one, a manifest describing them."""
    root = Path(dataset)
    if not root.is_dir():
        raise ShardError(f"{root}: dataset not found, expected a directory holding {MANIFEST} and shards")
    path = root / MANIFEST
    # lexists: a dangling or looping manifest.json symlink is a manifest that cannot be read, not a directory
    # of llm.c shards (exists() said False, and the shards were then read with a made-up tokenizer).
    if os.path.lexists(path):
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise ShardError(f"{path}: cannot read: {e.strerror}") from e
        if not stat.S_ISREG(mode):  # reading a FIFO would wait for a writer, forever
            raise ShardError(f"{path}: not a regular file")
        try:
            manifest = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as e:
            raise ShardError(f"{path}: cannot read: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise ShardError(f"{path}: not UTF-8: byte 0x{e.object[e.start]:02X} at offset {e.start}") from e
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: invalid JSON at offset {e.pos}: {e.msg}") from e
        except (ValueError, RecursionError) as e:  # an integer over Python's digit limit, deep nesting
            raise ShardError(f"{path}: invalid JSON: {e}") from e
        _check_manifest(path, manifest)
        return manifest
    files = {split: sorted(root.glob(f"*{split}*.bin")) for split in ("train", "val")}
    # A name matching both globs ("retrieval_train_000000.bin" holds "val") went into both splits: training
    # data evaluated as validation data. It belongs to the split named as a word (no letter on either side).
    for p in set(files["train"]) & set(files["val"]):
        words = [split for split in files if re.search(rf"(?<![a-z]){split}(?![a-z])", p.name, re.IGNORECASE)]
        if len(words) != 1:
            raise ShardError(f"{p}: the name matches both *train*.bin and *val*.bin; rename it or write a {MANIFEST}")
        files["val" if words == ["train"] else "train"].remove(p)
    splits, infos_all = {}, []
    for split in ("train", "val"):
        if files[split]:
            infos = [read_header(p) for p in files[split]]
            infos_all += infos
            splits[split] = {"tokens": sum(i.tokens for i in infos), "documents": 0,
                             "shards": [{"file": i.path.name, "tokens": i.tokens, "documents": 0,
                                         "bytes": i.file_bytes} for i in infos]}
    if not splits:
        raise ShardError(f"{root}: empty dataset: no {MANIFEST} and no *train*.bin / *val*.bin shards")
    tokenizer = {"file": None, "vocab_size": GPT2_VOCAB, "eos_id": GPT2_EOS, "source": "llm.c GPT-2 shards"}
    # fmcore shards whose manifest is missing carry their vocab size and EOS id in their headers; GPT-2's
    # would make check_vocab accept ids past the real vocab and doc_boundaries split at the wrong token.
    fmcore_infos = [i for i in infos_all if i.kind == "fmcore"]
    if fmcore_infos:
        first = fmcore_infos[0]
        for i in infos_all:
            if (i.vocab_size, i.eos_id) != (first.vocab_size, first.eos_id):
                raise ShardError(f"{i.path}: {i.kind} shard with vocab size {i.vocab_size} and EOS id {i.eos_id}, but "
                                 f"{first.path.name} is an fmcore shard with vocab size {first.vocab_size} and EOS id "
                                 f"{first.eos_id}; without a {MANIFEST}, every shard must agree")
        tokenizer = {"file": None, "vocab_size": first.vocab_size or None, "eos_id": first.eos_id,
                     "source": "fmcore shard headers (no manifest)"}
    return {"format": "fmcore-dataset", "version": 1, "splits": splits, "tokenizer": tokenizer}


def _check_manifest(path: Path, m) -> None:
    """The structure and types the readers rely on (a hand-edited or damaged manifest raises ShardError naming
    the field, not a KeyError later); vocab_size and eos_id are checked against the shard header's uint32
    fields before the C++ loader sees them."""
    def fail(field, want, got):
        raise ShardError(f"{path}: {field} must be {want}, got {got!r}")

    if not isinstance(m, dict):
        fail("the top level", "a JSON object", type(m).__name__)
    if m.get("format") != "fmcore-dataset" or m.get("version") != 1:
        raise ShardError(f"{path}: expected format 'fmcore-dataset' version 1, got "
                         f"{m.get('format')!r} version {m.get('version')!r}")
    tok = m.get("tokenizer", {})
    if not isinstance(tok, dict):
        fail("tokenizer", "an object", tok)
    vocab = tok.get("vocab_size")
    if vocab is not None and (not _is_int(vocab) or not 0 <= vocab < 2**32):
        fail("tokenizer.vocab_size", "null or an int in [0, 2^32)", vocab)
    for field in ("eos_id", "bos_id"):
        value = tok.get(field)
        if value is not None and (not _is_int(value) or not 0 <= value < (vocab or NO_EOS)):
            bound = f"[0, {vocab or NO_EOS})" + (" (the vocab size)" if vocab else "")
            fail(f"tokenizer.{field}", f"null or an int in {bound}", value)
    if "crc32" in tok and not _is_int(tok["crc32"]):
        fail("tokenizer.crc32", "an int", tok["crc32"])
    splits = m.get("splits")
    if not isinstance(splits, dict):
        fail("splits", "an object mapping split names to {\"shards\": [...]}", splits)
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            fail(f"splits.{name}", "an object with a \"shards\" list", split)
        for k, entry in enumerate(split["shards"]):
            where = f"splits.{name}.shards[{k}]"
            if not isinstance(entry, dict):
                fail(where, "an object", entry)
            # (a NUL ended the name the C++ loader opened: "a.bin<NUL>x" opened a.bin)
            if not isinstance(entry.get("file"), str) or not entry["file"] or "\0" in entry["file"]:
                fail(f"{where}.file", "a file name", entry.get("file"))
            if not _is_int(entry.get("tokens")) or entry["tokens"] < 0:
                fail(f"{where}.tokens", "a token count (an int >= 0)", entry.get("tokens"))
            if "crc32" in entry and not _is_int(entry["crc32"]):
                fail(f"{where}.crc32", "an int", entry["crc32"])


def _unique_shard_paths(root: Path, split: str, shards: list) -> list[Path]:
    """The split's shard paths; a shard listed twice (under one name, or two names of one file) would be
    read twice per epoch, so it raises ShardError naming both entries."""
    paths, seen = [root / s["file"] for s in shards], {}
    for k, path in enumerate(paths):
        real = os.path.realpath(path)
        if real in seen:
            raise ShardError(f"{root / MANIFEST}: splits.{split}.shards[{k}] ({shards[k]['file']}) is the same file as "
                             f"shards[{seen[real]}] ({shards[seen[real]]['file']}): each shard may be listed once")
        seen[real] = k
    return paths


def split_shards(dataset, split: str) -> tuple[dict, list[Path]]:
    """(manifest, shard paths of split); raises ShardError for an unknown or empty split."""
    root = Path(dataset)
    manifest = load_manifest(root)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardError(f"{root / MANIFEST}: no split {split!r}; the dataset has {sorted(splits)}")
    shards = splits[split].get("shards", [])
    if not shards or not any(s.get("tokens", 0) for s in shards):
        raise ShardError(f"{root}: empty dataset: split {split!r} has no tokens")
    # (a FIFO among them: the C++ loader opens without blocking and refuses what is not a regular file)
    return manifest, _unique_shard_paths(root, split, shards)


def verify_dataset(dataset, *, check_vocab: bool = True) -> dict:
    """Read every shard of every split fully: header, sizes, checksums (file CRC vs the manifest, payload
    CRC vs the header), document offsets and, optionally, token ids. Returns the manifest."""
    root = Path(dataset)
    manifest = load_manifest(root)
    for split in manifest["splits"]:
        entries = manifest["splits"][split]["shards"]
        for entry, path in zip(entries, _unique_shard_paths(root, split, entries)):
            shard = read_shard(path, verify=True, check_vocab=check_vocab)
            if shard.info.tokens != entry["tokens"]:
                raise ShardError(f"{path}: token count {shard.info.tokens} at offset 8, the manifest says {entry['tokens']}")
            if "crc32" in entry:
                crc = file_crc32(path)
                if crc != entry["crc32"]:
                    raise ShardError(f"{path}: file checksum mismatch over bytes 0..{shard.info.file_bytes}: "
                                     f"crc32 0x{crc:08X}, the manifest says 0x{entry['crc32']:08X}")
    return manifest


def write_dataset(out_dir, splits: dict, *, vocab_size: int, eos_id: int | None = None,
                  tokenizer: dict | None = None) -> Path:
    """Write a dataset from in-memory shards: splits maps a split name to a list of token arrays, or of
    (tokens, doc_starts) pairs. For converted data and tests; `fmcore prepare` builds datasets from text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_splits = {}
    for split, shards in splits.items():
        entries = []
        for k, shard in enumerate(shards):
            tokens, starts = shard if isinstance(shard, tuple) else (shard, None)
            entries.append(write_shard(out / f"{split}_{k:06d}.bin", tokens, vocab_size=vocab_size, eos_id=eos_id,
                                       doc_starts=starts))
        manifest_splits[split] = {"tokens": sum(e["tokens"] for e in entries),
                                  "documents": sum(e["documents"] for e in entries), "shards": entries}
    manifest = {"format": "fmcore-dataset", "version": 1,
                "tokenizer": {"file": None, "vocab_size": vocab_size, "eos_id": eos_id, **(tokenizer or {})},
                "splits": manifest_splits}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out
