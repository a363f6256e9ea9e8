"""Helper processes that never outlive the process that started them (tokenizing workers, the
background checkpoint writer), and a quick end for the commands' own processes.

A helper blocked on a queue, or still writing, would go on after its parent was killed (kill -9,
the OOM killer): on Linux the kernel kills it when the parent dies (PR_SET_PDEATHSIG).
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when `parent_pid` (its parent) exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def skip_final_collection() -> None:
    """Put every object alive now beyond the cyclic garbage collector, as a command ends: the
    interpreter's collections at exit then skip the millions of objects that importing torch and
    megatron-core made (about 1.5 s of CPU per process, so per rank of every run). Objects are still
    released as the interpreter clears its modules; atexit handlers run as before."""
    import gc

    gc.freeze()
