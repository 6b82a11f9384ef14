"""`fastmesh iptables apply | clean | show`: the nat rules that send a pod's traffic through
its sidecar, as Istio's init container sets them up, in the network namespace it runs in.

What the rules do (IPv4; with --ipv6 the same for IPv6 through ip6tables)::

    outbound: OUTPUT -> FASTMESH_OUTPUT
        the proxy's own connections (its uid or gid) ............... untouched
        an application talking to itself on loopback ................ untouched
        to 127.0.0.1, excluded ports and CIDRs ...................... untouched
        every other TCP connection (or those to --include-cidrs) .... REDIRECT to the
                                                                       outbound port (15001)
    inbound: PREROUTING -> FASTMESH_INBOUND
        TCP to the application's ports (--inbound-ports, "*" = all but the excluded
        ones and the proxy's own ports) ............................. REDIRECT to the
                                                                       inbound port (15006)

The proxy reads where each connection was going (SO_ORIGINAL_DST) and sends it there, under
its own uid, which the rules leave alone: nothing loops.

`apply` is idempotent (it rebuilds fastmesh's chains and adds each jump once) and `clean`
removes everything `apply` added; neither touches rules of others. Both need root or
CAP_NET_ADMIN in the namespace, and say so when they do not have it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

PREFIX = "FASTMESH_"
CHAINS = ("FASTMESH_INBOUND", "FASTMESH_IN_REDIRECT", "FASTMESH_OUTPUT", "FASTMESH_REDIRECT")
JUMPS = (("PREROUTING", "FASTMESH_INBOUND"), ("OUTPUT", "FASTMESH_OUTPUT"))
CAP_NET_ADMIN = 12
# Istio's default inbound exclusions (its agent's ports), kept for pods that run both
DEFAULT_EXCLUDE_INBOUND = (15020, 15021, 15090)


class IptablesError(Exception):
    pass


@dataclass
class Plan:
    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_uids: tuple = ()
    proxy_gids: tuple = ()
    inbound_ports: str = "*"                  # "*" or a comma-separated list; "" = none
    exclude_inbound_ports: tuple = DEFAULT_EXCLUDE_INBOUND
    exclude_outbound_ports: tuple = ()
    include_cidrs: tuple = ("*",)             # outbound destinations captured
    exclude_cidrs: tuple = ()
    capture_proxy_to_self: bool = False       # Istio's rule: the proxy's own connections to
                                              # the pod's addresses over loopback go inbound
    ipv6: bool = False
    extra: dict = field(default_factory=dict)

    def rules(self, v6: bool = False) -> list[str]:
        """The nat table's fastmesh chains, as iptables-restore lines."""
        lo_ip = "::1/128" if v6 else "127.0.0.1/32"
        inbound_passthrough = "::6/128" if v6 else "127.0.0.6/32"
        out = ["*nat"] + [f":{c} - [0:0]" for c in CHAINS]
        out.append(f"-A FASTMESH_REDIRECT -p tcp -j REDIRECT --to-ports {self.outbound_port}")
        out.append(f"-A FASTMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports {self.inbound_port}")
        # inbound
        if self.inbound_ports.strip():
            if self.inbound_ports.strip() == "*":
                own = {self.outbound_port, self.inbound_port}
                for p in sorted(set(self.exclude_inbound_ports) | own):
                    out.append(f"-A FASTMESH_INBOUND -p tcp --dport {p} -j RETURN")
                out.append("-A FASTMESH_INBOUND -p tcp -j FASTMESH_IN_REDIRECT")
            else:
                for p in _ports(self.inbound_ports):
                    if p not in self.exclude_inbound_ports:
                        out.append(f"-A FASTMESH_INBOUND -p tcp --dport {p} "
                                   f"-j FASTMESH_IN_REDIRECT")
        # outbound
        o = "-A FASTMESH_OUTPUT"
        out.append(f"{o} -s {inbound_passthrough} -o lo -j RETURN")
        for kind, ids in (("uid", self.proxy_uids), ("gid", self.proxy_gids)):
            for i in ids:
                if self.capture_proxy_to_self:
                    out.append(f"{o} ! -d {lo_ip} -o lo -m owner --{kind}-owner {i} "
                               f"-j FASTMESH_IN_REDIRECT")
                out.append(f"{o} -o lo -m owner ! --{kind}-owner {i} -j RETURN")
                out.append(f"{o} -m owner --{kind}-owner {i} -j RETURN")
        out.append(f"{o} -d {lo_ip} -j RETURN")
        for p in self.exclude_outbound_ports:
            out.append(f"{o} -p tcp --dport {p} -j RETURN")
        for cidr in self.exclude_cidrs:
            if (":" in cidr) == v6:
                out.append(f"{o} -d {cidr} -j RETURN")
        if "*" in self.include_cidrs:
            out.append(f"{o} -j FASTMESH_REDIRECT")
        else:
            for cidr in self.include_cidrs:
                if (":" in cidr) == v6:
                    out.append(f"{o} -d {cidr} -j FASTMESH_REDIRECT")
        out.append("COMMIT")
        return out


def _ports(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        p = int(part)
        if not 0 < p < 65536:
            raise ValueError(f"port {p} out of range")
        out.append(p)
    return out


# ------------------------------------------------------------------ running iptables

def has_privilege() -> bool:
    """Root, or CAP_NET_ADMIN in the effective set (a container's init step)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


class Runner:
    def __init__(self, binary: str, dry_run: bool = False, out=None):
        self.binary = binary
        self.dry_run = dry_run
        self.out = out

    def tool(self, suffix: str = "") -> str:
        """iptables, iptables-restore, iptables-save (or the ip6tables ones)."""
        if self.dry_run:
            return self.binary + suffix
        path = shutil.which(self.binary + suffix)
        if path is None:
            raise IptablesError(f"{self.binary + suffix} not found on PATH (install the "
                                f"iptables package)")
        return path

    def run(self, args: list, stdin: str | None = None, check=True) -> subprocess.CompletedProcess:
        if self.dry_run:
            print(" ".join(args) if stdin is None else
                  f"{self.binary}-restore --noflush <<EOF\n{stdin}EOF",
                  file=self.out or sys.stdout)
            return subprocess.CompletedProcess(args, 0, "", "")
        r = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise IptablesError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def restore(self, lines: list[str]) -> None:
        self.run([self.tool("-restore"), "--noflush"], "\n".join(lines) + "\n")

    def has_jump(self, chain: str, target: str) -> bool:
        if self.dry_run:
            return False
        return self.run([self.tool(), "-t", "nat", "-C", chain, "-p", "tcp", "-j", target],
                        check=False).returncode == 0

    def save(self) -> list[str]:
        r = self.run([self.tool("-save"), "-t", "nat"], check=False)
        return r.stdout.splitlines() if r.returncode == 0 else []


def apply(plan: Plan, runner: Runner, v6: bool = False) -> None:
    runner.restore(plan.rules(v6))
    for chain, target in JUMPS:
        if not runner.has_jump(chain, target):
            runner.run([runner.tool(), "-t", "nat", "-A", chain, "-p", "tcp", "-j", target])


def clean(runner: Runner) -> int:
    """Remove fastmesh's jumps and chains; returns how many things were removed."""
    removed = 0
    for chain, target in JUMPS:
        while runner.has_jump(chain, target):
            runner.run([runner.tool(), "-t", "nat", "-D", chain, "-p", "tcp", "-j", target])
            removed += 1
    present = {line[1:].split()[0] for line in runner.save() if line.startswith(":" + PREFIX)}
    for c in CHAINS:
        if c in present or runner.dry_run:
            runner.run([runner.tool(), "-t", "nat", "-F", c])
    for c in CHAINS:
        if c in present or runner.dry_run:
            runner.run([runner.tool(), "-t", "nat", "-X", c])
            removed += 1
    return removed


def show(runner: Runner) -> list[str]:
    return [line for line in runner.save() if PREFIX in line]


# ------------------------------------------------------------------ the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["apply", "clean", "show"])
    p.add_argument("--proxy-uid", action="append", default=[],
                   help="uid the proxy runs as: its connections are never redirected "
                        "(repeat or comma-separate; apply needs a uid or a gid)")
    p.add_argument("--proxy-gid", action="append", default=[], help="the same, by gid")
    p.add_argument("--outbound-port", type=int, default=15001,
                   help="the proxy's outbound listener (default 15001)")
    p.add_argument("--inbound-port", type=int, default=15006,
                   help="the proxy's inbound listener (default 15006)")
    p.add_argument("--inbound-ports", default="*",
                   help='application ports whose inbound connections go through the proxy: '
                        '"*" (default: all but the excluded), a comma list, or "" for none')
    p.add_argument("--exclude-inbound-ports", default=",".join(map(str, DEFAULT_EXCLUDE_INBOUND)),
                   help="inbound ports never redirected (default %(default)s)")
    p.add_argument("--exclude-outbound-ports", default="",
                   help="outbound destination ports never redirected")
    p.add_argument("--include-cidrs", default="*",
                   help='outbound destinations redirected: "*" (default) or a comma list')
    p.add_argument("--exclude-cidrs", default="",
                   help="outbound destinations never redirected (comma list)")
    p.add_argument("--capture-proxy-to-self", action="store_true",
                   help="Istio's rule: the proxy's own connections to the pod's non-loopback "
                        "addresses go to the inbound listener (its inbound upstream "
                        "connections must then come from 127.0.0.6)")
    p.add_argument("--ipv6", action="store_true", help="also set the IPv6 rules (ip6tables)")
    p.add_argument("--iptables", default="iptables",
                   help="the iptables command (default: iptables; ip6tables is its 6 name)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be run, change nothing")


def _ids(values: list) -> tuple:
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if part:
                if not part.isdigit():
                    raise ValueError(f"{part!r}: a numeric id is expected")
                out.append(int(part))
    return tuple(out)


def main(args) -> int:
    try:
        plan = Plan(
            outbound_port=args.outbound_port, inbound_port=args.inbound_port,
            proxy_uids=_ids(args.proxy_uid), proxy_gids=_ids(args.proxy_gid),
            inbound_ports=args.inbound_ports,
            exclude_inbound_ports=tuple(_ports(args.exclude_inbound_ports)),
            exclude_outbound_ports=tuple(_ports(args.exclude_outbound_ports)),
            include_cidrs=tuple(x.strip() for x in args.include_cidrs.split(",") if x.strip()),
            exclude_cidrs=tuple(x.strip() for x in args.exclude_cidrs.split(",") if x.strip()),
            capture_proxy_to_self=args.capture_proxy_to_self, ipv6=args.ipv6)
        _ports(plan.inbound_ports) if plan.inbound_ports.strip() not in ("*", "") else None
    except ValueError as exc:
        print(f"fastmesh iptables: {exc}", file=sys.stderr)
        return 2
    if args.action == "apply" and not (plan.proxy_uids or plan.proxy_gids):
        print("fastmesh iptables apply: --proxy-uid or --proxy-gid is required (the proxy's "
              "own connections must not be redirected back to it)", file=sys.stderr)
        return 2
    if not args.dry_run and not has_privilege():
        print(f"fastmesh iptables {args.action}: needs root or CAP_NET_ADMIN in this network "
              f"namespace (running as uid {os.geteuid()} without it); nothing was changed",
              file=sys.stderr)
        return 2
    v6_binary = args.iptables.replace("iptables", "ip6tables")
    binaries = [args.iptables]
    if args.ipv6 or args.action != "apply" and shutil.which(v6_binary):
        binaries.append(v6_binary)          # clean and show look at IPv6 too when they can
    try:
        for i, binary in enumerate(binaries):
            runner = Runner(binary, dry_run=args.dry_run)
            v6 = i == 1
            if args.action == "apply":
                apply(plan, runner, v6)
                if not args.dry_run:
                    print(f"fastmesh iptables: {binary}: {len(show(runner))} rules in place "
                          f"(outbound -> {plan.outbound_port}, inbound "
                          f"{plan.inbound_ports or 'none'} -> {plan.inbound_port})")
            elif args.action == "clean":
                n = clean(runner)
                if not args.dry_run:
                    print(f"fastmesh iptables: {binary}: removed "
                          f"{'fastmesh rules' if n else 'nothing (no fastmesh rules)'}")
            else:
                lines = show(runner)
                print("\n".join(lines) if lines else
                      f"# {binary}: no fastmesh rules in this network namespace")
    except IptablesError as exc:
        print(f"fastmesh iptables {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0
