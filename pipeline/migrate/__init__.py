"""Continue a Megatron-LM, NeMo 2 or Megatron-Bridge checkpoint with this pipeline.

`source` (find the checkpoint, read its config into a ModelConfig, refuse what the pipeline cannot
represent) and `import_` (load it at any TP/PP and save a pipeline `step_N` checkpoint).
Entry point: `python pipeline/convert.py import-megatron SRC OUT_DIR ...` (docs/cli.md).
"""
