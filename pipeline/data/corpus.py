"""The embedded default corpus: Python standard-library sources, its tokenizer and its dataset.

    python -m pipeline.data corpus            # builds data/build/ (~10 s on 2 cores); re-runs: no-op
    python -m pipeline.data corpus --force    # rebuild

No download: the text is the `.py` files of the running interpreter's standard library (tests,
codec tables, generated data and site-packages left out), cut into documents of about
`MIN_DOC_CHARS` at module- and class-level `def`/`class` statements, so that packed training
sequences of a few hundred tokens often hold more than one document. Code is a good first corpus
for a tiny model: repetitive enough that validation loss falls fast, varied enough not to be
memorised at once. Then, with the pipeline's own tools:
a 4096-token sentencepiece BPE tokenizer (`pipeline.data.tokenizer`) and the indexed dataset
(`python -m pipeline.data preprocess`), as named in conf/data/default.yaml:

    data/build/corpus/stdlib.jsonl            documents ({"path", "text"} per line)
    data/build/tokenizer/                     tokenizer.model + Hugging Face files
    data/build/corpus_text_document.json      dataset summary, shards corpus_text_document_00000.bin/.idx
    data/build/corpus_build.json              what was built from what (written last)

Deterministic: the same Python version gives byte-identical files (recorded in corpus_build.json).
"""

import hashlib
import json
import os
import re
import sys
import sysconfig
import time
from typing import Iterator, Optional

from pipeline.errors import DataError
from pipeline.fs import atomic_write_text, storage_error

RECIPE = "stdlib-v1"
MIN_DOC_CHARS = 2000
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                 "encodings", "pydoc_data"}
VOCAB_SIZE = 4096
SEED = 1234
DATASET = "corpus_text_document"
# Where a document may start: a statement at module level or directly in a class (methods).
STATEMENT = re.compile(r"(?: {4})?(?:@|def |class |async def )")


def stdlib_files(root: Optional[str] = None) -> list[tuple[str, str]]:
    """(relative path, absolute path) of the standard library's .py files, sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found.append((os.path.relpath(path, root), path))
    return found


def split_module(text: str, min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """Cut module source before module- or class-level def/class statements (and their decorators)
    into pieces of at least `min_chars`, unless the whole module is shorter. Joining the pieces
    gives `text` back."""
    blocks, current = [], []
    decorated = False
    for line in text.splitlines(keepends=True):
        starts = STATEMENT.match(line) is not None
        if starts and not decorated and current:
            blocks.append("".join(current))
            current = []
        current.append(line)
        if line.strip():
            decorated = line.lstrip().startswith("@")
    if current:
        blocks.append("".join(current))
    pieces: list[str] = []
    for block in blocks:
        if pieces and len(pieces[-1]) < min_chars:
            pieces[-1] += block
        else:
            pieces.append(block)
    if len(pieces) > 1 and len(pieces[-1]) < min_chars:
        last = pieces.pop()
        pieces[-1] += last
    return pieces


def documents(files: list[tuple[str, str]]) -> Iterator[dict]:
    """The corpus documents of `files`, in order; files that are not UTF-8 are left out."""
    for relative, path in files:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for piece in split_module(text):
            if piece.strip():
                yield {"path": relative, "text": piece}


def build(out_dir: str = "data/build", force: bool = False, max_files: int = 0,
          vocab_size: int = VOCAB_SIZE, workers: int = 0, progress: bool = True) -> dict:
    """Build (or find up to date) the corpus, tokenizer and dataset under `out_dir`; return the
    build record. `max_files` > 0 uses only the first files (for tests)."""
    from pipeline.data.preprocess import PreprocessOptions, preprocess
    from pipeline.data.sentencepiece_training import train_sentencepiece_bpe
    from pipeline.data.sources import iter_texts

    stamp = os.path.join(out_dir, "corpus_build.json")
    key = {"recipe": RECIPE, "python": sys.version.split()[0], "max_files": max_files,
           "vocab_size": vocab_size}
    current = _read_stamp(stamp)
    if not force and current is not None and current["key"] == key and _outputs_exist(out_dir):
        return current
    start = time.perf_counter()
    files = stdlib_files()[: max_files or None]
    if not files:
        raise DataError("no standard-library sources found; this Python ships without them: use a full "
                        "CPython install or preprocess your own data")
    corpus = os.path.join(out_dir, "corpus", "stdlib.jsonl")
    try:
        os.makedirs(os.path.dirname(corpus), exist_ok=True)
        atomic_write_text(corpus, "".join(json.dumps(doc, sort_keys=True) + "\n" for doc in documents(files)))
    except OSError as error:
        raise storage_error(error, "the corpus", os.path.dirname(corpus)) from None
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    tokenizer = train_sentencepiece_bpe(iter_texts([corpus]), tokenizer_dir, vocab_size, seed=SEED)
    summary = preprocess(PreprocessOptions(
        inputs=[corpus],
        output=os.path.join(out_dir, DATASET),
        tokenizer=os.path.join(tokenizer_dir, "tokenizer.model"),
        workers=workers,
        chunk_mb=0.25,  # ~40 chunks for the ~10 MB corpus: enough to keep every core busy
        overwrite=True,
        progress=progress,
    ))
    record = {
        "key": key,
        "files": len(files),
        "documents": summary["documents"],
        "tokens": summary["tokens"],
        "corpus_bytes": os.path.getsize(corpus),
        "corpus_sha256": _sha256(corpus),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
    atomic_write_text(stamp, json.dumps(record, indent=2) + "\n")
    return record


def _read_stamp(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _outputs_exist(out_dir: str) -> bool:
    needed = [os.path.join(out_dir, DATASET + ".json"),
              os.path.join(out_dir, "tokenizer", "tokenizer.json"),
              os.path.join(out_dir, "tokenizer", "tokenizer.model")]
    return all(os.path.exists(p) for p in needed)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
