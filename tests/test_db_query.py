"""
The API query language: parsing, compilation to parameterised SQL over the whitelist, and
refusal (SYS.1007) of everything else, injection attempts included.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.query import (
    OPERATORS,
    RESOURCES,
    Condition,
    Query,
    compile_query,
    ip_to_long,
    parse_condition,
    query_from_params,
    resource,
)


class ParseTests(SynchronousTestCase):
    """
    C{q=} condition strings.
    """

    def test_operators(self) -> None:
        """
        Every operator of ZStack's language parses, longest operator first.
        """
        cases = {
            "state=Running": Condition("state", "=", "Running"),
            "state!=Running": Condition("state", "!=", "Running"),
            "cpuNum>2": Condition("cpuNum", ">", "2"),
            "cpuNum>=2": Condition("cpuNum", ">=", "2"),
            "cpuNum<2": Condition("cpuNum", "<", "2"),
            "cpuNum<=2": Condition("cpuNum", "<=", "2"),
            "uuid?=a,b": Condition("uuid", "?=", ["a", "b"]),
            "uuid!?=a,b": Condition("uuid", "!?=", ["a", "b"]),
            "name~=vm-%": Condition("name", "~=", "vm-%"),
            "name!~=vm-%": Condition("name", "!~=", "vm-%"),
            "hostUuid is null": Condition("hostUuid", "is null"),
            "hostUuid not null": Condition("hostUuid", "not null"),
            "name=a=b": Condition("name", "=", "a=b"),
            "name=": Condition("name", "=", ""),
        }
        for text, want in cases.items():
            self.assertEqual(parse_condition(text), want, text)
        self.assertEqual(len(OPERATORS), 12)

    def test_malformed(self) -> None:
        """
        Text that is not a condition is SYS.1007.
        """
        for text in ["", "=x", "name", "name is nul", "1name=x", "na me=x", "name==", 3]:
            if text == "name==":
                # "name" "=" "=": a value that is "=", which is legal.
                continue
            with self.assertRaises(OperationError) as c:
                parse_condition(text)
            self.assertEqual(c.exception.error.code, SYS.INVALID_ARGUMENT_ERROR)


class CompileTests(SynchronousTestCase):
    """
    Compilation to SQL.
    """

    def bad(self, res: str, q: Query) -> None:
        with self.assertRaises(OperationError) as c:
            compile_query(res, q)
        self.assertEqual(c.exception.error.code, SYS.INVALID_ARGUMENT_ERROR)

    def test_parameterised(self) -> None:
        """
        Columns come from the whitelist, values are parameters, sort and paging are
        explicit.
        """
        cq = compile_query("vmInstance", Query(
            conditions=["state?=Running,Stopped", "hostUuid not null", "cpuNum>=2",
                        Condition("name", "~=", "web%")],
            sort="-createDate", limit=10, start=20, fields=["uuid", "name"]))
        self.assertEqual(
            cq.select,
            "SELECT uuid, name FROM vm_instances WHERE state IN (?, ?) AND host_uuid IS NOT NULL"
            " AND cpu_num >= ? AND name LIKE ? ESCAPE '\\' ORDER BY create_date DESC NULLS LAST, uuid ASC"
            " LIMIT ? OFFSET ?")
        self.assertEqual(cq.select_params, ("Running", "Stopped", 2, "web%", 10, 20))
        self.assertIsNone(cq.count)
        self.assertEqual(cq.names, ("uuid", "name"))

    def test_count(self) -> None:
        """
        count=true compiles to a COUNT only; replyWithCount to both.
        """
        cq = compile_query("zone", Query(count=True, conditions=["state=Enabled"]))
        self.assertIsNone(cq.select)
        self.assertEqual(cq.count, "SELECT COUNT(*) FROM zones WHERE state = ?")
        cq = compile_query("zone", Query(reply_with_count=True))
        self.assertIsNotNone(cq.select)
        self.assertEqual(cq.count, "SELECT COUNT(*) FROM zones")

    def test_refused(self) -> None:
        """
        Unknown resources, fields, operators, dotted paths, bad types, bad paging and
        malformed sorts are all SYS.1007.
        """
        self.bad("nope", Query())
        self.bad("zone", Query(conditions=["bogus=1"]))
        self.bad("vmInstance", Query(conditions=["vmNics.ip=10.0.0.1"]))
        self.bad("zone", Query(conditions=[Condition("name", "===", "x")]))
        self.bad("zone", Query(conditions=[Condition("name", "=", None)]))
        self.bad("host", Query(conditions=["cpuNum=many"]))
        self.bad("host", Query(conditions=["cpuNum~=1%"]))
        self.bad("host", Query(conditions=["uuid?="]))
        self.bad("job", Query(conditions=["result=1"]))
        self.bad("zone", Query(limit=-1))
        self.bad("zone", Query(limit=10**9))
        self.bad("zone", Query(start="x"))
        self.bad("zone", Query(limit=True))
        self.bad("zone", Query(sort=""))
        self.bad("zone", Query(sort="--name"))
        self.bad("zone", Query(fields=[]))
        self.bad("zone", Query(conditions=[object()]))
        self.bad("zone", "state=Enabled")

    def test_injection(self) -> None:
        """
        Classic injection strings never reach the SQL text: as names they are refused, as
        values they are parameters.
        """
        for name in ["name;DROP TABLE zones", "name OR 1", "name)--", "name/*", "`name`",
                     "\"name\"", "name UNION SELECT password FROM accounts"]:
            self.bad("zone", Query(conditions=[Condition(name, "=", "x")]))
            self.bad("zone", Query(sort=name))
            self.bad("zone", Query(fields=[name]))
        evil = "x' OR '1'='1'; DROP TABLE zones; --"
        cq = compile_query("zone", Query(conditions=[f"name={evil}", f"uuid?={evil},y"]))
        self.assertNotIn("DROP", cq.select)
        self.assertNotIn("'", cq.select)
        self.assertIn(evil, cq.select_params)

    @given(st.text(max_size=40), st.sampled_from(OPERATORS))
    def test_any_value_is_a_parameter(self, value: str, op: str) -> None:
        """
        Whatever the value text, it never appears in the SQL: the statement is made of
        whitelisted columns, keywords and placeholders only.
        """
        cond = Condition("name", op, [value] if "?" in op else
                         (None if " " in op else value))
        try:
            cq = compile_query("zone", Query(conditions=[cond]))
        except OperationError as e:
            # Refused at the edge (a control character, an unpaired LIKE escape): never SQL.
            self.assertEqual((e.error.code, e.error.opaque["field"]),
                             (SYS.INVALID_ARGUMENT_ERROR, "name"))
            return
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_ ,()?*<>=")
        # The one literal: LIKE's escape character, the same on both backends.
        self.assertTrue(set(cq.select.replace(" ESCAPE '\\'", "")) <= allowed, cq.select)

    @given(st.text(min_size=1, max_size=30))
    def test_unknown_names_refused(self, name: str) -> None:
        """
        Any field name outside the whitelist is refused with SYS.1007, never compiled.
        """
        if name in RESOURCES["zone"].fields:
            return
        self.bad("zone", Query(conditions=[Condition(name, "=", "x")]))
        self.bad("zone", Query(sort=name if name[0] not in "+-" else "x" + name))


class CatalogueTests(SynchronousTestCase):
    """
    The resource catalogue.
    """

    def test_every_resource(self) -> None:
        """
        Every resource of the design is there, with a uuid and snake_case columns.
        """
        for name in ["zone", "cluster", "host", "primaryStorage", "backupStorage", "image",
                     "imageBackupStorageRef", "instanceOffering", "l2Network", "l3Network",
                     "ipRange", "usedIp", "vmInstance", "volume", "vmNic", "account", "user",
                     "session", "managementNode", "job"]:
            res = resource(name)
            self.assertIn("uuid", res.fields)
            for f in res.fields.values():
                self.assertEqual(f.column, f.column.lower())
        self.assertEqual(resource("vmInstance").field("defaultL3NetworkUuid").column,
                         "default_l3_network_uuid")

    def test_ip_to_long(self) -> None:
        """
        Dotted IPv4 to integer; anything else is SYS.1007.
        """
        self.assertEqual(ip_to_long("10.0.0.1"), 0x0A000001)
        for bad in ["10.0.0", "::1", "x", None]:
            self.assertRaises(OperationError, ip_to_long, bad)


class FromParamsTests(SynchronousTestCase):
    """
    REST query parameters to a L{Query}.
    """

    def test_params(self) -> None:
        """
        q (repeated), limit, start, count, replyWithCount, sort and fields are read as the
        REST API sends them; a form-decoded '+' (a space) in sort means ascending.
        """
        q = query_from_params({"q": ["state=Running", "cpuNum>1"], "limit": "5", "start": ["2"],
                               "replyWithCount": "true", "sort": " createDate",
                               "fields": "uuid,name"})
        self.assertEqual(q.conditions, (Condition("state", "=", "Running"),
                                        Condition("cpuNum", ">", "1")))
        self.assertEqual((q.limit, q.start, q.count, q.reply_with_count, q.sort, q.fields),
                         (5, 2, False, True, "+createDate", ("uuid", "name")))
        self.assertEqual(query_from_params({"condition": "name=x", "count": "true"}).count, True)
        self.assertEqual(query_from_params({}), Query())

    def test_bad_params(self) -> None:
        """
        Unknown parameters, repeated single values and bad flags are SYS.1007.
        """
        for params in [{"evil": "1"}, {"limit": ["1", "2"]}, {"count": "yes"},
                       {"limit": "x"}, {"q": "bad"}]:
            with self.assertRaises(OperationError) as c:
                query_from_params(params)
            self.assertEqual(c.exception.error.code, SYS.INVALID_ARGUMENT_ERROR)
