"""The network config: flannel-compatible JSON validated into typed objects.

    {"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}

Dual stack is spelled as flannel spells it: `"EnableIPv6": true` with `IPv6Network` (and
`IPv6SubnetLen`, `IPv6SubnetMin`, `IPv6SubnetMax`) beside the IPv4 `Network`; `EnableIPv4`
(default true) false with `EnableIPv6` true is an IPv6-only network, the same as today's
`"Network": "<an IPv6 range>"`. Every host then holds one subnet of each enabled family.

Every mistake becomes one `ConfigError` whose message names the field and the value.
Each backend owns its options model (`weft.backends.<name>.options`); the registry
(`weft.backends.registry`) maps `Type` to it and hands that map to `parse_config` here
(`BackendTypes`), so core imports nothing of weft above it: parse with
`weft.backends.registry.parse_config`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from weft.core import untrusted_json
from weft.core.errors import ConfigError
from weft.core.untrusted_json import UntrustedJson

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MODEL = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BackendOptions(BaseModel):
    """Options every backend accepts."""

    model_config = _MODEL
    type: str = Field(alias="Type")
    # Overrides the MTU derived from the underlay; must leave room for the encapsulation.
    mtu: Annotated[int, Field(ge=576, le=65535)] | None = Field(default=None, alias="MTU")


@dataclass(frozen=True)
class BackendTypes:
    """The backends a config may name: each `Type`'s options model, and the `Type` of a
    config that names none. The registry builds it; validation gets it as its context."""

    models: Mapping[str, type[BackendOptions]]
    default: str


@dataclass(frozen=True)
class SubnetRange:
    """One family's address range split into one subnet per host: Network (or IPv6Network),
    the subnet length, and the first and last subnet a host may lease."""

    network: IPNetwork
    length: int
    first: IPNetwork
    last: IPNetwork

    @property
    def step(self) -> int:
        return 1 << (self.network.max_prefixlen - self.length)

    @property
    def capacity(self) -> int:
        return (int(self.last.network_address) - int(self.first.network_address)) // self.step + 1

    def nth(self, index: int) -> IPNetwork:
        """The index-th subnet from `first` (0 is `first`)."""
        start = int(self.first.network_address) + index * self.step
        return type(self.network)((start, self.length))

    def index(self, subnet: IPNetwork) -> int | None:
        """Where `subnet` sits from `first`, or None when it is not one of this range's."""
        offset = int(subnet.network_address) - int(self.first.network_address)
        if (subnet.version != self.network.version or subnet.prefixlen != self.length
                or offset < 0 or offset % self.step or offset // self.step >= self.capacity):
            return None
        return offset // self.step


class NetworkConfig(BaseModel):
    """The cluster network: one address range split into one subnet per host, or two in
    dual stack (`ipv6`: the IPv6 half; `network` and its Subnet* fields are the IPv4 half).
    With `"EnableIPv4": false` the IPv6 fields are moved into `network` and its Subnet*
    fields at validation, so the code below reads one shape for every single-family config.
    """

    model_config = _MODEL
    network: IPNetwork = Field(alias="Network")
    subnet_len: Annotated[int, Field(ge=0, le=128)] | None = Field(default=None, alias="SubnetLen")
    subnet_min: IPAddress | None = Field(default=None, alias="SubnetMin")
    subnet_max: IPAddress | None = Field(default=None, alias="SubnetMax")
    # Strict: flannel's are JSON booleans; "yes" or 1 is a mistake to name, not a guess.
    enable_ipv4: Annotated[bool, Field(strict=True)] | None = Field(default=None,
                                                                    alias="EnableIPv4")
    enable_ipv6: Annotated[bool, Field(strict=True)] | None = Field(default=None,
                                                                    alias="EnableIPv6")
    ipv6_network: IPNetwork | None = Field(default=None, alias="IPv6Network")
    ipv6_subnet_len: Annotated[int, Field(ge=0, le=128)] | None = Field(
        default=None, alias="IPv6SubnetLen")
    ipv6_subnet_min: IPAddress | None = Field(default=None, alias="IPv6SubnetMin")
    ipv6_subnet_max: IPAddress | None = Field(default=None, alias="IPv6SubnetMax")
    # SerializeAsAny: serialise the concrete options model, not just the base's fields.
    backend: SerializeAsAny[BackendOptions] = Field(
        default_factory=dict, alias="Backend", validate_default=True
    )

    @model_validator(mode="before")
    @classmethod
    def _families(cls, data: Any) -> Any:
        """flannel's family switches: which of Network and IPv6Network must be there. An
        IPv6-only config (`EnableIPv4` false) is validated under the IPv6 names and then
        read through `network`, as `"Network": "<IPv6 range>"` always was."""
        if not isinstance(data, dict):
            return data
        v4, v6 = data.get("EnableIPv4", True), data.get("EnableIPv6", False)
        if not isinstance(v4, bool) or not isinstance(v6, bool):
            return data  # the field's own validator names the bad value
        problems: list[str] = []
        ipv6_fields = [k for k in _IPV6_FIELDS if k in data]
        if not v4 and not v6:
            problems.append("EnableIPv4: false with EnableIPv6 not true leaves no network; "
                            'set "EnableIPv6": true and IPv6Network, or drop EnableIPv4')
        elif not v6:
            problems.extend(
                f"{k}: set but EnableIPv6 is not true; add \"EnableIPv6\": true for dual "
                f"stack (got {data[k]!r})" for k in ipv6_fields)
        else:
            if "IPv6Network" not in data:
                problems.append('IPv6Network: required when EnableIPv6 is true, e.g. '
                                '"2001:db8:1::/48"')
            if v4 and "Network" not in data:
                problems.append('Network: required when EnableIPv4 is true (the default), '
                                'e.g. "10.244.0.0/16"; or set "EnableIPv4": false')
            if not v4:
                problems.extend(
                    f"{k}: not used when EnableIPv4 is false; the IPv6 range goes in "
                    f"IPv6{k} (got {data[k]!r})"
                    for k in _IPV4_FIELDS if k in data)
        if problems:
            raise ValueError("; ".join(problems))
        if not v4:
            # A stand-in for the required field; `_subnets_fit` puts IPv6Network there.
            data = {**data, "Network": "::/0"}
        return data

    @field_validator("network", "ipv6_network", mode="before")
    @classmethod
    def _strict_network(cls, value: Any) -> Any:
        # "10.244.1.0/16" has host bits set: almost always a typo, so refuse it.
        if isinstance(value, str):
            try:
                return ipaddress.ip_network(value, strict=True)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("subnet_min", "subnet_max", "ipv6_subnet_min", "ipv6_subnet_max",
                     mode="before")
    @classmethod
    def _one_address(cls, value: Any) -> Any:
        # One message for a bad address, not one per family the union tried.
        if isinstance(value, str):
            try:
                return ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_by_type(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, BackendOptions):
            return value
        types = (info.context or {}).get("backend_types")
        if not isinstance(types, BackendTypes):
            raise TypeError("no backend types to validate Backend with: parse with "
                            "weft.backends.registry.parse_config")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"must be an object like {{\"Type\": \"{types.default}\"}}")
        kind = value.get("Type", types.default)
        model = types.models.get(kind) if isinstance(kind, str) else None
        if model is None:
            known = ", ".join(sorted(types.models))
            raise ValueError(f"unknown backend Type {kind!r}; known types: {known}")
        return model.model_validate(value)

    @model_validator(mode="after")
    def _subnets_fit(self) -> NetworkConfig:
        if self.enable_ipv4 is False:
            # IPv6 only, flannel's spelling: checked under the IPv6 names, then read as
            # `network` (`_families` made sure Network and its Subnet* fields are absent).
            assert self.ipv6_network is not None
            _check_range("IPv6", self.ipv6_network, self.ipv6_subnet_len,
                         self.ipv6_subnet_min, self.ipv6_subnet_max, version=6)
            for name in ("network", "subnet_len", "subnet_min", "subnet_max"):
                object.__setattr__(self, name, getattr(self, f"ipv6_{name}"))
        else:
            _check_range("", self.network, self.subnet_len, self.subnet_min, self.subnet_max,
                         version=4 if self.dual_stack else None)
            if self.dual_stack:
                assert self.ipv6_network is not None
                _check_range("IPv6", self.ipv6_network, self.ipv6_subnet_len,
                             self.ipv6_subnet_min, self.ipv6_subnet_max, version=6)
        if self.subnet_len is None:
            object.__setattr__(self, "subnet_len", _default_len(self.network))
        if self.ipv6_network is not None and self.ipv6_subnet_len is None:
            object.__setattr__(self, "ipv6_subnet_len", _default_len(self.ipv6_network))
        return self

    # --- derived facts ------------------------------------------------------------------

    @property
    def dual_stack(self) -> bool:
        """An IPv4 and an IPv6 subnet per host (`EnableIPv6` true, `EnableIPv4` not false)."""
        return bool(self.enable_ipv6) and self.enable_ipv4 is not False

    @property
    def range(self) -> SubnetRange:
        """`network`'s range: the IPv4 half in dual stack, the only one otherwise."""
        return SubnetRange(self.network, self.length, self.first_subnet, self.last_subnet)

    @property
    def ipv6(self) -> SubnetRange | None:
        """The IPv6 half of a dual-stack network (None otherwise)."""
        if not self.dual_stack:
            return None
        assert self.ipv6_network is not None
        assert self.ipv6_subnet_len is not None
        net, length = self.ipv6_network, self.ipv6_subnet_len
        return SubnetRange(net, length, _first(net, length, self.ipv6_subnet_min),
                           _last(net, length, self.ipv6_subnet_max))

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """Every overlay network: `network`, and the IPv6 one in dual stack."""
        six = self.ipv6
        return (self.network,) if six is None else (self.network, six.network)

    @property
    def length(self) -> int:
        assert self.subnet_len is not None  # filled in by validation
        return self.subnet_len

    @property
    def first_subnet(self) -> IPNetwork:
        """SubnetMin, by default the second subnet (the first shares Network's address)."""
        return _first(self.network, self.length, self.subnet_min)

    @property
    def last_subnet(self) -> IPNetwork:
        return _last(self.network, self.length, self.subnet_max)

    @property
    def capacity(self) -> int:
        """How many hosts the network holds: in dual stack, the pairs of an IPv4 and an
        IPv6 subnet (the n-th of each, `weft.core.lease.choose_pair`)."""
        six = self.ipv6
        return self.range.capacity if six is None else min(self.range.capacity, six.capacity)

    def to_json(self) -> str:
        # IPv6 only in flannel's spelling: `network` and its Subnet* fields are copies of
        # the IPv6 ones (see `_subnets_fit`), not what the user wrote.
        exclude = ({"network", "subnet_len", "subnet_min", "subnet_max"}
                   if self.enable_ipv4 is False else set())
        return self.model_dump_json(by_alias=True, exclude_none=True, exclude=exclude)


_IPV4_FIELDS = ("Network", "SubnetLen", "SubnetMin", "SubnetMax")
_IPV6_FIELDS = ("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax")


def _default_len(net: IPNetwork) -> int:
    return max(24 if net.version == 4 else 64, net.prefixlen)


def _first(net: IPNetwork, length: int, given: IPAddress | None) -> IPNetwork:
    if given is not None:
        return ipaddress.ip_network(f"{given}/{length}")
    start = net.network_address + (1 << (net.max_prefixlen - length))
    return ipaddress.ip_network(f"{start}/{length}")


def _last(net: IPNetwork, length: int, given: IPAddress | None) -> IPNetwork:
    if given is not None:
        return ipaddress.ip_network(f"{given}/{length}")
    last = net.broadcast_address - ((1 << (net.max_prefixlen - length)) - 1)
    return ipaddress.ip_network(f"{last}/{length}")


def _check_range(prefix: str, net: IPNetwork, subnet_len: int | None, low: IPAddress | None,
                 high: IPAddress | None, version: int | None) -> None:
    """One family's Network/SubnetLen/SubnetMin/SubnetMax (`prefix` "IPv6" for the IPv6
    fields); `version`: the family the network must be (dual stack), None for either."""
    name = f"{prefix}Network"
    if version is not None and net.version != version:
        hint = ("; the IPv6 range goes in IPv6Network" if version == 4
                else "; the IPv4 range goes in Network")
        raise ValueError(f"{name} {net} must be an IPv{version} network in dual stack{hint}")
    length = subnet_len if subnet_len is not None else _default_len(net)
    field = f"{prefix}SubnetLen"
    if length > net.max_prefixlen:
        raise ValueError(f"{field} {length} is longer than an IPv{net.version} address")
    if length <= net.prefixlen:
        raise ValueError(
            f"{field} {length} must be longer than the {name} prefix "
            f"/{net.prefixlen} of {net}, or there is only one subnet"
        )
    if net.max_prefixlen - length < 2:
        raise ValueError(f"{field} {length} leaves no room for hosts in a subnet")
    for which, addr in (("SubnetMin", low), ("SubnetMax", high)):
        if addr is None:
            continue
        if addr.version != net.version or addr not in net:
            raise ValueError(f"{prefix}{which} {addr} is outside {name} {net}")
        if int(addr) % (1 << (net.max_prefixlen - length)):
            raise ValueError(f"{prefix}{which} {addr} is not the start of a /{length} subnet")
    first, last = _first(net, length, low), _last(net, length, high)
    if int(first.network_address) > int(last.network_address):
        raise ValueError(
            f"{prefix}SubnetMin {first.network_address} is after "
            f"{prefix}SubnetMax {last.network_address}"
        )


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.endswith("Options") or item in {"function-after[_subnets_fit()]",
                                                   "function-before[_families()]"}:
            continue  # pydantic's internal tags, not fields a user wrote
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "config"


SECRET_FIELDS = frozenset({"PSK"})
REDACTED = "<redacted>"


def _redact(value: Any) -> Any:
    """`value` with every secret field's value replaced (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: REDACTED if k in SECRET_FIELDS else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def redact_config(text: str) -> str:
    """The config JSON as weft prints it: secrets (the WireGuard PSK) replaced."""
    try:
        data = untrusted_json.loads(text)  # the store's copy is anyone's: bounded
    except UntrustedJson:
        return text if not any(f in text for f in SECRET_FIELDS) else REDACTED
    return json.dumps(_redact(data), separators=(",", ":"))


def _describe(err: Any) -> str:
    loc = tuple(str(x) if not isinstance(x, int) else x for x in err.get("loc", ()))
    field = _field_path(loc)
    if SECRET_FIELDS & {str(x) for x in loc}:
        err = {**err, "input": REDACTED}  # a secret is never echoed, not even a bad one
    else:
        err = {**err, "input": _redact(err.get("input"))}
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return f"{field}: unknown field (value {err.get('input')!r}); check its spelling"
    if field == "config":
        return msg
    return f"{field}: {msg} (got {err.get('input')!r})"


def parse_config(text: str | bytes, types: BackendTypes) -> NetworkConfig:
    """Parse and validate the JSON network config, or raise ConfigError naming the problem.
    `types`: the backends `Backend` may name (`weft.backends.registry.parse_config` gives
    the registry's)."""
    try:
        data = untrusted_json.loads(text)  # also read back from the store: bounded
    except UntrustedJson as exc:
        raise ConfigError(f"config is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
    if "Network" not in data and not any(k in data for k in ("EnableIPv4", "EnableIPv6")):
        raise ConfigError('Network: required, e.g. "10.244.0.0/16"')
    try:
        return NetworkConfig.model_validate(data, context={"backend_types": types})
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(problems) from None
