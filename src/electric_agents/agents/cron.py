"""Cron expressions, timezones and cron stream paths (spec/02 §4.12, spec/03 §5.7).

Parsing follows the reference's `cron-parser`: five fields (minute hour day-of-month month
day-of-week) or six with a leading seconds field; `*` and `?`, lists, ranges, steps
(`*/n`, `a-b/n`, `a/n`), month and weekday names, weekday 7 = Sunday, `L` (last day of the
month), `<weekday>L` (last such weekday of the month), `<weekday>#<n>` (n-th such weekday)
and the `@yearly`-style shorthands. When both day fields are restricted a day matches
either of them (the classic cron rule, which cron-parser keeps).

Next fire times are computed on the wall clock of the schedule's timezone (zoneinfo): a
local time skipped by a DST jump does not fire that day; a local time repeated by a DST
fall-back fires once, except when the hour field is `*`, where both passes fire (an
"every 15 minutes" schedule keeps its pace through the repeated hour).
"""

from __future__ import annotations

import base64
import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import orjson

from electric_agents.agents.cron_zones import ICU_ZONE_NAMES
from electric_agents.errors import ApiError

CRON_STREAM_PREFIX = "/_cron/"
DEFAULT_TIMEZONE = "UTC"

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_SHORTHANDS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# A schedule with no fire time in this many years never fires (`0 0 30 2 *`): invalid.
_SEARCH_YEARS = 8


@dataclass(frozen=True)
class _Field:
    values: frozenset[int]
    wildcard: bool


@dataclass(frozen=True)
class CronExpression:
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    last_day: bool  # `L` in day-of-month
    nth_weekdays: frozenset[tuple[int, int]]  # (weekday, n); n = -1 for `<weekday>L`
    days_wildcard: bool
    weekdays_wildcard: bool
    hours_wildcard: bool

    def day_matches(self, year: int, month: int, day: int) -> bool:
        last = calendar.monthrange(year, month)[1]
        in_days = day in self.days or (self.last_day and day == last)
        weekday = (calendar.weekday(year, month, day) + 1) % 7
        in_weekdays = weekday in self.weekdays or any(
            wd == weekday and (n == (day - 1) // 7 + 1 or (n == -1 and day + 7 > last))
            for wd, n in self.nth_weekdays
        )
        if self.days_wildcard and self.weekdays_wildcard:
            return True
        if self.days_wildcard:
            return in_weekdays
        if self.weekdays_wildcard:
            return in_days
        return in_days or in_weekdays


def invalid_expression(expression: str) -> ApiError:
    # The reference surfaces this as a 500 (spec/02 §9 quirk 2); bad input is a 400 here.
    return ApiError(400, "INVALID_REQUEST", f'Invalid cron expression: "{expression}"')


def invalid_timezone(timezone: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", f'Invalid cron timezone: "{timezone}"')


def parse_cron(expression: str) -> CronExpression:
    """A parsed expression, or a 400 `Invalid cron expression` ApiError."""
    try:
        return _parse(expression)
    except ValueError:
        raise invalid_expression(expression) from None


def _parse(expression: str) -> CronExpression:
    text = expression.strip()
    text = _SHORTHANDS.get(text.lower(), text)
    parts = text.split()
    if len(parts) == 5:
        parts = ["0", *parts]
    if len(parts) != 6:
        raise ValueError("a cron expression has five or six fields")
    second, minute, hour, day, month, weekday = parts
    last_day = False
    day_items = []
    for item in day.split(","):
        if item.upper() == "L":
            last_day = True
        else:
            day_items.append(item)
    weekday_items = []
    nth: set[tuple[int, int]] = set()
    for item in weekday.split(","):
        lowered = item.lower()
        if "#" in lowered:
            name, _, count = lowered.partition("#")
            n = int(count)
            if not 1 <= n <= 5:
                raise ValueError("weekday occurrence out of range")
            nth.add((_single(name, 0, 7, _WEEKDAYS) % 7, n))
        elif lowered.endswith("l") and len(lowered) > 1:
            nth.add((_single(lowered[:-1], 0, 7, _WEEKDAYS) % 7, -1))
        else:
            weekday_items.append(item)
    days = _values(",".join(day_items), 1, 31) if day_items else _Field(frozenset(), False)
    weekdays = (
        _values(",".join(weekday_items), 0, 7, _WEEKDAYS)
        if weekday_items
        else _Field(frozenset(), False)
    )
    hours = _values(hour, 0, 23)
    parsed = CronExpression(
        seconds=_values(second, 0, 59).values,
        minutes=_values(minute, 0, 59).values,
        hours=hours.values,
        days=days.values,
        months=_values(month, 1, 12, _MONTHS, offset=1).values,
        weekdays=frozenset(v % 7 for v in weekdays.values),
        last_day=last_day,
        nth_weekdays=frozenset(nth),
        days_wildcard=days.wildcard and not last_day,
        weekdays_wildcard=weekdays.wildcard and not nth,
        hours_wildcard=hours.wildcard,
    )
    return parsed


def _single(
    token: str, low: int, high: int, names: list[str] | None = None, offset: int = 0
) -> int:
    token = token.strip().lower()
    if names is not None and token in names:
        return names.index(token) + offset
    if not token.isdigit():
        raise ValueError(f"bad value {token!r}")
    value = int(token)
    if not low <= value <= high:
        raise ValueError(f"value {value} out of range")
    return value


def _values(
    field: str, low: int, high: int, names: list[str] | None = None, offset: int = 0
) -> _Field:
    values: set[int] = set()
    wildcard = False
    for item in field.split(","):
        if not item:
            raise ValueError("empty list item")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            step = _single(step_text, 1, high - low + 1 if high > low else 1)
        if base in ("*", "?"):
            start, end = low, high
            wildcard = wildcard or not slash
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _single(first, low, high, names, offset)
            end = _single(last, low, high, names, offset)
            if start > end:
                raise ValueError("range runs backwards")
        else:
            start = _single(base, low, high, names, offset)
            end = high if slash else start
        values.update(range(start, end + 1, step))
    return _Field(frozenset(values), wildcard)


def canonical_timezone(timezone: str | None) -> str:
    """Node's canonical spelling of an IANA timezone (default `UTC`), or a 400."""
    if timezone is None:
        return DEFAULT_TIMEZONE
    spelled = _zones_by_lowercase().get(timezone.lower())
    if spelled is None:
        raise invalid_timezone(timezone)
    canonical = ICU_ZONE_NAMES.get(spelled, spelled)
    if canonical is None:
        raise invalid_timezone(timezone)
    return canonical


@cache
def _zones_by_lowercase() -> dict[str, str]:
    # Node matches names case-insensitively (`america/new_york`).
    return {name.lower(): name for name in available_timezones()}


@cache
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise invalid_timezone(name) from None


def next_fire_at(expression: CronExpression, timezone: str, after: datetime) -> datetime | None:
    """The first fire time strictly after `after` (aware), in UTC; None if there is none
    within the search horizon."""
    zone = _zone(timezone)
    after_utc = after.astimezone(UTC)
    local_after = after_utc.astimezone(zone).replace(tzinfo=None, microsecond=0)
    # A wall clock runs back at a DST fall-back, so a later instant can show an earlier
    # local time: look back by the coming drop (zero almost always) and keep the earliest
    # instant found within it.
    offset_now = after_utc.astimezone(zone).utcoffset() or timedelta(0)
    offset_soon = (after_utc + timedelta(hours=3)).astimezone(zone).utcoffset() or timedelta(0)
    lookback = max(timedelta(0), offset_now - offset_soon)
    candidate = local_after - lookback
    horizon = local_after.replace(year=local_after.year + _SEARCH_YEARS, month=1, day=1)
    best: datetime | None = None
    stop_at: datetime | None = None
    while candidate <= horizon and (stop_at is None or candidate <= stop_at):
        found = _next_local_match(expression, candidate, horizon)
        if found is None:
            break
        for instant in _instants(expression, found, zone):
            if instant > after_utc and (best is None or instant < best):
                best = instant
                stop_at = found + lookback
        candidate = found + timedelta(seconds=1)
    return best


def _instants(expression: CronExpression, local: datetime, zone: ZoneInfo) -> list[datetime]:
    """The UTC instants at which a wall-clock time occurs: none in a DST gap, two in a
    repeated hour (the second only for an hour-wildcard schedule)."""
    first = local.replace(tzinfo=zone, fold=0)
    second = local.replace(tzinfo=zone, fold=1)
    result = []
    for aware in (first, second):
        utc = aware.astimezone(UTC)
        if utc.astimezone(zone).replace(tzinfo=None) == local and utc not in result:
            result.append(utc)
    if len(result) == 2 and not expression.hours_wildcard:
        result = result[:1]
    return result


def _next_local_match(
    expression: CronExpression, start: datetime, horizon: datetime
) -> datetime | None:
    """The first naive wall-clock time at or after `start` matching every field."""
    moment = start
    while moment <= horizon:
        if moment.month not in expression.months:
            year, month = (
                (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
            )
            moment = datetime(year, month, 1)
            continue
        if not expression.day_matches(moment.year, moment.month, moment.day):
            moment = datetime(moment.year, moment.month, moment.day) + timedelta(days=1)
            continue
        if moment.hour not in expression.hours:
            moment = moment.replace(minute=0, second=0) + timedelta(hours=1)
            continue
        if moment.minute not in expression.minutes:
            moment = moment.replace(second=0) + timedelta(minutes=1)
            continue
        if moment.second not in expression.seconds:
            moment += timedelta(seconds=1)
            continue
        return moment
    return None


def validate_schedule(expression: str, timezone: str | None) -> tuple[str, CronExpression]:
    """resolveCronScheduleSpec: the canonical timezone and the parsed expression; an
    expression that can never fire (`0 0 30 2 *`) is invalid too, as in cron-parser."""
    zone_name = canonical_timezone(timezone)
    parsed = parse_cron(expression)
    if next_fire_at(parsed, zone_name, datetime.now(UTC)) is None:
        raise invalid_expression(expression)
    return zone_name, parsed


def cron_stream_url(expression: str, timezone: str) -> str:
    """`/_cron/<base64url(JSON)>`, no padding, keys in this order and no spaces: the
    runtime computes the same path client-side, so the bytes must match."""
    document = orjson.dumps({"expression": expression, "timezone": timezone})
    encoded = base64.urlsafe_b64encode(document).rstrip(b"=").decode()
    return CRON_STREAM_PREFIX + encoded


def parse_cron_stream_url(url: str) -> tuple[str, str] | None:
    """(expression, timezone) of a cron stream URL, or None when it is not one."""
    if not url.startswith(CRON_STREAM_PREFIX):
        return None
    encoded = url[len(CRON_STREAM_PREFIX) :]
    try:
        document = orjson.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    expression, timezone = document.get("expression"), document.get("timezone")
    if not isinstance(expression, str) or not isinstance(timezone, str):
        return None
    return expression, timezone
