"""The config schemas at their edges: non-finite numbers, wrong shapes, huge values."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import schema
from bridge.errors import ConfigError

BASE = ('site_id = "s"\n[tls]\nca = "a"\ncert = "b"\nkey = "c"\n[spool]\npath = "x"\n'
        '[[sources]]\ntopics = ["#"]\n[uplink]\n[[uplink.endpoints]]\nname = "a"\n'
        'target = "h:1"\n')


def _decode(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    schema.decode(path, schema.AgentFile)


def test_the_base_config_decodes(tmp_path: Path) -> None:
    _decode(tmp_path, BASE)


@pytest.mark.parametrize(("change", "key", "message"), [
    (('path = "x"', 'path = "x"\nmax_age_s = inf'), "spool.max_age_s", "finite"),
    (('path = "x"', 'path = "x"\nmax_age_s = nan'), "spool.max_age_s", "finite"),
    (("[uplink]\n", "[uplink]\ndeadline_s = -inf\n"), "uplink.deadline_s", "finite"),
    (('topics = ["#"]', 'topics = "#"'), "sources[0].topics", "expected a list, got str"),
    (('path = "x"', 'path = "x"\nmax_bytes = 1.5'), "spool.max_bytes",
     "expected an integer, got float"),
    (("[uplink]\n", "[uplink]\nmax_in_flight = 18446744073709551616\n"),
     "uplink.max_in_flight", "must be <= 64"),
    (('site_id = "s"', 'site_id = "   "'), "site_id", "must not be empty"),
])
def test_edge_values_are_one_clear_error_with_the_key_path(
        tmp_path: Path, change: tuple[str, str], key: str, message: str) -> None:
    text = BASE.replace(*change)
    assert text != BASE
    with pytest.raises(ConfigError) as err:
        _decode(tmp_path, text)
    assert err.value.key == key, err.value
    assert message in str(err.value)
