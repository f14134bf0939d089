"""The runtime side of CNI: run a plugin the way containerd or CRI-O would.

The testbed and `weft demo` attach containers with these, so they exercise `weft-cni` and
the reference plugins exactly as a real runtime does:

    from weft.integrations.cni.runtime import cni_add, cni_check, cni_del, default_cni_path
    conf = {"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
            "subnetFile": "/tmp/h1/subnet.env", "dataDir": "/tmp/h1/cni"}
    result = cni_add(conf, netns_path="/var/run/netns/c1", container_id="c1",
                     ifname="eth0", host_netns="h1", cni_path=default_cni_path())
    cni_check(conf, ..., prev_result=result)     # raises CniError when broken
    cni_del(conf, ..., prev_result=result)       # idempotent

`conf` is one plugin's network config or a conflist (`{"plugins": [...]}`, run in order
for ADD/CHECK and in reverse for DEL, each plugin getting the previous one's result as
`prevResult`, as libcni does). The plugin runs inside `ip netns exec <host_netns>` when
`host_netns` is given: that namespace plays the host the container lives on.

CNI_PATH must hold both the reference plugins and the directory of the `weft-cni`
executable: the runtime looks `weft-cni` up there, and `weft-cni` looks up its delegate
(`bridge`) and the delegate its IPAM (`host-local`) there too. `default_cni_path` is this
Python's bin directory, then both homes of the reference plugins: /opt/cni/bin (the CNI
convention) and /usr/lib/cni (Debian's containernetworking-plugins).

Every failure raises `weft.integrations.cni.spec.CniError` carrying the plugin's JSON error (code,
msg, details).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from weft.integrations.cni.plugin import REFERENCE_PLUGIN_DIRS, find_plugin
from weft.integrations.cni.spec import SPEC_VERSION, CniError, ErrorCode

PLUGIN_TIMEOUT: Final = 60.0


def default_cni_path() -> str:
    """The directory of this Python's `weft-cni` (the venv's bin), then the directories of
    the reference plugins (REFERENCE_PLUGIN_DIRS)."""
    return os.pathsep.join([str(Path(sys.executable).parent), *REFERENCE_PLUGIN_DIRS])


def run_cni_plugin(command: str, conf: Mapping[str, Any], *, container_id: str, ifname: str,
                netns_path: str | None, host_netns: str | None, cni_path: str,
                cni_args: str | None = None) -> dict[str, Any] | None:
    """Run one plugin (the one `conf["type"]` names) with one command; its parsed stdout."""
    plugin_type = conf.get("type")
    if not isinstance(plugin_type, str):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "the plugin config has no type",
                       json.dumps(conf))
    path = find_plugin(plugin_type, cni_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_IFNAME=ifname,
               CNI_PATH=cni_path)
    if netns_path is not None:
        env["CNI_NETNS"] = netns_path
    if cni_args is not None:
        env["CNI_ARGS"] = cni_args
    argv = [str(path)]
    if host_netns is not None:
        argv = ["ip", "netns", "exec", host_netns, *argv]
    try:
        proc = subprocess.run(argv, input=json.dumps(conf).encode(), capture_output=True,
                              env=env, timeout=PLUGIN_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CniError(ErrorCode.IO_FAILURE, f"cannot run plugin {path}", str(exc)) from None
    out = proc.stdout.strip()
    try:
        parsed = json.loads(out) if out else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
        if proc.returncode == 0:
            raise CniError(ErrorCode.DECODE_FAILURE, f"{plugin_type} {command} printed no JSON",
                           out.decode(errors="replace")[:2000]) from None
    if proc.returncode != 0:
        if isinstance(parsed, dict) and "code" in parsed:
            raise CniError.from_json(parsed)
        raise CniError(ErrorCode.INTERNAL,
                       f"{plugin_type} {command} failed (exit {proc.returncode})",
                       (proc.stderr or proc.stdout).decode(errors="replace").strip()[:2000])
    if parsed is not None and not isinstance(parsed, dict):
        raise CniError(ErrorCode.DECODE_FAILURE, f"{plugin_type} {command} printed no object",
                       out.decode(errors="replace")[:2000])
    return parsed


def _plugins(conf: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A single config is a list of one; a conflist's entries get its name and version."""
    if "plugins" not in conf:
        return [dict(conf)]
    plugins = conf["plugins"]
    if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "conflist plugins must be objects",
                       json.dumps(plugins))
    common = {"name": conf.get("name"), "cniVersion": conf.get("cniVersion", SPEC_VERSION)}
    return [{**p, **common} for p in plugins]


def cni_add(plugin_conf: Mapping[str, Any], netns_path: str, container_id: str,
            ifname: str = "eth0", host_netns: str | None = None,
            cni_path: str | None = None, cni_args: str | None = None) -> dict[str, Any]:
    """ADD: attach the container; the result (interfaces, ips, routes, dns)."""
    cni_path = cni_path or default_cni_path()
    result: dict[str, Any] | None = None
    for conf in _plugins(plugin_conf):
        if result is not None:
            conf["prevResult"] = result
        result = run_cni_plugin("ADD", conf, container_id=container_id, ifname=ifname,
                             netns_path=netns_path, host_netns=host_netns, cni_path=cni_path,
                             cni_args=cni_args)
        if result is None:
            raise CniError(ErrorCode.DECODE_FAILURE, f"{conf.get('type')} ADD printed nothing")
    assert result is not None  # _plugins never returns an empty list for a valid config
    return result


def cni_del(plugin_conf: Mapping[str, Any], netns_path: str | None, container_id: str,
            ifname: str = "eth0", host_netns: str | None = None, cni_path: str | None = None,
            prev_result: Mapping[str, Any] | None = None,
            cni_args: str | None = None) -> None:
    """DEL: detach the container (also when its namespace is gone: pass netns_path=None)."""
    cni_path = cni_path or default_cni_path()
    for conf in reversed(_plugins(plugin_conf)):
        if prev_result is not None:
            conf["prevResult"] = dict(prev_result)
        run_cni_plugin("DEL", conf, container_id=container_id, ifname=ifname,
                    netns_path=netns_path, host_netns=host_netns, cni_path=cni_path,
                    cni_args=cni_args)


def cni_check(plugin_conf: Mapping[str, Any], netns_path: str, container_id: str,
              ifname: str = "eth0", host_netns: str | None = None,
              cni_path: str | None = None, *, prev_result: Mapping[str, Any],
              cni_args: str | None = None) -> None:
    """CHECK: raises CniError unless the attachment is still as ADD left it."""
    cni_path = cni_path or default_cni_path()
    for conf in _plugins(plugin_conf):
        conf["prevResult"] = dict(prev_result)
        run_cni_plugin("CHECK", conf, container_id=container_id, ifname=ifname,
                    netns_path=netns_path, host_netns=host_netns, cni_path=cni_path,
                    cni_args=cni_args)


def cni_version(plugin_type: str, cni_path: str | None = None) -> dict[str, Any]:
    """VERSION: the plugin's supported spec versions."""
    result = run_cni_plugin("VERSION", {"cniVersion": SPEC_VERSION, "type": plugin_type},
                         container_id="", ifname="", netns_path=None, host_netns=None,
                         cni_path=cni_path or default_cni_path())
    return result or {}
