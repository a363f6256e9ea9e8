"""Two more components of the embedded corpus, for the phased recipe (conf/experiment/phased_dev.yaml):
stand-ins at dev-run scale for a pretraining run's high-quality and long-document data.

    python -m pipeline.data corpus --phases     # the corpus, then these two (~15 s more on 2 cores)

    data/build/corpus/documented.jsonl      pieces dense in docstrings (>= 1 per 1,000 characters):
    data/build/corpus_documented_document   about a quarter of the corpus, the "quality" blend's core
    data/build/corpus/modules.jsonl         whole modules of >= 16,000 characters, not cut at def/class
    data/build/corpus_modules_document      (>= ~4,500 tokens each): the long-context component
    data/build/corpus_phases_build.json     what was built from what (written last)

Both come from the corpus's own documents (data/build/corpus/stdlib.jsonl) and its tokenizer, so they
overlap it: a dev run's blends, not a held-out set. Deterministic, like the corpus.
"""

import json
import os
import time

from pipeline.data import corpus
from pipeline.fs import atomic_write_text, storage_error

RECIPE = "stdlib-phases-v1"
DOCUMENTED = "corpus_documented_document"
MODULES = "corpus_modules_document"
DOCSTRINGS_PER_1000_CHARS = 1.0
MIN_MODULE_CHARS = 16000


def documented(docs: list[dict]) -> list[dict]:
    """The documents with at least DOCSTRINGS_PER_1000_CHARS triple-quoted strings per 1,000 characters."""
    return [d for d in docs if d["text"].count('"""') / 2 * 1000 >= DOCSTRINGS_PER_1000_CHARS * len(d["text"])]


def whole_modules(docs: list[dict]) -> list[dict]:
    """The corpus's modules joined back from their pieces (in corpus order), those of >= MIN_MODULE_CHARS."""
    modules: dict[str, str] = {}
    for doc in docs:
        modules[doc["path"]] = modules.get(doc["path"], "") + doc["text"]
    return [{"path": path, "text": text} for path, text in modules.items() if len(text) >= MIN_MODULE_CHARS]


def build(out_dir: str = "data/build", force: bool = False, workers: int = 0, progress: bool = True) -> dict:
    """Build (or find up to date) the corpus and the two components under `out_dir`; the build record."""
    from pipeline.data.preprocess import PreprocessOptions, preprocess

    base = corpus.build(out_dir, force=force, workers=workers, progress=progress)
    stamp = os.path.join(out_dir, "corpus_phases_build.json")
    key = {"recipe": RECIPE, "corpus_sha256": base["corpus_sha256"]}
    current = json.load(open(stamp, encoding="utf-8")) if os.path.exists(stamp) else None
    outputs = [os.path.join(out_dir, name + ".json") for name in (DOCUMENTED, MODULES)]
    if not force and current is not None and current["key"] == key and all(map(os.path.exists, outputs)):
        return current
    start = time.perf_counter()
    source = os.path.join(out_dir, "corpus", "stdlib.jsonl")
    with open(source, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    record = {"key": key}
    for name, file, picked in ((DOCUMENTED, "documented.jsonl", documented(docs)),
                               (MODULES, "modules.jsonl", whole_modules(docs))):
        path = os.path.join(out_dir, "corpus", file)
        try:
            atomic_write_text(path, "".join(json.dumps(doc, sort_keys=True) + "\n" for doc in picked))
        except OSError as error:
            raise storage_error(error, "a corpus component", path) from None
        summary = preprocess(PreprocessOptions(
            inputs=[path], output=os.path.join(out_dir, name),
            tokenizer=os.path.join(out_dir, "tokenizer", "tokenizer.model"),
            workers=workers, chunk_mb=0.25, overwrite=True, progress=progress,
        ))
        record[name] = {"documents": summary["documents"], "tokens": summary["tokens"]}
    record["elapsed_s"] = round(time.perf_counter() - start, 2)
    atomic_write_text(stamp, json.dumps(record, indent=2) + "\n")
    return record
