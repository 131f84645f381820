"""The config schemas at their edges: non-finite numbers, wrong shapes, huge values."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.shared.config import schema
from bridge.shared.errors import ConfigError

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


def _load_uplink(tmp_path: Path, endpoints: str) -> list[tuple[str, str | None, str | None,
                                                              int]]:
    from bridge.shared.config import load_agent

    path = tmp_path / "agent.toml"
    path.write_text(BASE.split("[[uplink.endpoints]]", maxsplit=1)[0] + endpoints)
    return [(e.name, e.interface, e.leg, e.priority)
            for e in load_agent(path).uplink.endpoints]


def test_an_endpoint_with_several_legs_becomes_one_endpoint_per_leg_before_the_next_cloud(
        tmp_path: Path) -> None:
    got = _load_uplink(tmp_path, '[[uplink.endpoints]]\nname = "aws"\ntarget = "a:1"\n'
                                 'interface = ["wan0", "lte0"]\n'
                                 '[[uplink.endpoints]]\nname = "azure"\ntarget = "b:1"\n'
                                 'interface = "wan0"\n')
    assert got == [("aws/wan0", "wan0", "wan0", 0), ("aws/lte0", "lte0", "lte0", 0),
                   ("azure", "wan0", "wan0", 1)]


def test_vlan_legs_are_named_by_their_id(tmp_path: Path) -> None:
    got = _load_uplink(tmp_path, '[[uplink.endpoints]]\nname = "aws"\ntarget = "a:1"\n'
                                 'vlan = [200, 310]\n')
    assert got == [("aws/vlan200", None, "vlan200", 0), ("aws/vlan310", None, "vlan310", 0)]


@pytest.mark.parametrize(("legs", "message"), [
    ('interface = []', "an empty list binds to nothing"),
    ('interface = ["wan0", "wan0"]', "leg 'wan0' is listed twice"),
    ('vlan = [200, 4095]', "must be <= 4094"),
    ('interface = ["wan0"]\nvlan = 200', "give either interface or vlan, not both"),
])
def test_bad_legs_are_one_clear_error(tmp_path: Path, legs: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load_uplink(tmp_path, f'[[uplink.endpoints]]\nname = "aws"\ntarget = "a:1"\n{legs}\n')


def test_a_slash_in_an_endpoint_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'/' separates an endpoint from its leg"):
        _load_uplink(tmp_path, '[[uplink.endpoints]]\nname = "a/b"\ntarget = "a:1"\n')
