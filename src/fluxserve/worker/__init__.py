"""The GPU worker, in seams: ``loop`` (claim loop, batches, commands), ``prepare`` (inputs and
prompt enhancement), ``finish`` (safety, PNG, storage, the recorded outcome, on a thread of its
own), ``claim`` (heartbeats), ``config`` (typed settings), ``messages`` (typed commands and
reports). Imports no torch: the engine comes in through ``loop.Engine``."""

from fluxserve.worker.config import WorkerConfig
from fluxserve.worker.loop import Worker

__all__ = ["Worker", "WorkerConfig"]
