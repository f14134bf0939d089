"""The `weft` command line: a thin shell that parses arguments and calls the real code.

Every WeftError becomes one red line and exit status 1; nothing prints a traceback at a
user for a mistake the user can fix.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast, get_type_hints

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from weft.backends.registry import DEFAULT_TYPE
from weft.core.config import redact_config
from weft.core.constants import (
    DEFAULT_ETCD_PREFIX,
    DEFAULT_LEASE_TTL,
    DEFAULT_SQLITE_PATH,
    DEFAULT_STATE_DIR,
    DEFAULT_SUBNET_FILE,
)
from weft.core.errors import UsageError, WeftError
from weft.store import LeaseStore

app = typer.Typer(
    help="weft: a fast overlay network for containers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Read or write the network config in the store.",
                         no_args_is_help=True)
testbed_app = typer.Typer(help="The namespace testbed used by demo, bench and tests.",
                          no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(testbed_app, name="testbed")
# `weft bench` measures the data plane; `weft bench scale` the control plane at scale.
bench_app = typer.Typer(invoke_without_command=True)
app.add_typer(bench_app, name="bench")

# emoji=False: rich reads ":a:" in an IPv6 address (2001:db8:1:a::/64) as an emoji.
out = Console(emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # an error stays one line, greppable

StoreOpt = Annotated[
    str,
    typer.Option("--store", envvar="WEFT_STORE",
                 help="sqlite:///path/file.db (embedded, default) or etcd://host:port[,...] / "
                      "etcds://..."),
]
PrefixOpt = Annotated[str, typer.Option("--etcd-prefix", envvar="WEFT_ETCD_PREFIX",
                                        help="etcd key prefix (/coreos.com/network = flannel's)")]
CaOpt = Annotated[str | None, typer.Option("--etcd-cafile", envvar="WEFT_ETCD_CAFILE")]
CertOpt = Annotated[str | None, typer.Option("--etcd-certfile", envvar="WEFT_ETCD_CERTFILE")]
KeyOpt = Annotated[str | None, typer.Option("--etcd-keyfile", envvar="WEFT_ETCD_KEYFILE")]
UserOpt = Annotated[str | None, typer.Option("--etcd-username", envvar="WEFT_ETCD_USERNAME")]
# The password itself only from the environment (never shown in `ps`) or a file; the
# flag is kept for old scripts, but every other user of the host can read it in
# /proc/PID/cmdline.
PassOpt = Annotated[str | None, typer.Option("--etcd-password", envvar="WEFT_ETCD_PASSWORD",
                                             help="prefer --etcd-password-file or the "
                                                  "WEFT_ETCD_PASSWORD variable")]
PassFileOpt = Annotated[Path | None, typer.Option("--etcd-password-file",
                                                  envvar="WEFT_ETCD_PASSWORD_FILE",
                                                  help="read the etcd password from this "
                                                       "file (root-only)")]
PlainAuthOpt = Annotated[bool, typer.Option("--etcd-allow-plaintext-auth",
                                            help="send user and password over plaintext "
                                                 "etcd:// (readable on the wire)")]
LogOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")]

DEFAULT_STORE = f"sqlite://{DEFAULT_SQLITE_PATH}"
T = TypeVar("T")


@dataclass(frozen=True)
class StoreOptions:
    """The store flags every store-using command takes, declared once (`with_store`)."""

    url: str = DEFAULT_STORE
    prefix: str = DEFAULT_ETCD_PREFIX
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    allow_plaintext_auth: bool = False

    def open(self, *, create: bool = True) -> LeaseStore:
        """The store; `create=False` (a command that only reads) refuses to make an empty
        SQLite store where none is, instead of answering from it."""
        from weft.agent.args import check_store_url
        from weft.store import open_store

        check_store_url(self.url)
        password = self.password
        if self.password_file is not None:
            password = _read_password(self.password_file)
        if (self.url.startswith("etcd://") and (self.username or password)
                and not self.allow_plaintext_auth):
            raise UsageError(
                f"store URL {self.url!r} is plaintext: the etcd user and password would "
                "cross the network readable; use etcds:// (TLS), or pass "
                "--etcd-allow-plaintext-auth on a network you trust"
            )
        if self.url.startswith(("etcd://", "etcds://")):
            return open_store(self.url, prefix=self.prefix, cafile=self.cafile,
                              certfile=self.certfile, keyfile=self.keyfile,
                              username=self.username, password=password)
        from weft.host.files import private_dir

        path = Path(self.url.removeprefix("sqlite://"))
        if not create and not path.exists():
            raise UsageError(f"--store {self.url}: no store there (nothing to read); give the "
                             "store the agents use, or run `weft config set` first")
        # The store checks its own directory; whether another user could swap it (or a
        # directory above it) is the host layer's to say.
        private_dir(path.parent, "store directory")
        return open_store(self.url)


def _read_password(path: Path) -> str:
    from weft.host.files import check_private

    check_private(path, "etcd password file")
    try:
        return path.read_text().rstrip("\n")
    except OSError as exc:
        raise UsageError(f"--etcd-password-file {path}: {exc.strerror}") from None


# The flags behind StoreOptions: (parameter name, annotation, field).
_STORE_FLAGS: tuple[tuple[str, object, str], ...] = (
    ("store", StoreOpt, "url"), ("etcd_prefix", PrefixOpt, "prefix"),
    ("etcd_cafile", CaOpt, "cafile"), ("etcd_certfile", CertOpt, "certfile"),
    ("etcd_keyfile", KeyOpt, "keyfile"), ("etcd_username", UserOpt, "username"),
    ("etcd_password", PassOpt, "password"),
    ("etcd_password_file", PassFileOpt, "password_file"),
    ("etcd_allow_plaintext_auth", PlainAuthOpt, "allow_plaintext_auth"),
)
F = TypeVar("F", bound=Callable[..., Any])


def with_store(command: F) -> F:
    """Give `command` the store flags; it receives them as one `store: StoreOptions`."""
    signature = inspect.signature(command)
    hints = get_type_hints(command, include_extras=True)  # resolved: typer needs Annotated
    defaults = StoreOptions()
    flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                               default=getattr(defaults, field))
             for name, annotation, field in _STORE_FLAGS]
    kept = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()
            if p.name != "store"]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        store = StoreOptions(**{field: kwargs.pop(name) for name, _, field in _STORE_FLAGS})
        return command(*args, store=store, **kwargs)

    # typer reads the signature: the command's own parameters, then the store flags.
    wrapper.__signature__ = signature.replace(parameters=[*kept, *flags])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*kept, *flags]}
    return cast(F, wrapper)


def _using_store(store: LeaseStore, op: Callable[[LeaseStore], Awaitable[T]]) -> T:
    """Run one store operation and close the store, whatever happens."""

    async def run() -> T:
        try:
            return await op(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(1)


def _need_lab() -> None:
    """demo, bench and testbed live in the lab (`weft_lab`), a distribution of its own that
    an agent host does not install: without it, say how to get it instead of a traceback."""
    try:
        importlib.import_module("weft_lab")
    except ModuleNotFoundError as exc:
        if exc.name != "weft_lab":
            raise
        err.print("[bold red]error:[/] the lab is not installed: pip install ./lab (from "
                  "weft's source tree) for weft demo, bench and testbed", highlight=False)
        raise typer.Exit(2) from None


@app.command()
@with_store
def agent(
    store: StoreOptions,
    public_ip: Annotated[str | None, typer.Option(help="this host's underlay address")] = None,
    public_ipv6: Annotated[str | None, typer.Option(
        help="dual stack: this host's IPv6 underlay address beside an IPv4 --public-ip "
             "(default: the interface's first non-link-local IPv6 address, if any)")] = None,
    iface: Annotated[str | None, typer.Option(help="underlay interface (default: the "
                                                   "default route's)")] = None,
    subnet_file: Annotated[Path, typer.Option()] = Path(DEFAULT_SUBNET_FILE),
    state_dir: Annotated[Path, typer.Option()] = Path(DEFAULT_STATE_DIR),
    lease_ttl: Annotated[float, typer.Option(help="lease TTL in seconds")] = (
        DEFAULT_LEASE_TTL),
    ip_masq: Annotated[bool, typer.Option(help="masquerade overlay traffic leaving the "
                                               "network")] = True,
    metrics_addr: Annotated[str | None, typer.Option(help="serve Prometheus metrics on "
                                                          "HOST:PORT")] = None,
    overlay_conntrack: Annotated[str, typer.Option(
        help="overlay <-> overlay traffic skips conntrack: auto (unless destination NAT "
             "elsewhere on the host needs it), untrack or track")] = "auto",
    resync_interval: Annotated[float, typer.Option(help="seconds between full "
                                                         "reconciles of the kernel")] = 60.0,
    release_on_exit: Annotated[bool, typer.Option(help="on exit, release the lease and "
                                                       "remove the data plane")] = False,
    fastpath: Annotated[bool, typer.Option(
        help="tc BPF fast path for overlay <-> overlay packets where it can run (host-gw, "
             "vxlan; IPv4 overlays); --no-fastpath keeps every packet on the nftables "
             "path")] = True,
    probe_period: Annotated[float, typer.Option(
        min=0.0, help="probe each peer every this many seconds (0: no peer probes)")] = 2.0,
    probe_rate: Annotated[float, typer.Option(
        min=1.0, help="at most this many probe packets a second, whatever the number of "
                      "peers (beyond it, each peer is probed less often)")] = 200.0,
    log_level: LogOpt = "info",
) -> None:
    """Run the agent on this host: lease a subnet, program the data plane, follow peers."""
    from weft.agent import args, logs
    from weft.agent.daemon import Agent, AgentOptions, parse_ip, parse_ipv6
    from weft.agent.peer_health import ProbePolicy
    from weft.host.masquerade import parse_conntrack_mode
    from weft.host.system import require_root

    try:
        logs.configure(log_level)
        require_root()  # before anything else, so the first error is the one to fix
        # Every value checked before the store is opened or the kernel touched.
        args.check_store_url(store.url)
        address = parse_ip(public_ip)
        address6 = parse_ipv6(public_ipv6)
        args.check_metrics_addr(metrics_addr)
        args.check_numbers(lease_ttl, resync_interval)
        args.check_paths(state_dir, subnet_file)
        opts = AgentOptions(
            store=store.open(),
            public_ip=address, public_ipv6=address6, iface=iface, subnet_file=subnet_file,
            state_dir=state_dir, lease_ttl=lease_ttl, ip_masq=ip_masq,
            metrics_addr=metrics_addr, release_on_exit=release_on_exit,
            resync_interval=resync_interval,
            overlay_conntrack=parse_conntrack_mode(overlay_conntrack),
            fastpath=fastpath,
            probes=ProbePolicy(period=probe_period, max_packets_per_second=probe_rate)
            if probe_period > 0 else None,
        )
        asyncio.run(Agent(opts).run())
    except WeftError as exc:
        raise _fail(exc) from None


@config_app.command("set")
@with_store
def config_set(
    file: Annotated[str, typer.Argument(help="JSON file, or - for stdin")],
    store: StoreOptions,
) -> None:
    """Validate a network config and write it to the store."""
    from weft.backends.registry import backend_facts, ipv6_next_hops, parse_config

    try:
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read {file}: {exc.strerror}") from None
        config = parse_config(text)
        s = store.open()
        _using_store(s, lambda st: st.put_config(config.to_json()))
        # one line however long (a pipe or log gets JSON it can cut out and parse)
        out.print(f"config written: {redact_config(config.to_json())}", highlight=False,
                  soft_wrap=True)
        # The underlay's name plays no part in whether a backend authenticates.
        if not backend_facts(config.backend, "").encrypted:
            err.print(f"[yellow]warning:[/] backend {config.backend.type} does not "
                      "authenticate traffic between hosts: any machine on the underlay "
                      "segments between them can send packets into containers as a member; "
                      "use wireguard on a network you do not control (docs/security.md)",
                      highlight=False)
        if (needs := ipv6_next_hops(config)) is not None:
            err.print(f"[yellow]note:[/] {needs}", highlight=False, soft_wrap=True)
    except WeftError as exc:
        raise _fail(exc) from None


@config_app.command("show")
@with_store
def config_show(
    store: StoreOptions,
) -> None:
    """Print the network config held in the store."""
    try:
        s = store.open(create=False)
        text = _using_store(s, lambda st: st.get_config())
        if text is None:
            raise UsageError("the store holds no network config: run `weft config set FILE`")
        print(redact_config(text))
    except WeftError as exc:
        raise _fail(exc) from None


@app.command()
@with_store
def status(
    store: StoreOptions,
    state_dir: Annotated[Path, typer.Option()] = Path(DEFAULT_STATE_DIR),
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show every lease and this host's health (from its running agent).

    Exits 3 (as `systemctl status` for a unit not running) when no agent answers: the
    leases are still shown, and one line on stderr says so."""
    import json

    from weft.agent.peer_health import where_to_look
    from weft.agent.status import query_status

    try:
        s = store.open(create=False)
        leases, revision = _using_store(s, lambda st: st.list_leases())
        no_agent: str | None = None
        try:
            health = asyncio.run(query_status(state_dir))
        except UsageError as exc:
            no_agent = str(exc)
            health = {"error": no_agent}
        except OSError as exc:  # e.g. not root: the state directory is root's alone
            no_agent = f"cannot ask the agent in {state_dir}: {exc.strerror}"
            health = {"error": no_agent}
        now = time.time()
        first = (f"look first at the agent: {no_agent}" if no_agent is not None
                 else where_to_look(health))
        if json_output:
            print(json.dumps({
                "look_first": first,
                "revision": revision,
                "leases": [{"subnet": str(lease.subnet), "public_ip": str(lease.public_ip),
                            "backend": lease.backend_type,
                            "expires_in": round(lease.expires_in(now)),
                            **({"ipv6_subnet": str(lease.ipv6_subnet),
                                "public_ipv6": lease.public_ipv6 and str(lease.public_ipv6)}
                               if lease.ipv6_subnet is not None else {})}
                           for lease in leases],
                "host": health,
            }, indent=2))
        else:
            out.print(first, highlight=False, style="bold", soft_wrap=True)
            table = Table(title=f"leases (store revision {revision})")
            for col in ("subnet", "public IP", "backend", "expires in"):
                table.add_column(col)
            for lease in leases:
                # Dual stack: the IPv6 half under the IPv4 one, in the same row.
                subnet, public = str(lease.subnet), str(lease.public_ip)
                if lease.ipv6_subnet is not None:
                    subnet += f"\n{lease.ipv6_subnet}"
                    public += f"\n{lease.public_ipv6 or '-'}"
                table.add_row(Text(subnet), Text(public), lease.backend_type,
                              _duration(lease.expires_in(now)))
            out.print(table)
            if no_agent is None:
                _print_health(health)
    except WeftError as exc:
        raise _fail(exc) from None
    if no_agent is not None:
        err.print(f"[bold red]error:[/] this host: {no_agent}", highlight=False)
        raise typer.Exit(3)


@app.command()
@with_store
def doctor(
    store: StoreOptions,
    state_dir: Annotated[Path, typer.Option()] = Path(DEFAULT_STATE_DIR),
    subnet_file: Annotated[Path, typer.Option()] = Path(DEFAULT_SUBNET_FILE),
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    cluster: Annotated[bool, typer.Option(
        "--cluster", help="ask every peer's agent over the overlay for its own health")] = False,
) -> None:
    """Check this host's set-up: each check passes, warns or fails with what to do.

    Exits 0 only when nothing fails."""
    import json

    from weft.agent import doctor as checks
    from weft.agent.doctor_facts import gather

    try:
        try:
            opened: LeaseStore | WeftError = store.open(create=False)  # only reads
        except WeftError as exc:  # the store check says so; the others still run
            opened = exc
        facts = asyncio.run(gather(opened, state_dir, subnet_file))
        results = checks.diagnose(facts)
        report: dict[str, Any] = {"ok": checks.exit_status(results) == 0,
                                  "checks": [c.as_json() for c in results]}
        if cluster:
            report["cluster"] = _cluster(facts.agent)
            report["ok"] = report["ok"] and not report["cluster"]["failing"]
    except WeftError as exc:
        raise _fail(exc) from None
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        colour = {"pass": "green", "warn": "yellow", "fail": "red"}
        for c in results:
            out.print(f"[{colour[c.result]}]{c.result:4}[/] {c.name}: {c.message}",
                      highlight=False, soft_wrap=True)
        if cluster:
            mesh = report["cluster"]
            out.print(f"cluster: {mesh['answered']} of {mesh['asked']} peers answered",
                      highlight=False)
            for line in mesh["failing"]:
                out.print(f"[red]fail[/] {line}", highlight=False, soft_wrap=True)
            if not mesh["failing"]:
                out.print("[green]pass[/] every pair reaches each other", highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)


def _cluster(agent: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every peer's own summary, asked over the overlay from this host's overlay address;
    the pairs that fail and on which side."""
    import ipaddress

    from weft.agent import doctor as checks
    from weft.agent.prober import ask_summaries

    if agent is None or "peer_health" not in agent:
        return {"asked": 0, "answered": 0, "pairs": [],
                "failing": ["no agent (or no probes) here to ask from"]}
    own = ipaddress.ip_network(agent["subnet"])
    rows = agent["peer_health"]["peers"]
    peers = {p: ipaddress.ip_network(p).network_address for p in rows}
    summaries = ask_summaries(own.network_address, peers)
    views: dict[str, checks.View | None] = {
        p: checks.view_of_summary(s) for p, s in summaries.items()}
    views[str(own)] = checks.view_of_rows(rows)
    names = {p: str(r.get("public_ip")) for p, r in rows.items() if r.get("public_ip")}
    names[str(own)] = str(agent.get("public_ip"))
    failures = checks.mesh(str(own), views, names)
    return {"asked": len(peers), "answered": sum(1 for v in summaries.values() if v),
            "summaries": summaries, "pairs": [f.as_json() for f in failures],
            "failing": [f.message for f in failures]}


def _fastpath_line(fp: dict[str, object]) -> str:
    if not fp.get("active"):
        return str(fp.get("reason"))
    counts = fp.get("redirected_packets")
    attached = fp.get("attached")
    names = ", ".join(map(str, attached)) if isinstance(attached, list) else ""
    line = f"on, attached to {names or 'nothing yet'}"
    if isinstance(counts, dict):
        line += "; packets redirected " + ", ".join(f"{k} {v}" for k, v in counts.items())
    skipped = fp.get("skipped")
    if isinstance(skipped, dict) and skipped:
        line += "; left alone: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return line + (f"; error: {fp['error']}" if fp.get("error") else "")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _print_health(health: dict[str, object]) -> None:
    peers = health.get("peers") or []
    errors = health.get("errors") or {}
    probes = health.get("peer_health")
    down = (probes.get("counts") or {}).get("unreachable", 0) if isinstance(probes, dict) else 0
    state = ("[red]errors[/]" if errors else
             f"[yellow]{down} peer(s) unreachable[/]" if down else "[green]healthy[/]")
    six = (f" + {health.get('ipv6_subnet')}" if health.get("ipv6_subnet") else "")
    six_ip = (f" + {health.get('public_ipv6')}" if health.get("public_ipv6") else "")
    out.print(f"this host: {state}  subnet {health.get('subnet')}{six}  public IP "
              f"{health.get('public_ip')}{six_ip}  backend {health.get('backend')}  peers "
              f"{len(peers) if isinstance(peers, list) else peers}", highlight=False)
    fastpath = health.get("fastpath")
    if isinstance(fastpath, dict):
        out.print(f"  fast path: {_fastpath_line(fastpath)}", highlight=False)
    backend_status = health.get("backend_status")
    if isinstance(backend_status, dict):
        for key, value in backend_status.items():
            if key == "paths" and isinstance(value, dict):
                _print_paths(value)
            elif key == "handshakes":  # per peer: in the peers table
                continue
            else:
                out.print(f"  {key}: {value}", highlight=False)
    if isinstance(errors, dict):
        for peer, message in errors.items():
            out.print(f"  [red]{peer}[/]: {message}", highlight=False)
    if isinstance(probes, dict):
        _print_peer_health(probes)


# A host with thousands of peers: the table shows the unreachable first, then this many in
# all; `--json` has every peer.
PEER_ROWS = 100


def _print_peer_health(probes: dict[str, Any]) -> None:
    """Plain aligned lines, not a boxed table: it stays readable at 80 columns and in a
    pipe, and one peer is one line to grep."""
    rows: dict[str, Any] = probes.get("peers") or {}
    counts = probes.get("counts") or {}
    out.print(f"  peers: {counts.get('reachable', 0)} reachable, "
              f"{counts.get('unreachable', 0)} unreachable, {counts.get('unknown', 0)} not "
              f"yet probed (each probed every {probes.get('interval_s')} s)", highlight=False)
    handshakes = any(r.get("handshake_age_s") is not None for r in rows.values())
    head = (f"    {'subnet':<18} {'public IP':<15} {'plane':<9} {'state':<11} "
            f"{'RTT ms p50/p99':<15} {'loss':>4} {'PMTU':>5} {'since':>6}")
    out.print(head + ("  handshake" if handshakes else ""), highlight=False, soft_wrap=True)
    order = {"unreachable": 0, "unknown": 1, "reachable": 2}
    ranked = sorted(rows.items(), key=lambda kv: (order.get(kv[1].get("state"), 3), kv[0]))
    for subnet, row in ranked[:PEER_ROWS]:
        rtt, loss, state = row.get("rtt_ms"), row.get("loss"), str(row.get("state"))
        colour = {"unreachable": "red", "reachable": "green"}.get(state, "yellow")
        rtt_text = "-" if not rtt else f"{rtt['median']:.2f}/{rtt['p99']:.2f}"
        loss_text = "-" if loss is None else f"{loss:.0%}"
        line = (f"    {subnet:<18} {row.get('public_ip')!s:<15} {row.get('plane')!s:<9} "
                f"[{colour}]{state:<11}[/] {rtt_text:<15} {loss_text:>4} "
                f"{row.get('pmtu') or '-'!s:>5} {_duration(row.get('since_s') or 0):>6}")
        if handshakes:
            age = row.get("handshake_age_s")
            line += "  " + ("-" if age is None else f"{_duration(age)} ago")
        out.print(line, highlight=False, soft_wrap=True)
    if len(ranked) > PEER_ROWS:
        out.print(f"    ... {len(ranked) - PEER_ROWS} more peers (weft status --json)",
                  highlight=False)


def _print_paths(paths: dict[str, Any]) -> None:
    """Backend auto: one line per peer, the data plane in use and why, its probes."""
    out.print("  peers (data plane, why, probes answered/sent per plane, switches):",
              highlight=False)
    for subnet, path in sorted(paths.items()):
        if not isinstance(path, dict):
            continue
        probes = "  ".join(
            f"{name} {p.get('answered')}/{p.get('sent')}{'' if p.get('usable') else ' (out)'}"
            for name, p in (path.get("probes") or {}).items() if isinstance(p, dict))
        six = (f" (IPv6 on {path.get('ipv6_plane') or 'none'})" if "ipv6_plane" in path
               else "")
        out.print(f"    {subnet} {path.get('peer')}: [bold]{path.get('plane')}[/]{six} — "
                  f"{path.get('reason')}; {probes}; switches {path.get('switches')}",
                  highlight=False)


@app.command()
def demo(
    backend: Annotated[str, typer.Option(help="vxlan, host-gw, udp or wireguard")] = DEFAULT_TYPE,
    store: Annotated[str, typer.Option(help="sqlite (embedded) or etcd (a local etcd "
                                            "started for the demo)")] = "sqlite",
    hosts: Annotated[int, typer.Option(min=2, max=20)] = 3,
    containers: Annotated[int, typer.Option(min=1, max=10)] = 2,
    runtime: Annotated[str, typer.Option(help="containers as bare namespaces (netns), "
                                              "docker containers or podman ones")] = "netns",
    ipv6: Annotated[bool, typer.Option("--ipv6", help="an IPv6 overlay")] = False,
    dual_stack: Annotated[bool, typer.Option("--dual-stack", help="an IPv4 and an IPv6 "
                                                                  "overlay at once")] = False,
) -> None:
    """Build hosts and containers in namespaces, show leases and full connectivity."""
    _need_lab()
    from weft_lab.demo import run_demo

    try:
        if ipv6 and dual_stack:
            raise UsageError("--ipv6 and --dual-stack: choose one (--dual-stack has both)")
        family = "dual-stack" if dual_stack else "ipv6" if ipv6 else "ipv4"
        ok = run_demo(backend=backend, store=store, hosts=hosts, containers=containers,
                      console=out, runtime=runtime, family=family)
    except WeftError as exc:
        raise _fail(exc) from None
    raise typer.Exit(0 if ok else 1)


@bench_app.callback()
def bench(
    ctx: typer.Context,
    backends: Annotated[str | None, typer.Option(help="comma-separated, e.g. vxlan,host-gw "
                                                      "(default: every registered one)")] = None,
    rate: Annotated[str | None, typer.Option(help="shape each host's underlay with tbf, "
                                                  "e.g. 1gbit")] = None,
    secs: Annotated[int, typer.Option(min=1, help="seconds per qperf test")] = 5,
    reps: Annotated[int, typer.Option(min=1, help="rounds (native, A, native, B, ...)")] = 3,
    json_file: Annotated[str | None, typer.Option("--json", help="write the JSON here "
                                                                 "(- for stdout)")] = None,
    chart: Annotated[str | None, typer.Option(help="write a PNG bar chart here")] = None,
    attach: Annotated[str, typer.Option(help="how containers attach: bridge (flannel's "
                                             "layout) or ptp (routed veth)")] = "bridge",
    runtime: Annotated[str, typer.Option(help="also measure each backend with docker "
                                              "(or podman) containers")] = "netns",
    ipv6: Annotated[bool, typer.Option("--ipv6", help="dual stack: also measure native and "
                                                      "each backend over IPv6")] = False,
) -> None:
    """qperf tcp_bw/tcp_lat: native vs each backend, container to container, on 2 hosts."""
    _need_lab()
    if ctx.invoked_subcommand is not None:
        return
    from weft_lab.bench.report import render_table, write_chart, write_json
    from weft_lab.bench.runner import BenchOptions, parse_backends, run_bench

    try:
        opts = BenchOptions(parse_backends(backends), rate, secs, reps, attach, runtime,
                            ipv6)
        report = run_bench(opts, progress=lambda line: err.print(line, highlight=False))
        render_table(report, err if json_file == "-" else out)
        if json_file is not None:
            write_json(report, json_file)
        if chart is not None:
            write_chart(report, chart)
    except WeftError as exc:
        raise _fail(exc) from None


@bench_app.command("scale")
def bench_scale(
    leases: Annotated[int, typer.Option(min=1, max=8000, help="fake leases: valid records "
                                        "for hosts that don't exist")] = 1000,
    agents: Annotated[int, typer.Option(min=1, max=50, help="real vxlan agents")] = 3,
    stores: Annotated[str | None, typer.Option(help="sqlite,etcd (default: both)")] = None,
    events: Annotated[int, typer.Option(min=1, help="lease changes timed to the kernel")] = 10,
    storm: Annotated[int, typer.Option(min=0, max=200, help="agents started at once on "
                                       "etcd (0: no start storm)")] = 100,
    json_file: Annotated[str | None, typer.Option("--json", help="write the JSON here "
                                                                 "(- for stdout)")] = None,
) -> None:
    """Control plane at scale: join, event -> kernel, CPU, RSS, store requests, start storm."""
    from weft_lab.bench.report import write_json_data
    from weft_lab.bench.scale import ScaleOptions, parse_stores, run_scale
    from weft_lab.bench.scale_report import render_scale_table

    try:
        opts = ScaleOptions(leases, agents, parse_stores(stores), events, storm)
        report = run_scale(opts, progress=lambda line: err.print(line, highlight=False))
        render_scale_table(report, err if json_file == "-" else out)
        if json_file is not None:
            write_json_data(report, json_file)
    except WeftError as exc:
        raise _fail(exc) from None


@app.command("docker-opts")
def docker_opts(
    subnet_file: Annotated[Path, typer.Option("--subnet-file", "-f")] = Path(
        DEFAULT_SUBNET_FILE),
    fmt: Annotated[str, typer.Option("--format", help="flags, combined, individual, env "
                                                      "(individual + combined) or json")] = "env",
    key: Annotated[str, typer.Option("--key", "-k", help="variable of the combined "
                                                         "flags")] = "DOCKER_OPTS",
    ip_masq: Annotated[bool, typer.Option(help="emit --ip-masq (--no-ip-masq for old "
                                               "dockerd)")] = True,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write this file "
                                                "(atomically) instead of stdout")] = None,
) -> None:
    """dockerd flags (--bip, --ip-masq, --mtu) from subnet.env, like mk-docker-opts.sh."""

    from weft.host.files import write_atomic
    from weft.integrations.docker_opts import render_docker_opts
    from weft.integrations.subnet_env import read_subnet_env

    try:
        text = render_docker_opts(read_subnet_env(subnet_file), fmt, key=key, ip_masq=ip_masq)
        if output is None:
            sys.stdout.write(text)
            return
        write_atomic(output, text.encode())
    except OSError as exc:
        raise _fail(UsageError(f"cannot write {output}: {exc}")) from None
    except WeftError as exc:
        raise _fail(exc) from None


@app.command()
def units(
    directory: Annotated[Path, typer.Option("--dir", help="where systemd reads units")] = Path(
        "/etc/systemd/system"),
    weft_path: Annotated[str | None, typer.Option("--weft", help="the weft executable the "
                                                  "units run (default: this one)")] = None,
    dockerd: Annotated[str | None, typer.Option(help="dockerd's path (default: the one on "
                                                "PATH, else /usr/bin/dockerd)")] = None,
    docker: Annotated[bool, typer.Option(help="also write docker.service.d/weft.conf (dockerd "
                                              "on weft's subnet)")] = True,
) -> None:
    """Write the agent's systemd unit (weft.service) and docker's drop-in."""
    import os
    import shutil
    import sysconfig

    from weft.integrations.systemd.units import render_units, write_units

    try:
        if weft_path is None:
            # where pip put this install's console scripts (a venv's bin, /usr/local/bin)
            here = Path(sysconfig.get_path("scripts")) / "weft"
            weft_path = str(here) if here.is_file() else shutil.which("weft")
            if weft_path is None:
                raise UsageError("cannot find the weft executable: give its path with --weft")
        if dockerd is None:
            search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
            dockerd = shutil.which("dockerd", path=search) or "/usr/bin/dockerd"
        written = write_units(directory, render_units(weft_path, dockerd, docker=docker))
    except OSError as exc:
        raise _fail(UsageError(f"cannot write units in {directory}: {exc}")) from None
    except WeftError as exc:
        raise _fail(exc) from None
    for path in written:
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)
    out.print("then: systemctl daemon-reload && systemctl enable --now weft"
              + (" && systemctl restart docker" if docker else ""), highlight=False,
              soft_wrap=True)


@testbed_app.command("down")
def testbed_down() -> None:
    """Remove every namespace, process and file a testbed run left behind."""
    _need_lab()
    from weft_lab.testbed import remove_leftovers

    removed = remove_leftovers()
    out.print(f"removed {len(removed)} leftover namespace(s)"
              + (": " + " ".join(removed) if removed else ""), highlight=False)


def main() -> None:
    app()
