"""An orderly end for a process that joined a process group: every rank exits 0, every time.

A 2-rank CPU job (gloo) that had written all its output used to abort at interpreter exit in
about a third of runs (``terminate called without an active exception``, SIGABRT), and torchrun
then reported the whole job FAILED: the process group's C++ threads and sockets were still alive
while the interpreter tore itself down. :func:`tear_down_at_exit` registers (once) an ``atexit``
handler that flushes the output and destroys fairscale's model-parallel groups and the process
group while the interpreter is still whole. ``init_model_parallel`` calls it when it creates a
group.
"""

from __future__ import annotations

import atexit
import sys

__all__ = ["tear_down", "tear_down_at_exit"]

_registered = False


def tear_down() -> None:
    """Destroy the process group this process joined (and fairscale's groups), if any."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        import fairscale.nn.model_parallel.initialize as fs_init

        if fs_init.model_parallel_is_initialized():
            fs_init.destroy_model_parallel()
    except ImportError:  # pragma: no cover - fairscale is a dependency
        pass
    try:
        dist.destroy_process_group()
    except (RuntimeError, ValueError) as exc:  # already gone: nothing left to tear down
        sys.stderr.write(f"llama3: process group teardown: {exc}\n")


def tear_down_at_exit() -> None:
    """Register :func:`tear_down` to run at interpreter exit (once per process)."""
    global _registered
    if not _registered:
        atexit.register(tear_down)
        _registered = True
