"""The servers behind the proxies, one per scenario kind, pinned to the upstream CPU.

http  nginx when installed (one process, one worker; `/` answers a 20-byte body, `/post`
      answers "ok" after the body, `/64k` is a 64 KiB static file), else the bundled
      `fastmesh.demo.upstream` (httptools; `/` answers "hello from upstream\\n", 20 bytes;
      `/bytes/65536` for 64 KiB).
tcp   `benchmarks.tcpbulk sink`: counts what arrives.
bolt  `benchmarks.boltload echo-server`: answers every Bolt request with its content.
grpc  `benchmarks/floor/grpc_echo.c` (cc -O2 ... -lnghttp2, built on first use): a one-thread
      h2c gRPC server answering POST /bench.Echo/Ping with the message it got and
      grpc-status 0 trailers; GET /stats gives its counters.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .peers import build_c, find_nginx, nginx_common, nginx_http_common
from .procs import Proc, ProcError, ProcSet, free_port, http_probe

REPO = Path(__file__).resolve().parent.parent
SMALL_BODY = "hello from nginx!!!\n"          # 20 bytes, like the bundled upstream's answer


@dataclass
class Upstream:
    kind: str                  # nginx | builtin | tcp-sink | bolt-echo
    port: int
    proc: Proc
    argv: list
    paths: dict = field(default_factory=dict)    # resource -> path (http)
    version: str | None = None


def nginx_upstream_conf(port: int, workdir: Path) -> str:
    root = workdir / "www"
    root.mkdir(parents=True, exist_ok=True)
    (root / "64k").write_bytes(bytes(range(256)) * 256)
    body = SMALL_BODY.replace("\n", "\\n")
    lines = nginx_common(workdir) + [
        "http {",
        *nginx_http_common(workdir),
        "    default_type application/octet-stream;",
        "    sendfile on;",
        "    tcp_nodelay on;",
        "    server {",
        f"        listen 127.0.0.1:{port} backlog=4096;",
        f"        root {root};",
        f'        location = / {{ default_type text/plain; return 200 "{body}"; }}',
        "        location = /post {",
        "            client_body_buffer_size 64k;",
        '            default_type text/plain;',
        '            return 200 "ok\\n";',
        "        }",
        "        location / { }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def start_http(procs: ProcSet, cpu, workdir: Path, log_dir: Path, prefer: str) -> Upstream:
    """prefer: auto | nginx | builtin."""
    nginx, version = find_nginx() if prefer in ("auto", "nginx") else (None, None)
    if prefer == "nginx" and nginx is None:
        raise SystemExit("--upstream nginx: nginx not found")
    if nginx:
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = workdir / "nginx-upstream.conf"
        conf.write_text(nginx_upstream_conf(port, workdir))
        argv = [nginx, "-p", str(workdir), "-c", str(conf), "-e", "stderr"]
        proc = procs.start("upstream-nginx", argv, cpu, log_dir)
        http_probe(port, "/", 15, proc)
        return Upstream("nginx", port, proc, argv,
                        {"small": "/", "post": "/post", "64k": "/64k"}, version)
    argv = [sys.executable, "-P", "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
            "--name", "upstream"]
    proc = procs.start("upstream-builtin", argv, cpu, log_dir, cwd=str(REPO))
    port = int(proc.wait_line("READY", 20).split()[1])
    import fastmesh
    return Upstream("builtin", port, proc, argv,
                    {"small": "/", "post": "/", "64k": "/bytes/65536"}, fastmesh.__version__)


def start_tcp_sink(procs: ProcSet, cpu, log_dir: Path) -> Upstream:
    argv = [sys.executable, "-m", "benchmarks.tcpbulk", "sink", "--listen", "127.0.0.1:0"]
    proc = procs.start("upstream-tcpsink", argv, cpu, log_dir, cwd=str(REPO))
    return Upstream("tcp-sink", int(proc.wait_line("READY", 20).split()[1]), proc, argv)


def start_bolt_echo(procs: ProcSet, cpu, log_dir: Path) -> Upstream:
    argv = [sys.executable, "-m", "benchmarks.boltload", "echo-server", "--listen",
            "127.0.0.1:0"]
    proc = procs.start("upstream-boltecho", argv, cpu, log_dir, cwd=str(REPO))
    return Upstream("bolt-echo", int(proc.wait_line("READY", 20).split()[1]), proc, argv)


GRPC_ECHO_SOURCE = Path(__file__).resolve().parent / "floor" / "grpc_echo.c"


def start_grpc_echo(procs: ProcSet, cpu, log_dir: Path) -> Upstream:
    try:
        exe, digest = build_c("grpc-echo", GRPC_ECHO_SOURCE, ("nghttp2",))
    except RuntimeError as exc:
        raise ProcError(f"{exc} (apt-get install libnghttp2-dev)") from exc
    argv = [exe, "0"]
    proc = procs.start("upstream-grpcecho", argv, cpu, log_dir)
    port = int(proc.wait_line("READY", 20).split()[1])
    return Upstream("grpc-echo", port, proc, argv, {"probe": "/stats"}, digest)


def start_for(kind: str, procs: ProcSet, cpu, workdir: Path, log_dir: Path,
              prefer_http: str) -> Upstream:
    if kind == "tcp":
        return start_tcp_sink(procs, cpu, log_dir)
    if kind == "bolt":
        return start_bolt_echo(procs, cpu, log_dir)
    if kind == "grpc":
        return start_grpc_echo(procs, cpu, log_dir)
    return start_http(procs, cpu, workdir, log_dir, prefer_http)
