"""Context parallelism's data layout (which tokens each rank holds; packed documents padded to 2*cp) and
its one-line refusals. The exchange and the training itself: tests/distributed/test_context_parallel.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.distributed import ParallelConfig
from pipeline.errors import ConfigError
from pipeline.model.build import check_context_parallel_supported
from pipeline.model.config import ModelConfig
from pipeline.model.portable.context_parallel import rank_token_indices
from pipeline.training.batches import pad_documents, to_model_inputs
from tests.unit.config_errors import assert_refused_in_one_line

REPO = Path(__file__).resolve().parents[2]
EOD = 0


def test_sequence_is_cut_in_2cp_chunks_rank_r_holding_r_and_its_mirror():
    assert rank_token_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert rank_token_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert rank_token_indices(12, 3, 1).tolist() == [2, 3, 8, 9]


def test_packed_documents_are_cut_each_on_its_own():
    cu_padded = torch.tensor([0, 4, 12])
    assert rank_token_indices(12, 2, 0, cu_padded).tolist() == [0, 3, 4, 5, 10, 11]
    assert rank_token_indices(12, 2, 1, cu_padded).tolist() == [1, 2, 6, 7, 8, 9]


def test_documents_are_padded_at_their_end():
    cu_padded, source = pad_documents(torch.tensor([0, 3, 8], dtype=torch.int32), 4)
    assert cu_padded.tolist() == [0, 4, 12]
    assert source.tolist() == [0, 1, 2, -1, 3, 4, 5, 6, 7, -1, -1, -1]


def test_ranks_together_hold_every_token_once_and_train_on_no_padding():
    tokens = torch.tensor([[5, 6, EOD, 7, 8, 9, 10, EOD], [11, EOD, 12, 13, 14, 15, 16, 17]])
    batch = {"tokens": tokens, "labels": tokens + 100, "loss_mask": torch.ones(2, 8)}
    parts = [to_model_inputs(batch, EOD, True, torch.device("cpu"), cp=2, cp_rank=r) for r in range(2)]
    whole = to_model_inputs(batch, EOD, True, torch.device("cpu"))
    packed = parts[0].packed_seq_params
    # Documents of 3, 5, 2 and 6 tokens (a sample ending in EOD adds no empty one), padded to 4, 8, 4, 8.
    assert packed.cu_seqlens_q.tolist() == whole.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 8, 10, 16]
    assert packed.cu_seqlens_q_padded.tolist() == [0, 4, 12, 16, 24]
    assert packed.total_tokens == 24 and packed.seq_idx.shape == (1, 24)
    trained = sorted(int(label) for p in parts for label, m in zip(p.labels[0], p.loss_mask[0]) if m)
    assert trained == sorted((tokens + 100).flatten().tolist())
    assert sum(p.tokens.shape[1] for p in parts) == 24 and parts[0].tokens.shape == parts[1].tokens.shape


BAD = {
    "mamba heads % tp*cp": (["parallel.cp=32"], ["model.mamba_num_heads=16", "parallel.tp*parallel.cp=32"]),
    "mamba groups vs cp": (["parallel.cp=4", "model.mamba_num_groups=6", "model.mamba_num_heads=24"],
                           ["parallel.cp=4", "6 Mamba groups"]),
    "sequence % 2cp": (["parallel.cp=2", "train.seq_length=250"], ["train.seq_length=250", "2*parallel.cp=4"]),
    "cuda graphs": (["parallel.cp=2", "train.cuda_graphs=true"], ["parallel.cp", "train.cuda_graphs"]),
    "packed with pp": (["parallel.cp=2", "parallel.pp=2"], ["parallel.pp=1", "train.packed_documents=false"]),
    "cp < 1": (["parallel.cp=0"], ["parallel.cp=0"]),
    "phase sequence % 2cp": (["parallel.cp=2", "data.phases=[{name: a, start_step: 0}, "
                                               "{name: b, start_step: 2, seq_length: 250}]"],
                             ["data.phases[1].seq_length=250", "2*parallel.cp=4"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_impossible_context_parallel_layout_is_one_line(case):
    assert_refused_in_one_line(case, *BAD[case])


def test_portable_attention_needs_heads_that_split_over_cp():
    model = ModelConfig(num_attention_heads=6, num_query_groups=2)
    with pytest.raises(ConfigError, match="parallel.cp=4 on the portable backend"):
        check_context_parallel_supported(model, ParallelConfig(cp=4), "portable")
    check_context_parallel_supported(model, ParallelConfig(cp=4), "te")  # Transformer Engine's ring: any heads
    check_context_parallel_supported(model, ParallelConfig(cp=2), "portable")


def test_too_few_processes_for_cp_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "parallel.cp=2", f"run_dir={tmp_path}/run"],
                          cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin", "PYTHONPATH": str(REPO),
                                                                          "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: world size 1 not divisible by "
                                                           "parallel.tp*parallel.pp*parallel.cp=2")
