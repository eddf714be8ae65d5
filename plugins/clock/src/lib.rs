//! `phi3d-plugin-clock`: an MCP server on stdio that tells the time and does date arithmetic.
//!
//! Tools: `now`, `convert_time`, `add_duration` and `difference`. Time zones come from the
//! system tz database (`/usr/share/zoneinfo`, `/etc/localtime`, `TZ`), which is all the
//! sandbox lets this plugin read. Every bad input becomes a tool error (`isError: true`) whose
//! text tells the model what to send instead.

mod time;

use rmcp::{
    ServerHandler, ServiceExt,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolResult, ContentBlock},
    tool, tool_handler, tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NowArgs {
    /// IANA time zone name such as "Europe/Berlin" or "America/New_York". Leave out for the device's local time zone.
    time_zone: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ConvertTimeArgs {
    /// The time to convert, as "YYYY-MM-DD HH:MM", or "HH:MM" for today, or "now".
    time: String,
    /// IANA time zone the time is written in. Leave out for the device's local time zone.
    from_time_zone: Option<String>,
    /// IANA time zone to convert to, such as "Asia/Tokyo".
    to_time_zone: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct AddDurationArgs {
    /// Time to start from, as "YYYY-MM-DD HH:MM" or "YYYY-MM-DD". Leave out to start from now.
    start: Option<String>,
    /// IANA time zone for the start time and for calendar days. Leave out for local time.
    time_zone: Option<String>,
    /// Years to add; negative to go back.
    years: Option<i64>,
    /// Months to add; negative to go back.
    months: Option<i64>,
    /// Weeks to add; negative to go back.
    weeks: Option<i64>,
    /// Calendar days to add; negative to go back.
    days: Option<i64>,
    /// Hours to add; negative to go back.
    hours: Option<i64>,
    /// Minutes to add; negative to go back.
    minutes: Option<i64>,
    /// Seconds to add; negative to go back.
    seconds: Option<i64>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct DifferenceArgs {
    /// Earlier time, as "YYYY-MM-DD HH:MM" or "YYYY-MM-DD". Leave out for now.
    start: Option<String>,
    /// Later time, as "YYYY-MM-DD HH:MM" or "YYYY-MM-DD". Leave out for now.
    end: Option<String>,
    /// IANA time zone both times are written in. Leave out for local time.
    time_zone: Option<String>,
}

/// A tool's answer: one readable line for the model, the same facts as JSON for programs.
fn answer(text: String, structured: Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(structured);
    result
}

struct Clock {
    tool_router: ToolRouter<Self>,
}

// A tool body's `Err(message)` reaches the model as a tool error (`isError: true`) carrying
// that message; rmcp does the same for arguments that do not fit the schema.
#[tool_router]
impl Clock {
    fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Current date, time, weekday, time zone and UTC offset, in the local time zone or a given one.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn now(&self, Parameters(args): Parameters<NowArgs>) -> Result<CallToolResult, String> {
        let now = time::now_in(&time::zone(args.time_zone.as_deref())?)?;
        Ok(answer(
            format!("It is {}.", time::describe(&now)),
            time::moment_json(&now),
        ))
    }

    #[tool(
        description = "Convert a time from one time zone to another.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn convert_time(
        &self,
        Parameters(args): Parameters<ConvertTimeArgs>,
    ) -> Result<CallToolResult, String> {
        let from = time::parse_moment(&args.time, &time::zone(args.from_time_zone.as_deref())?)?;
        let to = from.with_time_zone(time::zone(Some(&args.to_time_zone))?);
        Ok(answer(
            format!("{} is {}.", time::describe(&from), time::describe(&to)),
            json!({ "from": time::moment_json(&from), "to": time::moment_json(&to) }),
        ))
    }

    #[tool(
        description = "Add or subtract years, months, weeks, days, hours, minutes and seconds to a time (or to now). Use negative amounts to go back.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn add_duration(
        &self,
        Parameters(args): Parameters<AddDurationArgs>,
    ) -> Result<CallToolResult, String> {
        let amounts = time::Amounts {
            years: args.years.unwrap_or(0),
            months: args.months.unwrap_or(0),
            weeks: args.weeks.unwrap_or(0),
            days: args.days.unwrap_or(0),
            hours: args.hours.unwrap_or(0),
            minutes: args.minutes.unwrap_or(0),
            seconds: args.seconds.unwrap_or(0),
        };
        let span = amounts.to_span()?;
        let zone = time::zone(args.time_zone.as_deref())?;
        let start = time::parse_moment(args.start.as_deref().unwrap_or("now"), &zone)?;
        let end = start.checked_add(span).map_err(|e| {
            format!("the result is outside the supported range of years -9999 to 9999: {e}")
        })?;
        Ok(answer(
            format!(
                "{} {} is {}.",
                time::describe(&start),
                amounts.words(),
                time::describe(&end)
            ),
            json!({
                "start": time::moment_json(&start),
                "added": span.to_string(),
                "result": time::moment_json(&end),
            }),
        ))
    }

    #[tool(
        description = "How much time lies between two times (either may be left out to mean now): in years, months, days, hours, minutes and seconds, and in total seconds.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn difference(
        &self,
        Parameters(args): Parameters<DifferenceArgs>,
    ) -> Result<CallToolResult, String> {
        if args.start.is_none() && args.end.is_none() {
            return Err(
                "give a start time, an end time, or both (the one left out means now)".into(),
            );
        }
        let zone = time::zone(args.time_zone.as_deref())?;
        let start = time::parse_moment(args.start.as_deref().unwrap_or("now"), &zone)?;
        let end = time::parse_moment(args.end.as_deref().unwrap_or("now"), &zone)?;
        let total_seconds = end.timestamp().as_second() - start.timestamp().as_second();
        let words = time::span_words(&start, &end)?;
        let direction = match total_seconds.signum() {
            -1 => "the end is before the start",
            0 => "they are the same moment",
            _ => "the end is after the start",
        };
        Ok(answer(
            format!(
                "From {} to {}: {words} ({total_seconds} seconds in total; {direction}).",
                time::describe(&start),
                time::describe(&end),
            ),
            json!({
                "start": time::moment_json(&start),
                "end": time::moment_json(&end),
                "difference": words,
                "total_seconds": total_seconds,
            }),
        ))
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "phi3d-plugin-clock",
    instructions = "Tells the current date and time, converts times between time zones, and does date arithmetic. Time zones are IANA names like Europe/Berlin."
)]
impl ServerHandler for Clock {}

/// Serves MCP on stdin and stdout until the client closes them: what the plugin's binary runs,
/// and what `phi3d` runs when it is started under the plugin's name.
pub fn serve_stdio() -> Result<(), Box<dyn std::error::Error>> {
    // One thread: the sandbox caps processes (threads count too) and memory, and the plugin
    // serves one call at a time anyway.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Anything but pipes (a terminal, a file) gets Tokio's thread-backed stdio instead.
        let server = match phi3d_plugin_kit::stdio::pipes() {
            Some(pipes) => Clock::new().serve(pipes).await?,
            None => Clock::new().serve(rmcp::transport::stdio()).await?,
        };
        server.waiting().await?;
        Ok(())
    })
}
