"""SIGTERM (what schedulers send before killing a job) -> checkpoint at the next step, exit.

One `Preemption` covers a whole run, the encoder's pretraining stage and the segmentation
training after it: each stage asks `reached()` once per training step and, when it turns True,
saves a checkpoint and stops; rerunning the command resumes the stage where it stopped. The
evaluations of both stages ask it once per batch too: a long evaluation is abandoned (its step
is saved first) and redone on resume, instead of outlasting the scheduler's grace period.

With several processes every one must save the same step (a process that stopped alone would
leave the others waiting in a collective): JAX's preemption service, started by
`jax.distributed.initialize`, catches the signal on whichever hosts get it, tells the others,
and `multihost_utils.reached_preemption_sync_point` turns True on all of them at one step. Its
step ids must increase over the run, so they count the steps of both stages (`reached` numbers
its calls). One process: a Python handler sets a flag, installed at the first training step:
before it there is nothing to save (a resumed run's checkpoint is on disk already), so a SIGTERM
during data preparation or compilation ends the process at once, as it would without segjax,
instead of after preparing, compiling, one step and a checkpoint, which could outlast a
scheduler's grace period.
"""

from __future__ import annotations

import signal

import jax


class Preemption:
    """Entered once per run (`train.train_and_evaluate`); the SIGTERM handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._service = None
        self._calls = 0

    def __enter__(self) -> Preemption:
        try:
            from jax._src import distributed  # the public API has no "is the service running" query
        except ImportError:  # a JAX whose private module moved: SIGTERM is handled here
            distributed = None
        state = getattr(distributed, "global_state", None)
        if jax.process_count() > 1 and getattr(state, "preemption_sync_manager", None) is not None:
            from jax.experimental import multihost_utils

            self._service = multihost_utils.reached_preemption_sync_point  # it handles SIGTERM itself
            return self
        return self

    def reached(self) -> bool:
        """Whether to save now and stop; asked once per training step (and evaluation batch), on
        every process."""
        self._calls += 1
        if self._service is not None and self._service(self._calls):
            self.requested = True
        elif self._service is None and self._calls == 1:  # from now on there is a step to save
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                self._previous = None
        return self.requested

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
