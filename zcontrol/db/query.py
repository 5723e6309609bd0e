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

import importlib.resources
import ipaddress
import json
import math
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


# What a value must be to reach either backend unchanged (Note [edge]).
TEXT_MAX = 65_535
JSON_MAX = 1_048_576
IN_LIST_MAX = 1000
INT_BOUNDS = {32: (-(2**31), 2**31 - 1), 64: (-(2**63), 2**63 - 1)}
# NUL (PostgreSQL cannot store it), lone surrogates (no UTF-8 form), and the other C0/C1
# control characters except tab, newline and carriage return.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(name: str, value: Any, max_length: int | None = TEXT_MAX) -> str:
    """
    C{value} if it is text both backends store unchanged, else C{SYS.1007} naming C{name}:
    a C{str} of at most C{max_length} characters without NUL, lone surrogates or control
    characters other than tab, newline and carriage return.
    """
    if not isinstance(value, str):
        raise _invalid(name, f"field {name!r} expects a str, not {type(value).__name__}")
    if max_length is not None and len(value) > max_length:
        raise _invalid(name, f"field {name!r} is {len(value)} characters long; at most "
                             f"{max_length} are allowed", max_length=max_length)
    m = _FORBIDDEN.search(value)
    if m is not None:
        raise _invalid(name, f"field {name!r} contains the control character or lone "
                             f"surrogate U+{ord(m.group()):04X} at {m.start()}")
    return value


def check_int(name: str, value: Any, lo: int = INT_BOUNDS[64][0], hi: int = INT_BOUNDS[64][1]
              ) -> int:
    """
    C{value} as an int within C{[lo, hi]}, else C{SYS.1007} naming C{name}. Accepts ints
    (not bools), integral floats and decimal strings.
    """
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(type(value).__name__)
        if isinstance(value, str):
            n = int(value.strip(), 10)
        elif isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            n = int(value)
        else:
            n = int(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise _invalid(name, f"field {name!r} expects an integer, not {_short(value)} ({e})"
                       ) from None
    if not lo <= n <= hi:
        raise _invalid(name, f"field {name!r} must be between {lo} and {hi}, not "
                             f"{_short(n)}")
    return n


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not escape
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(name: str, details: str, **opaque: Any) -> OperationError:
    return OperationError.of(SYS.INVALID_ARGUMENT_ERROR, details, field=name, **opaque)


@attrs.frozen
class Field:
    """
    One whitelisted field.

    @ivar name: the API name (camelCase).
    @ivar column: the SQL column (snake_case).
    @ivar type: one of C{"str"}, C{"int"}, C{"float"}, C{"bool"}, C{"json"}.
    @ivar max_length: for C{"str"}, the column's size in characters (C{VARCHAR(n)}), or
        L{TEXT_MAX} for C{TEXT}.
    @ivar bits: for C{"int"}, 32 (C{INTEGER}) or 64 (C{BIGINT}).
    """

    name: str
    column: str
    type: str = "str"
    max_length: int = TEXT_MAX
    bits: int = 64

    def to_db(self, value: Any) -> Any:
        """
        Convert an API value to what the driver stores; C{SYS.1007} naming the field when it
        does not fit the column (type, size, range, characters), so that both backends
        refuse or accept the same values (Note [edge]).
        """
        if value is None:
            return None
        if self.type == "str":
            return check_text(self.name, value, self.max_length)
        if self.type == "int":
            return check_int(self.name, value, *INT_BOUNDS[self.bits])
        try:
            if self.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise TypeError(type(value).__name__)
                f = float(value.strip() if isinstance(value, str) else value)
                if not math.isfinite(f):
                    raise ValueError("not a finite number")
                return f
            if self.type == "bool":
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    return value.lower() == "true"
                raise TypeError(type(value).__name__)
            if self.type == "json":
                text = json.dumps(value, sort_keys=True, allow_nan=False)
                if len(text) > JSON_MAX:
                    raise ValueError(f"{len(text)} characters of JSON; at most {JSON_MAX}")
                return text
        except (TypeError, ValueError, OverflowError, RecursionError) as e:
            raise _invalid(self.name, f"field {self.name!r} expects a {self.type}, not "
                                      f"{_short(value)} ({_short(e)})") from None
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
            return json.loads(value)
        return value


_TYPES = {"": "str", "i": "int", "f": "float", "b": "bool", "j": "json"}


_COLUMN_RE = re.compile(
    r"^\s*(?:ALTER TABLE \w+ ADD COLUMN )?(\w+) (VARCHAR\((\d+)\)|TEXT|INTEGER|BIGINT|BOOLEAN"
    r"|DOUBLE PRECISION)", re.M)


def schema_columns() -> dict[str, dict[str, tuple[str, int | None]]]:
    """
    table -> column -> (SQL type, VARCHAR size or None), read from the common migrations
    (C{CREATE TABLE} and C{ALTER TABLE ... ADD COLUMN}), so that the edge checks follow the
    schema (Note [edge]).
    """
    out: dict[str, dict[str, tuple[str, int | None]]] = {}
    directory = importlib.resources.files("zcontrol.db") / "migrations"
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if not re.match(r"^\d{4}_[a-z0-9_]+\.sql$", entry.name):
            continue
        text = entry.read_text(encoding="utf-8")
        for m in re.finditer(r"CREATE TABLE (\w+) \((.*?)\n\);", text, re.S):
            cols = out.setdefault(m.group(1), {})
            for c in _COLUMN_RE.finditer(m.group(2)):
                cols[c.group(1)] = (c.group(2), int(c.group(3)) if c.group(3) else None)
        for m in re.finditer(r"^ALTER TABLE (\w+) ADD COLUMN (\w+) (VARCHAR\((\d+)\)|\w+)",
                             text, re.M):
            out.setdefault(m.group(1), {})[m.group(2)] = (
                m.group(3), int(m.group(4)) if m.group(4) else None)
    return out


def _parse_fields(table: str, spec: str, columns: Mapping[str, tuple[str, int | None]]
                  ) -> dict[str, Field]:
    out = {}
    for item in spec.split():
        name, _, t = item.partition(":")
        column = _snake(name)
        sql_type, size = columns[column]  # a KeyError here: the catalogue and schema disagree
        out[name] = Field(name=name, column=column, type=_TYPES[t],
                          max_length=size if size is not None else TEXT_MAX,
                          bits=32 if sql_type == "INTEGER" else 64)
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
            raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                    f"field names are strings, not {_short(name)}", field="field")
        f = self.fields.get(name)
        if f is None:
            raise OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR,
                f"{self.name} has no queryable field {_short(name)}",
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
        " availableCapacity:i totalPhysicalCapacity:i availablePhysicalCapacity:i" + _DATES,
    ),
    "localStorageHostRef": (
        "local_storage_host_refs",
        "uuid primaryStorageUuid hostUuid totalCapacity:i availableCapacity:i"
        " totalPhysicalCapacity:i availablePhysicalCapacity:i" + _DATES,
    ),
    "primaryStorageHostRef": (
        "primary_storage_host_refs", "uuid primaryStorageUuid hostUuid status" + _DATES,
    ),
    "imageCache": (
        "image_caches",
        "uuid primaryStorageUuid hostUuid imageUuid installUrl mediaType size:i md5sum status"
        + _DATES,
    ),
    "imageCacheVolumeRef": (
        "image_cache_volume_refs",
        "uuid imageCacheUuid volumeUuid primaryStorageUuid" + _DATES,
    ),
    "primaryStorageClusterRef": (
        "primary_storage_cluster_refs", "uuid primaryStorageUuid clusterUuid" + _DATES,
    ),
    "backupStorage": (
        "backup_storages",
        _COMMON + " url type state status totalCapacity:i availableCapacity:i hostname"
        " username sshPort:i" + _DATES,
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
        "uuid imageUuid backupStorageUuid installPath status size:i lastError" + _DATES,
    ),
    "instanceOffering": (
        "instance_offerings",
        _COMMON + " cpuNum:i cpuSpeed:i memorySize:i allocatorStrategy sortKey:i type state"
        " accountUuid" + _DATES,
    ),
    "diskOffering": (
        "disk_offerings",
        _COMMON + " diskSize:i sortKey:i allocatorStrategy type state accountUuid" + _DATES,
    ),
    "l2Network": (
        "l2_networks", _COMMON + " zoneUuid physicalInterface type vlan:i" + _DATES,
    ),
    "l2NetworkClusterRef": (
        "l2_network_cluster_refs", "uuid l2NetworkUuid clusterUuid" + _DATES,
    ),
    "l3Network": (
        "l3_networks",
        _COMMON + " l2NetworkUuid zoneUuid type category state system:b dnsDomain ipVersion:i"
        " accountUuid" + _DATES,
    ),
    "l3NetworkDns": (
        "l3_network_dns", "uuid l3NetworkUuid dns position:i" + _DATES,
    ),
    "networkServiceL3NetworkRef": (
        "network_service_l3_refs",
        "uuid l3NetworkUuid networkServiceProviderUuid networkServiceType" + _DATES,
    ),
    "ipRange": (
        "ip_ranges",
        _COMMON + " l3NetworkUuid startIp endIp netmask gateway startIpInLong:i endIpInLong:i"
        " networkCidr prefixLen:i ipVersion:i" + _DATES,
    ),
    "usedIp": (
        "used_ips",
        "uuid ipRangeUuid l3NetworkUuid ip ipInLong:i netmask gateway holderType holderUuid"
        + _DATES,
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
    "tag": (
        "tags", "uuid resourceUuid resourceType tag type inherent:b" + _DATES,
    ),
    "job": (
        "jobs",
        "uuid apiName apiMessage:j managementNodeUuid resourceUuid accountUuid state result:j"
        " error:j finishDate:f flows:j rollbackError:j rolledBack:j" + _DATES,
    ),
}

_SCHEMA = schema_columns()
RESOURCES: Mapping[str, Resource] = {
    name: Resource(name=name, table=table, fields=_parse_fields(table, spec, _SCHEMA[table]))
    for name, (table, spec) in _SPECS.items()
}


def resource(name: str) -> Resource:
    """
    The L{Resource} called C{name} (API name such as C{"vmInstance"}), or C{SYS.1007}.
    """
    r = RESOURCES.get(name) if isinstance(name, str) else None
    if r is None:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"unknown resource {_short(name)}",
                                field="resource")
    return r


def ip_to_long(ip: str, field: str = "ip") -> int:
    """
    Dotted IPv4 text -> integer, or C{SYS.1007} naming C{field}.
    """
    if not isinstance(ip, str):
        raise _invalid(field, f"{field} must be an IPv4 address, not {type(ip).__name__}")
    try:
        return int(ipaddress.IPv4Address(ip))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise _invalid(field, f"{field} is not an IPv4 address: {_short(ip)}") from None


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
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                f"a condition is a string, not {_short(text)}", field="conditions")
    m = _COND_RE.match(text.strip())
    if m is None:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                f"malformed query condition {_short(text)}", field="conditions")
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
    if isinstance(conditions, (str, bytes)) or not isinstance(conditions, Iterable):
        raise _bad(f"conditions must be a list, not {_short(conditions)}", field="conditions")
    for c in conditions:
        if isinstance(c, str):
            c = parse_condition(c)
        elif not isinstance(c, Condition):
            raise _bad(f"not a query condition: {_short(c)}", field="conditions")
        if not isinstance(c.name, str) or not isinstance(c.op, str):
            raise _bad(f"not a query condition: {_short(c)}", field="conditions")
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
            if len(values) > IN_LIST_MAX:
                raise _bad(f"operator {c.op!r} takes at most {IN_LIST_MAX} values, not "
                           f"{len(values)}", field=c.name)
            clauses.append(f"{col} {_LIST_OPS[c.op]} ({', '.join('?' for _ in values)})")
            params.extend(f.to_db(v) for v in values)
            continue
        sql_op = _SQL_OPS.get(c.op)
        if sql_op is None:
            raise _bad(f"unknown query operator {_short(c.op)}", field=c.name, operator=c.op)
        if c.value is None:
            raise _bad(f"operator {c.op!r} needs a value; use 'is null'", field=c.name)
        if sql_op.endswith("LIKE"):
            if f.type != "str":
                raise _bad(f"operator {c.op!r} applies to text fields only", field=c.name)
            # One escape character on both backends (PostgreSQL's default, declared for
            # SQLite, which has none): a pattern may not end in an unpaired escape.
            pattern = f.to_db(c.value)
            if (len(pattern) - len(pattern.rstrip("\\"))) % 2:
                raise _bad(f"the pattern of {c.name!r} ends with an unpaired backslash",
                           field=c.name)
            clauses.append(f"{col} {sql_op} ? ESCAPE '\\'")
            params.append(pattern)
            continue
        clauses.append(f"{col} {sql_op} ?")
        params.append(f.to_db(c.value))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    return check_int(name, value, lo, hi)


def compile_query(res: Resource | str, query: Query) -> CompiledQuery:
    """
    Compile C{query} over C{res} into parameterised SQL; C{SYS.1007} on anything outside the
    language or the whitelist.
    """
    if not isinstance(res, Resource):
        res = resource(res)
    if not isinstance(query, Query):
        raise _bad(f"not a query: {_short(query)}", field="query")
    where, params = _where(res, query.conditions)
    limit = _int("limit", query.limit, 0, MAX_LIMIT)
    start = _int("start", query.start, 0, 2**62)

    if query.fields is None:
        names = tuple(res.fields)
    else:
        fields = query.fields
        if isinstance(fields, str):
            fields = fields.split(",")
        if not isinstance(fields, Iterable):
            raise _bad(f"fields must be a list of field names, not {_short(fields)}", field="fields")
        names = tuple(dict.fromkeys(res.field(n).name for n in fields))
        if not names:
            raise _bad("fields must name at least one field", field="fields")

    order = ""
    if query.sort is not None:
        s = query.sort
        if not isinstance(s, str) or not s:
            raise _bad(f"bad sort {_short(s)}", field="sort")
        direction = "ASC"
        if s[0] in "+-":
            direction = "DESC" if s[0] == "-" else "ASC"
            s = s[1:]
        col = res.field(s).column
        if res.field(s).type == "json":
            raise _bad(f"cannot sort by {s!r}", field="sort")
        # NULL sorts lowest on both backends (PostgreSQL's default is the opposite).
        nulls = "NULLS FIRST" if direction == "ASC" else "NULLS LAST"
        order = f" ORDER BY {col} {direction} {nulls}, uuid ASC"
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
    raise _bad(f"{name} must be true or false, not {_short(value)}", field=name)


def _single(name: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise _bad(f"{name} given {len(value)} times", field=name)
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
        raise _bad(f"unknown query parameters: {', '.join(sorted(map(str, unknown)))}",
                   field=sorted(map(str, unknown))[0])
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
            raise _bad(f"bad sort {_short(sort)}", field="sort")
        if sort[:1] == " ":
            sort = "+" + sort.lstrip(" ")
        kw["sort"] = sort
    if "fields" in params:
        fields = params["fields"]
        if isinstance(fields, str):
            fields = [fields]
        kw["fields"] = tuple(f.strip() for item in fields for f in str(item).split(",") if f.strip())
    return Query(**kw)
