"""The kernel cache keeps Triton autotune choices across processes (pipeline/training/kernel_cache.py).

Built on CPU with a real Triton autotuner (decorating a kernel compiles nothing): a choice recorded
by one "process" primes a fresh autotuner of the same kernel, keeping the config object (and so its
pre-hook), and a cache from another environment or a damaged file is ignored with a warning.
"""

import json
import os
import sys
import types

import pytest
import triton

from pipeline.training import kernel_cache
from pipeline.training.kernel_cache import AUTOTUNE_FILE, KernelCache

KEY = (128, 64, "torch.bfloat16")


@pytest.fixture(autouse=True)
def no_triton_cache_dir(monkeypatch):
    """KernelCache.open sets TRITON_CACHE_DIR when unset: start unset, restore the real value after."""
    monkeypatch.setenv("TRITON_CACHE_DIR", "recorded-for-undo")
    monkeypatch.delenv("TRITON_CACHE_DIR")


def _zero_hook(nargs):
    return None


def _install_kernel(monkeypatch, name: str = "fakepkg.ops"):
    """A module holding one autotuned kernel, as mamba_ssm's Triton modules do; returns its autotuner."""
    import triton.language as tl

    @triton.autotune(
        configs=[triton.Config({"BLOCK": 64}, num_warps=4),
                 triton.Config({"BLOCK": 128}, num_warps=8, pre_hook=_zero_hook)],
        key=["n"],
    )
    @triton.jit
    def kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    module = types.ModuleType(name)
    module.kernel = kernel
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernel_cache, "TUNED_PACKAGES", (name.split(".")[0],))
    return kernel


def test_choice_survives_a_restart(tmp_path, monkeypatch):
    tuner = _install_kernel(monkeypatch)
    first = KernelCache.open(tmp_path)
    assert first.primed == 0
    tuner.cache[KEY] = tuner.configs[1]  # what autotuning this key chose
    assert first.save() == 1
    assert first.save() == 0, "nothing new: the file is not rewritten"

    restarted = _install_kernel(monkeypatch)  # a new process: the same kernel, an empty autotuner
    assert restarted.cache == {}
    again = KernelCache.open(tmp_path)
    assert again.primed == 1
    assert restarted.cache[KEY] is restarted.configs[1], "the cached choice must be the kernel's own config"
    assert restarted.cache[KEY].pre_hook is _zero_hook
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")


def test_cache_from_another_environment_is_ignored(tmp_path, monkeypatch):
    tuner = _install_kernel(monkeypatch)
    (tmp_path / AUTOTUNE_FILE).write_text(json.dumps({
        "env": {"triton": "0.0", "mamba_ssm": "0.0", "device": "another GPU"},
        "choices": {"fakepkg.ops.kernel": {repr(KEY): str(tuner.configs[0])}},
    }))
    warnings = []
    cache = KernelCache.open(tmp_path, warnings.append)
    assert cache.primed == 0 and tuner.cache == {}
    assert len(warnings) == 1 and "another GPU" in warnings[0] and "tuning again" in warnings[0]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"env": None}), json.dumps([1, 2])])
def test_damaged_cache_file_is_ignored_with_a_warning(tmp_path, monkeypatch, content):
    tuner = _install_kernel(monkeypatch)
    (tmp_path / AUTOTUNE_FILE).write_text(content)
    warnings = []
    cache = KernelCache.open(tmp_path, warnings.append)
    assert tuner.cache == {} and cache.primed == 0
    assert len(warnings) == 1 and str(tmp_path / AUTOTUNE_FILE) in warnings[0]
    tuner.cache[KEY] = tuner.configs[0]
    assert cache.save() == 1, "a damaged file is replaced by the new choices"
    assert json.loads((tmp_path / AUTOTUNE_FILE).read_text())["choices"]
