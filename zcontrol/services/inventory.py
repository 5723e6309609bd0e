# -*- test-case-name: tests.test_services_base -*-
"""
ZStack-style inventories and the generic query.

A resource's inventory is its store row (camelCase API fields, L{zcontrol.db.query}) plus
the lists ZStack's inventory class carries that live in other tables (a primary storage's
C{attachedClusterUuids}, an L3 network's C{ipRanges}, C{dns}, C{networkServices}). The
service that owns a resource registers an L{InventoryBuilder} for it; L{inventories} applies
it to a page of rows with one batched store query per list (never one per row).

L{QueryService} answers L{QueryInventoryMsg} (ZStack's C{APIQueryXxxMsg}, one message for
every resource) on every node: the store query language (conditions, sort, paging, count,
fields), then the builder.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, ClassVar

import attrs

from zcontrol.bus.message import NeedReplyMessage, Reply, registry
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.query import MAX_LIMIT, Query, compile_query, parse_condition, resource
from zcontrol.services import validate
from zcontrol.services.base import Service, handles

__all__ = [
    "SERVICE_ID",
    "InventoryBuilder",
    "QueryInventoryMsg",
    "QueryInventoryReply",
    "QueryService",
    "builder_for",
    "inventories",
    "inventory",
    "register_inventory",
]

#: The bus service id of the query service (served on every node; sent locally).
SERVICE_ID = "query"

#: (store, rows) -> the rows with their list fields added, in the same order.
Expand = Callable[[Any, list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]


@attrs.frozen
class InventoryBuilder:
    """
    How to build a resource's inventories from its rows.

    @ivar resource: the store resource name (C{"primaryStorage"}).
    @ivar extra_fields: the list fields it adds (C{("attachedClusterUuids",)}); a query may
        name them in C{fields}.
    @ivar expand: C{async (store, rows) -> rows}, adding C{extra_fields} to each row with
        batched queries (e.g. one C{primaryStorageUuid?=a,b,c} query for the page).
    """

    resource: str
    extra_fields: tuple[str, ...]
    expand: Expand


_BUILDERS: dict[str, InventoryBuilder] = {}


def register_inventory(resource: str, extra_fields: tuple[str, ...]) -> Callable[[Expand], Expand]:
    """
    Decorate the C{expand} function of C{resource}'s inventory (see L{InventoryBuilder}).
    """

    def register(fn: Expand) -> Expand:
        _BUILDERS[resource] = InventoryBuilder(resource, tuple(extra_fields), fn)
        return fn

    return register


def builder_for(resource: str) -> InventoryBuilder | None:
    """
    The registered builder of C{resource}, or None (its inventory is its row).
    """
    return _BUILDERS.get(resource)


async def inventories(store: Any, resource: str, rows: list[dict[str, Any]]
                      ) -> list[dict[str, Any]]:
    """
    The inventories of C{rows} (rows of C{resource}, full or not), in order.
    """
    builder = _BUILDERS.get(resource)
    if builder is None or not rows:
        return [dict(r) for r in rows]
    return await builder.expand(store, [dict(r) for r in rows])


async def inventory(store: Any, resource: str, uuid: str) -> dict[str, Any] | None:
    """
    The inventory of one resource, or None when there is no such row.
    """
    row = await store.get(resource, uuid)
    if row is None:
        return None
    return (await inventories(store, resource, [row]))[0]


@registry.register
@attrs.define(kw_only=True)
class QueryInventoryReply(Reply):
    """
    C{inventories} (empty for a count-only query) and C{total} (when C{count} or
    C{reply_with_count} was asked, else None).
    """

    inventories: list[dict[str, Any]] = attrs.field(factory=list)
    total: int | None = None


@registry.register
@attrs.define(kw_only=True)
class QueryInventoryMsg(NeedReplyMessage):
    """
    Query one resource with the store's query language (ZStack's C{APIQueryXxxMsg}).

    @ivar resource: the resource name (C{"zone"}, C{"primaryStorage"}, C{"l3Network"}).
    @ivar conditions: condition strings (C{"state=Enabled"}, C{"uuid?=a,b"}), ANDed.
    @ivar fields: only these fields (None: all, the list fields included).

    Fails with C{SYS.1007} naming the message field (C{resource}, C{conditions[i]},
    C{conditions}, C{sort}, C{fields}, C{limit}, C{start}, C{count}, C{replyWithCount})
    for anything outside the language or the resource's whitelist; the resource's field at
    fault, if any, is C{queryField}.
    """

    reply_type: ClassVar[type[Reply]] = QueryInventoryReply

    resource: str
    conditions: list[str] = attrs.field(factory=list)
    limit: int = 1000
    start: int = 0
    count: bool = False
    reply_with_count: bool = False
    sort: str | None = None
    fields: list[str] | None = None


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise validate.invalid(field, value, "must be true or false")
    return value


def _as_field(field: str, fn: Callable[..., Any], *args: Any) -> Any:
    """
    C{fn(*args)}, its C{SYS.1007} naming the message field C{field} (the query language's
    own C{field}, a field of the resource, moves to C{queryField}).
    """
    try:
        return fn(*args)
    except OperationError as e:
        if e.error.code != SYS.INVALID_ARGUMENT_ERROR:
            raise
        opaque = dict(e.error.opaque)
        inner = opaque.pop("field", None)
        opaque["queryField"] = inner if isinstance(inner, str) else None
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"{field}: {e.error.details}",
                                field=field, **opaque) from None


class QueryService(Service):
    """
    Answers L{QueryInventoryMsg} from the store on the node that receives it.
    """

    service_id = SERVICE_ID

    @handles(QueryInventoryMsg)
    async def query(self, msg: QueryInventoryMsg) -> QueryInventoryReply:
        res = resource(msg.resource)
        builder = _BUILDERS.get(res.name)
        extra = set(builder.extra_fields) if builder is not None else set()
        fields = msg.fields
        wanted_extra: set[str] = set(extra)
        if fields is not None:
            if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
                raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                        "fields must be a list of field names", field="fields")
            wanted_extra = extra & set(fields)
            fields = [f for f in fields if f not in extra]
            if wanted_extra and "uuid" not in fields:
                fields = [*fields, "uuid"]
        if not isinstance(msg.conditions, list):
            raise validate.invalid("conditions", msg.conditions, "must be a list of conditions")
        conditions = [_as_field(f"conditions[{i}]", parse_condition, c)
                      for i, c in enumerate(msg.conditions)]
        query = Query(
            conditions=conditions, sort=msg.sort,
            limit=validate.integer(msg.limit, "limit", 0, MAX_LIMIT),
            start=validate.integer(msg.start, "start", 0, 2**62),
            count=_flag(msg.count, "count"),
            reply_with_count=_flag(msg.reply_with_count, "replyWithCount"), fields=fields)
        # each part compiled alone (no store call) so that a refusal names the message
        # field, the query's own check naming the resource's field (queryField)
        _as_field("conditions", compile_query, res, Query(conditions=conditions))
        _as_field("sort", compile_query, res, Query(sort=query.sort))
        _as_field("fields", compile_query, res, Query(fields=fields))
        result = await self.store.query(res.name, query)
        rows = result.inventories
        if builder is not None and wanted_extra and rows:
            rows = await builder.expand(self.store, [dict(r) for r in rows])
            drop = extra - wanted_extra
            uuid_asked = msg.fields is None or "uuid" in msg.fields
            for r in rows:
                for name in drop:
                    r.pop(name, None)
                if not uuid_asked:
                    r.pop("uuid", None)
        return QueryInventoryReply(inventories=rows, total=result.total)


def make(node: Any) -> QueryService:
    """
    The query service of C{node}.
    """
    return QueryService(node.reactor, node.bus, node.store)
