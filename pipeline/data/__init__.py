"""Training data, from raw text to packed sequences.

- tokenizer.py: the Tokenizer interface over HF tokenizer.json and sentencepiece .model; `train` CLI
- sp_bpe.py: sentencepiece BPE training and its exact Hugging Face conversion
- wordcache.py: the vectorised word cache that makes sentencepiece encoding several times faster
- sources.py, records.py: reading inputs in chunks; parsing and validating them
- workers.py: the tokenizing processes of preprocessing (they die with their parent)
- shards.py, preprocess.py: the .bin/.idx shard layout, its integrity check and the preprocessing CLI
- blend.py: megatron-core train/valid/test datasets from `data` config, checked before opening
- corpus.py: the embedded default corpus; bench.py: preprocessing throughput
"""
