"""Training data: blends of preprocessed datasets through megatron-core.

    train, valid, test = build_datasets(run.data, seq_length=256, seed=1234,
                                        num_samples=(1600, 80, 0), run_dir=run.run_dir)
    sample = train[0]          # megatron GPTDataset sample: tokens, labels, loss_mask, position_ids

Each sample reads seq_length + 1 tokens of documents packed back to back: `tokens` is the first
seq_length of them and `labels` the last seq_length (shifted by one); the label at an EOD position
is the next document's first token, which `data.eod_mask_loss=true` masks. Every shard is checked
(sizes, index header, edge checksum: pipeline.data.shards.check_shard) before megatron-core opens it,
so a damaged dataset fails at setup with the file named. Works on CPU without torch.distributed.
"""

import logging
import os
import warnings
from typing import Optional

from pipeline.data.config import DataConfig
from pipeline.data.shards import check_shard, progress_path, read_summary
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import ConfigError, DataError

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
    Raises DataError for missing, incomplete or damaged datasets and vocabulary mismatches, and
    ConfigError for a too small model vocabulary and empty splits.
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
    expands to its non-empty shards, weighted by tokens. Checks each was made with `tokenizer` and
    that its files are intact."""
    prefixes, weights, documents = [], [], []
    for i, (path, weight) in enumerate(zip(cfg.paths, cfg.weights)):
        field = f"data.paths[{i}]={path}"
        summary = read_summary(path)
        if summary is not None:
            _check_vocabulary(field, summary["tokenizer"], tokenizer, cfg.tokenizer)
            shards = [s for s in summary["shards"] if s["documents"] > 0]
            if not shards:
                raise DataError(f"{field} has no documents; check its preprocessing summary {path}.json")
            total = sum(s["tokens"] for s in shards)
            directory = os.path.dirname(path)
            fix = f"re-run the preprocess command for {path} with --overwrite"
            for shard in shards:
                base = os.path.join(directory, shard["prefix"])
                check_shard(base, shard, fix)
                prefixes.append(base)
                weights.append(weight * shard["tokens"] / total)
                documents.append(shard["documents"])
        elif os.path.exists(path + ".bin") or os.path.exists(path + ".idx"):
            logger.warning("%s has no preprocessing summary: its vocabulary cannot be checked", field)
            documents.append(check_shard(path, None, f"rebuild {path}.bin/.idx or fix {field}"))
            prefixes.append(path)
            weights.append(weight)
        elif os.path.exists(progress_path(path)):
            raise DataError(
                f"{field} is incomplete (its preprocessing was interrupted); re-run the same "
                f"preprocess command to resume it"
            )
        else:
            raise DataError(
                f"{field}: no dataset there (neither {path}.json nor {path}.bin/.idx); build the default "
                f"corpus with `python -m pipeline.data corpus` or fix data.paths"
            )
    return prefixes, weights, documents


def _check_vocabulary(field: str, recorded: dict, tokenizer: Tokenizer, tokenizer_path: str) -> None:
    if recorded["fingerprint"] != tokenizer.fingerprint:
        raise DataError(
            f"{field} was tokenized with {recorded['path']} ({recorded['vocab_size']} ids, fingerprint "
            f"{recorded['fingerprint'][:12]}) but data.tokenizer={tokenizer_path} has "
            f"{tokenizer.vocab_size} ids (fingerprint {tokenizer.fingerprint[:12]}); use the same "
            f"tokenizer or re-run preprocessing"
        )


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
