"""`python -m pipeline.compress all` on a `tiny_moe` parent as a user types it: importance scores the
routed experts, the search prunes experts and expert width under an active-parameter budget, and the
distilled MoE student ends below the pruned one (its router's aux loss and expert-bias balancing
running as in pretraining, the frozen teacher's routing untouched)."""

import json
import sys

import pytest

from tests.distributed.compress_runs import TINY, make_parent, records, run_cpu


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_moe")
    parent = make_parent(root / "parent", "model=tiny_moe")
    shape = [o for o in TINY if o not in ("precision=fp32", "train.eval_interval=0")]
    proc = run_cpu([sys.executable, "-m", "pipeline.compress", "all", f"compress.parent={parent}",
                    f"run_dir={root / 'kd'}", *shape, "train.iters=4", "train.eval_interval=4", "train.eval_iters=2",
                    "compress.target_active_params=1.45e6", "compress.num_experts=[6]",
                    "compress.moe_ffn_hidden_sizes=[48]", "compress.hidden_sizes=[128]",
                    "compress.calibration_samples=4", "compress.layer_calibration_samples=2", "compress.top_k=1",
                    "compress.rank_iters=1"])
    return proc, root / "kd"


def test_importance_scores_the_routed_experts(compressed):
    proc, _ = compressed
    assert "routed experts 3 layers x 8, expert neurons 3 layers x 8x64, shared-expert neurons 3 layers x 128" \
        in proc.stdout, proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if "fraction of tokens routed to each expert" in ln)
    assert [part.split()[0] for part in line.split(": ")[1].split(", ")] == ["1E", "4E", "6E"], line


def test_search_prunes_experts_under_the_active_budget(compressed):
    proc, run_dir = compressed
    table = proc.stdout.split("candidate")[1]
    assert "active" in table.splitlines()[0], table
    best = next(ln for ln in table.splitlines() if ln.startswith("#1"))
    assert "experts=6" in best and "effn=48" in best, best
    (found,) = json.loads((run_dir / "compress" / "candidates.json").read_text())
    assert found["active_params"] <= 1.45e6 < found["params"], found
    model = (run_dir / "compress" / "candidates" / "c0" / "model").glob("*.yaml")
    text = next(model).read_text()
    assert "num_experts: 6" in text and "ffn_hidden_size: 48" in text, text


def test_distilled_moe_student_beats_the_pruned_one(compressed):
    _, run_dir = compressed
    valid = records(run_dir, "valid")
    pruned, distilled = valid[0], valid[-1]
    assert pruned["step"] == 0 and distilled["step"] == 4, valid
    assert distilled["student_loss"] < pruned["student_loss"], valid
    assert distilled["kl"] < pruned["kl"], valid
    # The frozen teacher routes the same tokens the same way at every validation.
    assert len({r["teacher_loss"] for r in valid}) == 1, valid


def test_student_router_balances_during_distillation(compressed):
    _, run_dir = compressed
    train = records(run_dir, "train")
    assert all(r["moe_aux_loss"] > 0 for r in train), train
    # tiny_moe's bias moves every expert by +-1e-3 per step: the range grows from the parent's
    # (one pretraining step) by at most 2e-3 per distillation step, and it does grow.
    ranges = [r["moe_expert_bias_range"] for r in train]
    assert ranges[-1] > ranges[0] and all(b <= 2e-3 * (r["step"] + 1) + 1e-6 for b, r in zip(ranges, train)), ranges
