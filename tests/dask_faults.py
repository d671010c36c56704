"""A Dask worker plugin for fault tests: kills its worker process (SIGKILL, as a lost machine)
when a task whose key starts with a given prefix begins executing there, once per fault file.

Register it with `client.register_plugin(KillWorkerOnTask(path, prefix))`; creating the file
arms it, and the first worker to start such a task claims the file (an atomic unlink) and dies.
"""

from __future__ import annotations

import os
import signal
import sys

import cloudpickle
from distributed import WorkerPlugin

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests


class KillWorkerOnTask(WorkerPlugin):
    def __init__(self, fault_file: str, key_prefix: str):
        self.fault_file, self.key_prefix = fault_file, key_prefix

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing" or not str(key).startswith(self.key_prefix):
            return
        try:
            os.unlink(self.fault_file)
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
