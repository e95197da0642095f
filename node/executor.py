"""This node as an executor: a model backend per realm behind a per-realm queue.

The router sees it through ``LocalExecutor`` (serves / queue_depth / execute); peers reach it
through the query protocol, whose handler calls the same ``execute``. A realm whose backend
cannot load (a missing extra, a corrupt model) is simply not served, with the reason shown in
``realms``; the node goes on serving the others.

A watchdog guards every generation: a backend still busy ``WATCHDOG_GRACE`` seconds after its
query's deadline or cancellation is stuck (a hung native call cannot be interrupted from
Python); the query fails with a clear error, the stuck instance is dropped and a fresh backend
is loaded in its place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..p2p.health import RealmStatus
from ..realms import events as ev
from ..realms.catalog import CATALOG, backend_payload, wanted_model
from ..realms.events import BadRequest, Code, ExecutorFailure, FailureKind, ModelFailure, QueryError
from ..realms.queue import PositionReport, RealmQueue, outcome_of
from ..realms.router import Query, StreamEmit
from .config import Config, RealmConfig
from .limits import LOADING_RETRY_AFTER, WATCHDOG_GRACE

log = logging.getLogger("rentahal.node")

SMOKE_DIR = "smoke-test"
EXTRAS = {"imagine": "image", "speech": "speech"}


class BackendUnavailable(Exception):
    """The realm cannot be served on this install (a missing extra, a missing tool)."""


@dataclass
class RealmSlot:
    name: str
    config: RealmConfig
    queue: RealmQueue
    backend: Any = None
    model: str = ""
    smoke_test: bool = False
    gpu: bool = False
    status: str = "loading"  # loading | ready | restarting | disabled | <why not served>


class LocalRealms:
    def __init__(self, config: Config, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.slots: dict[str, RealmSlot] = {}
        for name, rc in config.realms.items():
            slot = RealmSlot(name, rc, RealmQueue(name, slots=rc.slots, limit=rc.queue_limit))
            if not rc.serve:
                slot.status = "disabled"
            self.slots[name] = slot
        self.loaded = trio.Event()
        self.disabled: set[str] = set()  # by the sysop, at run time
        self.storage: Any = None  # set by the node once storage is open
        self.metrics: Any = None  # set by the node (node/metrics.py)
        self.peer_id = ""
        self.watchdog_grace = WATCHDOG_GRACE
        self._status_changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the backend tasks; load every served realm's model."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self.load_all()
            await trio.sleep_forever()

    # --- LocalExecutor -----------------------------------------------------------------------
    def serves(self, realm: str) -> bool:
        slot = self.slots.get(realm)
        return slot is not None and slot.status == "ready" and realm not in self.disabled

    def model_name(self, realm: str) -> str:
        slot = self.slots.get(realm)
        return slot.model if slot else ""

    def queue_depth(self, realm: str) -> int:
        slot = self.slots.get(realm)
        return slot.queue.depth if slot else 0

    def loading(self, realm: str) -> bool:
        slot = self.slots.get(realm)
        return slot is not None and slot.status in ("loading", "restarting") and realm not in self.disabled

    def next_status_change(self) -> trio.Event:
        """Set when some realm's status next changes (a load ends, a restart, ...)."""
        return self._status_changed

    async def wait_loaded(self, realm: str) -> None:
        """Until the realm's model has loaded (or failed to)."""
        while self.loading(realm):
            await self._status_changed.wait()

    def not_served_reason(self, realm: str) -> str:
        slot = self.slots.get(realm)
        if slot is None:
            return f"unknown realm {realm!r}"
        if realm in self.disabled:
            return "disabled by the sysop"
        return {
            "disabled": "not served here (serve = false)",
            "loading": "model still loading",
            "restarting": "backend restarting after it got stuck",
        }.get(slot.status, slot.status)

    async def execute(self, query: Query, emit: StreamEmit) -> ev.Result:
        """Run ``query`` here: wait for a slot (reporting the position), stream the backend's
        events, return its result with the cost. Raises QueryError."""
        slot = self.slots.get(query.realm)
        if slot is not None and self.loading(query.realm):
            # Alive, and about to serve it (a restart, a model loading): busy, not "not served",
            # so the asker waits a moment or asks another rather than giving up on this one.
            raise ExecutorFailure(
                f"{query.realm}: {self.not_served_reason(query.realm)}", Code.BUSY,
                kind=FailureKind.REFUSED, retry_after=LOADING_RETRY_AFTER,
            )  # fmt: skip
        if slot is None or not self.serves(query.realm):
            raise ExecutorFailure(f"{query.realm}: {self.not_served_reason(query.realm)}", Code.REALM_NOT_SERVED)
        try:
            model = wanted_model(query.payload)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if model is not None and model != slot.model:
            raise ExecutorFailure(f"{query.realm}: serves model {slot.model!r}, not {model!r}", Code.REALM_NOT_SERVED)

        async def accepted(position: int, eta_ms: int | None) -> None:
            await emit(ev.Accepted(position, eta_ms))

        for_peer = query.origin != self.peer_id
        started = trio.current_time()
        try:
            result = await self._run(slot, query, emit, accepted, for_peer)
        except BaseException as exc:
            outcome = outcome_of(exc)
            if outcome in ("failed", "cancelled"):  # a refusal or a bad request is no outcome
                self._record(query.realm, for_peer=for_peer, ok=False, cancelled=outcome == "cancelled")
            raise
        ms = (trio.current_time() - started) * 1000.0
        rc = slot.config
        cost = (
            rc.cost_per_query
            + rc.cost_per_second * ms / 1000.0
            + (rc.cost_per_token * float(result.stats.get("tokens", 0)))
        )
        self._record(query.realm, for_peer=for_peer, ok=True, ms=ms, cost=cost)
        return ev.Result(result.output, {**result.stats, "cost": round(cost, 6)})

    async def _run(
        self,
        slot: RealmSlot,
        query: Query,
        emit: StreamEmit,
        accepted: PositionReport,
        for_peer: bool,
    ) -> ev.Result:
        """The backend's answer once the queue admits the query; every failure a QueryError."""
        try:
            with trio.fail_after(query.deadline_s):
                async with slot.queue.admit(
                    query.query_id, accepted, priority=query.priority, owner=query.origin if for_peer else ""
                ):
                    backend = slot.backend
                    if backend is None or slot.status != "ready":  # restarted while we waited
                        raise ExecutorFailure(
                            f"{query.realm}: {self.not_served_reason(query.realm)}", Code.BUSY, retry_after=1.0
                        )
                    result: ev.Result = await self._guarded(
                        slot, lambda: backend.generate(backend_payload(query.payload), emit)
                    )
                    return result
        except trio.TooSlowError:
            raise ExecutorFailure(f"deadline of {query.deadline_s:.1f}s passed", Code.DEADLINE_EXCEEDED) from None
        except (QueryError, trio.Cancelled):
            raise
        except Exception as exc:  # a backend bug: this query fails, the node goes on
            log.error("%s: backend error: %s: %s", query.realm, type(exc).__name__, exc)
            raise ModelFailure(f"{query.realm} backend error", Code.INTERNAL) from None

    async def _guarded(self, slot: RealmSlot, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run a backend call in a task of ours; if it outlives its cancellation, it is stuck."""
        assert self._nursery is not None, "LocalRealms.run() is not running"
        done = trio.Event()
        box: dict[str, Any] = {}
        scope = trio.CancelScope()

        async def runner() -> None:
            try:
                with scope:
                    box["result"] = await call()
            except Exception as exc:  # handed to the waiting query below
                box["error"] = exc
            finally:
                done.set()

        self._nursery.start_soon(runner)
        try:
            await done.wait()
        except trio.Cancelled:
            scope.cancel()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.watchdog_grace):
                    await done.wait()
                if not done.is_set():
                    self._restart(slot)
            raise
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _restart(self, slot: RealmSlot) -> None:
        log.error(
            "%s: backend still busy %.0fs after its query was stopped: stuck; restarting it",
            slot.name,
            self.watchdog_grace,
        )
        slot.status = "restarting"
        slot.backend = None  # the stuck instance is abandoned with its thread
        assert self._nursery is not None
        self._nursery.start_soon(self._load_logged, slot)

    def _record(self, realm: str, **outcome: Any) -> None:
        if self.storage is not None:
            self.storage.record_outcome(realm, **outcome)
        if self.metrics is not None:
            ok, cancelled = outcome.get("ok"), outcome.get("cancelled")
            result = "cancelled" if cancelled else "done" if ok else "failed"
            self.metrics.executed_query(realm, for_peer=bool(outcome.get("for_peer")), outcome=result)

    # --- loading -----------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every served realm's model; a failure leaves that realm unserved, with why."""
        for slot in self.slots.values():
            if slot.status != "disabled":
                await self._load_logged(slot)
        self.loaded.set()

    async def _load_logged(self, slot: RealmSlot) -> None:
        try:
            await self._load_and_report(slot)
        finally:
            done, self._status_changed = self._status_changed, trio.Event()
            done.set()

    async def _load_and_report(self, slot: RealmSlot) -> None:
        try:
            await self._load(slot)
        except BackendUnavailable as exc:
            slot.status = f"not served: {exc}"
            log.warning("%s: %s", slot.name, slot.status)
        except ImportError as exc:
            extra = EXTRAS.get(slot.name, "all")
            slot.status = f"not served: install rentahal-node[{extra}] ({exc.name or exc} is missing)"
            log.warning("%s: %s", slot.name, slot.status)
        except Exception as exc:  # ModelLoadError and friends: the node keeps serving others
            slot.status = f"not served: {exc}"
            log.error("%s: %s", slot.name, slot.status)

    async def _load(self, slot: RealmSlot) -> None:
        factory = CATALOG[slot.name].factory()
        backend = await factory(self, slot.config)
        # Test hook: a tiny model loads in a second; a real one can take minutes. Set in the
        # environment of a test that needs a slow load (tests/test_query_path.py), never in use.
        await trio.sleep(float(os.environ.get("RENTAHAL_TEST_LOAD_DELAY", "0") or 0))
        await backend.load()
        slot.backend = backend
        slot.model = backend.model_name
        slot.smoke_test = backend.is_smoke_test
        slot.gpu = bool(getattr(backend, "gpu", False))
        slot.status = "ready"
        label = " (SMOKE-TEST MODEL: random weights, output is gibberish)" if slot.smoke_test else ""
        log.info("%s: serving %s%s%s", slot.name, slot.model, " on GPU" if slot.gpu else "", label)

    async def smoke_model(self, name: str, write: Callable[[Path], Any], *, parts: tuple[str, ...] = ()) -> Path:
        """The path of a smoke-test model in the data dir, written on first use (and rewritten
        if a earlier write was interrupted: every one of ``parts`` must be there)."""
        path = self.data_dir / "models" / SMOKE_DIR / name
        if not path.exists() or any(not (path / p).exists() for p in parts):
            path.parent.mkdir(parents=True, exist_ok=True)
            await trio.to_thread.run_sync(write, path)
            log.info("wrote the smoke-test model %s", path)
        return path

    def model_path(self, realm: str, ref: str) -> Path | None:
        """node.toml's model reference: "" (smoke-test), a path, or a model in the store."""
        if not ref:
            return None
        from ..models.registry import ModelError, resolve

        try:
            return resolve(self.data_dir, realm, ref)
        except ModelError as exc:
            raise BackendUnavailable(str(exc)) from None

    async def aclose(self) -> None:
        for slot in self.slots.values():
            if slot.backend is not None:
                await slot.backend.aclose()

    # --- reporting ---------------------------------------------------------------------------
    def realm_statuses(self) -> tuple[RealmStatus, ...]:
        return tuple(
            RealmStatus(
                name=s.name,
                model=s.model[:256],
                smoke_test=s.smoke_test,
                queue_depth=s.queue.depth,
                slots=s.queue.slots,
                service_ms=round(s.queue.service_ms, 3),
                gpu=s.gpu,
            )
            for s in self.slots.values()
            if self.serves(s.name)
        )

    def success_ratio(self) -> float:
        ready = [s.queue for s in self.slots.values() if s.status == "ready"]
        done = sum(q.completed for q in ready)
        failed = sum(q.failed for q in ready)
        return 1.0 if done + failed == 0 else done / (done + failed)


# --- a realm's payload rules, checked before a query is stored ---------------------------------
def check_payload(realm: str, payload: dict[str, Any]) -> None:
    """Raise BadRequest if ``payload`` breaks ``realm``'s own rules, with the widest limits any
    executor may set (the one that runs it may allow less): a typo is the user's error, found
    before the query is stored, never an executor's failure. The rules are the realm's (its
    catalog entry names them)."""
    if realm not in CATALOG:
        raise BadRequest(f"realm: unknown realm {realm!r}")
    try:
        wanted_model(payload)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    CATALOG[realm].checker()(backend_payload(payload))


# --- one factory per realm: the backend for a realm's config -----------------------------------
def _gpu_layers(requested: int, model: Path, realm: str) -> int:
    """GPU layers for a GGUF model: -1 = as many as fit (ModelTooLarge if a request cannot)."""
    from ..models.gpu import detect_gpus, llama_gpu_offload_supported, plan_gpu_layers
    from ..models.registry import gguf_layer_count

    try:
        n_layers = gguf_layer_count(model)
    except Exception:  # not readable here: llama.cpp will say what is wrong when it loads
        n_layers = None
    # Without a llama.cpp built for a GPU there is nothing to plan, and no GPU to look for
    # (without nvidia-smi, looking means importing torch: +225 MB and a second of a busy start).
    offload = requested != 0 and llama_gpu_offload_supported()
    return plan_gpu_layers(
        requested,
        model_bytes=model.stat().st_size if model.exists() else 0,
        n_layers=n_layers,
        gpus=detect_gpus() if offload else [],
        offload_supported=offload,
        model_name=model.name,
        realm=realm,
    )


async def chat_backend(local: LocalRealms, rc: RealmConfig) -> Any:
    if rc.url:  # an external model server (models/external.py)
        from ..models.external import ExternalChatBackend, read_key

        key = read_key(rc.key_env, rc.key_file, "chat")
        return ExternalChatBackend(
            rc.url, api=rc.api, remote_model=rc.remote_model, key=key, max_tokens_cap=rc.max_tokens
        )
    from ..models.chat import ChatBackend
    from ..models.smoke.tiny_llama import write_tiny_llama

    path = local.model_path("chat", rc.model) or await local.smoke_model("chat.gguf", write_tiny_llama)
    layers = await trio.to_thread.run_sync(_gpu_layers, rc.n_gpu_layers, path, "chat")
    return ChatBackend(path, n_ctx=rc.n_ctx, n_gpu_layers=layers, threads=rc.threads, max_tokens_cap=rc.max_tokens)


async def vision_backend(local: LocalRealms, rc: RealmConfig) -> Any:
    from ..models.smoke.tiny_vision import write_tiny_vision
    from ..models.vision import VisionBackend

    model = local.model_path("vision", rc.model)
    if model is None:
        folder = await local.smoke_model("vision", lambda p: write_tiny_vision(p), parts=("model.gguf", "mmproj.gguf"))
        model, mmproj = folder / "model.gguf", folder / "mmproj.gguf"
    elif rc.mmproj:
        mmproj = Path(rc.mmproj).expanduser()
    else:
        from ..models.registry import ModelError, get_model

        try:
            stored = get_model(local.data_dir, "vision", rc.model[6:]) if rc.model.startswith("store:") else None
        except ModelError as exc:
            raise BackendUnavailable(str(exc)) from None
        if stored is None or stored.mmproj is None:
            raise BackendUnavailable("realms.vision.mmproj must name the model's projector GGUF")
        mmproj = stored.mmproj
    layers = await trio.to_thread.run_sync(_gpu_layers, rc.n_gpu_layers, model, "vision")
    return VisionBackend(
        model, mmproj, n_ctx=rc.n_ctx, n_gpu_layers=layers, threads=rc.threads, max_tokens_cap=rc.max_tokens
    )


async def imagine_backend(local: LocalRealms, rc: RealmConfig) -> Any:
    try:
        from ..models.imagine import ImagineBackend
        from ..models.smoke.tiny_diffusers import write_tiny_pipeline
    except ImportError as exc:
        raise BackendUnavailable(f"install rentahal-node[image] ({exc.name} is missing)") from None
    path = local.model_path("imagine", rc.model) or await local.smoke_model(
        "imagine", write_tiny_pipeline, parts=("model_index.json", "rentahal-smoke-test.json")
    )
    return ImagineBackend(path, max_steps=rc.max_steps, max_pixels=rc.max_pixels, threads=rc.threads)


async def speech_backend(local: LocalRealms, rc: RealmConfig) -> Any:
    try:
        from ..models.smoke.tiny_whisper import write_tiny_whisper
        from ..models.speech import SpeechBackend
    except ImportError as exc:
        raise BackendUnavailable(f"install rentahal-node[speech] ({exc.name} is missing)") from None
    path = local.model_path("speech", rc.model) or await local.smoke_model("whisper.bin", write_tiny_whisper)
    # whisper.cpp's OpenMP threads spin while they wait: on a 2-core machine that is busy with
    # other realms, 2 threads ran 10-30x slower than 1 (measured here).
    threads = rc.threads or (1 if (os.cpu_count() or 1) <= 2 else 0)
    # A spoken answer must fit in one 8 MiB wire frame: 1500 characters is ~100 s of 22 kHz audio.
    return SpeechBackend(path, threads=threads, max_tts_chars=1500)
