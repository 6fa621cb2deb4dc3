"""Topic patterns: parse errors, subscription filters, matching a received topic, building one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ingest.topics import LEVEL_CHARS, PLACEHOLDERS, TopicPattern

CONTRACT = "openegiz/{site}/{type}/{equipment_id}/{feature}/telemetry"
LEGACY = "sensors/{site}/{device_id}/telemetry"


# ------------------------------------------------------------------ parse


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "must not be empty"),
        ("/openegiz/{site}/{equipment_id}", "start/end with '/'"),
        ("openegiz/{site}/{equipment_id}/", "start/end with '/'"),
        ("openegiz//{equipment_id}", "must be a literal or one placeholder"),
        ("openegiz/+/{equipment_id}", "must be a literal or one placeholder"),
        ("openegiz/{equipment_id}/#", "must be a literal or one placeholder"),
        ("openegiz/x{site}/{equipment_id}", "must be a literal or one placeholder"),
        ("openegiz/{site}x/{equipment_id}", "must be a literal or one placeholder"),
        ("openegiz/{site}{line}/{equipment_id}", "unknown placeholder"),
        ("openegiz/{machine}/{equipment_id}", "unknown placeholder {machine}"),
        ("openegiz/{}/{equipment_id}", "unknown placeholder {}"),
        ("openegiz/{site}/{site}/{equipment_id}", "placeholder {site} appears twice"),
    ],
)
def test_parse_rejects_bad_patterns_with_a_reason(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        TopicPattern.parse(pattern)
    assert message in str(exc.value)


def test_unknown_placeholder_error_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as exc:
        TopicPattern.parse("a/{machine}")
    for name in PLACEHOLDERS:
        assert name in str(exc.value)


def test_required_placeholders_are_enforced() -> None:
    with pytest.raises(ValueError, match=r"needs \{equipment_id\}"):
        TopicPattern.parse("openegiz/{site}/{feature}/telemetry", required={"equipment_id"})
    with pytest.raises(ValueError, match=r"needs \{feature\}, \{site\}"):
        TopicPattern.parse("openegiz/{equipment_id}/telemetry", required={"site", "feature", "equipment_id"})


def test_device_id_satisfies_a_required_equipment_id() -> None:
    p = TopicPattern.parse(LEGACY, required={"equipment_id"})
    assert p.captures == ((1, "site"), (2, "device_id"))


def test_parse_records_levels_and_captures() -> None:
    p = TopicPattern.parse(CONTRACT, required={"equipment_id", "feature"})
    assert p.pattern == CONTRACT
    assert p.levels == ("openegiz", "{site}", "{type}", "{equipment_id}", "{feature}", "telemetry")
    assert p.captures == ((1, "site"), (2, "type"), (3, "equipment_id"), (4, "feature"))


def test_a_pattern_of_literals_only_is_allowed() -> None:
    p = TopicPattern.parse("plant/status")
    assert p.subscription == "plant/status"
    assert p.match("plant/status") == {}
    assert p.match("plant/other") is None


# ------------------------------------------------------------------ subscription


def test_subscription_turns_placeholders_into_single_level_wildcards() -> None:
    assert TopicPattern.parse(CONTRACT).subscription == "openegiz/+/+/+/+/telemetry"
    assert TopicPattern.parse(LEGACY).subscription == "sensors/+/+/telemetry"


def test_subscription_for_pins_given_placeholders_only() -> None:
    p = TopicPattern.parse(CONTRACT)
    assert p.subscription_for(site="izmir-bakery") == "openegiz/izmir-bakery/+/+/+/telemetry"
    assert p.subscription_for(site="izmir-bakery", type="oven") == "openegiz/izmir-bakery/oven/+/+/telemetry"
    # a name the pattern does not use (the gateway always passes its line) changes nothing
    assert p.subscription_for(line="line-a") == "openegiz/+/+/+/+/telemetry"


# ------------------------------------------------------------------ match


def test_match_captures_each_placeholder() -> None:
    p = TopicPattern.parse(CONTRACT)
    assert p.match("openegiz/izmir-bakery/oven/oven-001/thermal/telemetry") == {
        "site": "izmir-bakery", "type": "oven", "equipment_id": "oven-001", "feature": "thermal",
    }
    assert TopicPattern.parse(LEGACY).match("sensors/izmir-bakery/ESP32_a1.v2/telemetry") == {
        "site": "izmir-bakery", "device_id": "ESP32_a1.v2",
    }


@pytest.mark.parametrize(
    "topic",
    [
        "openegiz/izmir-bakery/oven/oven-001/thermal/status",  # wrong literal at the end
        "other/izmir-bakery/oven/oven-001/thermal/telemetry",  # wrong literal at the start
        "openegiz/izmir-bakery/oven/oven-001/telemetry",  # one level short
        "openegiz/izmir-bakery/oven/oven-001/thermal/x/telemetry",  # one level too many
        "openegiz/izmir-bakery/oven/oven-001/thermal/telemetry/",  # trailing empty level
        "openegiz/izmir-bakery/oven//thermal/telemetry",  # empty placeholder level
        "openegiz/izmir-bakery/oven/oven 001/thermal/telemetry",  # space
        "openegiz/izmir-bakery/oven/oven+001/thermal/telemetry",  # wildcard character
        "openegiz/izmir-bakery/oven/oven#001/thermal/telemetry",
        "openegiz/izmir-bakery/oven/f\u0131r\u0131n-001/thermal/telemetry",  # non-ASCII
        "openegiz/izmir-bakery/oven/oven:001/thermal/telemetry",
        "openegiz/izmir-bakery/oven/" + "x" * 65 + "/thermal/telemetry",  # over 64 characters
        "",
    ],
)
def test_match_returns_none_for_topics_that_do_not_fit(topic: str) -> None:
    assert TopicPattern.parse(CONTRACT).match(topic) is None


def test_match_accepts_a_level_of_exactly_64_characters() -> None:
    eq = "x" * 64
    assert TopicPattern.parse(CONTRACT).match(f"openegiz/s/oven/{eq}/thermal/telemetry") == {
        "site": "s", "type": "oven", "equipment_id": eq, "feature": "thermal",
    }


def test_command_ack_pattern_is_the_command_pattern_plus_ack() -> None:
    cmd = TopicPattern.parse("openegiz/{site}/{type}/{equipment_id}/cmd")
    ack = TopicPattern.parse(cmd.pattern + "/ack")
    topic = cmd.build(site="s", type="oven", equipment_id="oven-001")
    assert cmd.match(topic) is not None
    assert ack.match(topic) is None
    assert ack.match(topic + "/ack") == {"site": "s", "type": "oven", "equipment_id": "oven-001"}


# ------------------------------------------------------------------ build


def test_build_fills_every_placeholder() -> None:
    p = TopicPattern.parse("openegiz/{site}/{type}/{equipment_id}/cmd")
    assert p.build(site="izmir-bakery", type="oven", equipment_id="oven-001") == (
        "openegiz/izmir-bakery/oven/oven-001/cmd"
    )


def test_build_ignores_extra_values_and_needs_every_placeholder() -> None:
    p = TopicPattern.parse(LEGACY)
    assert p.build(site="s", device_id="esp-1", equipment_id="oven-001", line="a") == "sensors/s/esp-1/telemetry"
    with pytest.raises(KeyError):
        p.build(site="s")


# ------------------------------------------------------------------ properties

LEVEL = st.text(alphabet=sorted(LEVEL_CHARS), min_size=1, max_size=64)
LITERAL = st.text(alphabet=sorted(LEVEL_CHARS), min_size=1, max_size=12)


@st.composite
def patterns(draw: st.DrawFn) -> TopicPattern:
    names = draw(st.lists(st.sampled_from(sorted(PLACEHOLDERS)), unique=True, max_size=len(PLACEHOLDERS)))
    levels = [f"{{{n}}}" for n in names] + draw(st.lists(LITERAL, max_size=4))
    levels = draw(st.permutations(levels)) if levels else ["root"]
    return TopicPattern.parse("/".join(levels))


@settings(max_examples=100, deadline=None)
@given(patterns(), st.data())
def test_match_of_build_gives_back_the_values(pattern: TopicPattern, data: st.DataObject) -> None:
    values = {name: data.draw(LEVEL, label=name) for _, name in pattern.captures}
    topic = pattern.build(**values)
    assert pattern.match(topic) == values


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_match_never_raises_and_only_captures_valid_levels(topic: str) -> None:
    result = TopicPattern.parse(CONTRACT).match(topic)
    if result is not None:
        assert set(result) == {"site", "type", "equipment_id", "feature"}
        for value in result.values():
            assert 1 <= len(value) <= 64
            assert LEVEL_CHARS.issuperset(value)
