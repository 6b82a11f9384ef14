"""The `fastmesh` command: run, validate, demo, --version."""
from __future__ import annotations

import os
import sys

from fastmesh import early as _early     # first: it only imports `signal`

_early_signals = None
if sys.argv[1:2] == ["run"]:
    # `fastmesh run`: signals are caught before the imports below take their time
    _early_signals = _early.catch_signals(hup="FASTMESH_READY_FD" not in os.environ)

import argparse                         # noqa: E402
import logging                          # noqa: E402

from fastmesh import __version__        # noqa: E402


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load(path: str):
    from fastmesh.config.load import ConfigError, load_file
    try:
        return load_file(path), None
    except ConfigError as exc:
        return None, exc


def cmd_validate(args) -> int:
    cfg, err = _load(args.config)
    if err is not None:
        for line in err.errors:
            print(f"{args.config}: {line}" if not line.startswith(args.config) else line,
                  file=sys.stderr)
        print(f"{args.config}: {len(err.errors)} problem(s)", file=sys.stderr)
        return 1
    xds = (f"; then a control plane over ADS at {cfg.xds.server} (cluster {cfg.xds.cluster})"
           if cfg.xds is not None else "")
    print(f"{args.config}: ok ({len(cfg.listeners)} listeners, {len(cfg.route_tables)} route "
          f"tables, {len(cfg.clusters)} clusters{xds})")
    return 0


def _workers_in(path: str):
    """The config file's `workers`, read cheaply before anything starts (None: not given or
    unreadable; the generation reports config errors)."""
    try:
        import yaml
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
        return data.get("workers") if isinstance(data, dict) else None
    except Exception:
        return None


def cmd_run(args, early_signals=None) -> int:
    _setup_logging(args.log_level)
    from fastmesh.server import mainproc
    single = args.workers == 0 or args.workers is None and _workers_in(args.config) == 0
    if not mainproc.is_generation() and not single:
        # the main process: the PID that stays while generations come and go
        return mainproc.MainProcess(mainproc.generation_argv(), early_signals).run()
    # a generation; or, with workers: 0 (a sidecar's footprint), the one process there is:
    # no main process to keep a PID across SIGHUP hot restarts (a second `fastmesh run`
    # with the same upgrade socket still takes over)
    cfg, err = _load(args.config)
    if err is not None:
        for line in err.errors:
            logging.getLogger("fastmesh").error("config: %s", line)
        return 1
    from fastmesh.server.supervisor import default_upgrade_path, serve
    upgrade_path = args.upgrade_socket or default_upgrade_path(args.config)
    return serve(cfg, config_path=args.config, loop_kind=args.loop, workers=args.workers,
                 upgrade_path=upgrade_path, log_level=args.log_level,
                 early_signals=early_signals)


def cmd_demo(args) -> int:
    _setup_logging(args.log_level)
    import importlib.resources
    import yaml
    from fastmesh.config.load import load_dict
    from fastmesh.demo.upstream import start_upstream
    from fastmesh.server.supervisor import serve

    text = importlib.resources.files("fastmesh.demo").joinpath("demo.yaml").read_text()
    data = yaml.safe_load(text)
    data["listeners"][0]["address"] = f"127.0.0.1:{args.port}"
    data["admin"]["address"] = f"127.0.0.1:{args.admin_port}"
    cfg = load_dict(data, source="fastmesh/demo/demo.yaml")
    upstreams = []

    async def start_upstreams():
        for name, c in cfg.clusters.items():
            for i, ep in enumerate(c.endpoints):
                upstreams.append(await start_upstream(ep.host, ep.port, f"{name}-{i + 1}"))
        p, a = args.port, args.admin_port
        print(f"""
fastmesh {__version__} demo: proxy on 127.0.0.1:{p}, admin on 127.0.0.1:{a}
demo upstreams: web (2 endpoints), web_canary, api_v1 on 127.0.0.1:18001-18004

try:
  curl -s http://127.0.0.1:{p}/                       # round-robin over web-1 / web-2
  curl -s http://127.0.0.1:{p}/health                 # answered by fastmesh itself
  curl -s -H 'x-canary: 1' http://127.0.0.1:{p}/      # 10% to web_canary
  curl -s -H 'Host: api.local' http://127.0.0.1:{p}/v1/echo   # api_v1, request as seen upstream
  curl -s http://127.0.0.1:{a}/stats                  # counters
Ctrl-C stops.
""", flush=True)

    return serve(cfg, loop_kind=args.loop, log_level=args.log_level, upgrade_path=None,
                 before_start=start_upstreams)


def main(argv=None) -> int:
    early = _early_signals if argv is None else None
    ap = argparse.ArgumentParser(prog="fastmesh", description="A sidecar data plane.")
    ap.add_argument("--version", action="version", version=f"fastmesh {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--log-level", default=os.environ.get("FASTMESH_LOG_LEVEL", "info"),
                       choices=["debug", "info", "warning", "error"])
        p.add_argument("--loop", default=os.environ.get("FASTMESH_LOOP", "uvloop"),
                       choices=["uvloop", "asyncio"], help="event loop (default uvloop)")

    p = sub.add_parser("run", help="run with a config file, in the foreground")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: the config's `workers`, else 1)")
    p.add_argument("--upgrade-socket", default=None,
                   help="unix socket path for hot restart (default derived from the config "
                        "path); a second `fastmesh run` with the same path takes over")
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a config file; print every problem")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("iptables", help="set up, remove or show the nat rules that send a "
                                        "pod's traffic through the sidecar")
    from fastmesh import iptables
    iptables.add_arguments(p)
    p.set_defaults(func=iptables.main)

    p = sub.add_parser("demo", help="run fastmesh in front of bundled demo upstreams")
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--admin-port", type=int, default=9901)
    common(p)
    p.set_defaults(func=cmd_demo)

    args = ap.parse_args(argv)
    if args.func is cmd_run:
        return cmd_run(args, early)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
