"""Training phases (data.phases): the switch at the right step with the phase's own blend and sequence
length, a resume inside phase 2 equal to the uninterrupted run, later phases free to change, started
ones refused, and bad phase lists refused in one line."""

import json
import re
import sys

import pytest

from pipeline.config import load_run_config
from pipeline.data.corpus import build, documents, stdlib_files
from pipeline.data.phases import check_started_phases_unchanged, resolve_phases, wsd_decay_iters
from pipeline.data.preprocess import PreprocessOptions, preprocess
from pipeline.training import loop
from pipeline.training.state import phases_of
from tests.distributed.training import run_cpu
from tests.unit.config_errors import assert_refused_in_one_line


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three datasets of one small tokenizer: the corpus of the first files and two of other files."""
    out = tmp_path_factory.mktemp("corpus")
    build(str(out), max_files=6, vocab_size=400, workers=1, progress=False)
    files = stdlib_files()
    for name, chosen in (("b", files[20:26]), ("c", files[40:46])):
        source = out / f"{name}.jsonl"
        source.write_text("".join(json.dumps(d) + "\n" for d in documents(chosen)), encoding="utf-8")
        preprocess(PreprocessOptions(inputs=[str(source)], output=str(out / name),
                                     tokenizer=str(out / "tokenizer" / "tokenizer.model"), workers=1,
                                     progress=False))
    return {"a": str(out / "corpus_text_document"), "b": str(out / "b"), "c": str(out / "c"),
            "tokenizer": str(out / "tokenizer")}


def phases(data, c_paths="c") -> str:
    """Phases a [0, 2) at 32 tokens, b [2, 4) at 64, c [4, 5) (its blend given by `c_paths`)."""
    c = ", ".join(data[p] for p in c_paths)
    return (f"data.phases=[{{name: a, start_step: 0}}, {{name: b, start_step: 2, paths: [{data['b']}], "
            f"seq_length: 64}}, {{name: c, start_step: 4, paths: [{c}]}}]")


def overrides(data, run_dir, *extra) -> list[str]:
    return ["device=cpu", "precision=fp32", "train.iters=5", "train.seq_length=32", "train.global_batch_size=2",
            "train.micro_batch_size=1", "train.eval_interval=0", "logging.interval=1",
            "checkpoint.save_interval=0", "checkpoint.async_save=false", "data.split='80,20,0'",
            f"data.tokenizer={data['tokenizer']}", f"data.paths=[{data['a']}]", f"run_dir={run_dir}", *extra]


def prefixes(dataset) -> set[str]:
    """The dataset prefixes (preprocessing outputs, not their shards) a megatron (blended) dataset reads."""
    return {re.sub(r"_\d{5}$", "", part.dataset.path_prefix) for part in getattr(dataset, "datasets", [dataset])}


@pytest.fixture
def read_batches(monkeypatch):
    """Records (blend prefixes, step inside the phase, sequence length) of every training step's batches."""
    seen = []
    original = loop.step_batches

    def recording(dataset, step, *args, **kwargs):
        batches = list(original(dataset, step, *args, **kwargs))
        seen.append((prefixes(dataset), step, batches[0].tokens.shape[-1]))
        return iter(batches)

    monkeypatch.setattr(loop, "step_batches", recording)
    return seen


def records(run_dir, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def test_phases_switch_at_their_start_step_with_their_own_blend(data, tmp_path, read_batches):
    result = loop.train(load_run_config(overrides(data, tmp_path, phases(data), "logging.tensorboard=true")))
    assert result.done
    assert [(r["step"], r["phase"]) for r in records(tmp_path, "train")] == [
        (1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c")]
    assert [(r["step"], r["phase"], r["seq_length"]) for r in records(tmp_path, "phase")] == [
        (0, "a", 32), (2, "b", 64), (4, "c", 32)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    names = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("train/phase/text_summary")}
    assert names == {1: "a", 2: "a", 3: "b", 4: "b", 5: "c"}, "TensorBoard has the phase of every train record"
    # Each phase reads its own blend from its own first sample on, at its sequence length.
    assert read_batches == [({data["a"]}, 0, 32), ({data["a"]}, 1, 32), ({data["b"]}, 0, 64),
                            ({data["b"]}, 1, 64), ({data["c"]}, 0, 32)]


def test_resume_inside_phase_2_equals_the_uninterrupted_run_and_a_later_phase_may_change(data, tmp_path):
    straight = tmp_path / "straight"
    loop.train(load_run_config(overrides(data, straight, phases(data, c_paths="ab"))))
    stopped = tmp_path / "stopped"
    first = loop.train(load_run_config(overrides(data, stopped, phases(data), "train.exit_after_steps=3")))
    assert (first.step, first.done) == (3, False)
    # Phase c has not started at step 3: its blend may change (here to the straight run's).
    loop.train(load_run_config(overrides(data, stopped, phases(data, c_paths="ab"))))
    losses = {r["step"]: r["loss"] for r in records(straight, "train")}
    resumed = {r["step"]: r["loss"] for r in records(stopped, "train")}
    assert resumed == losses, "the resumed run differs from the uninterrupted one"

    # Phase b had started: changing its blend is refused in one line, exit 2, through the CLI.
    changed_b = phases(data).replace(f"paths: [{data['b']}]", f"paths: [{data['c']}]")
    proc = run_cpu([sys.executable, "-m", "pipeline.train", *overrides(data, stopped, changed_b)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.phases[1] (b) paths") and "checkpoint at step 5" in line, line


def test_a_started_phase_moved_or_removed_is_refused():
    saved = [p.record() for p in resolve_phases(load_run_config(["data.phases=[{name: a, start_step: 0}, "
                                                                 "{name: b, start_step: 10}]"]).data.phases,
                                                ["x"], [1.0], 256, 20)]
    moved = resolve_phases(load_run_config(["data.phases=[{name: a, start_step: 0}, {name: b, start_step: 12}]"])
                           .data.phases, ["x"], [1.0], 256, 20)
    assert "start_step 10 -> 12" in check_started_phases_unchanged(saved, moved, step=11)
    assert check_started_phases_unchanged(saved, moved, step=10) is None, "b had not started at step 10"
    alone = resolve_phases(load_run_config(["data.phases=[{name: a, start_step: 0}]"]).data.phases,
                           ["x"], [1.0], 256, 20)
    assert "was removed" in check_started_phases_unchanged(saved, alone, step=11)
    early = resolve_phases(load_run_config(["data.phases=[{name: a, start_step: 0}, {name: b, start_step: 4}, "
                                            "{name: c, start_step: 10}]"]).data.phases, ["x"], [1.0], 256, 20)
    assert "data.phases[1] (b)" in check_started_phases_unchanged(saved, early, step=8)


TWO = "data.phases=[{name: a, start_step: 0}, {name: b, start_step: 100%s}]"
BAD_PHASES = {
    "first phase late": (["data.phases=[{name: a, start_step: 5}]"], ["data.phases[0].start_step=5", "step 0"]),
    "out of order": (["data.phases=[{name: a, start_step: 0}, {name: b, start_step: 0}]"],
                     ["data.phases[1].start_step=0", "data.phases[0].start_step=0"]),
    "same name": (["data.phases=[{name: a, start_step: 0}, {name: a, start_step: 9}]"], ["data.phases[1].name='a'"]),
    "no name": (["data.phases=[{start_step: 0}]"], ["data.phases[0].name is empty"]),
    "weights for paths": ([TWO % ", paths: [x, y], weights: [1.0]"], ["data.phases[1].weights has 1", "2 paths"]),
    "zero weight": ([TWO % ", paths: [x], weights: [0.0]"], ["data.phases[1].weights[0]=0.0"]),
    "bad seq_length": ([TWO % ", seq_length: 0"], ["data.phases[1].seq_length=0"]),
    "longer than the model": ([TWO % ", seq_length: 4096"], ["data.phases[1].seq_length=4096", "model.seq_length"]),
    "starts after the run": ([TWO % "", "train.iters=100"], ["data.phases[1].start_step=100", "train.iters=100"]),
    "decay without wsd": ([TWO % ", lr_decay: true"], ["data.phases[1].lr_decay=true", "optim.schedule=wsd"]),
    "two decays": ([TWO.replace("0}", "0, lr_decay: true}", 1) % ", lr_decay: true", "optim.schedule=wsd"],
                   ["data.phases[1].lr_decay=true", "data.phases[0]"]),
    "decay and decay length": ([TWO % ", lr_decay: true", "optim.schedule=wsd", "optim.wsd_decay_iters=10"],
                               ["data.phases[1].lr_decay", "optim.wsd_decay_iters=10"]),
    "length with cuda graphs": ([TWO % ", seq_length: 128", "train.cuda_graphs=true"],
                                ["data.phases[1].seq_length=128", "train.cuda_graphs=true"]),
    "misspelled phase key": (["data.phases=[{name: a, start: 0}]"], ["start"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PHASES))
def test_bad_phases_give_one_line_errors(case):
    assert_refused_in_one_line(case, *BAD_PHASES[case])


def test_wsd_decay_starts_with_the_decaying_phase():
    run = load_run_config(["+experiment=phased_dev"])
    assert [p.name for p in run.data.phases] == ["broad", "quality", "long"]
    assert wsd_decay_iters(phases_of(run), run.train.iters) == run.train.iters - run.data.phases[2].start_step
    assert phases_of(run)[2].seq_length == 4 * run.train.seq_length
