"""
ErrorCode: construction from the catalogue, wrapping, JSON round trip, failures.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, TimeoutError, fail
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from zcontrol.core.errors import (
    SYS,
    ErrorCode,
    OperationError,
    describe,
    error_code,
    from_failure,
    register_codes,
)

texts = st.text(max_size=20)
leaf = st.builds(
    ErrorCode,
    code=st.sampled_from([SYS.INTERNAL, SYS.TIMEOUT, "HOST.1000", "X.1"]),
    description=texts,
    details=st.none() | texts,
    opaque=st.dictionaries(st.text(max_size=5), st.integers() | texts, max_size=3),
    location=st.none() | texts,
)
errors = st.recursive(leaf, lambda inner: st.builds(lambda e, c: e.wrap(c), leaf, inner),
                      max_leaves=4)


class ErrorCodeTests(SynchronousTestCase):
    def test_catalogue(self):
        """
        The SYS codes run from 1000 to 1017 and each has a description.
        """
        codes = [getattr(SYS, n) for n in dir(SYS) if not n.startswith("_")]
        self.assertEqual(sorted(codes), [f"SYS.{n}" for n in range(1000, 1018)])
        self.assertEqual(describe(SYS.TIMEOUT), "An operation timeout happened")
        self.assertEqual(describe("NOPE.1"), "Unregistered error code")

    def test_wrap_and_root_cause(self):
        """
        Wrapping keeps the cause chain; root_cause and has_code walk it.
        """
        timeout = error_code(SYS.TIMEOUT, "Message[name: DownloadImageMsg] timeout after 1800")
        err = error_code(SYS.CREATE_RESOURCE_ERROR, "Failed to download image", timeout)
        self.assertEqual(err.root_cause(), timeout)
        self.assertTrue(err.has_code(SYS.TIMEOUT))
        self.assertFalse(err.has_code(SYS.IO_ERROR))
        self.assertEqual([e.code for e in err.chain()], ["SYS.1002", "SYS.1001"])
        self.assertIn("caused by SYS.1001", str(err))

    @given(errors)
    def test_json_round_trip(self, err):
        """
        Any error code survives JSON.
        """
        self.assertEqual(ErrorCode.from_json(err.to_json()), err)

    def test_from_dict_rejects_garbage(self):
        """
        Malformed error data is a ValueError, not a crash elsewhere.
        """
        for bad in ([], {"code": 3}, {"code": "X.1", "details": 5},
                    {"code": "X.1", "cause": "nope"}):
            self.assertRaises(ValueError, ErrorCode.from_dict, bad)

    def test_register_domain(self):
        """
        Domain codes join the catalogue; a conflicting re-registration is refused.
        """
        codes = register_codes("ZTEST", {1000: "Unable to test"})
        self.assertEqual(codes[1000], "ZTEST.1000")
        self.assertEqual(error_code("ZTEST.1000").description, "Unable to test")
        register_codes("ZTEST", {1000: "Unable to test"})
        self.assertRaises(ValueError, register_codes, "ZTEST", {1000: "other"})
        self.assertRaises(ValueError, register_codes, "bad prefix", {1: "x"})

    def test_errbacks_carry_the_code(self):
        """
        An OperationError's ErrorCode comes back out of a failure; other exceptions become
        SYS.1000, cancellations SYS.1017 and Twisted timeouts SYS.1001.
        """
        err = error_code(SYS.OPERATION_ERROR, "nope")
        f = self.failureResultOf(fail(OperationError(err)))
        self.assertIs(from_failure(f), err)
        internal = from_failure(Failure(ValueError("bad")))
        self.assertEqual((internal.code, internal.details), (SYS.INTERNAL, "ValueError: bad"))
        self.assertEqual(from_failure(CancelledError()).code, SYS.CANCEL)
        self.assertEqual(from_failure(TimeoutError()).code, SYS.TIMEOUT)
        self.assertEqual(OperationError.of(SYS.IO_ERROR, "disk").error.details, "disk")
