"""Byte-level BPE training for `fmcore prepare`, also run as a script in a child process.

The tokenizers trainer runs in Rust and never checks for signals: trained in prepare's process, a Ctrl-C
or a SIGTERM waited for the whole training (about a minute per 24M characters). prepare() trains in a
child process instead, which it kills: `python _bpe.py VOCAB_SIZE DOCUMENTS OUT_JSON PARENT_PID
[TOKENIZERS_DIR]` reads the documents from stdin (write_documents' framing) and saves the tokenizer to
OUT_JSON (TOKENIZERS_DIR: the sys.path entry the parent found tokenizers in, searched last). Run by path, not
with -m: this module imports only the standard library and tokenizers, never the fmcore package (torch
and the native extension, seconds to import).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

EOS_TOKEN = "<|endoftext|>"
_LENGTH_BYTES = 8


def train_bpe(texts, vocab_size: int, total: int | None = None):
    """A byte-level BPE (GPT-2 style pre-tokenization, no unknown tokens) trained on texts, with
    <|endoftext|> as its only special token (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=total)
    return tok


def write_documents(texts, f) -> None:
    """Each text as an 8-byte little-endian length and that many bytes of UTF-8 (a text may hold any
    character, newlines and NUL included)."""
    for text in texts:
        data = text.encode("utf-8")
        f.write(len(data).to_bytes(_LENGTH_BYTES, "little"))
        f.write(data)


def read_documents(f):
    while head := f.read(_LENGTH_BYTES):
        n = int.from_bytes(head, "little")
        data = f.read(n) if len(head) == _LENGTH_BYTES else b""
        if len(data) < n or len(head) < _LENGTH_BYTES:
            raise EOFError("the document stream ended inside a document")
        yield data.decode("utf-8")


def _exit_with_parent(parent: int) -> None:
    """A parent killed outright (SIGKILL: no cleanup) would leave this process training for minutes."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _main(argv: list[str]) -> int:
    # Ctrl-C is the parent's to handle (it kills this process; the terminal sends SIGINT to both): raised
    # here, it would only come out after training, as a traceback. SIGTERM and SIGHUP end it at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    vocab_size, total, out, parent = int(argv[0]), int(argv[1]), argv[2], int(argv[3])
    if len(argv) > 4 and argv[4] not in sys.path:  # last: this interpreter's own packages come first
        sys.path.append(argv[4])
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        train_bpe(read_documents(sys.stdin.buffer), vocab_size, total).save(out)
    except BaseException as e:  # (BaseException: a Rust panic is a pyo3 PanicException) shown by the parent
        print(f"{type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
