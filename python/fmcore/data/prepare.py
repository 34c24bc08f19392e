"""`fmcore prepare`: raw text to a validated, sharded token dataset (see fmcore.data.shards for the format).

Pipeline: gather documents (text files, directories of them, JSON Lines or .json arrays with a text field, any
of them .gz/.bz2/.xz compressed, Parquet and Arrow files (HF datasets) with pyarrow installed; or, with no
input, the embedded corpus of the Python standard library) -> clean in worker processes (newline
normalisation, empty / too-short / too-long / symbol-heavy filters, content hash) -> exact-duplicate removal
by hash -> train/val split by hash (stable whatever the input order) -> tokenizer (a given tokenizer.json, or
a byte-level BPE trained on the train split, in a child process) -> tokenize (the `tokenizers` Rust encoder,
parallel over the cores) -> shards of about shard_tokens tokens, one EOS after every document (and in front of
it the BOS that a given tokenizer's post-processor adds, Llama's <s>), document start offsets stored ->
manifest.json. Written into a temporary sibling directory and renamed, so a crash or a concurrent prepare
never leaves a half dataset under the final name.

Everything is held in memory between cleaning and sharding: fine for corpora of a few GB of text.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fmcore.data import _bpe
from fmcore.data._bpe import EOS_TOKEN, train_bpe
from fmcore.data.shards import MANIFEST, ShardError, _is_int, file_crc32, load_manifest, write_shard

EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
# Compressed inputs are read through these (a file's name ends with one: "part.jsonl.gz", "book.txt.xz").
DECOMPRESSORS = {".gz": ("gzip", gzip.open), ".bz2": ("bzip2", bz2.open), ".xz": ("xz", lzma.open)}
# .json too: C4's and Dolma's *.json.gz and datasets' Dataset.to_json() hold JSON Lines; a .json file that
# starts with "[" is read as an array of records. Read as plain text, such a file was one document of JSON.
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".ndjson", ".json") for c in ("", *DECOMPRESSORS))
# Formats prepare cannot read: their bytes look binary, so they were skipped as binary_files, the data lost.
# (The tar suffixes too: a .tar.xz or .tar.bz2 decompressed to tar's NUL-padded headers, a binary file.)
UNSUPPORTED_SUFFIXES = (".zst", ".zstd", ".lz4", ".zip", ".7z", ".tar", ".tar.gz", ".tgz",
                        ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
# Read through pyarrow (an optional dependency, that of HF datasets): the Hub ships datasets as Parquet (FineWeb,
# C4, DCLM ...), and datasets' save_to_disk writes Arrow IPC files beside these metadata files (not documents).
ARROW_SUFFIXES = (".parquet", ".arrow")
HF_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")
JSONL_CHUNK_BYTES = 32 << 20
BINARY_SNIFF_BYTES = 8192  # a NUL byte among a file's first bytes marks it binary
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class CleanConfig:
    min_chars: int = 16  # shorter documents (after stripping) are dropped as too short
    max_chars: int | None = None  # longer documents are dropped as too long
    # Drop documents whose fraction of characters that are neither letters, digits nor whitespace is
    # above this (markup, tables of numbers, base64 ...); None keeps everything.
    max_symbol_fraction: float | None = None
    text_field: str = "text"


COUNT_KEYS = ("documents_in", "empty", "too_short", "too_long", "symbols", "binary_files", "invalid_utf8_files",
              "bad_json", "duplicate")


# ---- reading and cleaning (runs in worker processes)


# Windows' "Unicode" text files (Notepad's, PowerShell 5's `>` and Out-File) are UTF-16 with a byte order mark:
# every ASCII character has a NUL byte, and they were taken for binary files. (UTF-32's marks first: FF FE 00 00
# starts with UTF-16 LE's.)
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
              (b"\xfe\xff", "utf-16"))


def _wide_encoding(head: bytes) -> str | None:
    return next((enc for bom, enc in _WIDE_BOMS if head.startswith(bom)), None)


def _decode(raw: bytes, counts: dict | None) -> str:
    """raw as UTF-8 (or BOM-marked UTF-16/32) text; invalid bytes (a Latin-1 or cp1252 file) become U+FFFD, and
    the file is counted in invalid_utf8_files: the cleaning report then says that some text was replaced, not
    kept."""
    encoding = _wide_encoding(raw) or "utf-8-sig"  # (-sig, and utf-16/32: a byte order mark is not part of the text)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        if counts is not None:
            counts["invalid_utf8_files"] += 1
        return raw.decode(encoding, errors="replace")


def _read_text(path: Path, counts: dict | None = None) -> str | None:
    fmt, opener = DECOMPRESSORS.get(path.suffix.lower(), (None, open))
    with opener(path, "rb") as f:
        try:
            # Sniff first: a binary file found while walking a directory (a checkpoint, an archive) is
            # skipped without reading it whole.
            raw = f.read(BINARY_SNIFF_BYTES)
            if b"\0" in raw and not _wide_encoding(raw):
                return None
            raw += f.read()
        # A truncated or mislabelled compressed file (gzip.BadGzipFile and bz2's "Invalid data stream" are
        # OSErrors); an OSError reading a plain file is not about its format.
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            if opener is open:
                raise
            raise ValueError(f"input {path}: not a valid {fmt} file: {e}") from None
    return _decode(raw, counts)


def _clean(text: str, cfg: CleanConfig, counts: dict) -> str | None:
    counts["documents_in"] += 1
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        counts["empty"] += 1
        return None
    if len(text) < cfg.min_chars:
        counts["too_short"] += 1
        return None
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        counts["too_long"] += 1
        return None
    if cfg.max_symbol_fraction is not None:
        plain = sum(c.isalnum() or c.isspace() for c in text)
        if 1.0 - plain / len(text) > cfg.max_symbol_fraction:
            counts["symbols"] += 1
            return None
    return text


def _read_jsonl_range(path: Path, start: int, end: int) -> bytes:
    """The lines of an uncompressed file that start in [start, end) (a line straddling start belongs to
    the previous range)."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # finish the line that began before start (nothing if start is a line start)
        out = []
        while f.tell() < end:
            line = f.readline()
            if not line:
                break
            out.append(line)
    return b"".join(out)


_JSON_ARRAY_SUFFIXES = tuple(".json" + c for c in ("", *DECOMPRESSORS))


def _json_records(text: str) -> list | None:
    """The records of a .json file that is one JSON value: an array of records, or a single record
    pretty-printed over several lines (read as JSON Lines, its text was lost and each of its lines
    counted in bad_json); None for JSON Lines."""
    head = text.lstrip()[:1]
    if head not in ("[", "{"):
        return None
    try:  # (JSON Lines fails at once, at the end of its first record: "Extra data")
        value = json.loads(text)
    except (ValueError, RecursionError):
        return [None] if head == "[" else None  # an array that does not parse is one bad record
    return value if isinstance(value, list) else [value]


def _record_text(record, field: str):
    return record.get(field) if isinstance(record, dict) else None


def _json_lines(text: str):
    """Each record of JSON Lines text, None for a line that is not JSON."""
    # Records end at "\n" only: str.splitlines() would also split inside a record at U+2028,
    # U+2029, U+0085 ..., which JSON allows unescaped in strings.
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        # ValueError: bad JSON, or an integer over Python's digit limit; RecursionError: deep nesting.
        # One bad record is counted, never the end of the whole run.
        except (ValueError, RecursionError):
            yield None


def _record_texts(records, path, field: str, raw_docs: list, counts: dict) -> None:
    """The text field of each record into raw_docs, the others counted in bad_json; ValueError naming the
    file when no record has the field: a wrong --text-field (a missing Parquet column is an error too),
    which counted every record as bad JSON and kept the other inputs' text as if nothing was wrong."""
    first, keyed = None, False
    for record in records:
        if isinstance(record, dict):
            first = record if first is None else first
            keyed = keyed or field in record
        value = _record_text(record, field)
        if isinstance(value, str):
            raw_docs.append(value)
        else:
            counts["bad_json"] += 1
    if first is not None and not keyed:
        raise ValueError(f"input {path}: no record has the field {field!r} (--text-field); the first record's "
                         f"fields are {list(first)[:20]}")


def _import_pyarrow(path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"input {path}: reading {Path(path).suffix} files needs pyarrow (pip install pyarrow); or "
                         f"convert it to JSON Lines (.jsonl, optionally .gz/.bz2/.xz compressed)") from None
    return pyarrow


def _arrow_spans(path: Path) -> list:
    """The tasks' spans of a Parquet file: runs of row groups of about JSONL_CHUNK_BYTES each (a file of several GB,
    as on the Hub, is read by several workers); one span, None, for an Arrow file."""
    pa = _import_pyarrow(path)
    if not path.name.lower().endswith(".parquet"):
        return [None]
    try:
        meta = pa.parquet.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"input {path}: not a valid Parquet file: {e}") from None
    spans, first, size = [], 0, 0
    for k in range(meta.num_row_groups):
        size += meta.row_group(k).total_byte_size
        if size >= JSONL_CHUNK_BYTES or k == meta.num_row_groups - 1:
            spans.append((first, k + 1))
            first, size = k + 1, 0
    return spans or [(0, 0)]


def _arrow_texts(path: Path, field: str, span) -> list:
    """The text column (field) of a Parquet file's row groups [span) or of an Arrow IPC file (the stream format of
    datasets' save_to_disk, or the file format): str, or None for a null."""
    pa = _import_pyarrow(path)

    def column(schema):  # (a schema is the whole file's: a missing column is an error, not a count per record)
        if field not in schema.names:
            raise ValueError(f"input {path}: no column {field!r} (--text-field); its columns are {schema.names}")
        kind = schema.field(field).type
        if not any(getattr(pa.types, f"is_{t}", lambda _: False)(kind)
                   for t in ("string", "large_string", "string_view")):
            raise ValueError(f"input {path}: column {field!r} (--text-field) holds {kind}, expected strings")
        return field

    try:
        if span is not None:
            f = pa.parquet.ParquetFile(path)
            batches = f.iter_batches(columns=[column(f.schema_arrow)], row_groups=range(*span), use_threads=False)
            return [text for batch in batches for text in batch.column(field).to_pylist()]
        with pa.memory_map(str(path)) as source:
            magic = source.read(6)
            source.seek(0)
            reader = pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)
            return reader.read_all().column(column(reader.schema)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"input {path}: not a valid {path.suffix} file: {e}") from None


def _load_task(task) -> tuple[list[tuple[bytes, str]], dict]:
    """One input file, byte range of a JSON Lines file, row groups of a Parquet file, or the builtin
    docstrings -> ([(content hash, clean text)], counts)."""
    kind, path, cfg, span, explicit = task
    counts = dict.fromkeys(COUNT_KEYS, 0)
    raw_docs: list[str] = []
    if kind == "docstrings":
        raw_docs = _builtin_docstrings()
    elif kind == "arrow":
        raw_docs = [text or "" for text in _arrow_texts(Path(path), cfg.text_field, span)]  # (a null: empty)
    else:
        if span is not None:
            raw = _read_jsonl_range(Path(path), *span)
            text = None if b"\0" in raw[:BINARY_SNIFF_BYTES] else _decode(raw, counts)
        else:
            text = _read_text(Path(path), counts)
        if text is None:
            if explicit:  # a file the user named is data they meant: an error, not a count next to the output
                raise ValueError(f"input {path}: a binary file (a NUL byte in its first {BINARY_SNIFF_BYTES} "
                                 f"bytes), expected text or JSON Lines, optionally .gz/.bz2/.xz compressed")
            counts["binary_files"] += 1
        elif kind == "jsonl" and span is None and Path(path).name.lower().endswith(_JSON_ARRAY_SUFFIXES) \
                and (records := _json_records(text)) is not None:
            _record_texts(records, path, cfg.text_field, raw_docs, counts)
        elif kind == "jsonl":
            _record_texts(_json_lines(text), path, cfg.text_field, raw_docs, counts)
        else:
            raw_docs.append(text)
    docs = []
    for raw in raw_docs:
        text = _clean(raw, cfg, counts)
        if text is not None:
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate from a JSON escape ("\ud83d" without its pair) is not text: replace it with
                # U+FFFD as the decoder does for invalid UTF-8 bytes, and keep the rest of the document.
                text = _SURROGATES.sub("\ufffd", text)
                data = text.encode("utf-8")
            docs.append((hashlib.blake2b(data, digest_size=16).digest(), text))
    return docs, counts


def _worker_signals() -> None:
    """A read+clean worker leaves Ctrl-C to its parent, whose Pool then stops it, and dies of SIGTERM and
    SIGHUP without a word: forked, it inherits the parent's Python handlers, and each worker printed a
    KeyboardInterrupt or (its parent gone) BrokenPipeError traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


# ---- the embedded default corpus: the Python standard library


_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo",
                "_bundled", "lib2to3", "pydoc_data"}


def stdlib_files(max_chars: int) -> list[Path]:
    """The standard library's own .py files (tests and vendored packages left out), in sorted order,
    until their total size passes max_chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP)
        files += [Path(d) / n for n in sorted(names) if n.endswith(".py")]
    files.sort(key=lambda p: str(p.relative_to(root)))
    out, total = [], 0
    for p in files:
        if total >= max_chars:
            break
        out.append(p)
        total += p.stat().st_size
    return out


def _builtin_docstrings() -> list[str]:
    """Docstrings of the modules compiled into the interpreter (builtins, sys, math, itertools ...): text
    that exists on every machine with Python but in no .py file. One document per module."""
    import importlib

    docs = []
    for name in sorted(sys.builtin_module_names):
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        parts = [f"{name}\n\n{module.__doc__ or ''}"]
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            doc = getattr(getattr(module, attr, None), "__doc__", None)
            if isinstance(doc, str) and doc.strip() and doc is not type(getattr(module, attr)).__doc__:
                parts.append(f"{name}.{attr}\n{doc.strip()}")
        docs.append("\n\n".join(parts))
    return docs


# ---- tokenizer


MIN_BPE_VOCAB = 257  # a byte-level BPE's alphabet (256 bytes) and the EOS token; no merges at all


def _load_tokenizer(path: Path):
    """An HF tokenizers tokenizer.json; a missing or unreadable file raises ValueError naming it."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ValueError(f"tokenizer {path} is not a file (pass an HF tokenizers tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise ValueError(f"tokenizer {path} is not an HF tokenizers tokenizer.json: {e}") from None
    # A tokenizer.json may carry the truncation and padding of a fine-tuning setup (sentence-transformers
    # models save max_length 128 and batch padding): encode_batch applied them, cutting every document to
    # max_length tokens and writing pad ids into the shards as text. A document is encoded whole here.
    tok.no_truncation()
    tok.no_padding()
    return tok


def _train_bpe_file(texts: list[str], vocab_size: int, path: Path) -> None:
    """train_bpe(texts, vocab_size) saved to path, trained in a child process (see _bpe): a signal stops the
    wait for it at once, and the child is killed. The same tokenizer.json as trained in this process."""
    if not sys.executable:  # (an embedded interpreter: nothing to start the child with)
        train_bpe(texts, vocab_size, len(texts)).save(str(path))
        return
    with tempfile.TemporaryFile() as err:  # (a file: a pipe that fills up would stall the child)
        # The folder this process imported tokenizers from, for the child to fall back on: it may be a sys.path
        # entry added at run time (pip install --target, a notebook's sys.path, a launcher's bootstrap) that
        # sys.executable does not have; the child failed with "No module named 'tokenizers'" there.
        import tokenizers

        tokenizers_dir = os.path.dirname(os.path.dirname(os.path.abspath(tokenizers.__file__)))
        child = subprocess.Popen([sys.executable, _bpe.__file__, str(vocab_size), str(len(texts)), str(path),
                                  str(os.getpid()), tokenizers_dir], stdin=subprocess.PIPE, stderr=err,
                                 bufsize=1 << 20)
        try:
            try:
                _bpe.write_documents(texts, child.stdin)
                child.stdin.close()
            except BrokenPipeError:  # the child stopped reading: its error is read below
                pass
            # Not child.wait(): on a KeyboardInterrupt it first gives the child 0.25 s to end of the same
            # Ctrl-C, and this child ignores SIGINT (see _bpe).
            while child.poll() is None:
                time.sleep(0.02)
        except BaseException:  # KeyboardInterrupt, _Terminated: the child would train on for minutes
            child.kill()
            child.wait()
            raise
        finally:
            with contextlib.suppress(OSError):  # (a broken pipe: the unsent rest of the buffer)
                child.stdin.close()
        if child.returncode != 0:
            err.seek(0)
            message = err.read().decode(errors="replace").strip()[-4000:] or f"exit status {child.returncode}"
            if child.returncode < 0:
                try:
                    name = signal.Signals(-child.returncode).name
                except ValueError:
                    name = f"signal {-child.returncode}"
                message = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
            raise RuntimeError(f"training the BPE tokenizer (in a child process) failed: {message}")


def _framing(tok, texts, eos_id: int) -> tuple[list[int], list[int]]:
    """(ids before, ids after) each document's text: the ones the tokenizer's post-processor adds around one
    sequence (Llama's <s>, BERT's [CLS] ... [SEP], T5's </s>), EOS last and once. A model trained on the shards
    then sees what it will see from the same tokenizer.json at inference (transformers adds them to a prompt),
    as with torchtitan's <s> text </s>. An EOS the post-processor adds is the one that ends the document, not a
    second one; one it adds in front (OPT's </s>, a BOS that is the EOS) is left out: the previous document's
    EOS already separates them."""
    if tok.post_processor is None:
        return [], [eos_id]
    # The added ids do not depend on the text: they are read off the first document that encodes to a token.
    enc = next((e for t in texts if (e := tok.encode(t, add_special_tokens=False)).ids), None)
    if enc is None:
        return [], [eos_id]
    full = tok.post_process(enc)
    text = [k for k, s in enumerate(full.sequence_ids) if s is not None]  # (None: an id the post-processor added)
    ids = full.ids
    return ([i for i in ids[:text[0]] if i != eos_id],
            [i for i in ids[text[-1] + 1:] if i != eos_id] + [eos_id])


def _eos_id(tok, eos_token: str | None, source: str) -> tuple[str, int]:
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return name, i
    raise ValueError(f"{source}: no EOS token found (tried {', '.join(names)}); pass eos_token / --eos-token")


# ---- shard writing


class _SplitWriter:
    """Streams one split's documents into shards of shard_tokens; the tail is balanced over the last two
    shards so no shard is shorter than half of shard_tokens (unless the whole split is)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab_size: int, eos_id: int,
                 framing: tuple[list[int], list[int]]):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.before, self.after = framing  # ids written before and after each document's text (see _framing)
        self.chunks: list[np.ndarray] = []
        self.starts: list[int] = []  # document starts, in tokens from the start of the buffer
        self.buffered = 0
        self.entries: list[dict] = []
        self.documents = 0

    def add(self, ids: list[int]) -> None:
        self.starts.append(self.buffered)
        a, b = len(self.before), len(self.after)
        arr = np.empty(a + len(ids) + b, dtype=np.uint32)
        arr[:a] = self.before
        arr[a:a + len(ids)] = ids
        arr[a + len(ids):] = self.after
        self.chunks.append(arr)
        self.buffered += arr.size
        self.documents += 1
        while self.buffered >= 2 * self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        # (One chunk is the rest of the last flush's buffer, a view: concatenating it copied a long document's
        # remaining tokens at each of its shards, time growing with its length squared.)
        buf = self.chunks[0] if len(self.chunks) == 1 else np.concatenate(self.chunks)
        starts = np.asarray(self.starts, dtype=np.int64)
        head = starts[starts < n]
        if head.size == 0 or head[0] != 0:
            head = np.concatenate([[0], head])  # a document continued from the previous shard
        name = f"{self.split}_{len(self.entries):06d}.bin"
        self.entries.append(write_shard(self.out / name, buf[:n], vocab_size=self.vocab_size, eos_id=self.eos_id,
                                        doc_starts=head))
        self.chunks = [buf[n:]] if buf.size > n else []
        self.starts = [int(s) - n for s in starts if s >= n]
        self.buffered = buf.size - n

    def close(self) -> dict:
        if self.buffered > self.shard_tokens:
            self._flush(self.buffered // 2)
        if self.buffered:
            self._flush(self.buffered)
        return {"tokens": sum(e["tokens"] for e in self.entries), "documents": self.documents, "shards": self.entries}


# ---- the pipeline


def _is_dataset(d: Path) -> bool:
    """Whether d holds an fmcore dataset (a manifest.json written by prepare or write_dataset)."""
    try:
        return json.loads((d / MANIFEST).read_bytes()).get("format") == "fmcore-dataset"
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


def _walk(root: Path, out: Path | None) -> list[Path]:
    """The files under root, in sorted order, leaving out hidden paths, the output directory and any other
    dataset directory: a rerun with --out inside an input would otherwise read the previous dataset's
    manifest.json and tokenizer.json as documents. Symlinked directories are followed (a corpus assembled
    from links to its parts was read without them), each real directory once (a link to an ancestor loops)."""
    skip = out.resolve() if out is not None else None
    files, visited = [], {root.resolve()}

    def keep(d: str, x: str) -> bool:
        real = (Path(d) / x).resolve()
        if x.startswith(".") or real == skip or real in visited or _is_dataset(Path(d) / x):
            return False
        visited.add(real)
        return True

    for d, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [x for x in dirs if keep(d, x)]
        files += [Path(d) / n for n in names if not n.startswith(".") and (Path(d) / n).is_file()]
    return sorted(files)


def _tasks(inputs: list[Path], cfg: CleanConfig, out: Path | None = None) -> list[tuple]:
    tasks = []
    for root in inputs:
        if not root.exists():
            raise FileNotFoundError(f"input {root} does not exist")
        real = root.resolve()
        if out is not None and (real == out or out in real.parents):
            # The dataset's own files read as text (its shards as binary files), then deleted with it by --overwrite.
            raise ValueError(f"input {root} is inside the output directory {out}: choose another --out")
        explicit = root.is_file()  # (a binary file named as an input raises; one found in a directory is counted)
        files = [root] if explicit else _walk(root, out)
        for p in files:
            name = p.name.lower()
            if name.endswith(UNSUPPORTED_SUFFIXES):
                # The longest suffix that matched: "data.tar.gz" is a .tar.gz file (p.suffix, ".gz", is one
                # that the same message offers as supported).
                suffix = max((s for s in UNSUPPORTED_SUFFIXES if name.endswith(s)), key=len)
                raise ValueError(f"input {p}: {suffix} files are not supported: decompress or convert it to text "
                                 f"or JSON Lines (.jsonl, optionally .gz/.bz2/.xz compressed)")
            if name.endswith(ARROW_SUFFIXES):
                tasks += [("arrow", str(p), cfg, span, explicit) for span in _arrow_spans(p)]
            elif not explicit and p.name in HF_METADATA and any(p.parent.glob("*.arrow")):
                continue
            elif not name.endswith(JSONL_SUFFIXES):
                tasks.append(("text", str(p), cfg, None, explicit))
            elif p.suffix.lower() in DECOMPRESSORS or p.stat().st_size <= JSONL_CHUNK_BYTES or _json_whole(p) \
                    or _wide_file(p):  # (byte ranges cut at b"\n", which is half of a UTF-16 "\n")
                tasks.append(("jsonl", str(p), cfg, None, explicit))
            else:  # a large uncompressed JSON Lines file is read in byte ranges by several workers
                size = p.stat().st_size
                tasks += [("jsonl", str(p), cfg, (a, min(a + JSONL_CHUNK_BYTES, size)), explicit)
                          for a in range(0, size, JSONL_CHUNK_BYTES)]
    return tasks


def _wide_file(p: Path) -> bool:
    with open(p, "rb") as f:
        return _wide_encoding(f.read(4)) is not None


def _json_whole(p: Path) -> bool:
    """Whether a .json file is one JSON value, read whole (an array of records, or one record
    pretty-printed over several lines), not JSON Lines (which can be read in byte ranges): it starts
    with "[", or with "{" on a first line that is not a whole record. _json_records decides again on
    the text; this look at the head keeps a large one from being cut into ranges of bad JSON."""
    if not p.name.lower().endswith(".json"):
        return False
    with open(p, "rb") as f:
        raw = f.read(4096)
        head = raw.removeprefix(b"\xef\xbb\xbf").lstrip()
        if not head.startswith((b"[", b"{")):
            return False
        # The line the first value starts on (past a byte order mark and blank lines: read from byte 0, a blank
        # first line did not parse, and a JSON Lines file of many GB was read whole by one worker).
        f.seek(len(raw) - len(head))
        # (a longer first line: read whole, and found to be JSON Lines; invalid UTF-8 in a record is replaced when
        # it is read, as here: it made a JSON Lines file "not a whole record")
        first = f.readline(JSONL_CHUNK_BYTES).decode("utf-8", errors="replace").rstrip()
    try:
        json.loads(first)
    except json.JSONDecodeError as e:
        # A value cut off at the line's end (a record pretty-printed over several lines) is read whole; a bad
        # record, its error inside the line, is one of JSON Lines (counted in bad_json when read).
        return e.pos >= len(first) or head.startswith(b"[")
    except (ValueError, RecursionError):  # an integer over Python's digit limit, deep nesting: a record (the
        pass  # reader counts it in bad_json), not the end of the whole run
    return head.startswith(b"[")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def prepare(inputs=None, out_dir=None, *, tokenizer=None, vocab_size: int = 8192, shard_tokens: int = 100_000_000,
            val_fraction: float = 0.005, eos_token: str | None = None, min_chars: int = 16,
            max_chars: int | None = None, max_symbol_fraction: float | None = None, text_field: str = "text",
            max_input_chars: int = 8_000_000, bpe_train_chars: int = 200_000_000, workers: int | None = None,
            overwrite: bool = False, progress: bool | None = None) -> Path:
    """Build a dataset directory (shards + manifest.json + tokenizer.json) and return its path.

    inputs: files / directories / JSON Lines files (a str, a Path or a list of them). None: the embedded
    corpus (the standard library's source files, capped at max_input_chars, plus the docstrings of
    the built-in modules). out_dir: None means default_dataset_dir(), for the embedded corpus only
    (default_dataset() rebuilds that directory when it holds anything else). tokenizer:
    path of an HF tokenizers tokenizer.json; None trains a byte-level BPE of vocab_size on the train
    split.
    progress: tqdm bars (None: only on a terminal).
    """
    t0 = time.perf_counter()
    if out_dir is None and inputs is not None:
        # The default location is the embedded corpus's: default_dataset() (`fmcore train` without
        # data.dataset) would replace a dataset of these inputs there with the corpus, deleting it.
        raise ValueError("out_dir (--out) is required with inputs: the default directory is the embedded "
                         "corpus's, which `fmcore train` rebuilds")
    if out_dir is None:
        out_dir = default_dataset_dir()
    out = Path(out_dir)
    # Where the dataset goes: through a symlinked --out (a link to a larger disk), to the link's target. (Replaced
    # by rename, the link itself became a directory beside the dataset it had pointed to.)
    dest = out.resolve()
    _check_out(out, dest, overwrite)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    # (-1 or 2 filtered nothing or everything; the run ended in "no documents left" or kept what it should not)
    if min_chars < 0 or max_chars is not None and max_chars < 1:
        raise ValueError(f"min_chars must be >= 0 and max_chars None or >= 1, got {min_chars} and {max_chars}")
    if max_symbol_fraction is not None and not 0.0 <= max_symbol_fraction <= 1.0:
        raise ValueError(f"max_symbol_fraction must be None or in [0, 1], got {max_symbol_fraction}")
    # (not `workers or default_workers()`: 0 ran with every core and -2 with one process, silently, as the
    # Loader's threads=0 once did)
    if workers is not None and (not _is_int(workers) or workers < 1):
        raise ValueError(f"workers must be None (the usable cores) or an int >= 1, got {workers!r}")
    if tokenizer is not None:
        tok = _load_tokenizer(Path(tokenizer))  # before reading the inputs, which can take minutes
        _eos_id(tok, eos_token, str(tokenizer))  # (as is its EOS token: it was looked up after reading them)
    elif vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_BPE_VOCAB} for a byte-level BPE (256 bytes and the "
                         f"end-of-document token), got {vocab_size}")
    elif eos_token not in (None, EOS_TOKEN):  # the trained BPE's only special token
        raise ValueError(f"eos_token {eos_token!r} is not in the trained byte-level BPE, whose EOS token is "
                         f"{EOS_TOKEN!r}; pass a tokenizer (--tokenizer) that has it")
    cfg = CleanConfig(min_chars, max_chars, max_symbol_fraction, text_field)
    if inputs is None:
        tasks = [("text", str(p), cfg, None, False) for p in stdlib_files(max_input_chars)]
        tasks.append(("docstrings", None, cfg, None, False))
        source = f"python {sys.version.split()[0]} standard library (.py files, capped at {max_input_chars} chars) + built-in module docstrings"
    else:
        inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        if not inputs:  # ("no input files found in " named nothing; None is the stdlib corpus)
            raise ValueError("inputs is empty: pass files or directories, or None for the python stdlib corpus")
        tasks = _tasks([Path(p) for p in inputs], cfg, dest)
        source = ", ".join(str(p) for p in inputs)
    if not tasks:
        raise ValueError(f"no input files found in {source}")

    from tqdm import tqdm

    disable = None if progress is None else not progress
    counts = dict.fromkeys(COUNT_KEYS, 0)
    seen: set[bytes] = set()
    docs: list[tuple[bytes, str]] = []
    workers = default_workers() if workers is None else int(workers)
    # fork: a spawned worker would re-import torch (through the fmcore package) before doing anything.
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    n_proc = min(workers, len(tasks))
    with ctx.Pool(n_proc, initializer=_worker_signals) if n_proc > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(_load_task, tasks, chunksize=4) if pool is not None else map(_load_task, tasks)
        invalid_utf8: set[str] = set()
        for task, (file_docs, file_counts) in zip(tasks, tqdm(results, total=len(tasks), desc="read+clean",
                                                              unit="file", disable=disable)):
            if file_counts["invalid_utf8_files"]:  # once per file: a large JSON Lines file is several tasks
                file_counts["invalid_utf8_files"] = int(task[1] not in invalid_utf8)
                invalid_utf8.add(task[1])
            for k, v in file_counts.items():
                counts[k] += v
            for h, text in file_docs:
                if h in seen:
                    counts["duplicate"] += 1
                else:
                    seen.add(h)
                    docs.append((h, text))
    if not docs:
        raise ValueError(f"no documents left after cleaning {source}: {counts}")

    # Split by content hash: a document's split does not depend on the input order or the worker count.
    is_val = [int.from_bytes(h[:8], "little") / 2.0**64 < val_fraction for h, _ in docs]
    if val_fraction > 0 and len(docs) >= 2 and not any(is_val):
        # The shortest document (the hash breaks ties): the smallest hash took whichever came, so of a user's
        # two or three files the largest could become val, the rest too short for one training window.
        is_val[min(range(len(docs)), key=lambda i: (len(docs[i][1]), docs[i][0]))] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=lambda i: docs[i][0])] = False

    if (dest / _REPLACED).exists():  # a replaced dataset whose deletion was killed (below)
        shutil.rmtree(dest / _REPLACED, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))  # same filesystem: rename is atomic
    tmp.chmod(0o755)
    old = None  # the replaced dataset, while it is moved aside
    try:
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
            tok_source = f"file {tokenizer}"
        else:
            train_texts = [t for (_, t), v in zip(docs, is_val) if not v]
            budget, chosen = bpe_train_chars, []
            for t in train_texts:
                if budget <= 0:
                    break
                chosen.append(t)
                budget -= len(t)
            _train_bpe_file(chosen, vocab_size, tmp / "tokenizer.json")
            tok = _load_tokenizer(tmp / "tokenizer.json")
            tok_source = f"byte-level BPE trained on {len(chosen)} train documents"
        # max id + 1: a tokenizer's ids need not be contiguous (an added token far above the model's vocab),
        # and every id written must be below the vocab size stored in the shards.
        vocab = max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab(with_added_tokens=True).values()) + 1)
        eos_name, eos_id = _eos_id(tok, eos_token, str(tokenizer or "trained BPE"))

        batch = 256
        # Special tokens written in a document (the literal text "<|endoftext|>") are ordinary text: the only
        # EOS ids in a shard are the ones after each document. The flag is restored: tok may be shared.
        encode_special = tok.encode_special_tokens
        tok.encode_special_tokens = True
        try:
            framing = _framing(tok, (t for _, t in docs), eos_id)
            writers = {s: _SplitWriter(tmp, s, shard_tokens, vocab, eos_id, framing) for s in ("train", "val")}
            with tqdm(total=len(docs), desc="tokenize", unit="doc", disable=disable) as bar:
                for i in range(0, len(docs), batch):
                    chunk = docs[i:i + batch]
                    encoded = tok.encode_batch([t for _, t in chunk], add_special_tokens=False)
                    for enc, v in zip(encoded, is_val[i:i + batch]):
                        ids = enc.ids  # (a new list at each access)
                        if eos_id in ids:
                            # An EOS token the tokenizer produces for text (a plain vocab entry, not a special
                            # token): the shards would hold EOS ids inside documents, and a model trained on them
                            # would end a document after that text.
                            raise ValueError(f"the EOS token {eos_name!r} (id {eos_id}) occurs inside a document: "
                                             f"the tokenizer ({tok_source}) encodes text to it, so it cannot mark the "
                                             f"ends of documents; pass eos_token (--eos-token) naming a special token")
                        writers["val" if v else "train"].add(ids)
                    bar.update(len(chunk))
        finally:
            tok.encode_special_tokens = encode_special
        splits = {s: w.close() for s, w in writers.items()}
        splits = {s: v for s, v in splits.items() if v["tokens"]}
        counts["kept"] = len(docs)
        manifest = {
            "format": "fmcore-dataset", "version": 1,
            "tokenizer": {"file": "tokenizer.json", "crc32": file_crc32(tmp / "tokenizer.json"),
                          "vocab_size": vocab, "eos_id": eos_id, "eos_token": eos_name,
                          "bos_id": framing[0][0] if framing[0] else None,
                          "document": " ".join([*map(tok.id_to_token, framing[0]), "$text",
                                                *map(tok.id_to_token, framing[1])]),
                          "source": tok_source},
            "splits": splits, "cleaning": {**counts, **asdict(cfg)},
            "source": source, "seconds": round(time.perf_counter() - t0, 2),
            "options": {"vocab_size": vocab_size, "max_input_chars": max_input_chars if inputs is None else None,
                        "val_fraction": val_fraction, "shard_tokens": shard_tokens},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if overwrite and (dest / MANIFEST).exists():  # a dataset of prepare's files alone (_check_out)
            # Moved into the new dataset's directory first, deleted after that took its place: deleted in place, a
            # process killed inside rmtree (a preempted job) left out/ with its manifest and some of its shards,
            # which `fmcore prepare` then refused to replace and `fmcore train` read until a missing shard. Killed
            # now, the leftover is out/.fmcore-replaced, which the next prepare of out deletes: a sibling
            # .<out>.*.old, recognised by its name alone, could have been a user's own directory.
            old = tmp / _REPLACED
            dest.rename(old)
        try:
            tmp.rename(dest)
        except OSError as e:
            if old is not None and not dest.exists():
                old.rename(dest)  # the new one could not take its place: the old one stays
                old = None
            if not (dest / MANIFEST).exists():  # out was filled with something else while the inputs were read
                raise FileExistsError(f"cannot create the dataset directory {out}: {e.strerror}") from e
            shutil.rmtree(tmp)  # another process finished the same dataset first: keep theirs
        else:
            if old is not None:
                shutil.rmtree(dest / _REPLACED, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not dest.exists():
            old.rename(dest)  # interrupted between the two renames: the old dataset stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_REPLACED = ".fmcore-replaced"  # a replaced dataset, inside the new one until deleted


def _check_out(out: Path, dest: Path, overwrite: bool) -> None:
    """Refuse an output path that is not free: a file, a non-empty directory that holds no dataset (never
    deleted, even with overwrite), or a dataset without overwrite. overwrite deletes a dataset's own files
    only: a directory that holds anything else (a user's notes, their raw text, a web app's manifest.json) is
    refused. dest: out resolved."""
    # The dataset is written in a directory beside dest, then renamed onto it: tried now, not after the inputs are
    # read (an --out under a file said "[Errno 17] File exists: 'afile'", one where no directory can be made named
    # the temporary directory, minutes later).
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in dest.parents if p.exists())
        raise ValueError(f"output {out} cannot be written: {blocker} is not a directory") from None
    except OSError as e:
        raise ValueError(f"output {out} cannot be written in {dest.parent}: {e.strerror}") from None
    if not dest.exists():
        return
    if not dest.is_dir():
        raise FileExistsError(f"output {out} is an existing file, not a dataset directory")
    if (dest / MANIFEST).exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a dataset; pass overwrite=True (--overwrite) to replace it")
        try:
            manifest = load_manifest(dest)
        except ShardError as e:
            raise FileExistsError(f"output {out} holds a {MANIFEST} that is not an fmcore dataset's ({e}); refusing "
                                  f"to replace it (--overwrite only replaces a dataset)") from None
        own = {MANIFEST, _REPLACED, manifest.get("tokenizer", {}).get("file")}
        own |= {os.path.normpath(e["file"]) for split in manifest["splits"].values() for e in split["shards"]}
        foreign = []
        for d, dirs, names in os.walk(dest):
            rel = Path(d).relative_to(dest)
            if d == str(dest) and _REPLACED in dirs:
                dirs.remove(_REPLACED)
            for x in [x for x in dirs if os.path.islink(os.path.join(d, x))]:  # a linked directory is one entry
                dirs.remove(x)
                names.append(x)
            foreign += [str(rel / n) for n in names if str(rel / n) not in own]
        if foreign:
            listed = ", ".join(sorted(foreign)[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FileExistsError(f"output {out} holds files that are not part of its dataset ({listed}); "
                                  f"--overwrite replaces a dataset and would delete them: move them elsewhere")
    elif any(dest.iterdir()):
        raise FileExistsError(f"output {out} is a non-empty directory without {MANIFEST}; refusing to replace "
                              f"it (--overwrite only replaces a dataset): choose an empty or new directory")


# ---- the default dataset

DEFAULT_RECIPE = {"vocab_size": 4096, "max_input_chars": 4_000_000, "val_fraction": 0.05, "shard_tokens": 1_000_000}


def default_dataset_root() -> Path:
    """$FMCORE_DATA when set, else ~/.cache/fmcore/datasets."""
    env = os.environ.get("FMCORE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "fmcore" / "datasets"


def default_dataset_dir(root=None) -> Path:
    """Where the embedded corpus of this Python goes: root (default: default_dataset_root()) /
    "stdlib-py3.11". One directory per Python version, since the corpus is that version's standard
    library: in one shared directory, whichever Python prepared it first set every later run's data (a
    3.10-prepared corpus gave the default job a val perplexity of 238 where 3.11's gives 166)."""
    root = Path(root) if root is not None else default_dataset_root()
    return root / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"


def default_dataset(root=None) -> Path:
    """The embedded corpus (Python standard library sources + built-in docstrings, 4096-token BPE),
    prepared in default_dataset_dir(root) on first use; returns the dataset dir."""
    out = default_dataset_dir(root)
    manifest = out / MANIFEST
    if manifest.exists():
        options = json.loads(manifest.read_text()).get("options", {})
        if all(options.get(k) == v for k, v in DEFAULT_RECIPE.items()):
            return out
    return prepare(None, out, overwrite=manifest.exists(), **DEFAULT_RECIPE)


# ---- command line


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread (see _terminate_raises)."""


@contextlib.contextmanager
def _terminate_raises():
    """SIGTERM (a preempted or cancelled job) and SIGHUP (a closed terminal) raise _Terminated instead of
    ending the process at once: prepare() then deletes its temporary directory (a whole dataset's size,
    left behind as .<out>.XXXXXXXX otherwise, which nothing deletes) and its Pool stops its workers."""
    def raise_terminated(signum, frame):
        raise _Terminated(signum)

    previous = {s: signal.signal(s, raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fmcore prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", type=Path,
                   help="text files, directories, JSON Lines files (.jsonl/.ndjson/.json, or a .json array of "
                   "records), optionally .gz/.bz2/.xz compressed, .parquet/.arrow files (needs pyarrow); none: the "
                   "Python stdlib corpus")
    p.add_argument("--out", type=Path, help="dataset directory; required with inputs (the stdlib corpus's default: "
                   f"this Python's {default_dataset_dir()})")
    p.add_argument("--tokenizer", type=Path, help="an HF tokenizers tokenizer.json; default: train a byte-level BPE")
    p.add_argument("--vocab-size", type=int, help="vocab of the trained BPE (default 8192; 4096 for the stdlib corpus)")
    p.add_argument("--shard-tokens", type=int,
                   help="tokens per shard (default 100000000; 1000000 for the stdlib corpus)")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction of documents for val (default 0.005; 0.05 for stdlib)")
    p.add_argument("--eos-token", help="the tokenizer's EOS token (default: the first of %s found)" % ", ".join(EOS_CANDIDATES))
    p.add_argument("--text-field", default="text",
                   help="JSON Lines field or Parquet/Arrow column holding the text (default %(default)s)")
    p.add_argument("--min-chars", type=int, default=16, help="drop shorter documents (default %(default)s)")
    p.add_argument("--max-chars", type=int, help="drop longer documents")
    p.add_argument("--max-symbol-fraction", type=float, help="drop documents with more non-alphanumeric, non-space characters")
    p.add_argument("--max-input-chars", type=int,
                   help=f"cap on the stdlib corpus (default {DEFAULT_RECIPE['max_input_chars']})")
    p.add_argument("--workers", type=int, help="worker processes (default: the usable cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    args = p.parse_args(argv)
    stdlib = not args.inputs
    default_val = DEFAULT_RECIPE["val_fraction"] if stdlib else 0.005
    shard_tokens = args.shard_tokens if args.shard_tokens is not None else (
        DEFAULT_RECIPE["shard_tokens"] if stdlib else 100_000_000)
    if args.tokenizer is not None and args.vocab_size is not None:
        # (ignored before, and recorded in the manifest's options as if it had been used)
        print("fmcore prepare: error: --vocab-size sizes the trained BPE; a given --tokenizer has its own vocab: "
              "pass one of them", file=sys.stderr)
        return 2
    if args.max_input_chars is not None and not stdlib:
        # (ignored before: inputs are read whole, whatever cap was asked for)
        print("fmcore prepare: error: --max-input-chars caps the embedded stdlib corpus; INPUTS are read whole "
              "(--max-chars drops longer documents)", file=sys.stderr)
        return 2
    vocab_size = args.vocab_size  # (not `or`: --vocab-size 0 took the default silently)
    if vocab_size is None:
        vocab_size = DEFAULT_RECIPE["vocab_size"] if stdlib else 8192
    val_fraction = default_val if args.val_fraction is None else args.val_fraction
    try:
        with _terminate_raises():
            out = prepare(None if stdlib else args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=vocab_size,
                          shard_tokens=shard_tokens,
                          val_fraction=val_fraction,
                          eos_token=args.eos_token, min_chars=args.min_chars, max_chars=args.max_chars,
                          max_symbol_fraction=args.max_symbol_fraction, text_field=args.text_field,
                          max_input_chars=DEFAULT_RECIPE["max_input_chars"] if args.max_input_chars is None
                          else args.max_input_chars, workers=args.workers, overwrite=args.overwrite,
                          progress=True)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # a missing input, an existing dataset, a bad option
        print(f"fmcore prepare: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as e:  # (its temporary directory is deleted)
        signum = e.args[0] if isinstance(e, _Terminated) else signal.SIGINT
        print(f"fmcore prepare: stopped by {signal.Signals(signum).name}; no partial dataset is left", file=sys.stderr)
        return 128 + signum
    manifest = json.loads((out / MANIFEST).read_text())
    splits = ", ".join(f"{s}: {v['tokens']:,} tokens in {len(v['shards'])} shards" for s, v in manifest["splits"].items())
    print(f"{out}: {splits}; vocab {manifest['tokenizer']['vocab_size']}; cleaning {manifest['cleaning']}")
    if val_fraction > 0 and "val" not in manifest["splits"]:
        # The classic first corpus, one input.txt (nanoGPT's Shakespeare), is one document: `fmcore train` then
        # ran without a single evaluation, for no reason said anywhere.
        print("fmcore prepare: note: no val split: the split is by document and all the text is one document (a text "
              "file is one); pass several files, or JSON Lines with one record per document", file=sys.stderr)
    return 0
