# -*- test-case-name: tests.test_db_query -*-
"""
The resource catalogue (one whitelist of API fields per table) and the API query language,
compiled to parameterised SQL.

Every resource the store knows is a L{Resource}: its API name (C{"vmInstance"}), its table
(C{"vm_instances"}) and its fields, named as the API names them (ZStack's inventory names,
camelCase: C{"clusterUuid"}, C{"availableCpuCapacity"}), each mapped to a snake_case column
and a type. Rows leave the store as plain dicts keyed by those API names.

The query language is ZStack's (C{shared/ZSTACK_FACTS.md} section 6): conditions C{name<op>value}
with the operators C{=}, C{!=}, C{>}, C{>=}, C{<}, C{<=}, C{?=} (in), C{!?=} (not in), C{~=}
(like), C{!~=} (not like), C{is null} and C{not null}; plus sort, limit, start, count,
replyWithCount and fields. Field names are looked up in the resource's whitelist and values
always travel as parameters, so no text from a client ever becomes SQL. Anything else (an
unknown field, a dotted path, a bad operator, a value of the wrong type) is an
L{OperationError} carrying C{SYS.1007}.

Note [placeholders]: compiled SQL uses C{?} placeholders and never contains a literal C{?} or
C{%}; the PostgreSQL backend rewrites C{?} to psycopg2's C{%s}.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Mapping, Sequence

import attrs

from zcontrol.core.errors import SYS, OperationError

__all__ = [
    "RESOURCES",
    "CompiledQuery",
    "Condition",
    "Field",
    "Query",
    "Resource",
    "compile_query",
    "ip_to_long",
    "parse_condition",
    "query_from_params",
    "resource",
]

MAX_LIMIT = 100_000
DEFAULT_LIMIT = 1000


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", r"_\1", name).lower()


@attrs.frozen
class Field:
    """
    One whitelisted field.

    @ivar name: the API name (camelCase).
    @ivar column: the SQL column (snake_case).
    @ivar type: one of C{"str"}, C{"int"}, C{"float"}, C{"bool"}, C{"json"}.
    """

    name: str
    column: str
    type: str = "str"

    def to_db(self, value: Any) -> Any:
        """
        Convert an API value to what the driver stores; C{SYS.1007} when it does not fit.
        """
        if value is None:
            return None
        try:
            if self.type == "str":
                if not isinstance(value, str):
                    raise TypeError(type(value).__name__)
                return value
            if self.type == "int":
                if isinstance(value, bool):
                    raise TypeError("bool")
                if isinstance(value, str):
                    return int(value.strip(), 10)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                return int(value)
            if self.type == "float":
                if isinstance(value, bool):
                    raise TypeError("bool")
                return float(value)
            if self.type == "bool":
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    return value.lower() == "true"
                raise TypeError(type(value).__name__)
            if self.type == "json":
                import json

                return json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR,
                f"field {self.name!r} expects a {self.type}, not {value!r} ({e})",
                field=self.name,
            ) from None
        raise AssertionError(self.type)  # pragma: no cover

    def from_db(self, value: Any) -> Any:
        """
        Convert a driver value back to the API value.
        """
        if value is None:
            return None
        if self.type == "bool":
            return bool(value)
        if self.type == "int":
            return int(value)
        if self.type == "float":
            return float(value)
        if self.type == "json":
            import json

            return json.loads(value)
        return value


_TYPES = {"": "str", "i": "int", "f": "float", "b": "bool", "j": "json"}


def _parse_fields(spec: str) -> dict[str, Field]:
    out = {}
    for item in spec.split():
        name, _, t = item.partition(":")
        out[name] = Field(name=name, column=_snake(name), type=_TYPES[t])
    return out


@attrs.frozen
class Resource:
    """
    A table and the whitelist of its API fields.

    @ivar name: the API name, e.g. C{"vmInstance"}.
    @ivar table: the SQL table.
    @ivar fields: API name -> L{Field}; C{uuid} is always there and is the primary key.
    """

    name: str
    table: str
    fields: Mapping[str, Field]

    @property
    def has_dates(self) -> bool:
        return "createDate" in self.fields

    def field(self, name: str) -> Field:
        """
        The whitelisted field C{name}, or C{SYS.1007}.
        """
        if not isinstance(name, str):
            raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"field names are strings: {name!r}")
        f = self.fields.get(name)
        if f is None:
            raise OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR,
                f"{self.name} has no queryable field {name!r}",
                resource=self.name,
                field=name,
            )
        return f

    def to_row(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """
        API values -> C{{column: driver value}}, every name checked against the whitelist.
        """
        return {self.field(k).column: self.field(k).to_db(v) for k, v in values.items()}

    def from_row(self, names: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
        """
        A driver row selected in the order of C{names} (API names) -> an API dict.
        """
        return {n: self.fields[n].from_db(v) for n, v in zip(names, row, strict=True)}


_DATES = " createDate:f lastOpDate:f"
_COMMON = "uuid name description"

_SPECS: dict[str, tuple[str, str]] = {
    "zone": ("zones", _COMMON + " type state" + _DATES),
    "cluster": ("clusters", _COMMON + " zoneUuid hypervisorType type state" + _DATES),
    "host": (
        "hosts",
        _COMMON + " zoneUuid clusterUuid managementIp hypervisorType state status cpuNum:i"
        " totalCpuCapacity:i availableCpuCapacity:i totalMemoryCapacity:i"
        " availableMemoryCapacity:i" + _DATES,
    ),
    "primaryStorage": (
        "primary_storages",
        _COMMON + " zoneUuid url type mountPath state status totalCapacity:i"
        " availableCapacity:i" + _DATES,
    ),
    "primaryStorageClusterRef": (
        "primary_storage_cluster_refs", "uuid primaryStorageUuid clusterUuid" + _DATES,
    ),
    "backupStorage": (
        "backup_storages",
        _COMMON + " url type state status totalCapacity:i availableCapacity:i" + _DATES,
    ),
    "backupStorageZoneRef": (
        "backup_storage_zone_refs", "uuid backupStorageUuid zoneUuid" + _DATES,
    ),
    "image": (
        "images",
        _COMMON + " url state status mediaType format platform guestOsType size:i actualSize:i"
        " md5sum system:b accountUuid" + _DATES,
    ),
    "imageBackupStorageRef": (
        "image_backup_storage_refs",
        "uuid imageUuid backupStorageUuid installPath status" + _DATES,
    ),
    "instanceOffering": (
        "instance_offerings",
        _COMMON + " cpuNum:i cpuSpeed:i memorySize:i allocatorStrategy type state accountUuid"
        + _DATES,
    ),
    "l2Network": (
        "l2_networks", _COMMON + " zoneUuid physicalInterface type vlan:i" + _DATES,
    ),
    "l2NetworkClusterRef": (
        "l2_network_cluster_refs", "uuid l2NetworkUuid clusterUuid" + _DATES,
    ),
    "l3Network": (
        "l3_networks",
        _COMMON + " l2NetworkUuid zoneUuid type category state system:b dnsDomain accountUuid"
        + _DATES,
    ),
    "ipRange": (
        "ip_ranges",
        _COMMON + " l3NetworkUuid startIp endIp netmask gateway startIpInLong:i endIpInLong:i"
        + _DATES,
    ),
    "usedIp": (
        "used_ips",
        "uuid ipRangeUuid l3NetworkUuid ip ipInLong:i netmask gateway" + _DATES,
    ),
    "vmInstance": (
        "vm_instances",
        _COMMON + " zoneUuid clusterUuid hostUuid lastHostUuid imageUuid instanceOfferingUuid"
        " rootVolumeUuid defaultL3NetworkUuid type hypervisorType platform allocatorStrategy"
        " cpuNum:i cpuSpeed:i memorySize:i state accountUuid" + _DATES,
    ),
    "volume": (
        "volumes",
        _COMMON + " primaryStorageUuid vmInstanceUuid rootImageUuid diskOfferingUuid"
        " installPath type format size:i actualSize:i deviceId:i state status accountUuid"
        + _DATES,
    ),
    "vmNic": (
        "vm_nics",
        "uuid vmInstanceUuid l3NetworkUuid usedIpUuid ip mac netmask gateway deviceId:i"
        " internalName" + _DATES,
    ),
    "account": ("accounts", _COMMON + " type password" + _DATES),
    "user": ("users", _COMMON + " accountUuid password" + _DATES),
    "session": ("sessions", "uuid accountUuid userUuid expiredDate:f" + _DATES),
    "managementNode": (
        "management_nodes", "uuid hostname port:i state heartbeat:f joinDate:f",
    ),
    "job": (
        "jobs",
        "uuid apiName apiMessage:j managementNodeUuid resourceUuid accountUuid state result:j"
        " error:j finishDate:f" + _DATES,
    ),
}

RESOURCES: Mapping[str, Resource] = {
    name: Resource(name=name, table=table, fields=_parse_fields(spec))
    for name, (table, spec) in _SPECS.items()
}


def resource(name: str) -> Resource:
    """
    The L{Resource} called C{name} (API name such as C{"vmInstance"}), or C{SYS.1007}.
    """
    r = RESOURCES.get(name) if isinstance(name, str) else None
    if r is None:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"unknown resource {name!r}")
    return r


def ip_to_long(ip: str) -> int:
    """
    Dotted IPv4 text -> integer, or C{SYS.1007}.
    """
    try:
        return int(ipaddress.IPv4Address(ip))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"not an IPv4 address: {ip!r}") from None


# The query language ---------------------------------------------------------------------------

_SQL_OPS = {
    "=": "=",
    "!=": "<>",
    ">": ">",
    ">=": ">=",
    "<": "<",
    "<=": "<=",
    "~=": "LIKE",
    "!~=": "NOT LIKE",
}
_LIST_OPS = {"?=": "IN", "!?=": "NOT IN"}
_NULL_OPS = {"is null": "IS NULL", "not null": "IS NOT NULL"}
OPERATORS = tuple(_SQL_OPS) + tuple(_LIST_OPS) + tuple(_NULL_OPS)

# Longest operators first, so that "!?=" is never read as "!" + "?=".
_COND_RE = re.compile(
    r"^(?P<name>[A-Za-z_][A-Za-z0-9_.]*)"
    r"(?:\s+(?P<nullop>is null|not null)\s*$|(?P<op>!\?=|\?=|!~=|~=|!=|>=|<=|=|>|<)(?P<value>.*)$)",
    re.DOTALL,
)


@attrs.frozen
class Condition:
    """
    One query condition: C{name op value}. C{value} is a string (as it came from a URL), a
    typed value, or a list for C{?=}/C{!?=}; None for the null operators.
    """

    name: str
    op: str
    value: Any = None


def parse_condition(text: str) -> Condition:
    """
    Parse one C{q=} condition such as C{"state=Running"}, C{"uuid?=a,b"} or
    C{"hostUuid is null"}; C{SYS.1007} when it is not one.
    """
    if not isinstance(text, str):
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"a condition is a string: {text!r}")
    m = _COND_RE.match(text.strip())
    if m is None:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"malformed query condition {text!r}")
    if m.group("nullop"):
        return Condition(m.group("name"), m.group("nullop"))
    op, value = m.group("op"), m.group("value")
    if op in _LIST_OPS:
        return Condition(m.group("name"), op, value.split(",") if value else [])
    return Condition(m.group("name"), op, value)


@attrs.frozen
class Query:
    """
    An API query over one resource.

    @ivar conditions: L{Condition}s or condition strings, ANDed.
    @ivar sort: a field name with an optional C{+}/C{-} prefix (descending with C{-}), or None.
    @ivar limit: at most this many rows (default 1000).
    @ivar start: skip this many rows first.
    @ivar count: only count the matching rows (ZStack's C{count=true}).
    @ivar reply_with_count: return the rows and the total count.
    @ivar fields: only these fields in each row (None: all).
    """

    conditions: Sequence[Condition | str] = ()
    sort: str | None = None
    limit: int = DEFAULT_LIMIT
    start: int = 0
    count: bool = False
    reply_with_count: bool = False
    fields: Sequence[str] | None = None


@attrs.frozen
class CompiledQuery:
    """
    Parameterised SQL ready for a driver (C{?} placeholders).

    @ivar select: the row query, or None for a count-only query.
    @ivar count: the count query, or None.
    @ivar names: the API names of the selected columns, in order.
    """

    resource: Resource
    select: str | None
    select_params: tuple
    count: str | None
    count_params: tuple
    names: tuple[str, ...]


def _bad(details: str, **opaque: Any) -> OperationError:
    return OperationError.of(SYS.INVALID_ARGUMENT_ERROR, details, **opaque)


def _where(res: Resource, conditions: Iterable[Condition | str]) -> tuple[str, list]:
    clauses: list[str] = []
    params: list[Any] = []
    for c in conditions:
        if isinstance(c, str):
            c = parse_condition(c)
        elif not isinstance(c, Condition):
            raise _bad(f"not a query condition: {c!r}")
        if "." in c.name:
            raise _bad(f"joined (dotted) query fields are not supported: {c.name!r}", field=c.name)
        f = res.field(c.name)
        col = f.column
        if c.op in _NULL_OPS:
            clauses.append(f"{col} {_NULL_OPS[c.op]}")
            continue
        if f.type == "json":
            raise _bad(f"field {c.name!r} only takes 'is null' and 'not null'", field=c.name)
        if c.op in _LIST_OPS:
            values = c.value
            if isinstance(values, str):
                values = values.split(",")
            if not isinstance(values, (list, tuple)) or not values:
                raise _bad(f"operator {c.op!r} needs a non-empty list of values", field=c.name)
            clauses.append(f"{col} {_LIST_OPS[c.op]} ({', '.join('?' for _ in values)})")
            params.extend(f.to_db(v) for v in values)
            continue
        sql_op = _SQL_OPS.get(c.op)
        if sql_op is None:
            raise _bad(f"unknown query operator {c.op!r}", operator=str(c.op))
        if c.value is None:
            raise _bad(f"operator {c.op!r} needs a value; use 'is null'", field=c.name)
        if sql_op.endswith("LIKE") and f.type != "str":
            raise _bad(f"operator {c.op!r} applies to text fields only", field=c.name)
        clauses.append(f"{col} {sql_op} ?")
        params.append(f.to_db(c.value))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise _bad(f"{name} must be an integer, not {value!r}")
    try:
        n = int(value, 10) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise _bad(f"{name} must be an integer, not {value!r}") from None
    if isinstance(value, float) and not value.is_integer():
        raise _bad(f"{name} must be an integer, not {value!r}")
    if not lo <= n <= hi:
        raise _bad(f"{name} must be between {lo} and {hi}, not {n}")
    return n


def compile_query(res: Resource | str, query: Query) -> CompiledQuery:
    """
    Compile C{query} over C{res} into parameterised SQL; C{SYS.1007} on anything outside the
    language or the whitelist.
    """
    if isinstance(res, str):
        res = resource(res)
    if not isinstance(query, Query):
        raise _bad(f"not a query: {query!r}")
    where, params = _where(res, query.conditions)
    limit = _int("limit", query.limit, 0, MAX_LIMIT)
    start = _int("start", query.start, 0, 2**62)

    if query.fields is None:
        names = tuple(res.fields)
    else:
        fields = query.fields
        if isinstance(fields, str):
            fields = fields.split(",")
        names = tuple(dict.fromkeys(res.field(n).name for n in fields))
        if not names:
            raise _bad("fields must name at least one field")

    order = ""
    if query.sort is not None:
        s = query.sort
        if not isinstance(s, str) or not s:
            raise _bad(f"bad sort {s!r}")
        direction = "ASC"
        if s[0] in "+-":
            direction = "DESC" if s[0] == "-" else "ASC"
            s = s[1:]
        col = res.field(s).column
        if res.field(s).type == "json":
            raise _bad(f"cannot sort by {s!r}")
        order = f" ORDER BY {col} {direction}, uuid ASC"
    else:
        order = " ORDER BY uuid ASC"

    count_sql = None
    if query.count or query.reply_with_count:
        count_sql = f"SELECT COUNT(*) FROM {res.table}{where}"
    select_sql = None
    if not query.count:
        cols = ", ".join(res.fields[n].column for n in names)
        select_sql = f"SELECT {cols} FROM {res.table}{where}{order} LIMIT ? OFFSET ?"
    return CompiledQuery(
        resource=res,
        select=select_sql,
        select_params=tuple(params) + (limit, start),
        count=count_sql,
        count_params=tuple(params),
        names=names,
    )


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(f"{name} must be true or false, not {value!r}")


def _single(name: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise _bad(f"{name} given {len(value)} times")
        return value[0]
    return value


def query_from_params(params: Mapping[str, Any]) -> Query:
    """
    A L{Query} from the parameters of a REST query (ZStack's C{GET /v1/<resources>}): C{q}
    (one condition or a list; C{condition} is the older name), C{limit}, C{start},
    C{count}, C{replyWithCount}, C{sort} (C{[+|-]field}; a leading space, which is what a
    form-decoded C{+} becomes, means ascending) and C{fields} (comma-separated). Values
    may be strings or lists of strings (as C{request.args} gives them, decoded). Anything
    else is C{SYS.1007}.
    """
    known = {"q", "condition", "limit", "start", "count", "replyWithCount", "sort", "fields"}
    unknown = set(params) - known
    if unknown:
        raise _bad(f"unknown query parameters: {', '.join(sorted(map(str, unknown)))}")
    conditions: list[Any] = []
    for key in ("q", "condition"):
        value = params.get(key)
        if value is None:
            continue
        conditions.extend(value if isinstance(value, (list, tuple)) else [value])
    kw: dict[str, Any] = {"conditions": tuple(parse_condition(c) for c in conditions)}
    if "limit" in params:
        kw["limit"] = _int("limit", _single("limit", params["limit"]), 0, MAX_LIMIT)
    if "start" in params:
        kw["start"] = _int("start", _single("start", params["start"]), 0, 2**62)
    if "count" in params:
        kw["count"] = _flag("count", _single("count", params["count"]))
    if "replyWithCount" in params:
        kw["reply_with_count"] = _flag("replyWithCount",
                                       _single("replyWithCount", params["replyWithCount"]))
    if "sort" in params:
        sort = _single("sort", params["sort"])
        if not isinstance(sort, str):
            raise _bad(f"bad sort {sort!r}")
        if sort[:1] == " ":
            sort = "+" + sort.lstrip(" ")
        kw["sort"] = sort
    if "fields" in params:
        fields = params["fields"]
        if isinstance(fields, str):
            fields = [fields]
        kw["fields"] = tuple(f.strip() for item in fields for f in str(item).split(",") if f.strip())
    return Query(**kw)
