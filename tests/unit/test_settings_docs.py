"""The environment-variable registry is documented where operators read it, in step with the code."""

import re
from pathlib import Path

from unclip.runtime import settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "interfaces.md"


def test_documented_settings_table_matches_the_registry():
    text = DOC.read_text()
    match = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", text, re.S)
    assert match, "docs/interfaces.md lost its settings table markers"
    assert match.group(1) == settings.table(), "run `python -m unclip.runtime.settings` and paste the table"


def test_every_setting_has_an_unclip_variable_and_help():
    for setting in settings.SETTINGS.values():
        assert setting.env.startswith("UNCLIP_"), setting
        assert setting.help, setting
