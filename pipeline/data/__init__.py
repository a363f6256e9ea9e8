"""Training data, from raw text to packed sequences; the commands are `python -m pipeline.data`.

Preprocessing reads inputs in chunks (sources), parses them into documents (record_parsing) and
tokenizes them in processes that die with their parent (tokenize_workers) into .bin/.idx shards;
blend opens the shards as megatron-core train/valid/test datasets. `tokenizer.load_tokenizer` takes
a HF tokenizer.json or a sentencepiece .model; word_cache and gigatoken_encoder are its exact fast
paths. corpus builds the embedded default corpus (corpus_phases: the phased recipe's components).
phases resolves a run's data phases (a blend per stage); lengths reports document lengths per
dataset and per phase.
"""
