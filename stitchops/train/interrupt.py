"""Stopping a training run cleanly: Ctrl-C (SIGINT) or SIGTERM while training lets the step
finish; the loop then saves a checkpoint, says how to resume, and raises
``TrainingInterrupted``, which the command line turns into exit code 130 (SIGINT) or 143
(SIGTERM) without a traceback. Under torchrun every process stops at the same step (the
processes agree on it after each step)."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving ``checkpoint``; ``code`` is the exit code."""

    def __init__(self, checkpoint, signum: int) -> None:
        super().__init__(f"training interrupted; resume from {checkpoint}")
        self.checkpoint, self.code = checkpoint, 128 + signum


class StopRequests:
    """Inside the block, SIGINT and SIGTERM set a flag instead of raising (in the main
    thread; elsewhere nothing changes); ``requested()`` says whether to stop now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world: int = 1) -> None:
        self.world, self.signum, self.previous = world, 0, {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, device: torch.device) -> int:
        """The signal to stop on (0: go on), agreed by every process."""
        if self.world == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
