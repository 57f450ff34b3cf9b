"""The one log policy for repeated refusals and cuts (pure)."""
import logging

from wse_sync.core.refusals import ThinnedLog


def test_first_then_once_per_interval_with_counts(caplog):
    logger = logging.getLogger("test.refusals")
    thin = ThinnedLog(logger, interval=10.0)
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        assert thin.note("full", "cut %s", "a", now=0.0)
        assert not thin.note("full", "cut %s", "b", now=5.0)
        assert not thin.note("full", "cut %s", "c", now=9.9)
        assert thin.note("other", "refused %s", "x", now=9.9)  # kinds are apart
        assert thin.note("full", "cut %s", "d", now=10.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["cut a (1 since the last line, 1 in all)",
                     "refused x (1 since the last line, 1 in all)",
                     "cut d (3 since the last line, 4 in all)"]
    assert thin.total == {"full": 4, "other": 1}
