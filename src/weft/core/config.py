"""The network config: flannel-compatible JSON validated into typed objects.

    {"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}

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


class NetworkConfig(BaseModel):
    """The cluster network: one address range split into one subnet per host."""

    model_config = _MODEL
    network: IPNetwork = Field(alias="Network")
    subnet_len: Annotated[int, Field(ge=0, le=128)] | None = Field(default=None, alias="SubnetLen")
    subnet_min: IPAddress | None = Field(default=None, alias="SubnetMin")
    subnet_max: IPAddress | None = Field(default=None, alias="SubnetMax")
    # SerializeAsAny: serialise the concrete options model, not just the base's fields.
    backend: SerializeAsAny[BackendOptions] = Field(
        default_factory=dict, alias="Backend", validate_default=True
    )

    @field_validator("network", mode="before")
    @classmethod
    def _strict_network(cls, value: Any) -> Any:
        # "10.244.1.0/16" has host bits set: almost always a typo, so refuse it.
        if isinstance(value, str):
            try:
                return ipaddress.ip_network(value, strict=True)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
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
        net = self.network
        default_len = 24 if net.version == 4 else 64
        length = self.subnet_len if self.subnet_len is not None else max(default_len, net.prefixlen)
        if self.subnet_len is None:
            object.__setattr__(self, "subnet_len", length)
        if length > net.max_prefixlen:
            raise ValueError(f"SubnetLen {length} is longer than an IPv{net.version} address")
        if length <= net.prefixlen:
            raise ValueError(
                f"SubnetLen {length} must be longer than the Network prefix "
                f"/{net.prefixlen} of {net}, or there is only one subnet"
            )
        if net.max_prefixlen - length < 2:
            raise ValueError(f"SubnetLen {length} leaves no room for hosts in a subnet")
        for name, addr in (("SubnetMin", self.subnet_min), ("SubnetMax", self.subnet_max)):
            if addr is None:
                continue
            if addr.version != net.version or addr not in net:
                raise ValueError(f"{name} {addr} is outside Network {net}")
            if int(addr) % (1 << (net.max_prefixlen - length)):
                raise ValueError(f"{name} {addr} is not the start of a /{length} subnet")
        if int(self.first_subnet.network_address) > int(self.last_subnet.network_address):
            raise ValueError(
                f"SubnetMin {self.first_subnet.network_address} is after "
                f"SubnetMax {self.last_subnet.network_address}"
            )
        return self

    # --- derived facts ------------------------------------------------------------------

    @property
    def length(self) -> int:
        assert self.subnet_len is not None  # filled in by validation
        return self.subnet_len

    @property
    def first_subnet(self) -> IPNetwork:
        """SubnetMin, by default the second subnet (the first shares Network's address)."""
        if self.subnet_min is not None:
            return ipaddress.ip_network(f"{self.subnet_min}/{self.length}")
        step = 1 << (self.network.max_prefixlen - self.length)
        start = self.network.network_address + step
        return ipaddress.ip_network(f"{start}/{self.length}")

    @property
    def last_subnet(self) -> IPNetwork:
        if self.subnet_max is not None:
            return ipaddress.ip_network(f"{self.subnet_max}/{self.length}")
        step = 1 << (self.network.max_prefixlen - self.length)
        last = self.network.broadcast_address - (step - 1)
        return ipaddress.ip_network(f"{last}/{self.length}")

    @property
    def capacity(self) -> int:
        """How many host subnets the network holds."""
        step = 1 << (self.network.max_prefixlen - self.length)
        first = int(self.first_subnet.network_address)
        last = int(self.last_subnet.network_address)
        return (last - first) // step + 1

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.endswith("Options") or item in {"function-after[_subnets_fit()]"}:
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
    if "Network" not in data:
        raise ConfigError('Network: required, e.g. "10.244.0.0/16"')
    try:
        return NetworkConfig.model_validate(data, context={"backend_types": types})
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(problems) from None
