"""governor.yamlnode: the one reader of line-aware YAML (config, rules, domains, simulator)."""
from __future__ import annotations

from pathlib import Path

import pytest

from governor.classify import RuleError, load_rules
from governor.sim.settings import Settings, SettingsError
from governor.yamlnode import YamlError, load, parse


class _MyError(YamlError):
    pass


def _problems(text: str, **mapping_args: object) -> list[str]:
    root, problems = parse(text, "f.yaml")
    root.mapping(**mapping_args)  # type: ignore[arg-type]
    return [str(p) for p in problems.items]


def test_required_keys_are_reported_once_at_the_mapping() -> None:
    assert _problems("a: 1\n", allowed=["a", "b"], required=["a", "b"]) == ["f.yaml:1: b: missing key"]
    # a misspelling of a required key is one problem, not two
    assert _problems("\nbb_x: 1\n", allowed=["bb_y"], required=["bb_y"]) == [
        'f.yaml:2: bb_x: unknown key (did you mean "bb_y"?)']
    assert _problems("- 1\n", required=["a"]) == ["f.yaml:1: expected a mapping with keys a, got a list"]
    assert _problems("", required=["a"]) == ["f.yaml:1: expected a mapping with keys a, got nothing (null)"]
    assert _problems("") == []


def test_merge_keys_expand_and_own_keys_override() -> None:
    root, problems = parse("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\n  z: 4\n  z: 5\n", "f.yaml")
    m = root.mapping()["m"].mapping(["x", "y", "z"])
    assert {k: v.raw() for k, v in m.items()} == {"x": 1, "y": 3, "z": 5}
    assert m["x"].line == 1 and m["y"].line == 4
    assert [str(p) for p in problems.items] == ["f.yaml:6: m.z: duplicate key"]
    with pytest.raises(YamlError, match=r"^f\.yaml:2: m\.<<: expected a mapping \(or a list of mappings\)"):
        parse("m:\n  <<: 3\n", "f.yaml")


def test_values_yaml_cannot_build_are_errors_of_the_callers_class() -> None:
    with pytest.raises(_MyError, match=r"^f\.yaml:2: a\.d: invalid value: month must be in 1\.\.12"):
        parse("a:\n  d: 2024-13-45\n", "f.yaml", error=_MyError)
    with pytest.raises(_MyError, match=r"^f\.yaml:1: t: invalid value: could not determine a constructor"):
        parse("t: !nope x\n", "f.yaml", error=_MyError)
    with pytest.raises(_MyError, match=r"^f\.yaml:2: YAML syntax error"):
        parse("a: [1,\n", "f.yaml", error=_MyError)
    root, problems = parse("a: x\n", "f.yaml", error=_MyError)
    root.fail("bad")
    with pytest.raises(_MyError, match=r"^f\.yaml:1: bad$"):
        problems.raise_if_any()


def test_load_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(_MyError, match=r"^gone\.yaml:1: cannot read: file not found$"):
        load(tmp_path / "gone.yaml", "gone.yaml", error=_MyError)
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(YamlError, match=rf"^{bad}:1: cannot read: "):
        load(bad)


def test_error_classes_keep_plain_messages() -> None:
    assert str(RuleError("'X1': class: bad")) == "'X1': class: bad" and RuleError("m").problems == []
    assert issubclass(RuleError, ValueError) and issubclass(SettingsError, ValueError)


def test_rule_table_lists_every_problem() -> None:
    rule = "  - {{code: {code}, class: {cls}, scope: ip, permanent: null, match: x, meaning: m}}\n"
    with pytest.raises(RuleError) as info:
        load_rules("rules:\n" + rule.format(code="A_1", cls="rates") + rule.format(code="'A 2'", cls="rate"))
    assert [str(p).split(": ")[:2] for p in info.value.problems] == [
        ["replies.yaml:2", "rules[0].class"], ["replies.yaml:3", "rules[1].code"]]


def test_simulator_settings_list_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("max_conn: 0\ncold_ips: [nope]\nmax_rate: 7\n")
    with pytest.raises(SettingsError) as info:
        Settings.from_yaml(path)
    assert str(info.value).splitlines() == [
        f"{path}:1: max_conn: must be >= 1, got 0",
        f"{path}:2: cold_ips: not an IP address: 'nope'",
    ]
    path.write_text("base: &b {max_conn: 3}\n")
    with pytest.raises(SettingsError, match=r"sim\.yaml:1: base: unknown setting 'base'"):
        Settings.from_yaml(path)
