"""make_id: n characters of [A-Za-z0-9], each equally likely."""
import string
from collections import Counter

from wse_sync.core.ids import make_id

ALPHABET = set(string.ascii_letters + string.digits)


def test_ids_have_the_length_asked_and_only_the_alphabet():
    for n in (1, 8, 24, 100, 1000):
        got = make_id(n)
        assert isinstance(got, str) and len(got) == n and set(got) <= ALPHABET


def test_every_character_comes_about_equally_often():
    counts = Counter("".join(make_id(24) for _ in range(10000)))  # 240,000 characters
    assert set(counts) == ALPHABET
    expected = 240000 / 62  # ~3,871; without the rejection 8 of them would be +25 %
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts
