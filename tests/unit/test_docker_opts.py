"""`weft docker-opts`: dockerd flags that match subnet.env, in mk-docker-opts.sh's formats."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from helpers import weft
from weft.integrations.subnet_env import SubnetEnv, write_subnet_env

CASES = [
    # network, host subnet, mtu, weft masquerades
    ("10.244.0.0/16", "10.244.3.0/24", 1450, True),
    ("198.19.0.0/16", "198.19.128.0/20", 1500, False),
    ("172.16.0.0/12", "172.31.255.0/28", 1420, True),
]


def docker_opts(*args: str) -> subprocess.CompletedProcess[str]:
    return weft("docker-opts", *args)


def subnet_env(tmp_path: Path, network: str, subnet: str, mtu: int, ipmasq: bool) -> Path:
    path = tmp_path / "subnet.env"
    write_subnet_env(path, SubnetEnv(ipaddress.ip_network(network),
                                     ipaddress.ip_network(subnet), mtu, ipmasq))
    return path


def expected_flags(subnet: str, mtu: int, ipmasq: bool) -> list[str]:
    net = ipaddress.ip_network(subnet)
    return [f"--bip={net.network_address + 1}/{net.prefixlen}",
            f"--ip-masq={'false' if ipmasq else 'true'}", f"--mtu={mtu}"]


@pytest.mark.parametrize(("network", "subnet", "mtu", "ipmasq"), CASES)
def test_flags_match_subnet_env(tmp_path: Path, network: str, subnet: str, mtu: int,
                                ipmasq: bool) -> None:
    path = subnet_env(tmp_path, network, subnet, mtu, ipmasq)
    proc = docker_opts("--subnet-file", str(path), "--format", "flags")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected_flags(subnet, mtu, ipmasq)


@pytest.mark.parametrize(("network", "subnet", "mtu", "ipmasq"), CASES)
def test_env_file_sourced_by_a_shell_gives_the_flags(tmp_path: Path, network: str,
                                                     subnet: str, mtu: int,
                                                     ipmasq: bool) -> None:
    """The file systemd's EnvironmentFile= reads; a shell must see the same variables."""
    path = subnet_env(tmp_path, network, subnet, mtu, ipmasq)
    out = tmp_path / "run" / "docker.env"
    proc = docker_opts("-f", str(path), "--output", str(out))
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
    shell = subprocess.run(
        ["sh", "-c", f'. "{out}" && printf "%s\\n" "$DOCKER_OPTS" "$DOCKER_OPT_BIP" '
                     '"$DOCKER_OPT_IPMASQ" "$DOCKER_OPT_MTU"'],
        capture_output=True, text=True, check=True)
    combined, *individual = shell.stdout.splitlines()
    flags = expected_flags(subnet, mtu, ipmasq)
    assert combined.split() == flags
    assert individual == flags


def test_formats_and_key(tmp_path: Path) -> None:
    path = subnet_env(tmp_path, *CASES[0])
    flags = "--bip=10.244.3.1/24 --ip-masq=false --mtu=1450"
    combined = docker_opts("-f", str(path), "--format", "combined", "-k", "DOCKER_NETWORK_OPTIONS")
    assert combined.stdout == f'DOCKER_NETWORK_OPTIONS="{flags}"\n'
    individual = docker_opts("-f", str(path), "--format", "individual")
    assert individual.stdout.splitlines() == [
        'DOCKER_OPT_BIP="--bip=10.244.3.1/24"', 'DOCKER_OPT_IPMASQ="--ip-masq=false"',
        'DOCKER_OPT_MTU="--mtu=1450"']
    daemon = docker_opts("-f", str(path), "--format", "json")
    assert json.loads(daemon.stdout) == {"bip": "10.244.3.1/24", "ip-masq": False, "mtu": 1450}
    old_dockerd = docker_opts("-f", str(path), "--format", "flags", "--no-ip-masq")
    assert old_dockerd.stdout == "--bip=10.244.3.1/24 --mtu=1450\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "yaml"], "unknown format 'yaml'"),
    (["-k", "DOCKER OPTS"], "invalid variable name"),
    (["-f", "/nonexistent/subnet.env"], "is `weft agent` running"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    path = subnet_env(tmp_path, *CASES[0])
    proc = docker_opts("-f", str(path), *args)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ipv6_subnet_is_refused_for_bip(tmp_path: Path) -> None:
    path = subnet_env(tmp_path, "fd00:198:19::/48", "fd00:198:19:3::/64", 1430, True)
    proc = docker_opts("-f", str(path))
    assert proc.returncode == 1
    assert "IPv4" in proc.stderr


def test_output_file_is_not_left_half_written_on_error(tmp_path: Path) -> None:
    out = tmp_path / "docker.env"
    out.write_text("DOCKER_OPTS=old\n")
    proc = docker_opts("-f", str(tmp_path / "missing.env"), "--output", str(out))
    assert proc.returncode == 1
    assert out.read_text() == "DOCKER_OPTS=old\n"


@pytest.mark.parametrize(("content", "message"), [
    ("FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=banana\nFLANNEL_MTU=1450\n"
     "FLANNEL_IPMASQ=true\n", "'banana' does not appear to be an IPv4 or IPv6 interface"),
    ("FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.3.1/24\nFLANNEL_IPMASQ=true\n",
     "FLANNEL_MTU is missing"),
    ("garbage line\n", "FLANNEL_NETWORK is missing"),
])
def test_a_malformed_subnet_env_is_one_line_naming_the_file_and_the_output_is_untouched(
        tmp_path: Path, content: str, message: str) -> None:
    env = tmp_path / "subnet.env"
    env.write_text(content)
    out = tmp_path / "docker.env"
    out.write_text("DOCKER_OPTS=old\n")
    proc = docker_opts("-f", str(env), "--output", str(out))
    assert proc.returncode == 1
    assert proc.stderr == f"error: {env}: {message}\n"
    assert out.read_text() == "DOCKER_OPTS=old\n"


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_an_unwritable_output_is_one_line_and_leaves_nothing(tmp_path: Path, where: str) -> None:
    (tmp_path / "env").mkdir()
    env = subnet_env(tmp_path / "env", *CASES[0])
    target = tmp_path / "out"
    if where == "a directory":
        target.mkdir()
        output = target
    else:
        target.write_text("a file\n")
        output = target / "docker.env"
    proc = docker_opts("-f", str(env), "--output", str(output))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: cannot write {output}: "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr
    # Nothing half-written beside it: no temporary file left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env", "out"]
    assert (list(target.iterdir()) == []) if target.is_dir() else (
        target.read_text() == "a file\n")
