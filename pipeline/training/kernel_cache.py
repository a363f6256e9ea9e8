"""Compiled Triton kernels and their autotune choices, kept across restarts of a run.

mamba-ssm's Mamba-2 kernels are Triton kernels that autotune on first use: about 75 s on an H200
for `bench_1p5b`, paid again by every restart and Slurm requeue. Triton's own disk cache of autotune
results (TRITON_CACHE_AUTOTUNING) skips every kernel whose configs carry a pre-hook, which most Mamba
backward kernels do, so the choices are kept here instead:

    cache = KernelCache.open(directory)   # before the first kernel runs: primes the autotuners
    ...                                   # first training step: new shapes are tuned
    cache.save()                          # rank 0: records every choice made so far

`directory/autotune.json` maps each autotuned kernel and key to its chosen config; it is used only
by the same Triton, mamba-ssm and GPU model that wrote it. Compiled kernels go to
`directory/triton` (Triton's TRITON_CACHE_DIR) unless the user set TRITON_CACHE_DIR.
"""

import ast
import json
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.fs import atomic_write_text

AUTOTUNE_FILE = "autotune.json"
TUNED_PACKAGES = ("mamba_ssm",)
"""Packages whose module-level Triton autotuners are cached."""


def _package_version(name: str) -> str:
    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return "none"


def environment() -> dict[str, str]:
    """What a cached choice is valid for: a choice tuned elsewhere may be slow or not even compile."""
    import torch

    return {
        "triton": _package_version("triton"),
        "mamba_ssm": _package_version("mamba_ssm"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def autotuners() -> dict[str, object]:
    """Every Triton autotuner defined at module level in an imported TUNED_PACKAGES module, by name."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in TUNED_PACKAGES:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, Autotuner):
                found[f"{module_name}.{attr}"] = value
    return found


@dataclass
class KernelCache:
    """The autotune choices of one cache directory (see the module docstring)."""

    directory: Path
    env: dict[str, str]
    choices: dict[str, dict[str, str]] = field(default_factory=dict)
    """kernel name -> repr(autotune key) -> str(chosen triton.Config)."""
    primed: int = 0
    """Choices put back into autotuners at open()."""

    @classmethod
    def open(cls, directory: str | Path, warn=print) -> "KernelCache":
        """Point Triton's compile cache at `directory/triton` and prime the autotuners of the
        imported kernels with the saved choices. A file from another environment, or one that
        cannot be read, is ignored with a warning (the kernels are tuned again and it is rewritten)."""
        directory = Path(directory)
        os.environ.setdefault("TRITON_CACHE_DIR", str(directory / "triton"))
        cache = cls(directory, environment())
        path = directory / AUTOTUNE_FILE
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                if saved.get("env") != cache.env:
                    warn(f"kernel cache {path} was tuned for {saved.get('env')}, this is {cache.env}: tuning again")
                else:
                    cache.choices = {k: dict(v) for k, v in saved["choices"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                warn(f"kernel cache {path} is unreadable ({type(e).__name__}: {e}): tuning again")
        cache.primed = cache._prime()
        return cache

    def _prime(self) -> int:
        primed = 0
        for name, tuner in autotuners().items():
            by_text = {str(config): config for config in tuner.configs}
            for key_text, config_text in self.choices.get(name, {}).items():
                config = by_text.get(config_text)
                if config is None:
                    continue  # the kernel's configs changed: it will be tuned
                tuner.cache[ast.literal_eval(key_text)] = config
                primed += 1
        return primed

    def collect(self) -> int:
        """Take the choices the autotuners made so far; returns how many are new."""
        before = sum(len(v) for v in self.choices.values())
        for name, tuner in autotuners().items():
            for key, config in tuner.cache.items():
                self.choices.setdefault(name, {})[repr(key)] = str(config)
        return sum(len(v) for v in self.choices.values()) - before

    def save(self) -> int:
        """Collect and write the choices (one process per cache: global rank 0); returns how many are new."""
        new = self.collect()
        if new:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.directory / AUTOTUNE_FILE,
                              json.dumps({"env": self.env, "choices": self.choices}, indent=1, sort_keys=True))
        return new
