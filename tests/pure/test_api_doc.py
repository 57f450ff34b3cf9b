"""docs/api.md cannot go stale silently: every public name of wse_sync and
every WseServer option (the keys of DEFAULTS) is documented there."""
import os
import re

import wse_sync
from helpers import ROOT
from wse_sync.worker.server import DEFAULTS

API_DOC = os.path.join(ROOT, "docs", "api.md")


def doc() -> str:
    with open(API_DOC, encoding="utf-8") as f:
        return f.read()


def test_every_public_name_is_in_the_api_reference():
    text = doc()
    # in a heading, or in code (`Name`, `Name(...)`)
    missing = [name for name in wse_sync.__all__
               if not re.search(rf"(^#+ .*\b{name}\b)|(`{name}\b)", text, flags=re.M)]
    assert not missing, f"docs/api.md does not document {missing}"


def test_every_option_is_a_row_of_the_options_table():
    text = doc()
    options = text[text.index("\n## Options\n"):]
    options = options[:options.index("\n## ", 1)]
    rows = set(re.findall(r"^\| `(\w+)` \|", options, flags=re.M))
    missing = sorted(set(DEFAULTS) - rows)
    assert not missing, f"options without a row in docs/api.md's Options table: {missing}"
    stale = sorted(rows - set(DEFAULTS))
    assert not stale, f"docs/api.md documents options WseServer does not have: {stale}"


def test_the_readme_links_the_api_reference():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "(docs/api.md)" in f.read()
