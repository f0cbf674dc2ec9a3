//! Business hours: per weekday, time ranges in an IANA time zone (the zone database is built in,
//! so a host without one still gets daylight saving right). Pure: the clock is passed in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// When an inbox is staffed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hours {
    /// IANA time zone, such as `Europe/Berlin`.
    pub time_zone: String,
    /// Per weekday (`mon` … `sun`), ranges `["09:00", "17:30"]`; a missing day is closed.
    pub days: BTreeMap<String, Vec<[String; 2]>>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Minutes after midnight of `HH:MM` (`24:00` ends a day).
fn minutes(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 || h == 24 && m == 0).then_some(h * 60 + m)
}

impl Hours {
    /// Checks the zone, the day names and every range.
    pub fn validate(&self) -> Result<(), String> {
        jiff::tz::TimeZone::get(&self.time_zone).map_err(|_| format!("unknown time zone {:?}", self.time_zone))?;
        for (day, ranges) in &self.days {
            if !DAYS.contains(&day.as_str()) {
                return Err(format!("day {day:?}: one of {}", DAYS.join(", ")));
            }
            for [from, to] in ranges {
                match (minutes(from), minutes(to)) {
                    (Some(a), Some(b)) if a < b => {}
                    _ => return Err(format!("{day}: {from}–{to} is not a range of HH:MM times")),
                }
            }
        }
        Ok(())
    }

    /// Whether `now_ms` (epoch ms) falls in a range of its local weekday.
    pub fn is_open(&self, now_ms: i64) -> bool {
        let (Ok(tz), Ok(at)) = (jiff::tz::TimeZone::get(&self.time_zone), jiff::Timestamp::from_millisecond(now_ms)) else { return true };
        let local = at.to_zoned(tz);
        let day = DAYS[usize::from(local.weekday().to_monday_zero_offset().unsigned_abs())];
        let now = u32::from(local.hour().unsigned_abs()) * 60 + u32::from(local.minute().unsigned_abs());
        self.days.get(day).is_some_and(|ranges| {
            ranges.iter().any(|[from, to]| matches!((minutes(from), minutes(to)), (Some(a), Some(b)) if a <= now && now < b))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    fn berlin_weekdays() -> Hours {
        let mut days = BTreeMap::new();
        for d in ["mon", "tue", "wed", "thu", "fri"] {
            days.insert(d.to_string(), vec![["09:00".to_string(), "17:00".to_string()]]);
        }
        Hours { time_zone: "Europe/Berlin".into(), days }
    }

    fn at(text: &str) -> i64 {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn open_follows_the_local_clock_through_daylight_saving() {
        let h = berlin_weekdays();
        h.validate().unwrap();
        // Winter (UTC+1): Monday 2026-01-05 08:30 UTC is 09:30 in Berlin.
        assert!(h.is_open(at("2026-01-05T08:30:00Z")));
        assert!(!h.is_open(at("2026-01-05T07:30:00Z")));
        // Summer (UTC+2): Monday 2026-07-06 07:30 UTC is 09:30 in Berlin.
        assert!(h.is_open(at("2026-07-06T07:30:00Z")));
        assert!(!h.is_open(at("2026-07-06T15:30:00Z")), "17:30 local");
        // Saturday is closed.
        assert!(!h.is_open(at("2026-07-04T10:00:00Z")));
    }

    #[test]
    fn bad_hours_are_refused_with_a_reason() {
        let mut h = berlin_weekdays();
        h.time_zone = "Mars/Olympus".into();
        assert!(h.validate().unwrap_err().contains("time zone"));
        let mut h = berlin_weekdays();
        h.days.insert("funday".into(), vec![]);
        assert!(h.validate().is_err());
        let mut h = berlin_weekdays();
        h.days.insert("sat".into(), vec![["18:00".into(), "09:00".into()]]);
        assert!(h.validate().is_err());
        assert_eq!(minutes("24:00"), Some(1440));
        assert_eq!(minutes("24:01"), None);
    }
}
