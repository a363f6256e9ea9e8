"""Training data: blends of preprocessed datasets through megatron-core, and document boundaries.

    train, valid, test = build_datasets(run.data, seq_length=256, seed=1234,
                                        num_samples=(1600, 80, 0), run_dir=run.run_dir)
    sample = train[0]          # megatron GPTDataset sample: tokens, labels, loss_mask, position_ids
    cu_seqlens = cu_seqlens_from_tokens(sample["tokens"], eod)

Each sample reads seq_length + 1 tokens of documents packed back to back: `tokens` is the first
seq_length of them and `labels` the last seq_length (shifted by one). Document boundaries refer to
`tokens`, the model's input: a document ends right after its EOD, so with tokens
[a b EOD c d] the boundaries are cu_seqlens = [0, 3, 5]. The label at an EOD position is the next
document's first token; `data.eod_mask_loss=true` masks it. Works on CPU without torch.distributed.
"""

import logging
import os
import warnings
from typing import Optional

import numpy as np
import torch

from pipeline.data.config import DataConfig
from pipeline.data.shards import progress_path, read_summary
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
# megatron's "no pad token" id: never a real token, so nothing in the data is masked as padding.
NO_PAD = -1


class MegatronTokenizerView:
    """The attributes of megatron-core's tokenizer that GPTDataset reads (it never tokenizes)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.eos = tokenizer.eod
        self.pad = NO_PAD if tokenizer.pad is None else tokenizer.pad
        # Part of megatron's dataset cache key: indices built for one tokenizer are not reused for another.
        self.unique_identifiers = {
            "class": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": tokenizer.fingerprint,
        }


def build_datasets(
    cfg: DataConfig,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    run_dir: str = ".",
    model_vocab_size: Optional[int] = None,
) -> list:
    """[train, valid, test] megatron-core datasets (None for a split with no share in `cfg.split`).

    `num_samples` are the sequences to draw per split (datasets repeat in epochs if smaller).
    `model_vocab_size`, when given, must hold every token id of the tokenizer.
    Raises ConfigError for missing datasets, vocabulary mismatches and empty splits.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = load_tokenizer(cfg.tokenizer)
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"data.tokenizer {cfg.tokenizer} has {tokenizer.vocab_size} ids but model.vocab_size="
            f"{model_vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    prefixes, weights, documents = resolve_blend(cfg, tokenizer)
    with warnings.catch_warnings():
        # Single-process runs have no torch.distributed and are rank 0, as megatron then assumes.
        warnings.filterwarnings("ignore", message="Could not determine rank")
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=(prefixes, weights if len(prefixes) > 1 else None),
            split=cfg.split,
            path_to_cache=cfg.cache_dir or os.path.join(run_dir, "data_cache"),
            tokenizer=MegatronTokenizerView(tokenizer),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=cfg.eod_mask_loss,
            create_attention_mask=False,
        )
        _check_splits(cfg, prefixes, documents, config.split_matrix)
        builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
        return builder.build()


def resolve_blend(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """Megatron prefixes, their weights and document counts for `cfg.paths`: a preprocessed dataset
    expands to its non-empty shards, weighted by tokens. Checks each was made with `tokenizer`."""
    prefixes, weights, documents = [], [], []
    for i, (path, weight) in enumerate(zip(cfg.paths, cfg.weights)):
        field = f"data.paths[{i}]={path}"
        summary = read_summary(path)
        if summary is not None:
            _check_vocabulary(field, summary["tokenizer"], tokenizer, cfg.tokenizer)
            shards = [s for s in summary["shards"] if s["documents"] > 0]
            if not shards:
                raise ConfigError(f"{field} has no documents; check its preprocessing summary {path}.json")
            total = sum(s["tokens"] for s in shards)
            directory = os.path.dirname(path)
            for shard in shards:
                prefixes.append(os.path.join(directory, shard["prefix"]))
                weights.append(weight * shard["tokens"] / total)
                documents.append(shard["documents"])
        elif os.path.exists(path + ".bin") and os.path.exists(path + ".idx"):
            logger.warning("%s has no preprocessing summary: its vocabulary cannot be checked", field)
            prefixes.append(path)
            weights.append(weight)
            documents.append(_idx_sequence_count(path + ".idx"))
        elif os.path.exists(progress_path(path)):
            raise ConfigError(
                f"{field} is incomplete (its preprocessing was interrupted); re-run the same "
                f"preprocess command to resume it"
            )
        else:
            raise ConfigError(
                f"{field}: no dataset there (neither {path}.json nor {path}.bin/.idx); build the default "
                f"corpus with `python -m pipeline.data.corpus` or fix data.paths"
            )
    return prefixes, weights, documents


def _check_vocabulary(field: str, recorded: dict, tokenizer: Tokenizer, tokenizer_path: str) -> None:
    if recorded["fingerprint"] != tokenizer.fingerprint:
        raise ConfigError(
            f"{field} was tokenized with {recorded['path']} ({recorded['vocab_size']} ids, fingerprint "
            f"{recorded['fingerprint'][:12]}) but data.tokenizer={tokenizer_path} has "
            f"{tokenizer.vocab_size} ids (fingerprint {tokenizer.fingerprint[:12]}); use the same "
            f"tokenizer or re-run preprocessing"
        )


def _idx_sequence_count(idx_path: str) -> int:
    # .idx header: 9-byte magic, u64 version, u8 dtype code, then u64 sequence count.
    with open(idx_path, "rb") as f:
        f.seek(18)
        return int(np.frombuffer(f.read(8), dtype="<u8")[0])


def _check_splits(cfg, prefixes, documents, split_matrix) -> None:
    """megatron-core loops forever building a split with a share in data.split but no documents
    (even when no samples are asked of it): refuse that."""
    for name, bounds in zip(SPLITS, split_matrix):
        if bounds is None:
            continue
        for prefix, count in zip(prefixes, documents):
            # megatron-core's own rounding (BlendedMegatronDatasetBuilder._build_megatron_dataset_splits)
            if int(round(bounds[1] * count)) - int(round(bounds[0] * count)) == 0:
                raise ConfigError(
                    f"data.split={cfg.split!r} gives the {name} split none of the {count} documents "
                    f"of {prefix}; raise its share in data.split or use a larger dataset"
                )


def cu_seqlens_from_tokens(tokens_L: torch.Tensor, eod: int) -> torch.Tensor:
    """Document boundaries of one packed input sequence: int32 [0, ..., L], a boundary right after
    every EOD (none added twice when the sequence ends with EOD)."""
    length = tokens_L.numel()
    ends = torch.nonzero(tokens_L.reshape(-1) == eod).flatten() + 1
    ends = ends[ends < length]
    edges = [torch.zeros(1, dtype=torch.long), ends.cpu(), torch.tensor([length])]
    return torch.cat(edges).to(torch.int32)


def cu_seqlens_for_batch(tokens_BL: torch.Tensor, eod: int) -> torch.Tensor:
    """Boundaries of a micro-batch flattened to B*L tokens (THD layout): each sequence's own
    boundaries offset by its start, so documents never continue across sequences."""
    batch, length = tokens_BL.shape
    parts = [torch.zeros(1, dtype=torch.int32)]
    for b in range(batch):
        parts.append(cu_seqlens_from_tokens(tokens_BL[b], eod)[1:] + b * length)
    return torch.cat(parts)
