//! Time zone lookup, lenient parsing of model-written times, and the wording of results.
//!
//! Everything here returns `Result<_, String>` whose error text goes straight back to the
//! model as a tool error, so each message says what to send instead.

use jiff::{
    RoundMode, Span, Timestamp, Unit, Zoned, ZonedRound,
    civil::{Date, DateTime, Time},
    fmt::strtime,
    tz::{self, TimeZone},
};
use serde_json::{Value, json};

/// Examples quoted in error messages, chosen to show the `Area/City` shape.
const ZONE_EXAMPLES: &str = "'Europe/Berlin', 'America/New_York', 'Asia/Tokyo' or 'UTC'";

/// Forms that jiff's ISO 8601 parser rejects but people (and models) write: single-digit
/// fields ("2026-5-3 9:05") and 12-hour clocks ("3:15 pm").
const LOOSE_FORMATS: [&str; 8] = [
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%H:%M:%S",
    "%H:%M",
    "%Y-%m-%d %I:%M %p",
    "%Y-%m-%d %I %p",
    "%I:%M %p",
    "%I %p",
];

/// The device's own zone: `TZ` when the manifest passes it, else `/etc/localtime`.
fn local_zone() -> TimeZone {
    // A sandbox that hides the zone files must not break the tool: the answer stays correct
    // as an instant and names UTC, so the model is not misled about the offset.
    TimeZone::try_system().unwrap_or(TimeZone::UTC)
}

/// Resolves an optional zone argument; absent, blank or "local" means the device's zone.
pub fn zone(name: Option<&str>) -> Result<TimeZone, String> {
    let Some(name) = name
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("local"))
    else {
        return Ok(local_zone());
    };
    if let Ok(tz) = TimeZone::get(name)
        && !tz.is_unknown()
    {
        return Ok(tz);
    }
    // Small models often give just the city ("Tokyo", "new york"); accept it when exactly one
    // zone ends in that city, and otherwise list the candidates so the model can pick.
    let city = name.replace(' ', "_");
    let mut candidates: Vec<String> = tz::db()
        .available()
        .filter(|id| {
            id.as_str()
                .rsplit('/')
                .next()
                .is_some_and(|last| last.eq_ignore_ascii_case(&city))
        })
        .map(|id| id.as_str().to_owned())
        .collect();
    candidates.sort();
    match candidates.as_slice() {
        [only] => {
            TimeZone::get(only).map_err(|e| format!("time zone '{only}' could not be loaded: {e}"))
        }
        [] if tz::db().is_definitively_empty() => Err(format!(
            "unknown time zone '{name}': no time zone database is readable on this device, so only 'UTC' works"
        )),
        [] => Err(format!(
            "unknown time zone '{name}'. Use an IANA time zone name such as {ZONE_EXAMPLES}."
        )),
        several => Err(format!(
            "time zone '{name}' is ambiguous; use one of: {}",
            several
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The current time in `zone`, cut to whole seconds because fractions only add noise for a model.
pub fn now_in(zone: &TimeZone) -> Result<Zoned, String> {
    whole_seconds(Timestamp::now().to_zoned(zone.clone()))
}

fn whole_seconds(z: Zoned) -> Result<Zoned, String> {
    z.round(
        ZonedRound::new()
            .smallest(Unit::Second)
            .mode(RoundMode::Trunc),
    )
    .map_err(|e| format!("could not round the time: {e}"))
}

/// Reads a time the way a model is likely to write it.
///
/// A time that carries an offset or a `[zone]` names an instant and is shown in `zone`; a
/// plain wall-clock time is read as a time in `zone`. Wall-clock times that do not exist or
/// happen twice around a DST change resolve the way clocks do: forward out of a gap, and the
/// earlier of two repeated times.
pub fn parse_moment(text: &str, zone: &TimeZone) -> Result<Zoned, String> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("now") {
        return now_in(zone);
    }
    let at_wall_clock = |dt: DateTime| {
        dt.to_zoned(zone.clone())
            .map_err(|e| format!("the time '{text}' cannot be placed in the zone: {e}"))
    };
    if let Ok(z) = text.parse::<Zoned>() {
        return whole_seconds(z.with_time_zone(zone.clone()));
    }
    if let Ok(ts) = text.parse::<Timestamp>() {
        return whole_seconds(ts.to_zoned(zone.clone()));
    }
    if let Ok(dt) = text.parse::<DateTime>() {
        return whole_seconds(at_wall_clock(dt)?);
    }
    if let Ok(date) = text.parse::<Date>() {
        return at_wall_clock(date.to_datetime(Time::midnight()));
    }
    if let Ok(time) = text.parse::<Time>() {
        return whole_seconds(at_wall_clock(now_in(zone)?.date().to_datetime(time))?);
    }
    for format in LOOSE_FORMATS {
        let Ok(parts) = strtime::parse(format, text) else {
            continue;
        };
        let time = parts
            .to_time()
            .map_err(|e| format!("the time '{text}' is not valid: {e}"))?;
        let date = match parts.to_date() {
            Ok(date) => date,
            Err(_) => now_in(zone)?.date(),
        };
        return at_wall_clock(date.to_datetime(time));
    }
    Err(format!(
        "could not understand the time '{text}'. Write it as 'YYYY-MM-DD HH:MM' (for example \
         '2026-05-12 14:30'), 'HH:MM' for today, 'YYYY-MM-DD' for midnight, or 'now'."
    ))
}

/// Name of the zone a result is shown in.
fn zone_name(z: &Zoned) -> &str {
    // Only a POSIX rule in `TZ` (e.g. "CET-1CEST,M3.5.0,M10.5.0/3") has no IANA name.
    z.time_zone().iana_name().unwrap_or("the local time zone")
}

/// One line a model can quote: weekday, date, time, abbreviation, zone and offset.
pub fn describe(z: &Zoned) -> String {
    format!(
        "{} in {} (UTC{})",
        z.strftime("%A %Y-%m-%d %H:%M:%S %Z"),
        zone_name(z),
        z.strftime("%:z")
    )
}

/// The same facts as [`describe`], split into fields for clients that read structured content.
pub fn moment_json(z: &Zoned) -> Value {
    json!({
        "datetime": z.to_string(),
        "date": z.date().to_string(),
        "time": z.strftime("%H:%M:%S").to_string(),
        "weekday": z.strftime("%A").to_string(),
        "time_zone": zone_name(z),
        "abbreviation": z.strftime("%Z").to_string(),
        "utc_offset": z.strftime("%:z").to_string(),
        "unix_seconds": z.timestamp().as_second(),
    })
}

/// The amounts of an `add_duration` call, in the order they are applied.
pub struct Amounts {
    pub years: i64,
    pub months: i64,
    pub weeks: i64,
    pub days: i64,
    pub hours: i64,
    pub minutes: i64,
    pub seconds: i64,
}

impl Amounts {
    fn units(&self) -> [(i64, &'static str); 7] {
        [
            (self.years, "year"),
            (self.months, "month"),
            (self.weeks, "week"),
            (self.days, "day"),
            (self.hours, "hour"),
            (self.minutes, "minute"),
            (self.seconds, "second"),
        ]
    }

    /// Builds one span; jiff spans carry a single sign, so amounts pointing both ways are
    /// refused rather than silently all made negative.
    pub fn to_span(&self) -> Result<Span, String> {
        let units = self.units();
        if units.iter().all(|(n, _)| *n == 0) {
            return Err(
                "give at least one non-zero amount, for example days: 3 or hours: -2".into(),
            );
        }
        if units.iter().any(|(n, _)| *n > 0) && units.iter().any(|(n, _)| *n < 0) {
            return Err("all amounts must point the same way: use only positive amounts to go forward or \
                        only negative amounts to go back (e.g. instead of days: 1, hours: -2 use hours: 22)"
                .into());
        }
        let range = |e: jiff::Error| format!("an amount is too large: {e}");
        Span::new()
            .try_years(self.years)
            .and_then(|s| s.try_months(self.months))
            .and_then(|s| s.try_weeks(self.weeks))
            .and_then(|s| s.try_days(self.days))
            .and_then(|s| s.try_hours(self.hours))
            .and_then(|s| s.try_minutes(self.minutes))
            .and_then(|s| s.try_seconds(self.seconds))
            .map_err(range)
    }

    /// "plus 1 day, 2 hours" or "minus 3 weeks".
    pub fn words(&self) -> String {
        let negative = self.units().iter().any(|(n, _)| *n < 0);
        let parts = self
            .units()
            .iter()
            .filter(|(n, _)| *n != 0)
            .map(|(n, unit)| count(n.abs(), unit))
            .collect::<Vec<_>>();
        format!(
            "{} {}",
            if negative { "minus" } else { "plus" },
            parts.join(", ")
        )
    }
}

fn count(n: i64, unit: &str) -> String {
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

/// The calendar-aware span between two times in the same zone, in words, e.g.
/// "1 month, 2 days, 3 hours". Days follow the zone's calendar, so a day across a DST change
/// counts as one day even though it lasts 23 or 25 hours.
pub fn span_words(start: &Zoned, end: &Zoned) -> Result<String, String> {
    let span = start
        .until(
            jiff::ZonedDifference::new(end)
                .largest(Unit::Year)
                .smallest(Unit::Second),
        )
        .map_err(|e| format!("could not compute the difference: {e}"))?;
    let parts: Vec<String> = [
        (span.get_years().into(), "year"),
        (span.get_months().into(), "month"),
        (span.get_days().into(), "day"),
        (span.get_hours().into(), "hour"),
        (span.get_minutes(), "minute"),
        (span.get_seconds(), "second"),
    ]
    .iter()
    .filter(|(n, _): &&(i64, &str)| *n != 0)
    .map(|(n, unit)| count(n.abs(), unit))
    .collect();
    Ok(if parts.is_empty() {
        "0 seconds".into()
    } else {
        parts.join(", ")
    })
}
