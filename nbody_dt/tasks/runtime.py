"""What the tasks of one training process share: the open (locked) runs and their evaluators,
and an optional progress listener (the CLI's terminal bar). Process-local by design: a run's
single writer is this process."""

from __future__ import annotations

from typing import Callable

from nbody_dt.storage.run import Run
from nbody_dt.training.evaluators import Evaluator

_runs: dict[str, Run] = {}
_evaluators: dict[str, Evaluator] = {}
_listeners: list[Callable[[dict], None]] = []


def register(run: Run, evaluator: Evaluator) -> None:
    _runs[run.url] = run
    _evaluators[run.url] = evaluator


def release(url: str) -> None:
    _runs.pop(url, None)
    _evaluators.pop(url, None)


def run(url: str) -> Run:
    try:
        return _runs[url]
    except KeyError:
        raise RuntimeError(f"run {url} is not open in this process (tasks run inside the train flow)") from None


def evaluator(url: str) -> Evaluator:
    return _evaluators[url]


def add_listener(listener: Callable[[dict], None]) -> None:
    _listeners.append(listener)


def remove_listener(listener: Callable[[dict], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def notify(event: dict) -> None:
    """Tell the listeners how far training got (epoch, stage, a few figures)."""
    for listener in list(_listeners):
        listener(event)
