"""What every engine behind an engine's own server shares, whatever its protocol.

An unmodified server (``vllm serve``, SGLang's ``launch_server``) has none of the engine facade's
semantics: no canonical sampling, no state checks, no validated atomic updates, no versions on every
token. So such a server is driven *as a backend*: a :class:`ServerEngine` implements the engine hooks
over the server's HTTP API, and :func:`skyrl_backends.remote.native.connect_server` wraps it in the
:class:`~skyrl_backends.engine.InferenceEngine` facade, which adds everything else on this side of
the wire, as it does for an in-process engine. Each protocol module
(:mod:`~skyrl_backends.remote.native.vllm`, :mod:`~skyrl_backends.remote.native.sglang`) says which
route each hook takes; this module keeps what they share:

* requests in flight, and aborts that cannot miss: a server ignores an abort of a request it has not
  registered yet, so an abort is repeated, with growing intervals, until the request has returned
  (and an abort of a request not sent yet stops it from being sent);
* weight versions: every request is salted with the version of the weights it was submitted under
  (a prefix cached under older weights is never reused), updates are bracketed by an
  :class:`~skyrl_backends.version_labels.UpdateWatch`, and the server labels each token with the
  facade's version number;
* in-process tensors: sent through shared memory, which needs the trainer on the server's machine;
* weight specs: read from the checkpoint the server serves (its folder must be readable here).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.checkpoint import checkpoint_specs
from skyrl_backends.errors import ConfigError
from skyrl_backends.hookspecs import hookimpl
from skyrl_backends.remote.native.http import ServerHTTP
from skyrl_backends.types import Completion, ParallelSizes, TensorSpec, WeightUpdateRequest
from skyrl_backends.version_labels import UpdateWatch

logger = logging.getLogger(__name__)

_ABORT_RETRY_S = 0.05
_ABORT_RETRY_MAX_S = 0.5
_MAX_REMEMBERED_ABORTS = 10_000


@dataclass
class ServerInfo:
    """What a server said about itself when the engine connected."""

    protocol: str
    url: str
    model: str | None
    served_dtype: str
    engine_version: str | None
    capabilities: Capabilities
    parallel_sizes: ParallelSizes = field(default_factory=ParallelSizes)
    max_model_len: int | None = None
    weight_version: int = 0
    same_host: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class ServerEngine(abc.ABC):
    """The engine hooks over one server; a protocol module implements the abstract methods."""

    def __init__(self, http: ServerHTTP, info: ServerInfo) -> None:
        self.http = http
        self.info = info
        self._inflight: set[str] = set()
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self._background: set[asyncio.Task] = set()
        self._updates = UpdateWatch(info.weight_version)
        self._senders: dict[str, Any] = {}
        self._owned_server: Any = None
        self._closed = False

    # -- what a protocol implements --------------------------------------------------------------------
    @abc.abstractmethod
    async def abort_on_server(self, request_ids: list[str] | None) -> None:
        """Ask the server to abort ``request_ids`` (None: everything it runs)."""

    # -- requests ----------------------------------------------------------------------------------------
    def check_prompts(self, prompts: list[list[int]]) -> None:
        """Refuse, naming the prompt, what the server would refuse in its own words (or fail on):
        a prompt as long as the context, a token id outside the vocabulary."""
        limit = self.info.max_model_len
        vocab = self._vocab_size()
        for i, prompt in enumerate(prompts):
            if limit is not None and len(prompt) >= limit:
                raise ConfigError(f"prompt_token_ids[{i}]", f"has {len(prompt)} tokens; the server's context is "
                                                            f"{limit} tokens. Shorten the prompt.")
            bad = next((t for t in prompt if vocab is not None and t >= vocab), None)
            if bad is not None:
                raise ConfigError(f"prompt_token_ids[{i}]", f"token id {bad} is outside the vocabulary (size {vocab}).")

    def _vocab_size(self) -> int | None:
        if "vocab_size" not in self.info.extra:
            self.info.extra["vocab_size"] = _config_vocab_size(self.info.model)
        return self.info.extra["vocab_size"]

    # -- requests in flight ------------------------------------------------------------------------------
    def cache_salt(self) -> str:
        """The prefix-cache salt of a request submitted now: the weights it runs on."""
        return f"skyrl-weights-{self._updates.version}"

    def take_abort(self, request_id: str) -> bool:
        """Whether ``request_id`` was aborted before it was sent (it is then not sent)."""
        if request_id in self._aborted:
            del self._aborted[request_id]
            return True
        return False

    @contextlib.contextmanager
    def in_flight(self, request_id: str):
        self._inflight.add(request_id)
        try:
            yield
        finally:
            self._inflight.discard(request_id)
            self._aborted.pop(request_id, None)

    @hookimpl
    async def skyrl_backends_abort(self, request_ids: list[str] | None) -> None:
        ids = sorted(self._inflight) if request_ids is None else list(request_ids)
        for rid in ids:
            if rid not in self._inflight:
                self._remember_abort(rid)
        if request_ids is None:
            await self.abort_on_server(None)
        elif ids:
            await self.abort_on_server(ids)
        pending = set(ids) & self._inflight
        if pending:
            task = asyncio.create_task(self._repeat_abort(pending))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _remember_abort(self, request_id: str) -> None:
        self._aborted[request_id] = None
        while len(self._aborted) > _MAX_REMEMBERED_ABORTS:
            self._aborted.popitem(last=False)

    async def _repeat_abort(self, ids: set[str]) -> None:
        delay = _ABORT_RETRY_S
        while not self._closed:
            await asyncio.sleep(delay)
            pending = ids & self._inflight
            if not pending or self._closed:
                return
            try:
                await self.abort_on_server(sorted(pending))
            except Exception as exc:  # tried again while the request runs; a dead server ends the request too
                logger.debug("repeated abort failed: %r", exc)
            delay = min(delay * 2, _ABORT_RETRY_MAX_S)

    # -- weights -----------------------------------------------------------------------------------------
    @hookimpl
    def skyrl_backends_weight_specs(self) -> list[TensorSpec]:
        model = self.info.model
        if not model:
            raise ConfigError("model", f"the server at {self.info.url} did not say which model folder it serves; "
                                       f"weight updates are checked against that checkpoint's tensors")
        try:
            return checkpoint_specs(model, self.info.served_dtype)
        except (OSError, ConfigError) as exc:
            raise ConfigError("model", f"the checkpoint the server at {self.info.url} serves ({model}) is not "
                                       f"readable here ({exc}); weight updates are checked against its tensors, so "
                                       f"this side needs the same folder (a shared filesystem or a copy at the same "
                                       f"path)") from None

    def transported(self, request: WeightUpdateRequest) -> WeightUpdateRequest:
        """``request`` as the server can receive it: in-process tensors (``strategy="tensors"``) are
        written to shared memory (CUDA IPC for CUDA tensors), through senders kept for the next
        update; other strategies travel as they are."""
        if request.strategy != "tensors":
            return request
        from skyrl_backends.weight_sync import make_sender
        from skyrl_backends.weight_sync.chunks import plan

        tensors = list(request.payload or [])
        strategy = "cuda_ipc" if tensors and all(getattr(t, "is_cuda", False) for t in tensors) else "shared_memory"
        sender = self._senders.get(strategy)
        if sender is None:
            device = tensors[0].device if strategy == "cuda_ipc" else None
            sender = self._senders[strategy] = make_sender(strategy, device)
        layout = plan(list(zip(request.names, tensors, strict=True)),
                      dtype_for=dict(zip(request.names, request.dtypes, strict=True)))
        return WeightUpdateRequest(request.names, request.dtypes, request.shapes, strategy, sender.write(layout),
                                   check_finite=request.check_finite)

    # -- the rest ----------------------------------------------------------------------------------------
    @hookimpl
    def skyrl_backends_parallel_sizes(self) -> ParallelSizes:
        return self.info.parallel_sizes

    @hookimpl
    def skyrl_backends_engine_version(self) -> str | None:
        return self.info.engine_version

    @hookimpl
    async def skyrl_backends_teardown(self) -> None:
        """Close the connection; the server keeps running unless this engine started it."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        for sender in self._senders.values():
            with contextlib.suppress(Exception):
                sender.close()
        self._senders.clear()
        await self.http.aclose()
        if self._owned_server is not None:
            await asyncio.to_thread(self._owned_server.stop)

    def own_server(self, server: Any) -> None:
        """Stop ``server`` (a process this side started) when the engine is torn down."""
        self._owned_server = server


def _config_vocab_size(model_dir: str | None) -> int | None:
    """The vocabulary size in the model folder's config.json (None when not readable here)."""
    import json
    import os

    if not model_dir:
        return None
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def empty_aborted(request_id: str, top_n: int | None) -> Completion:
    """A request aborted before the server saw it."""
    return Completion(token_ids=[], finish_reason="abort", logprobs=[] if top_n is not None else None,
                      top_logprobs=[] if top_n else None, text="", request_id=request_id)


__all__ = ["ServerEngine", "ServerInfo", "empty_aborted"]
