"""The ADS client: one aggregated xDS v3 stream (state of the world) to the control plane.

It runs in a thread of the supervisor, with gRPC's blocking API, so the control plane's
stream never shares the event loop's time with the admin API or the workers' links (and gRPC
needs no integration with whichever loop runs). Each response is decoded here and applied
in the loop by the XdsSource (``apply([(type_url, update), ...])``, a coroutine: responses
that arrived while the previous one was being applied go together, one configuration for
all); each response's verdict goes back on the stream:

- applied: ACK, a DiscoveryRequest with the response's ``version_info`` and ``nonce``;
- refused: NACK, the *previous* accepted version, the response's nonce, and ``error_detail``
  (google.rpc.Status INVALID_ARGUMENT) naming each resource and field at fault; the config
  that was serving goes on serving.

Subscriptions: clusters and listeners by wildcard from the start; then the route
configurations the listeners name (RDS) and the load assignments of EDS clusters, updated
whenever those sets change (a new request with the type's last version and nonce).

When the stream fails or ends, it is opened again after a jittered exponential back-off
(base to max: the bootstrap's ``retry_back_off``, Envoy's 0.5 s - 30 s otherwise), asking for
every subscription again with the last accepted versions. Everything keeps serving meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import threading
import time

# the supervisor spawns workers (fork + exec) while the stream's threads run: gRPC's fork
# handlers are not wanted for that
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from google.rpc import status_pb2  # noqa: E402

from fastmesh.xds import resources as R  # noqa: E402

log = logging.getLogger("fastmesh.xds")

INVALID_ARGUMENT = 3
APPLY_TIMEOUT_S = 60.0
# the order subscriptions are (re)sent in: clusters before listeners, as Envoy does
ORDER = (R.CLUSTER, R.ENDPOINT, R.SECRET, R.LISTENER, R.ROUTE)


class TypeState:
    def __init__(self, wildcard: bool):
        self.wildcard = wildcard
        self.names: list = []           # subscribed resource names (wildcard: empty)
        self.version = ""               # last accepted version_info
        self.nonce = ""                 # nonce of the last response seen on this stream
        self.acks = 0
        self.nacks = 0
        self.last_error = ""
        self.updated_at = 0.0           # wall time of the last accepted response


class AdsClient:
    def __init__(self, *, target: str, node: dict, apply, loop,
                 retry_base_s: float = 0.5, retry_max_s: float = 30.0,
                 lds: bool = True, cds: bool = True):
        self.target = target
        self.node = base_pb2.Node()
        json_format.ParseDict(node, self.node, ignore_unknown_fields=False)
        self.apply = apply
        self.loop = loop
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        wildcard = {R.LISTENER: lds, R.CLUSTER: cds}
        self.types = {t: TypeState(wildcard=wildcard.get(t, False)) for t in ORDER}
        self.connected = False
        self.connects = 0
        self._decoded: dict = {}                  # type -> {serialized bytes: (name, data)}
        self._held = None                         # a response (or end) for the next batch
        self._stop = threading.Event()
        self._out: queue.Queue | None = None
        self._call = None
        self._thread = threading.Thread(target=self._run, name="xds-ads", daemon=True)

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._out is not None:
            self._out.put(None)
        # not joined: it may be waiting on the loop that is calling us; it is a daemon

    def status(self) -> dict:
        return {"server": self.target, "connected": self.connected, "connects": self.connects,
                "types": {R.KINDS[t][0]: {"version": s.version, "names": list(s.names),
                                          "acks": s.acks, "nacks": s.nacks,
                                          "last_error": s.last_error,
                                          "updated_at": s.updated_at}
                          for t, s in self.types.items()}}

    # ------------------------------------------------------------------ the stream

    def _run(self) -> None:
        backoff = self.retry_base_s
        while not self._stop.is_set():
            started = time.monotonic()
            self._stream_once()
            if self._stop.is_set():
                return
            if time.monotonic() - started > self.retry_max_s:
                backoff = self.retry_base_s         # it had been up for a while
            delay = random.uniform(self.retry_base_s, backoff)   # jittered
            log.warning("xds: stream to %s down; retrying in %.2f s", self.target, delay)
            if self._stop.wait(delay):
                return
            backoff = min(self.retry_max_s, backoff * 2)

    def _stream_once(self) -> None:
        out: queue.Queue = queue.Queue()
        self._out = out
        for s in self.types.values():
            s.nonce = ""                             # nonces belong to one stream

        def requests():
            while True:
                req = out.get()
                if req is None:
                    return
                yield req
        channel = grpc.insecure_channel(self.target)
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            for t in ORDER:
                s = self.types[t]
                if s.wildcard or s.names:
                    self._request(t)
            call = stub.StreamAggregatedResources(requests())
            self._call = call
            inbox: queue.Queue = queue.Queue()

            def read():
                try:
                    for resp in call:
                        inbox.put(resp)
                except Exception as exc:            # the stream's end, as an exception
                    inbox.put(exc)
                finally:
                    inbox.put(None)
            threading.Thread(target=read, name="xds-ads-read", daemon=True).start()
            while True:
                batch = self._next_batch(inbox)
                if not batch:
                    break
                if not self.connected:
                    self.connected = True
                    self.connects += 1
                    log.info("xds: connected to %s", self.target)
                self._on_responses(batch)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if not self._stop.is_set():
                log.warning("xds: stream error: %s", getattr(code, "name", exc))
        except Exception:
            log.exception("xds: stream failed")
        finally:
            self.connected = False
            self._call = None
            out.put(None)
            channel.close()

    def _request(self, t: str, error: str | None = None) -> None:
        s = self.types[t]
        req = discovery_pb2.DiscoveryRequest(
            version_info=s.version, node=self.node, resource_names=s.names, type_url=t,
            response_nonce=s.nonce)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=error))
        self._out.put(req)

    def _next_batch(self, inbox: queue.Queue) -> list:
        """The next response, with those that arrived meanwhile (each type once, in order):
        they are applied together, one configuration instead of one per response."""
        item = self._held if self._held is not None else inbox.get()
        self._held = None
        batch: list = []
        while item is not None:
            if isinstance(item, BaseException):
                if batch:
                    self._held = item                 # after this batch
                    return batch
                raise item
            if any(r.type_url == item.type_url for r in batch):
                self._held = item
                return batch
            batch.append(item)
            try:
                item = inbox.get_nowait()
            except queue.Empty:
                return batch
        if batch:
            self._held = None
            inbox.put(None)
        return batch

    def _on_responses(self, batch: list) -> None:
        known = []
        for resp in batch:
            if resp.type_url not in self.types:
                log.warning("xds: response of unsupported type %s ignored", resp.type_url)
                continue
            self.types[resp.type_url].nonce = resp.nonce
            known.append(resp)
        decoded = [(resp, self._decode(resp.type_url, resp)) for resp in known]
        good = [(resp.type_url, upd) for resp, (upd, err) in decoded if err is None]
        results = iter(self._apply_all(good) if good else [])
        for resp, (upd, err) in decoded:
            errors, wanted = ([err], {}) if err is not None else next(results)
            self._answer(resp, errors, wanted)

    def _answer(self, resp, errors: list, wanted: dict) -> None:
        t = resp.type_url
        s = self.types[t]
        if errors:
            s.nacks += 1
            s.last_error = "; ".join(errors)
            log.error("xds: %s version %r refused (NACK; version %r keeps serving): %s",
                      R.KINDS[t][0], resp.version_info, s.version, s.last_error)
            self._request(t, error=s.last_error)
            return
        s.version = resp.version_info
        s.acks += 1
        s.last_error = ""
        s.updated_at = time.time()
        log.info("xds: %s version %r applied (%d resources)", R.KINDS[t][0],
                 resp.version_info, len(resp.resources))
        self._request(t)                              # ACK
        self.want(wanted)                             # RDS / EDS follow LDS / CDS

    def want(self, wanted: dict, send: bool = True) -> None:
        """Subscribe RDS / EDS to these names (a request when they changed)."""
        for wt, names in wanted.items():
            ws = self.types[wt]
            if sorted(names) != ws.names:
                ws.names = sorted(names)
                if send and self._out is not None:
                    self._request(wt)

    def _decode(self, t: str, resp) -> tuple[dict | None, str | None]:
        """-> (name -> plain data, None) or (None, the reason it cannot be read)."""
        # state of the world resends every resource each time: one decoded before, whose
        # bytes have not changed, is the very same object (cheap to recognise downstream)
        cache = self._decoded.setdefault(t, {})
        update, fresh = {}, {}
        try:
            for any_msg in resp.resources:
                hit = cache.get(any_msg.value)
                name, data = hit if hit is not None else R.decode(t, any_msg)
                if name in update:
                    raise R.ResourceError(f"{R.KINDS[t][0]} {name!r} sent twice")
                update[name] = data
                fresh[any_msg.value] = (name, data)
        except R.ResourceError as exc:
            return None, str(exc)
        if t in R.WHOLE_SET or len(fresh) >= len(cache) or len(cache) > 4 * len(fresh) + 4096:
            self._decoded[t] = fresh
        else:
            cache.update(fresh)                   # a partial answer: keep the others too
        return update, None

    def _apply_all(self, items: list) -> list:
        """Apply [(type, update)] in the loop -> [(errors, wanted)] in the same order."""
        fut = asyncio.run_coroutine_threadsafe(self.apply(items), self.loop)
        try:
            return fut.result(APPLY_TIMEOUT_S)
        except Exception as exc:
            log.exception("xds: applying failed")
            return [([f"internal error while applying: {exc}"], {})] * len(items)
