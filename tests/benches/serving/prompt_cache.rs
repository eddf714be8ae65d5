//! The prompt cache under pressure (issue 18), on phi3d and, when `LLAMA_SERVER` names its
//! binary, on llama-server with its own prompt reuse turned on:
//!
//! - `cache-burst`: the home-automation turn cold, warm, after a burst of unrelated requests
//!   has taken every slot, and after a restart (phi3d is stopped with SIGTERM and saves its
//!   cache; llama-server keeps its prompt cache in RAM, `--cache-ram`, so it starts empty);
//! - `cache-time`: the home turn with the wall-clock time at the start of its system prompt, as
//!   an assistant that tells its model the time sends it, asked four times a second apart, so
//!   that every prompt differs from the last a few tokens in. phi3d runs twice, with its
//!   default `--prompt-cache-min-chunk` and with 0 (no reuse past a changed span), to show
//!   what that reuse is worth in one run.
//!
//! In these two, each row is one request: its time to first token as the client sees it, and
//! the server's own count of the prompt tokens it read, found cached as an exact prefix, and
//! reused after a changed span by moving their cells (phi3d's `shifted_prompt_tokens`;
//! llama-server counts those as cached, so its shifted column is 0), and the time against the
//! side's first row. Both sides run with the bench's model, fixed threads, context and batch.
//!
//! `cache-chunk` (phi3d only): what `--prompt-cache-min-chunk` trades. Reuse past a changed
//! span is an approximation: the reused cells once attended to the old text. For each
//! minimum chunk (0, 16, 32, 64, 128, 256 tokens) and each of three changes, a fresh daemon
//! with one slot reads a first turn, then a follow-up that differs from it as real prompts
//! do: the time at the start changed, a few device states changed through the list, or the
//! oldest exchange of a conversation dropped. Each row is a minimum chunk; for each change,
//! the follow-up's time to first token, its prompt tokens reused (exact prefix and shifted;
//! at min chunk 0 the prefix alone, which every row shares), and whether its greedy reply is
//! the text min chunk 0 generated, the exact computation. Where a row reuses no more than
//! the prefix, a different text would mean the runs are not repeatable, not that reuse erred.

use std::path::Path;
use std::time::Duration;

use phi3d_proto::v1::admin_client::AdminClient;
use phi3d_proto::v1::{GetStatusRequest, Message, Role};

use super::scenarios::{HomeTurn, LlamaServer, Phi3d, Server, StreamFigures, house_prompt, message, switch_devices};
use super::{Setup, median_value};

/// Tokens generated per request: only the time to the first one is measured.
const GENERATE: usize = 4;

/// The user lines of the four home turns of each scenario, one per turn, so that no turn is
/// cached whole.
const USER_LINES: [&str; 4] =
    ["Turn off the kitchen lights.", "Is the garage door open?", "Dim the bedroom lights.", "What is on in the office?"];

/// llama-server's prompt reuse: chunks of at least 256 tokens past a changed span reused by
/// shifting them (its counterpart of phi3d's shifted tokens), and prompts that leave a slot
/// kept in 2 GiB of RAM (several home prompts of a Phi-3-mini-shape model).
const PEER_REUSE: [&str; 2] = ["--cache-reuse", "256"];
const PEER_CACHE_RAM: [&str; 2] = ["--cache-ram", "2048"];

/// System prompts of unrelated assistants, 20 to 40 tokens each, so that a burst request finds
/// nothing of the house prompt (beyond the template's first tokens) to reuse.
const OTHER_SYSTEMS: [&str; 8] = [
    "Recipes are your field: suggest one dish from what is in the fridge, list its steps and say how long it takes.",
    "Train timetables are your field: give the next departure, its platform and any change of trains on the way.",
    "Gardening is your field: say when to sow, water and harvest, and which plants grow well side by side.",
    "Bicycle repair is your field: name the tool, the part and the order of the steps, and warn about the brakes.",
    "Chess is your field: explain the opening, the idea behind the next move and the mistake to avoid.",
    "Weather at sea is your field: read the forecast for sailors, the wind force, the waves and the visibility.",
    "Tax forms are your field: point to the box to fill in, the figure that goes there and the deadline.",
    "Bird songs are your field: describe the call, the bird that makes it and the season it is heard in.",
];

/// A distinct system prompt for each request of a burst; past the list's length a text comes
/// again with another number, still distinct.
fn other_system(index: usize) -> String {
    format!("{} This is conversation {index}.", OTHER_SYSTEMS[index % OTHER_SYSTEMS.len()])
}

pub async fn burst(setup: &Setup, slots: u32, home_tokens: usize, llama_server: Option<&Path>) -> anyhow::Result<()> {
    let house = house_prompt(home_tokens);
    println!(
        "\ncache-burst: the home turn (system prompt about {home_tokens} tokens + one user line, {GENERATE} tokens, \
         greedy) cold, warm, after {slots} unrelated requests at once on {slots} slots, and after a restart"
    );
    let cache = tempfile::tempdir()?;
    // The burst comes from one client: one stream per slot, past the default of 8 where there
    // are more slots.
    let streams = slots.to_string();
    let flags = ["--max-streams-per-client", streams.as_str()];
    let mut phi3d = Phi3d::start_with(setup, slots, cache.path(), Some(setup.threads), &flags).await?;
    println!("{}", describe(&phi3d, setup).await?);
    let ([cold, cached, after_burst], burst) = before_restart(&phi3d, &house, slots).await?;
    // SIGTERM: the daemon saves its prompt cache on the way out, the next one restores it.
    phi3d.daemon.terminate().await?;
    let phi3d = Phi3d::start_with(setup, slots, cache.path(), Some(setup.threads), &flags).await?;
    let restarted = phi3d.chat(&house, USER_LINES[3], GENERATE).await?;
    drop(phi3d);
    let mut sides = vec![BurstRun { name: "phi3d", home: HomeTurn { cold, cached, restarted }, after_burst, burst }];

    match llama_server {
        Some(binary) => {
            let flags = [PEER_REUSE, PEER_CACHE_RAM].concat();
            let server = LlamaServer::start_with(binary, setup, slots, &flags).await?;
            let ([cold, cached, after_burst], burst) = before_restart(&server, &house, slots).await?;
            drop(server);
            let server = LlamaServer::start_with(binary, setup, slots, &flags).await?;
            let restarted = server.chat(&house, USER_LINES[3], GENERATE).await?;
            drop(server);
            println!("llama-server: {}; its prompt cache lives in RAM, so a restart starts it empty", flags.join(" "));
            sides.push(BurstRun { name: "llama-server", home: HomeTurn { cold, cached, restarted }, after_burst, burst });
        }
        None => println!("llama-server: skipped (set LLAMA_SERVER=/path/to/llama-server to compare with it)"),
    }

    let steps = ["cold", "warm", "after burst", "after restart"];
    let tables: Vec<(&str, Vec<StreamFigures>)> = sides
        .iter()
        .map(|side| (side.name, vec![side.home.cold, side.home.cached, side.after_burst, side.home.restarted]))
        .collect();
    print_table(&steps, "of cold", &tables);
    for side in &sides {
        let first_token: Vec<f64> = side.burst.iter().map(|figures| figures.first_token_ms).collect();
        println!(
            "{} burst: {} requests, first token median {:.0} ms, slowest {:.0} ms, {} of {} prompt tokens cached",
            side.name,
            side.burst.len(),
            median_value(first_token.clone()),
            first_token.iter().copied().fold(0.0, f64::max),
            side.burst.iter().map(|figures| figures.cached_tokens).sum::<u32>(),
            side.burst.iter().map(|figures| figures.prompt_tokens).sum::<u32>()
        );
    }
    Ok(())
}

/// One side of the cache-burst table: the home scenario's three turns (the warm one as
/// `cached`), the turn after the burst, and the burst's own requests.
struct BurstRun {
    name: &'static str,
    home: HomeTurn,
    after_burst: StreamFigures,
    burst: Vec<StreamFigures>,
}

/// What the sequence does on the first process of a server: the home turn cold and warm, one
/// request per slot at once, and the home turn again. The three home turns in that order, and
/// the burst's requests.
async fn before_restart(server: &impl Server, house: &str, slots: u32) -> anyhow::Result<([StreamFigures; 3], Vec<StreamFigures>)> {
    let cold = server.chat(house, USER_LINES[0], GENERATE).await?;
    let warm = server.chat(house, USER_LINES[1], GENERATE).await?;
    let systems: Vec<String> = (0..slots as usize).map(other_system).collect();
    let burst = futures::future::try_join_all(systems.iter().map(|system| server.chat(system, "What should I do first?", GENERATE))).await?;
    let after_burst = server.chat(house, USER_LINES[2], GENERATE).await?;
    Ok(([cold, warm, after_burst], burst))
}

pub async fn time(setup: &Setup, home_tokens: usize, llama_server: Option<&Path>) -> anyhow::Result<()> {
    let house = house_prompt(home_tokens);
    // One slot on every side: what is measured is the reuse past the changed time, not which
    // slot a server picks (llama-server picks by common prefix, which the time at the start
    // leaves at a few tokens, so with more slots it would take an empty one).
    println!(
        "\ncache-time: the home turn (system prompt \"Current time is HH:MM:SS. Today's date is ...\" + about \
         {home_tokens} tokens + one user line, {GENERATE} tokens, greedy), four questions 1 s apart, one slot"
    );
    let mut tables = Vec::new();
    let runs: [(&str, &[&str]); 2] = [("phi3d default", &[]), ("phi3d min-chunk 0", &["--prompt-cache-min-chunk", "0"])];
    for (name, flags) in runs {
        let cache = tempfile::tempdir()?;
        let phi3d = Phi3d::start_with(setup, 1, cache.path(), Some(setup.threads), flags).await?;
        if tables.is_empty() {
            println!("{}", describe(&phi3d, setup).await?);
        }
        tables.push((name, questions(&phi3d, &house).await?));
    }
    match llama_server {
        Some(binary) => {
            let server = LlamaServer::start_with(binary, setup, 1, &PEER_REUSE).await?;
            tables.push(("llama-server", questions(&server, &house).await?));
            println!("llama-server: {}", PEER_REUSE.join(" "));
        }
        None => println!("llama-server: skipped (set LLAMA_SERVER=/path/to/llama-server to compare with it)"),
    }
    print_table(&["question 1", "question 2", "question 3", "question 4"], "of q1", &tables);
    Ok(())
}

/// The four timed home turns on one server, a second apart.
async fn questions(server: &impl Server, house: &str) -> anyhow::Result<Vec<StreamFigures>> {
    let mut rows = Vec::new();
    for (index, question) in USER_LINES.iter().enumerate() {
        if index > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Written as the request goes out, so that it changes with every question. UTC: the
        // bench's jiff has no time zone database, and the cache sees only that the text changed.
        let system = timed(jiff::Timestamp::now().strftime("%H:%M:%S"), house);
        rows.push(server.chat(&system, question, GENERATE).await?);
    }
    Ok(rows)
}

/// The minimum chunks cache-chunk compares; 0 first, since its replies (exact prefixes only) are
/// the exact computation that the others are checked against.
const MIN_CHUNKS: [usize; 6] = [0, 16, 32, 64, 128, 256];

/// Tokens generated per reply in cache-chunk: a reply that drifts from the exact one needs some
/// text to show it.
const REPLY_TOKENS: usize = 16;

/// The time in the home turn's system prompt and in the follow-up's where only the time
/// changed: fixed, unlike cache-time's clock, so that every daemon reads the same prompts and
/// only the reuse can make their replies differ.
const HOME_TIME: &str = "08:15:02";
const LATER_TIME: &str = "08:16:47";

/// Devices switched between the home turn and the follow-up where states changed.
const SWITCHED: usize = 5;

/// The exchanges before the dropped-turn conversation's last question, oldest first: the first
/// turn has the first two and then the third's question; the follow-up drops the oldest, keeps
/// the other two whole, and asks [`NEXT_QUESTION`].
const EXCHANGES: [(&str, &str); 3] = [
    ("Turn on the hall switch.", "switch.hall_1 is now on."),
    ("Set the office climate to 21 degrees.", "climate.office_4 is now set to 21 degrees."),
    ("Is anything on in the garage?", "Yes, switch.garage_6 is on."),
];
const NEXT_QUESTION: &str = "And turn off the kitchen light.";

/// One kind of change: the turn that fills the cache, and the follow-up measured after it.
struct Change {
    name: &'static str,
    first: Vec<Message>,
    follow_up: Vec<Message>,
}

/// The three changes cache-chunk measures, on the home prompt `house`.
fn changes(house: &str) -> [Change; 3] {
    let home = timed(HOME_TIME, house);
    [
        Change {
            name: "time changed",
            first: conversation(&home, &[], USER_LINES[0]),
            follow_up: conversation(&timed(LATER_TIME, house), &[], USER_LINES[1]),
        },
        Change {
            name: "states changed",
            first: conversation(&home, &[], USER_LINES[0]),
            follow_up: conversation(&timed(HOME_TIME, &switch_devices(house, SWITCHED)), &[], USER_LINES[2]),
        },
        Change {
            name: "turn dropped",
            first: conversation(&home, &EXCHANGES[..2], EXCHANGES[2].0),
            follow_up: conversation(&home, &EXCHANGES[1..], NEXT_QUESTION),
        },
    ]
}

/// The messages of a chat: `system`, the earlier exchanges (user line, reply), then `question`.
fn conversation(system: &str, exchanges: &[(&str, &str)], question: &str) -> Vec<Message> {
    let mut messages = vec![message(Role::System, system)];
    for &(user, reply) in exchanges {
        messages.extend([message(Role::User, user), message(Role::Assistant, reply)]);
    }
    messages.push(message(Role::User, question));
    messages
}

pub async fn chunk(setup: &Setup, home_tokens: usize) -> anyhow::Result<()> {
    let changes = changes(&house_prompt(home_tokens));
    println!(
        "\ncache-chunk: what --prompt-cache-min-chunk trades, one slot. A first turn (the home turn: system prompt \
         \"Current time is {HOME_TIME}. ...\" + about {home_tokens} tokens + one user line; or a conversation on it), \
         then a follow-up with the time changed, {SWITCHED} device states changed through the list, or the oldest \
         exchange dropped; {REPLY_TOKENS} tokens each, greedy. Per change: the follow-up's time to first token, its \
         prompt tokens reused (cached + shifted), and whether its reply is min chunk 0's (the exact computation)"
    );
    let mut footer = None;
    let mut rows = Vec::new();
    for min_chunk in MIN_CHUNKS {
        let value = min_chunk.to_string();
        let flags = ["--prompt-cache-min-chunk", value.as_str()];
        let mut row = Vec::new();
        for change in &changes {
            // A daemon for each change, so that the follow-up is measured against its first
            // turn's exact cells: with one slot, a follow-up that reuses chunks moves the cells
            // it takes, so the next change's first turn would find those, and its follow-up's
            // error would add to the last one's.
            let cache = tempfile::tempdir()?;
            let phi3d = Phi3d::start_with(setup, 1, cache.path(), Some(setup.threads), &flags).await?;
            if footer.is_none() {
                footer = Some(describe(&phi3d, setup).await?);
            }
            phi3d.converse(&change.first, REPLY_TOKENS).await?;
            row.push(phi3d.converse(&change.follow_up, REPLY_TOKENS).await?);
        }
        rows.push((min_chunk, row));
    }

    let exact = &rows[0].1;
    let mut title = format!("{:<12}", "");
    let mut header = format!("{:<12}", "min chunk");
    for (change, (figures, _)) in changes.iter().zip(exact) {
        title.push_str(&format!("{:>34}", format!("{}, {} tokens", change.name, figures.prompt_tokens)));
        header.push_str(&format!("{:>14}{:>10}{:>10}", "first ms", "reused", "same text"));
    }
    println!("{title}\n{header}");
    for (index, (min_chunk, row)) in rows.iter().enumerate() {
        let mut line = format!("{min_chunk:<12}");
        for ((figures, text), (_, exact_text)) in row.iter().zip(exact) {
            let same = match (index, text == exact_text) {
                (0, _) => "exact",
                (_, true) => "yes",
                (_, false) => "no",
            };
            line.push_str(&format!(
                "{:>14.0}{:>10}{:>10}",
                figures.first_token_ms,
                figures.cached_tokens + figures.shifted_tokens,
                same
            ));
        }
        println!("{line}");
    }
    println!("{}", footer.unwrap_or_default());
    Ok(())
}

/// The home system prompt as an assistant that tells its model the time sends it: the time, the
/// date, then `house`.
fn timed(time: impl std::fmt::Display, house: &str) -> String {
    format!("Current time is {time}. Today's date is Friday, December 4, 2026.\n{house}")
}

/// The scenario's setup, as the bench's own header names it: the model file, the threads, and
/// the CPU features llama.cpp's kernels were built for (as the daemon reports them).
pub async fn describe(phi3d: &Phi3d, setup: &Setup) -> anyhow::Result<String> {
    let status = AdminClient::new(phi3d.channel()).get_status(GetStatusRequest {}).await?.into_inner();
    Ok(format!(
        "model {}, threads {} (fixed), ctx {}, batch {}, CPU features {}",
        setup.model.display(),
        setup.threads,
        setup.ctx_size,
        setup.batch_size,
        status.cpu_features
    ))
}

/// The steps down, the sides across: each side's time to first token, its token counts, and
/// the time against the side's own first row (`ratio`).
fn print_table(steps: &[&str], ratio: &str, sides: &[(&str, Vec<StreamFigures>)]) {
    let mut title = format!("{:<16}", "");
    let mut header = format!("{:<16}", "step");
    for (name, _) in sides {
        title.push_str(&format!("{name:>44}"));
        header.push_str(&format!("{:>12}{:>8}{:>8}{:>8}{:>8}", "first ms", "prompt", "cached", "shifted", ratio));
    }
    println!("{title}\n{header}");
    for (index, step) in steps.iter().enumerate() {
        let mut line = format!("{step:<16}");
        for (_, rows) in sides {
            let (row, first) = (rows[index], rows[0]);
            line.push_str(&format!(
                "{:>12.0}{:>8}{:>8}{:>8}{:>8.3}",
                row.first_token_ms,
                row.prompt_tokens,
                row.cached_tokens,
                row.shifted_tokens,
                row.first_token_ms / first.first_token_ms
            ));
        }
        println!("{line}");
    }
}
