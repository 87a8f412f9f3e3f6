//! `schedules:`: cron expressions with a time zone, compiled into [`Schedule`]s.

use std::collections::BTreeMap;

use super::diag::Diagnostic;
use super::yaml::join_key;
use super::Schedule;

use super::parsed::*;

/// Compiles the schedules of every file.
pub(super) fn load_schedules(
    parsed: &[Parsed],
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Schedule> {
    let mut out = BTreeMap::new();
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build();
    for p in parsed {
        for (name, spec) in &p.spec.schedules {
            let path = join_key("schedules", name);
            if out.contains_key(name) {
                diags.push(p.at_key(
                    Diagnostic::error("duplicate", format!("schedule `{name}` is defined twice")),
                    &path,
                ));
                continue;
            }
            let fields = spec.cron.split_whitespace().count();
            let cron = match parser.parse(&spec.cron) {
                Ok(c) if fields == 5 || fields == 6 => c,
                Ok(_) | Err(_) if fields != 5 && fields != 6 => {
                    diags.push(
                        p.at(
                            Diagnostic::error(
                                "bad-cron",
                                format!(
                                    "cron pattern `{}` has {fields} field{}; switchyard accepts 5 (`min hour day month weekday`) or 6 (seconds first)",
                                    spec.cron,
                                    if fields == 1 { "" } else { "s" }
                                ),
                            ),
                            &join_key(&path, "cron"),
                        )
                        .hint("e.g. `0 9 * * MON` (09:00 on Mondays) or `30 0 9 * * MON` (09:00:30)"),
                    );
                    continue;
                }
                Ok(c) => c,
                Err(e) => {
                    diags.push(
                        p.at(Diagnostic::error("bad-cron", format!("invalid cron pattern `{}`: {e}", spec.cron)), &join_key(&path, "cron"))
                            .hint("5 fields `min hour day month weekday` (e.g. `0 9 * * MON`), or 6 with seconds first"),
                    );
                    continue;
                }
            };
            let tz_name = spec.timezone.clone().unwrap_or_else(|| "UTC".into());
            let tz: chrono_tz::Tz = match tz_name.parse() {
                Ok(t) => t,
                Err(_) => {
                    diags.push(
                        p.at(
                            Diagnostic::error(
                                "bad-timezone",
                                format!("unknown time zone `{tz_name}`"),
                            ),
                            &join_key(&path, "timezone"),
                        )
                        .hint("an IANA name such as `Europe/Berlin` or `America/New_York`"),
                    );
                    continue;
                }
            };
            out.insert(
                name.clone(),
                Schedule {
                    name: name.clone(),
                    cron,
                    pattern: spec.cron.clone(),
                    tz,
                },
            );
        }
    }
    out
}
