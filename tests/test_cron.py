"""Cron expressions, timezones and cron stream paths (spec/02 §4.12, spec/03 §5.7), as pure
functions: cron-parser's field syntax, next fire times across DST, Node's timezone names."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import orjson
import pytest

from electric_agents.agents.cron import (
    canonical_timezone,
    cron_stream_url,
    next_fire_at,
    parse_cron,
    parse_cron_stream_url,
    validate_schedule,
)
from electric_agents.errors import ApiError

NEW_YORK = ZoneInfo("America/New_York")


def fires(expression: str, timezone: str, start: datetime, count: int) -> list[datetime]:
    parsed = parse_cron(expression)
    moments = []
    moment = start
    for _ in range(count):
        found = next_fire_at(parsed, timezone, moment)
        assert found is not None
        moments.append(found)
        moment = found
    return moments


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_five_field_expression_fires_on_the_minute_strictly_after_the_start() -> None:
    assert fires("* * * * *", "UTC", utc(2026, 1, 1, 10, 0, 0), 2) == [
        utc(2026, 1, 1, 10, 1),
        utc(2026, 1, 1, 10, 2),
    ]
    assert fires("* * * * *", "UTC", utc(2026, 1, 1, 10, 0, 30), 1) == [utc(2026, 1, 1, 10, 1)]


def test_six_field_expression_has_a_leading_seconds_field() -> None:
    assert fires("*/1 * * * * *", "UTC", utc(2026, 1, 1, 10, 0, 0), 3) == [
        utc(2026, 1, 1, 10, 0, 1),
        utc(2026, 1, 1, 10, 0, 2),
        utc(2026, 1, 1, 10, 0, 3),
    ]
    assert fires("15,45 * * * * *", "UTC", utc(2026, 1, 1, 10, 0, 20), 2) == [
        utc(2026, 1, 1, 10, 0, 45),
        utc(2026, 1, 1, 10, 1, 15),
    ]


def test_ranges_steps_lists_and_names() -> None:
    # Weekdays 9-17 every 30 minutes; 2026-01-02 is a Friday.
    assert fires("*/30 9-17 * * mon-fri", "UTC", utc(2026, 1, 2, 17, 10), 2) == [
        utc(2026, 1, 2, 17, 30),
        utc(2026, 1, 5, 9, 0),
    ]
    assert fires("0 0 1 jan,jul *", "UTC", utc(2026, 2, 1), 2) == [
        utc(2026, 7, 1),
        utc(2027, 1, 1),
    ]
    assert fires("10-50/20 * * * *", "UTC", utc(2026, 1, 1, 0, 0), 3) == [
        utc(2026, 1, 1, 0, 10),
        utc(2026, 1, 1, 0, 30),
        utc(2026, 1, 1, 0, 50),
    ]
    assert fires("5/20 * * * *", "UTC", utc(2026, 1, 1, 0, 0), 3) == [
        utc(2026, 1, 1, 0, 5),
        utc(2026, 1, 1, 0, 25),
        utc(2026, 1, 1, 0, 45),
    ]


def test_weekday_seven_is_sunday_and_both_day_fields_match_either() -> None:
    # 2026-01-04 is a Sunday.
    assert fires("0 12 * * 7", "UTC", utc(2026, 1, 1), 1) == [utc(2026, 1, 4, 12)]
    # The 10th of the month OR any Sunday.
    assert fires("0 0 10 * sun", "UTC", utc(2026, 1, 5), 3) == [
        utc(2026, 1, 10),
        utc(2026, 1, 11),
        utc(2026, 1, 18),
    ]


def test_last_day_nth_weekday_and_shorthands() -> None:
    assert fires("0 0 L * *", "UTC", utc(2026, 2, 1), 2) == [utc(2026, 2, 28), utc(2026, 3, 31)]
    # The second Monday; the last Friday.
    assert fires("0 9 * * mon#2", "UTC", utc(2026, 1, 1), 1) == [utc(2026, 1, 12, 9)]
    assert fires("0 9 * * 5L", "UTC", utc(2026, 1, 1), 1) == [utc(2026, 1, 30, 9)]
    assert fires("@daily", "UTC", utc(2026, 1, 1, 5), 1) == [utc(2026, 1, 2)]
    assert fires("@hourly", "UTC", utc(2026, 1, 1, 5, 1), 1) == [utc(2026, 1, 1, 6)]


def test_wall_clock_schedules_follow_the_timezone() -> None:
    # 09:00 in New York is 14:00 UTC in winter and 13:00 UTC in summer.
    assert fires("0 9 * * *", "America/New_York", utc(2026, 1, 1), 1) == [utc(2026, 1, 1, 14)]
    assert fires("0 9 * * *", "America/New_York", utc(2026, 7, 1), 1) == [utc(2026, 7, 1, 13)]


def test_a_time_skipped_by_spring_forward_does_not_fire_that_day() -> None:
    # 2026-03-08 02:30 does not exist in New York.
    assert fires("30 2 * * *", "America/New_York", utc(2026, 3, 7, 12), 2) == [
        utc(2026, 3, 9, 6, 30),
        utc(2026, 3, 10, 6, 30),
    ]


def test_fall_back_fires_a_fixed_hour_once_and_keeps_an_hourly_pace() -> None:
    # 2026-11-01 01:00-02:00 happens twice in New York.
    once = fires("30 1 * * *", "America/New_York", utc(2026, 10, 31, 12), 2)
    assert once == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    every_half_hour = fires("*/30 * * * *", "America/New_York", utc(2026, 11, 1, 4, 50), 6)
    assert every_half_hour == [
        utc(2026, 11, 1, 5, 0),  # 01:00 EDT
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT
        utc(2026, 11, 1, 6, 0),  # 01:00 EST
        utc(2026, 11, 1, 6, 30),  # 01:30 EST
        utc(2026, 11, 1, 7, 0),  # 02:00 EST
        utc(2026, 11, 1, 7, 30),
    ]
    assert [m.astimezone(NEW_YORK).hour for m in every_half_hour] == [1, 1, 1, 1, 2, 2]
    # From inside the repeated hour, a fixed-hour schedule waits for the next day.
    assert fires("30 1 * * *", "America/New_York", utc(2026, 11, 1, 6, 10), 1) == [
        utc(2026, 11, 2, 6, 30)
    ]


@pytest.mark.parametrize(
    "expression",
    [
        "",
        "* * * *",
        "* * * * * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "*/0 * * * *",
        "5-1 * * * *",
        "a * * * *",
        "1,,2 * * * *",
        "0 0 30 2 *",  # never fires
        "0 9 * * mon#6",
    ],
)
def test_invalid_expressions_are_400(expression: str) -> None:
    with pytest.raises(ApiError) as raised:
        validate_schedule(expression, None)
    assert raised.value.status == 400
    assert raised.value.code == "INVALID_REQUEST"
    assert str(raised.value) == f'Invalid cron expression: "{expression}"'


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (None, "UTC"),
        ("UTC", "UTC"),
        ("utc", "UTC"),
        ("Etc/UTC", "UTC"),
        ("GMT", "UTC"),
        ("Zulu", "UTC"),
        ("america/new_york", "America/New_York"),
        ("US/Eastern", "America/New_York"),
        ("Asia/Calcutta", "Asia/Calcutta"),
        ("Asia/Kolkata", "Asia/Calcutta"),  # ICU keeps the old canonical name
        ("Europe/Kyiv", "Europe/Kiev"),
        ("Europe/Berlin", "Europe/Berlin"),
    ],
)
def test_timezones_are_spelled_as_node_spells_them(given: str | None, canonical: str) -> None:
    assert canonical_timezone(given) == canonical


@pytest.mark.parametrize("timezone", ["Mars/Olympus", "", " UTC", "localtime", "Factory"])
def test_unknown_timezones_are_400(timezone: str) -> None:
    with pytest.raises(ApiError) as raised:
        validate_schedule("* * * * *", timezone)
    assert raised.value.status == 400
    assert str(raised.value) == f'Invalid cron timezone: "{timezone}"'


def test_cron_stream_url_is_unpadded_base64url_of_compact_json_in_key_order() -> None:
    # The bytes Node produces for Buffer.from(JSON.stringify({expression, timezone})).
    url = cron_stream_url("*/5 * * * *", "Europe/Berlin")
    assert (
        url == "/_cron/eyJleHByZXNzaW9uIjoiKi81ICogKiAqICoiLCJ0aW1lem9uZSI6IkV1cm9wZS9CZXJsaW4ifQ"
    )
    assert "=" not in url
    encoded = url.removeprefix("/_cron/")
    document = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    assert document == orjson.dumps({"expression": "*/5 * * * *", "timezone": "Europe/Berlin"})
    assert parse_cron_stream_url(url) == ("*/5 * * * *", "Europe/Berlin")
    assert parse_cron_stream_url("/_cron/!!!") is None
    assert parse_cron_stream_url("/chat/a1") is None
