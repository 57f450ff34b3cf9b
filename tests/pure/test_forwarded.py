"""Who the client is (pure): X-Forwarded-For believed only from trusted proxies."""
import pytest

from wse_sync.core.forwarded import client_address, parse_trusted

LOOPBACK = parse_trusted(("127.0.0.1", "::1"))


def test_an_untrusted_peer_is_the_client_whatever_it_claims():
    assert client_address("198.51.100.4", "203.0.113.7", LOOPBACK) == "198.51.100.4"
    assert client_address("198.51.100.4", None, LOOPBACK) == "198.51.100.4"


def test_a_trusted_proxy_gives_the_right_most_untrusted_hop():
    assert client_address("127.0.0.1", "203.0.113.7", LOOPBACK) == "203.0.113.7"
    # the client prepended a lie; the proxy appended what it saw
    assert client_address("127.0.0.1", "1.2.3.4, 203.0.113.7", LOOPBACK) == "203.0.113.7"
    trusted = parse_trusted("127.0.0.1,10.0.0.0/8")
    assert client_address("127.0.0.1", "203.0.113.7, 10.1.2.3", trusted) == "203.0.113.7"
    assert client_address("::1", "2001:db8::5", LOOPBACK) == "2001:db8::5"
    assert client_address("::ffff:127.0.0.1", "203.0.113.9", LOOPBACK) == "203.0.113.9"


def test_only_trusted_hops_gives_the_left_most_and_empty_header_the_peer():
    assert client_address("127.0.0.1", "127.0.0.1", LOOPBACK) == "127.0.0.1"
    assert client_address("127.0.0.1", " , ", LOOPBACK) == "127.0.0.1"
    assert client_address("127.0.0.1", "", LOOPBACK) == "127.0.0.1"


def test_star_trusts_everyone_and_none_trusts_nobody():
    assert client_address("198.51.100.4", "203.0.113.7", parse_trusted("*")) == "203.0.113.7"
    assert client_address("127.0.0.1", "203.0.113.7", parse_trusted(None)) == "127.0.0.1"
    assert client_address("127.0.0.1", "203.0.113.7", parse_trusted("")) == "127.0.0.1"


def test_a_bad_entry_is_named():
    with pytest.raises(ValueError, match="'not-an-ip'"):
        parse_trusted("127.0.0.1, not-an-ip")


def test_a_peer_that_is_not_an_ip_is_not_trusted():
    assert client_address("unix-socket", "203.0.113.7", LOOPBACK) == "unix-socket"
