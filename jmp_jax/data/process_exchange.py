"""Small JSON values shared by the processes of a `jax.distributed` run through its coordination service's
key-value store (the store orbax synchronises processes with).

The input pipeline agrees on each step's batch shape through it from its producer thread: a device
collective there would run concurrently with the training step's collectives, in an order that differs
between processes.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import jax
from jax._src import distributed  # the client that jax.distributed.initialize() connected; no public accessor

# A wait re-checks its stop event this often.
POLL_MS = 1000


class Stopped(Exception):
    """A wait for another process's value was abandoned: its stop event was set."""


class ProcessExchange:
    """Keys under `namespace/`; `publish` writes this process's value, `read` waits for any process's."""

    def __init__(self, namespace: str, client=None, process_index: int | None = None,
                 process_count: int | None = None):
        self.client = client if client is not None else distributed.global_state.client
        if self.client is None:
            raise RuntimeError("ProcessExchange: jax.distributed.initialize() has not been called")
        self.namespace = namespace
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self._mine: list[str] = []
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, namespace: str) -> ProcessExchange | None:
        """An exchange when this run has several processes; None for one."""
        return cls(namespace) if jax.process_count() > 1 else None

    def _key(self, key: str) -> str:
        return f"{self.namespace}/{key}"

    def publish(self, key: str, value: Any) -> None:
        self.client.key_value_set(self._key(key), json.dumps(value))
        with self._lock:
            self._mine.append(key)

    def read(self, key: str, stop: threading.Event | None = None) -> Any:
        """The value at `key`, once some process has published it; raises Stopped when `stop` is set."""
        while True:
            if stop is not None and stop.is_set():
                raise Stopped(key)
            try:
                return json.loads(self.client.blocking_key_value_get(self._key(key), POLL_MS))
            except jax.errors.JaxRuntimeError as err:
                if "DEADLINE_EXCEEDED" not in str(err):
                    raise

    def allgather(self, key: str, value: Any, stop: threading.Event | None = None) -> list[Any]:
        """Every process's `value` for `key`, in process order."""
        self.publish(f"{key}/{self.process_index}", value)
        return [self.read(f"{key}/{p}", stop) for p in range(self.process_count)]

    def delete_mine(self, prefix: str) -> None:
        """Deletes the keys this process published under `prefix` (once every process has read them)."""
        with self._lock:
            gone = [k for k in self._mine if k.startswith(prefix)]
            self._mine = [k for k in self._mine if not k.startswith(prefix)]
        for key in gone:
            self.client.key_value_delete(self._key(key))
