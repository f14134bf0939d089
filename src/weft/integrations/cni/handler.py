"""The logic of `weft-cni`, as a pure function of its inputs (the thin-shell pattern).

`handle(environ, stdin, exec_plugin=..., state=..., read_subnet_env=...)` returns
`(exit_code, stdout)`. Everything that touches the host — running the delegate plugin,
reading `subnet.env`, the saved delegate configs — is injected, so this module does no I/O.

Like flannel's CNI plugin, weft-cni does not configure interfaces itself: it turns
`subnet.env` into a config for the reference `bridge` plugin with `host-local` IPAM for
this host's subnet, and delegates to it:

    {"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
     "subnetFile": "/run/weft/subnet.env", "dataDir": "/var/lib/cni/weft",
     "delegate": {"bridge": "weft0", "hairpinMode": true}}

ADD saves the delegate config under dataDir before running the delegate, so DEL (also
after a failed ADD, also when subnet.env is gone) tears down exactly what ADD set up.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from weft.core.constants import CNI_BRIDGE, DEFAULT_SUBNET_FILE
from weft.core.errors import WeftError
from weft.integrations.cni.spec import (
    CHECK_SINCE,
    COMMANDS,
    REQUIRED_ENV,
    SPEC_VERSION,
    SUPPORTED_VERSIONS,
    CniError,
    ErrorCode,
    valid_container_id,
    valid_ifname,
    valid_network_name,
    valid_plugin_type,
    version_tuple,
)
from weft.integrations.subnet_env import SubnetEnv

DEFAULT_DATA_DIR: Final = "/var/lib/cni/weft"
DEFAULT_DELEGATE: Final = "bridge"
# Keys weft-cni computes for the delegate; an override would silently break DEL or IPAM.
_OWNED_DELEGATE_KEYS: Final = ("name", "cniVersion", "ipam")
# Keys a runtime adds to a plugin's config that the delegate must see too.
_PASS_THROUGH_KEYS: Final = ("args", "runtimeConfig")

ExecPlugin = Callable[[str, Mapping[str, str], bytes], tuple[int, bytes]]
"""Run the plugin named `name` from CNI_PATH with exactly `env` and `stdin`:
returns (exit code, stdout). Raises CniError when it cannot be found or started."""

ReadSubnetEnv = Callable[[str], SubnetEnv]
"""Read and parse a subnet.env file; raises a WeftError when missing or malformed."""


class DelegateStore(Protocol):
    """Where ADD keeps the delegate config for DEL and CHECK. Methods raise CniError
    (I/O failure) when the storage fails."""

    def load(self, data_dir: str, key: str) -> bytes | None: ...

    def save(self, data_dir: str, key: str, data: bytes) -> None: ...

    def delete(self, data_dir: str, key: str) -> None: ...


@dataclass(frozen=True)
class NetConf:
    """weft-cni's network configuration, validated."""

    cni_version: str
    name: str
    subnet_file: str
    data_dir: str
    delegate: Mapping[str, Any]  # overrides for the delegate config
    raw: Mapping[str, Any]  # the whole object, for keys a runtime adds (prevResult, args)

    @property
    def prev_result(self) -> Any:
        return self.raw.get("prevResult")


@dataclass(frozen=True)
class Invocation:
    command: str
    container_id: str
    ifname: str
    environ: Mapping[str, str]

    @property
    def state_key(self) -> str:
        # An attachment is (container, interface). Neither part may contain ':'
        # (container IDs are [A-Za-z0-9_.-], interface names exclude ':'), so keys are unique.
        return f"{self.container_id}:{self.ifname}"


NetnsUsable = Callable[[str], bool]
"""Whether a CNI_NETNS path is a network namespace that can be entered (I/O: injected)."""


def handle(
    environ: Mapping[str, str],
    stdin: bytes,
    *,
    exec_plugin: ExecPlugin,
    state: DelegateStore,
    read_subnet_env: ReadSubnetEnv,
    netns_usable: NetnsUsable = lambda _: True,
) -> tuple[int, bytes]:
    """Run one CNI command. Never raises: every failure is a spec error on stdout."""
    conf: NetConf | None = None
    try:
        inv = parse_environ(environ)
        if inv.command == "VERSION":
            return 0, _dump(version_result())
        conf = parse_netconf(stdin)
        if inv.command == "ADD":
            return _add(inv, conf, exec_plugin, state, read_subnet_env)
        if inv.command == "DEL":
            return _del(inv, conf, exec_plugin, state, netns_usable)
        return _check(inv, conf, exec_plugin, state, read_subnet_env)
    except CniError as exc:
        # An error speaks the caller's version once that is known (parse_netconf sets it
        # on its own errors after reading a supported cniVersion).
        if conf is not None:
            exc.cni_version = conf.cni_version
        return 1, _dump(exc.to_json())


def version_result() -> dict[str, Any]:
    return {"cniVersion": SPEC_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def parse_environ(environ: Mapping[str, str]) -> Invocation:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, "CNI_COMMAND is not set",
                       f"expected one of {', '.join(COMMANDS)}")
    if command not in COMMANDS:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}",
                       f"expected one of {', '.join(COMMANDS)}")
    missing = [name for name in REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT,
                       f"required environment variables missing: {', '.join(missing)}",
                       f"CNI_COMMAND={command}")
    container_id = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    if command != "VERSION":
        if not valid_container_id(container_id):
            raise CniError(ErrorCode.INVALID_ENVIRONMENT,
                           "invalid characters in CNI_CONTAINERID",
                           f"CNI_CONTAINERID={container_id!r}: letters, digits, '_', '.', '-'")
        if not valid_ifname(ifname):
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, "invalid CNI_IFNAME",
                           f"CNI_IFNAME={ifname!r}: 1-15 characters, no '/', ':' or spaces")
    return Invocation(command, container_id, ifname, environ)


def parse_netconf(stdin: bytes) -> NetConf:
    try:
        obj = json.loads(stdin)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode the network config on stdin",
                       str(exc)) from None
    if not isinstance(obj, dict):
        raise CniError(ErrorCode.DECODE_FAILURE, "the network config must be a JSON object",
                       f"got {type(obj).__name__}")
    version = obj.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "cniVersion is missing",
                       f"cniVersion={version!r}; supported: {', '.join(SUPPORTED_VERSIONS)}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, f"incompatible CNI version {version}",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    try:
        return _validate_netconf(obj, version)
    except CniError as exc:
        exc.cni_version = version
        raise


def _validate_netconf(obj: dict[str, Any], version: str) -> NetConf:
    name = _string(obj, "name", None)
    if not valid_network_name(name):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, f"invalid network name {name!r}",
                       "name: letters, digits, '_', '.', '-'")
    _string(obj, "type", None)
    subnet_file = _path(obj, "subnetFile", DEFAULT_SUBNET_FILE)
    data_dir = _path(obj, "dataDir", DEFAULT_DATA_DIR)
    delegate = obj.get("delegate", {})
    if not isinstance(delegate, dict):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "delegate must be a JSON object",
                       f"delegate={delegate!r}")
    for key in _OWNED_DELEGATE_KEYS:
        if key in delegate:
            raise CniError(ErrorCode.UNSUPPORTED_FIELD,
                           f"delegate.{key}={json.dumps(delegate[key])} is not supported",
                           f"weft-cni sets the delegate's {key} itself; remove it")
    dtype = delegate.get("type", DEFAULT_DELEGATE)
    if not isinstance(dtype, str) or not valid_plugin_type(dtype):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, f"invalid delegate.type {dtype!r}",
                       "a plugin name in CNI_PATH, e.g. bridge")
    return NetConf(version, name, subnet_file, data_dir, delegate, obj)


def _string(obj: Mapping[str, Any], key: str, default: str | None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG,
                       f"{key} is missing" if key not in obj else f"invalid {key}",
                       f"{key}={obj.get(key)!r}: a non-empty string is required")
    return value


def _path(obj: Mapping[str, Any], key: str, default: str) -> str:
    value = _string(obj, key, default)
    if not value.startswith("/"):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, f"{key} must be an absolute path",
                       f"{key}={value!r}")
    return value


def delegate_config(conf: NetConf, env: SubnetEnv) -> dict[str, Any]:
    """The delegate's network config: `bridge` (or `ptp`) + host-local for this host's
    subnet; in dual stack for both its subnets (one range set each: one address of each
    family per container, and a route of each family)."""
    dtype = conf.delegate.get("type", DEFAULT_DELEGATE)
    delegate: dict[str, Any] = {
        "type": dtype,
        "mtu": env.mtu,
        # weft's agent masquerades traffic leaving the overlay when FLANNEL_IPMASQ=true;
        # the delegate must not add a second masquerade then (flannel does the same).
        "ipMasq": not env.ipmasq,
    }
    if dtype == "bridge":
        delegate.update(bridge=CNI_BRIDGE, isGateway=True, isDefaultGateway=True)
    delegate.update(conf.delegate)
    families = [(env.network, env.subnet, env.gateway)]
    if env.ipv6_network is not None and env.ipv6_subnet is not None \
            and env.ipv6_gateway is not None:
        families.append((env.ipv6_network, env.ipv6_subnet, env.ipv6_gateway))
    if delegate.get("isDefaultGateway"):
        # The bridge plugin adds the default route through the bridge, one per family.
        routes: list[dict[str, str]] = []
    elif dtype == "bridge":
        # Without a default route through the bridge the container still needs one to
        # the whole overlay network.
        routes = [{"dst": str(network)} for network, _, _ in families]
    else:
        # ptp and the like: every route goes via the gateway address, which the plugin
        # puts on the host end of the container's veth.
        routes = [{"dst": "0.0.0.0/0" if network.version == 4 else "::/0"}
                  for network, _, _ in families]
    delegate.update(
        cniVersion=conf.cni_version,
        name=conf.name,
        ipam={
            "type": "host-local",
            "ranges": [[{"subnet": str(subnet), "gateway": str(gateway)}]
                       for _, subnet, gateway in families],
            "routes": routes,
            # Per host: host-local keeps its reservations here, so hosts sharing one
            # filesystem (the testbed) must not share it.
            "dataDir": f"{conf.data_dir.rstrip('/')}/ipam",
        },
    )
    return delegate


def _load_env(conf: NetConf, read_subnet_env: ReadSubnetEnv) -> SubnetEnv:
    try:
        return read_subnet_env(conf.subnet_file)
    except WeftError as exc:
        # The agent writes subnet.env once it holds a lease: the runtime may retry.
        raise CniError(ErrorCode.TRY_AGAIN_LATER, f"cannot use {conf.subnet_file}",
                       f"{exc} (is the weft agent running?)") from None


def _invoke(conf: NetConf, delegate: Mapping[str, Any], command: str, inv: Invocation,
            exec_plugin: ExecPlugin, *, with_prev_result: bool) -> bytes:
    """Run the delegate; its error (a spec error) is passed through unchanged."""
    body = dict(delegate)
    body["cniVersion"] = conf.cni_version  # prevResult is in the caller's version
    for key in _PASS_THROUGH_KEYS:
        if key in conf.raw:
            body[key] = conf.raw[key]
    if with_prev_result and conf.prev_result is not None:
        body["prevResult"] = conf.prev_result
    env = dict(inv.environ)
    env["CNI_COMMAND"] = command
    rc, out = exec_plugin(str(delegate["type"]), env, _dump(body))
    if rc != 0:
        try:
            error = json.loads(out)
        except (UnicodeDecodeError, json.JSONDecodeError):
            error = None
        if isinstance(error, dict) and isinstance(error.get("code"), int):
            raise CniError.from_json(error)
        raise CniError(ErrorCode.DELEGATE_FAILED,
                       f"delegate plugin {delegate['type']} {command} failed (exit {rc})",
                       out.decode(errors="replace").strip()[:2000])
    return out


def _add(inv: Invocation, conf: NetConf, exec_plugin: ExecPlugin, state: DelegateStore,
         read_subnet_env: ReadSubnetEnv) -> tuple[int, bytes]:
    env = _load_env(conf, read_subnet_env)
    delegate = delegate_config(conf, env)
    # Saved first: if the delegate fails half-way, the runtime's DEL can still undo it.
    state.save(conf.data_dir, inv.state_key, _dump(delegate))
    out = _invoke(conf, delegate, "ADD", inv, exec_plugin, with_prev_result=False)
    try:
        result = json.loads(out)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CniError(ErrorCode.DELEGATE_FAILED,
                       f"delegate plugin {delegate['type']} printed no JSON result",
                       out.decode(errors="replace")[:2000]) from None
    return 0, _dump(result)


def _saved_delegate(inv: Invocation, conf: NetConf,
                    state: DelegateStore) -> dict[str, Any] | None:
    data = state.load(conf.data_dir, inv.state_key)
    if data is None:
        return None
    try:
        delegate = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        delegate = None
    if not isinstance(delegate, dict) or not isinstance(delegate.get("type"), str) \
            or not valid_plugin_type(delegate["type"]):
        raise CniError(ErrorCode.DECODE_FAILURE,
                       f"saved delegate config for {inv.state_key} is corrupt",
                       f"in {conf.data_dir}")
    return delegate


def _del(inv: Invocation, conf: NetConf, exec_plugin: ExecPlugin,
         state: DelegateStore, netns_usable: NetnsUsable) -> tuple[int, bytes]:
    delegate = _saved_delegate(inv, conf, state)
    if delegate is None:
        return 0, b""  # never added, or already deleted: DEL is idempotent
    try:
        _invoke(conf, delegate, "DEL", inv, exec_plugin, with_prev_result=True)
    except CniError:
        netns = inv.environ.get("CNI_NETNS", "")
        if not netns or netns_usable(netns):
            raise
        # The namespace is gone, or never was one (the ADD failed on it): nothing inside
        # it is left to undo, and the delegate refuses to enter it. The spec asks DEL to
        # succeed then: the delegate's DEL without a namespace (which the spec allows)
        # still releases the address and the host's side.
        environ = {k: v for k, v in inv.environ.items() if k != "CNI_NETNS"}
        _invoke(conf, delegate, "DEL", replace(inv, environ=environ), exec_plugin,
                with_prev_result=True)
    state.delete(conf.data_dir, inv.state_key)
    return 0, b""


def _check(inv: Invocation, conf: NetConf, exec_plugin: ExecPlugin, state: DelegateStore,
           read_subnet_env: ReadSubnetEnv) -> tuple[int, bytes]:
    version = version_tuple(conf.cni_version)
    if version is None or version < CHECK_SINCE:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION,
                       f"cniVersion {conf.cni_version} does not allow CHECK",
                       "CHECK needs cniVersion 0.4.0 or later")
    if not isinstance(conf.prev_result, dict):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "CHECK needs prevResult",
                       "the runtime must pass the result of ADD as prevResult")
    delegate = _saved_delegate(inv, conf, state)
    if delegate is None:
        raise CniError(ErrorCode.UNKNOWN_CONTAINER,
                       f"no attachment {inv.ifname} of container {inv.container_id}",
                       f"nothing saved in {conf.data_dir}")
    env = _load_env(conf, read_subnet_env)
    subnet = _saved_subnet(delegate)
    if subnet != str(env.subnet):
        raise CniError(ErrorCode.SUBNET_CHANGED,
                       f"the container's subnet {subnet} is no longer this host's subnet",
                       f"{conf.subnet_file} says {env.subnet}: re-create the container")
    _invoke(conf, delegate, "CHECK", inv, exec_plugin, with_prev_result=True)
    return 0, b""


def _saved_subnet(delegate: Mapping[str, Any]) -> str | None:
    try:
        return str(delegate["ipam"]["ranges"][0][0]["subnet"])
    except (KeyError, IndexError, TypeError):
        return None


def _dump(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"
