"""Compression (MiniPuzzle): turn a trained parent into a smaller student that keeps its quality.

Four steps, each usable alone through `python -m pipeline.compress <step>` and all of them in order
with `compress=minipuzzle`: `importance` scores the parent's units (hidden channels, FFN neurons,
query heads, Mamba heads and head channels, whole layers) on calibration data; `search` enumerates
students inside a parameter/memory budget and keeps the top K; `rank` prunes the parent to each of
them and ranks them by a short knowledge distillation; `distill` trains the chosen student against
the frozen parent with the pretraining loop (forward KL on logits, optionally mixed with LM loss and
a hidden-state cosine term). Everything a step writes lives under `<run_dir>/compress/`; see
docs/compression.md.
"""
