"""Resume refuses a model whose weights differ in shape from the checkpoint's, naming the field, and
allows what does not change the weights (router options of MoE layers)."""

import dataclasses
from pathlib import Path

import pytest

from pipeline.checkpoint import CheckpointMeta, check_compatible
from pipeline.config import load_run_config
from pipeline.errors import CheckpointError


def _model(*overrides: str) -> dict:
    return dataclasses.asdict(load_run_config(["model=tiny_moe", *overrides]).model)


def test_a_changed_expert_count_is_refused_naming_the_field():
    meta = CheckpointMeta(step=4, model=_model())
    with pytest.raises(CheckpointError, match=r"model\.moe\.num_experts=4 .* trained with 8"):
        check_compatible(meta, _model("model.moe.num_experts=4", "model.moe.top_k=2"), Path("ckpt"))


def test_router_options_may_change_on_resume():
    meta = CheckpointMeta(step=4, model=_model())
    check_compatible(meta, _model("model.moe.aux_loss_coeff=0.5", "model.moe.bias_update_rate=0.01"), Path("ckpt"))


def test_a_dense_checkpoint_without_moe_in_its_meta_still_resumes():
    dense = dataclasses.asdict(load_run_config([]).model)
    saved = {k: v for k, v in dense.items() if k != "moe"}  # written before model.moe existed
    check_compatible(CheckpointMeta(step=4, model=saved), dense, Path("ckpt"))
