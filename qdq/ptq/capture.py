"""What one module sees on calibration data: its inputs and outputs, captured by feeding the model up to it.

The PTQ algorithms (:mod:`qdq.ptq.bias_correction`, :mod:`qdq.ptq.adaround`) work layer by layer in forward order. For each
layer they need what reaches it on calibration data - with the layers before it already quantized (and corrected),
or in float - and nothing beyond it. :func:`run_until` feeds the batches through :func:`qdq.calibrate.feeding.feed` (the
batch conventions of :func:`qdq.calibrate_model`) and stops every batch as soon as the module has run, so the rest of
the model costs nothing and memory holds only what the caller keeps of this one module.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> seen = []
    >>> run_until(model, model[1], [torch.randn(5, 3)] * 2, lambda args, kwargs, out: seen.append(out.shape),
    ...           progress=False)
    2
    >>> seen
    [torch.Size([5, 4]), torch.Size([5, 4])]
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn

from qdq.calibrate.feeding import feed, model_device, model_inputs, run_model, to_device
from qdq.transform.switches import preserved_modes

__all__ = ["run_until", "call_order", "StopForward", "PausedForwards"]

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by the capture hook once the module has run: the rest of the batch's forward is skipped."""


class _Truncated(nn.Module):
    """Runs the model and swallows :class:`StopForward` (so that :func:`feed` goes on with the next batch)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.model(*args, **kwargs)
        except StopForward:
            return None


def run_until(
    model: nn.Module,
    module: nn.Module,
    data: Iterable,
    on_call: Callable[[tuple, dict, Any], None],
    num_batches: int | None = None,
    *,
    device: torch.device | str | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    progress: bool = True,
    desc: str = "Capturing",
    name: str | None = None,
) -> int:
    """Feeds ``data`` through ``model`` in eval mode under ``no_grad``; ``on_call(args, kwargs, output)`` sees each
    call of ``module``, after which the batch stops. Returns the number of batches fed.

    The train/eval state of every module is restored afterwards. A batch in which ``module`` never runs is an error
    naming it (``name``, default its class).
    """
    calls = [0]

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        on_call(args, kwargs, output)
        calls[0] += 1
        raise StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    device = torch.device(device) if device is not None else model_device(model)
    batches = [0]

    def before_batch() -> None:
        if batches[0] > calls[0]:
            raise RuntimeError(f"{name or type(module).__name__} did not run in calibration batch {batches[0] - 1}")
        batches[0] += 1

    try:
        with preserved_modes(model, quantizer_states=False), torch.no_grad():
            model.eval()
            fed = feed(_Truncated(model), data, num_batches, device=device, preprocess=preprocess, desc=desc,
                       what="calibration batch", progress=progress, before_batch=before_batch)
        if fed > calls[0]:
            raise RuntimeError(f"{name or type(module).__name__} did not run in calibration batch {fed - 1}")
    finally:
        handle.remove()
    return fed


def call_order(model: nn.Module, modules: Iterable[nn.Module], data: Iterable, *,
               device: torch.device | str | None = None, preprocess: Callable[[Any], Any] | None = None) -> list:
    """``modules`` in the order ``model`` first calls them on the first batch of ``data`` (the ones it never calls
    are left out)."""
    modules = list(modules)
    order: list[nn.Module] = []
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(lambda mod, args: order.append(mod) if mod not in order else None))
    try:
        with preserved_modes(model, quantizer_states=False), torch.no_grad():
            model.eval()
            feed(model, data, 1, device=torch.device(device) if device is not None else model_device(model),
                 preprocess=preprocess, progress=False)
    finally:
        for h in handles:
            h.remove()
    return order


class _Stop(BaseException):
    """Sent into a paused forward to end it (a BaseException: the model's own ``except Exception`` lets it pass)."""


class PausedForwards:
    """Every calibration batch runs through the model once, in its own thread, pausing at each watched module.

    :func:`run_until` feeds the model from the start for every layer: over ``L`` layers that is about ``L / 2``
    forwards of the data. Here the forward of each batch runs in a worker thread that stops at each ``watch``
    module in turn (before it runs with ``at="input"``, after it with ``at="output"``) and goes on only when
    :meth:`advance` asks for the next one, so the whole sequence of layers costs one forward. What a worker holds
    while paused is what its forward keeps alive at that point (the module's input, a residual, ...).

    Only one thread runs at any time (the caller waits for the worker to pause), so the caller may change the model
    between :meth:`advance` calls - round the weights of a layer the forward has not reached yet, switch quantizers
    off - and the forwards see the change. ``context()`` is entered around each resumption (e.g.
    :func:`qdq.transform.switches.disable_quantization` for a float reference). Calls of the watched modules from
    other threads (the caller's own use of a layer) pass through untouched. Use as a context manager: leaving it
    stops the forwards.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> data = [torch.randn(5, 3), torch.randn(2, 3)]
        >>> with PausedForwards(model, [model[0], model[2]], data, at="output") as forwards:
        ...     first = forwards.advance(model[0])
        ...     with torch.no_grad():
        ...         _ = model[2].weight.zero_()      # seen by the forwards: they have not reached it
        ...     second = forwards.advance(model[2])
        >>> [out.shape[0] for _, _, out in first], float(second[0][2].abs().max()) == float(model[2].bias.abs().max())
        ([5, 2], True)
    """

    def __init__(self, model: nn.Module, watch: Iterable[nn.Module], data: Iterable, num_batches: int | None = None,
                 *, at: str = "input", device: torch.device | str | None = None,
                 preprocess: Callable[[Any], Any] | None = None, context: Callable[[], Any] | None = None,
                 names: dict[int, str] | None = None):
        import queue
        import threading

        if at not in ("input", "output"):
            raise ValueError(f"PausedForwards: at must be 'input' or 'output', got {at!r}")
        self._queue_type, self._threading = queue.Queue, threading
        self.model, self.at, self.context = model, at, context
        self.watch = list(watch)
        self._names = names or {}
        self._next = {id(m): i for i, m in enumerate(self.watch)}
        self._workers: list[dict] = []
        self._idents: dict[int, dict] = {}
        self._handles = []
        device = torch.device(device) if device is not None else model_device(model)
        for index, batch in enumerate(itertools.islice(data, num_batches)):
            batch = to_device(batch, device)
            inputs = preprocess(batch) if preprocess is not None else model_inputs(batch, index, "calibration batch")
            self._workers.append({"index": index, "inputs": inputs, "to_worker": queue.Queue(),
                                  "to_main": queue.Queue(), "thread": None, "state": "new", "position": -1})
        for m in self.watch:
            if at == "input":
                self._handles.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            else:
                self._handles.append(m.register_forward_hook(self._post_hook, with_kwargs=True))

    def __len__(self) -> int:
        return len(self._workers)

    def __enter__(self) -> "PausedForwards":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _name(self, module: nn.Module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def _pause(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        worker = self._idents.get(self._threading.get_ident())
        if worker is None:
            return  # a call from the caller's thread
        worker["to_main"].put(("pause", module, args, kwargs, out))
        if worker["to_worker"].get() == "stop":
            raise _Stop

    def _pre_hook(self, module, args, kwargs):
        self._pause(module, args, kwargs, None)

    def _post_hook(self, module, args, kwargs, out):
        self._pause(module, args, kwargs, out)

    def _run(self, worker: dict) -> None:
        self._idents[self._threading.get_ident()] = worker
        try:
            if worker["to_worker"].get() == "stop":
                raise _Stop
            with torch.no_grad():
                run_model(self.model, worker["inputs"], worker["index"], "calibration batch")
            worker["to_main"].put(("done",))
        except _Stop:
            worker["to_main"].put(("stopped",))
        except BaseException as err:  # handed to the caller's thread
            worker["to_main"].put(("error", err))

    def advance(self, module: nn.Module) -> list[tuple[tuple, dict, Any]]:
        """Resumes every batch's forward until it pauses at ``module``; ``(args, kwargs, output)`` per batch
        (``output`` is ``None`` with ``at="input"``). The watched modules must be asked for in the order the
        forward calls them; a forward that ends, or pauses at another module, first is an error naming both."""
        if id(module) not in self._next:
            raise ValueError(f"PausedForwards: {self._name(module)} is not watched")
        target = self._next[id(module)]
        found = []
        for worker in self._workers:
            if worker["state"] in ("done", "stopped"):
                raise RuntimeError(f"{self._name(module)} did not run in calibration batch {worker['index']}")
            if worker["position"] >= target:
                raise RuntimeError(f"PausedForwards: {self._name(module)} asked for after a later module")
            manager = self.context() if self.context is not None else contextlib.nullcontext()
            with manager:
                if worker["thread"] is None:
                    worker["thread"] = self._threading.Thread(target=self._run, args=(worker,), daemon=True,
                                                              name=f"qdq-forward-{worker['index']}")
                    worker["thread"].start()
                worker["to_worker"].put("go")
                message = worker["to_main"].get()
            kind = message[0]
            if kind == "error":
                worker["state"] = "done"
                raise message[1]
            if kind in ("done", "stopped"):
                worker["state"] = kind
                raise RuntimeError(f"{self._name(module)} did not run in calibration batch {worker['index']}")
            _, seen, args, kwargs, out = message
            position = self._next[id(seen)]
            worker["position"] = position
            if seen is not module:
                raise RuntimeError(
                    f"{self._name(module)} did not run in calibration batch {worker['index']} where expected: "
                    f"{self._name(seen)} ran " + ("before it" if position < target else "instead (a module called "
                                                  "more than once, or in another order than on the first batch)"))
            found.append((args, kwargs, out))
        return found

    def close(self) -> None:
        """Ends the paused forwards (their threads exit) and removes the hooks."""
        try:
            for worker in self._workers:
                thread = worker["thread"]
                if thread is None or worker["state"] in ("done", "stopped"):
                    continue
                worker["to_worker"].put("stop")
                worker["to_main"].get()
                thread.join()
                worker["state"] = "stopped"
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
