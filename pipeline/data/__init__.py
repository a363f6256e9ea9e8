"""Training data, from raw text to packed sequences.

- tokenizer.py: the Tokenizer interface over HF tokenizer.json and sentencepiece .model
- tokenizer_cli.py: `train` a sentencepiece BPE tokenizer, `info` about any tokenizer
- sp_bpe.py, sp_model.py: sentencepiece BPE training; reading models and their exact HF conversion
- byte_bpe.py: GPT-2 and Llama-3 style byte-level BPE training (bench and tests)
- wordcache.py: the vectorised word cache that makes sentencepiece encoding several times faster
- hf_fast.py: gigatoken for HF byte-level BPE tokenizers, where it is exact
- sources.py, records.py: reading inputs in chunks; parsing and validating them
- workers.py: the tokenizing processes of preprocessing (they die with their parent)
- shards.py, preprocess.py: the .bin/.idx shard layout, its integrity check and the preprocessing CLI
- blend.py: megatron-core train/valid/test datasets from `data` config, checked before opening
- corpus.py: the embedded default corpus (throughput: bench/preprocess.py)
"""
