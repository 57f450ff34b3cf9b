"""core.routes: a member's traffic goes to the link that last spoke for it with
its key; an identity cannot be taken by knowing the member's name."""
from wse_sync.core.routes import NONCE_LEN, Routes, link_identity, member_of


def test_a_link_identity_is_the_member_and_a_fresh_nonce():
    a, b = link_identity("w1"), link_identity("w1")
    assert a != b and member_of(a) == member_of(b) == "w1"
    assert len(a) == len("w1#") + NONCE_LEN
    # names with the separator, and identities without a nonce, are their own member
    assert member_of(link_identity("host#3")) == "host#3"
    for raw in ("w1", "w1#short", "w1#" + "!" * NONCE_LEN, "#" + "a" * NONCE_LEN):
        assert member_of(raw) == raw


def test_traffic_follows_the_last_link_of_the_members_key():
    routes = Routes()
    first, second = link_identity("w1"), link_identity("w1")
    assert routes.identity("w1") == "w1"            # nobody spoke yet: the name itself
    assert routes.speaks(first, "K", None) == "w1"  # (the core binds w1 to K next)
    assert routes.identity("w1") == first
    assert routes.speaks(second, "K", "K") == "w1"  # the worker's new socket
    assert routes.identity("w1") == second


def test_another_key_speaking_as_the_member_changes_nothing():
    routes = Routes()
    mine = link_identity("w1")
    routes.speaks(mine, "K", None)
    for intruder in ("w1", link_identity("w1")):
        assert routes.speaks(intruder, "EVIL", "K") is None
        assert routes.identity("w1") == mine
    # without CURVE (ipc) every peer is trusted: there is no key to compare
    other = link_identity("w1")
    assert routes.speaks(other, None, None) == "w1" and routes.identity("w1") == other


def test_raw_identities_route_to_themselves_and_the_table_is_bounded():
    routes = Routes(most=3)
    assert routes.speaks("stats-cli", "K", None) == "stats-cli" and len(routes) == 0
    ids = [link_identity(f"w{i}") for i in range(5)]
    for i in ids:
        routes.speaks(i, "K", None)
    assert len(routes) == 3
    assert routes.identity("w0") == "w0" and routes.identity("w4") == ids[4]
    # members the broker forgot lose their routes (the table follows the core's)
    routes.keep({"w4": 1}, {"w3": 1})
    assert len(routes) == 2 and routes.identity("w2") == "w2"
    assert routes.identity("w3") == ids[3]
