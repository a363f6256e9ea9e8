"""Conversion between the pipeline's checkpoints and Hugging Face NemotronH directories.

`config` (config.json <-> ModelConfig), `mapping` (tensor names and layouts), `safetensors_io`
(streaming shard writer/reader), `export` and `import_` (the two directions); whole tensors are read
from checkpoints by `pipeline.checkpoint.CheckpointTensors`. The export benchmark is bench/hf_export.py.
Entry point: `python pipeline/convert.py {export,import} ...`.
"""

from pipeline.errors import ConversionError

__all__ = ["ConversionError"]
