"""Workers: the processes that run jobs, talking to the API only through the store.

- `loop`: a worker's life: load the runner once, claim jobs with a lease (waking on the store's
  events, a local nudge or the poll), heartbeat, drain and stop on SIGTERM;
- `handoff`: the one-job hand-off between a worker's device stage (render) and its CPU stage
  (encode, store, record);
- `job`: one job: fetch its media, render, finish, store the outputs, record the outcome (in two
  stages, or one for a runner with only `run`);
- `fetching`: media inputs by URL, or from our own storage for our own URLs;
- `supervision`: the API process's side (or `wan-vace worker`'s, for several workers): spawn
  one local worker per slot of the host's GPU plan (server/gpus.py), restart the dead, hand their
  jobs back, expire leases, fail queued jobs no worker can run (after a grace), stop them all
  within their shutdown grace;
- `retry`: backoff and once-per-outage logging, so a store or disk outage never ends a loop.

A worker receives a runner factory (`server.kernel.runner.RunnerFactory`): the default builds
the real pipeline (`default_runner_factory`, which imports `pipelines` in the worker process
only); the tests pass failure-named fakes.
"""

from server.worker.loop import EXIT_LOAD_FAILED, Worker, default_runner_factory, install_sigterm, worker_main

__all__ = ["EXIT_LOAD_FAILED", "Worker", "default_runner_factory", "install_sigterm", "worker_main"]
