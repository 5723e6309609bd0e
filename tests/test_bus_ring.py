"""
The consistent-hash ring of management nodes: pure and synchronous.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from zcontrol.bus.ring import ConsistentHashRing

KEYS = [f"resource-{i}" for i in range(3000)]

node_names = st.lists(
    st.text(alphabet="abcdef0123456789", min_size=4, max_size=12), min_size=2, max_size=8,
    unique=True)


def owners(ring: ConsistentHashRing) -> dict[str, str]:
    return {k: ring.owner(k) for k in KEYS}


class RingTests(SynchronousTestCase):
    """
    Ownership moves as little as possible when membership changes.
    """

    @given(nodes=node_names, data=st.data())
    def test_add_moves_only_to_new_node(self, nodes, data):
        """
        Adding one node to N moves about 1/(N+1) of the keys, all of them to the new node.
        """
        new = data.draw(st.text(alphabet="ghijk", min_size=3, max_size=8))
        ring = ConsistentHashRing(nodes)
        before = owners(ring)
        ring.add(new)
        after = owners(ring)
        moved = [k for k in KEYS if before[k] != after[k]]
        self.assertTrue(all(after[k] == new for k in moved))
        self.assertEqual(set(moved), {k for k in KEYS if after[k] == new})
        share = len(moved) / len(KEYS)
        expected = 1 / (len(nodes) + 1)
        self.assertTrue(0.5 * expected <= share <= 1.5 * expected, (share, expected))

    @given(nodes=node_names, data=st.data())
    def test_remove_moves_only_from_that_node(self, nodes, data):
        """
        Removing one of N nodes moves exactly its keys (about 1/N), and no others.
        """
        gone = data.draw(st.sampled_from(nodes))
        ring = ConsistentHashRing(nodes)
        before = owners(ring)
        ring.remove(gone)
        after = owners(ring)
        moved = {k for k in KEYS if before[k] != after[k]}
        self.assertEqual(moved, {k for k in KEYS if before[k] == gone})
        self.assertNotIn(gone, set(after.values()))
        share = len(moved) / len(KEYS)
        expected = 1 / len(nodes)
        self.assertTrue(0.5 * expected <= share <= 1.5 * expected, (share, expected))

    @given(nodes=node_names)
    def test_order_independent(self, nodes):
        """
        Every node computes the same ring whatever order it learnt the members in.
        """
        a = ConsistentHashRing(nodes)
        b = ConsistentHashRing()
        for n in reversed(nodes):
            b.add(n)
        self.assertEqual(owners(a), owners(b))

    def test_empty_and_set_nodes(self):
        """
        An empty ring owns nothing; set_nodes replaces the membership.
        """
        ring = ConsistentHashRing()
        self.assertIsNone(ring.owner("x"))
        ring.set_nodes(["a", "b"])
        self.assertEqual(ring.nodes, frozenset({"a", "b"}))
        self.assertIn(ring.owner("x"), {"a", "b"})
        self.assertFalse(ring.add("a"))
        self.assertFalse(ring.remove("zz"))
