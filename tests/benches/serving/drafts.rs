//! `drafts`: decode of a copy-heavy reply with and without drafts from the prompt (lookup
//! decoding). The system prompt lists fifty entity ids and the user asks for them; a grammar
//! holds the reply to those ids (as a tool call's `enum` does in a real home), because a
//! random-weight model copies nothing by itself. A second reply, free text that does not
//! repeat its prompt, shows what drafting costs where it cannot help. One slot, greedy; the
//! runs alternate the sides, and the table is the median. llama-server, when given, runs the
//! same requests plain and with its own n-gram drafts (`--spec-type ngram-simple`), where its
//! build has them.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt;
use phi3d_proto::v1::inference_client::InferenceClient;
use phi3d_proto::v1::{CompleteRequest, GenerationOptions};

use super::scenarios::{LlamaServer, Phi3d, Streamed, until_done};
use super::{Setup, median_value};

/// llama-server's n-gram drafts at phi3d's default length.
/// llama-server's n-gram drafts at phi3d's lengths: a draft of up to 8 tokens after a match of
/// the last 3 (its default, 12, rarely matches in a reply of ids).
const NGRAM_SIMPLE: [&str; 8] = [
    "--spec-type", "ngram-simple", "--spec-draft-n-max", "8", "--spec-ngram-simple-size-m", "8", "--spec-ngram-simple-size-n", "3",
];

/// Tokens generated per reply.
const REPLY_TOKENS: usize = 128;

/// Fifty entity ids, as a home lists them.
fn entity_ids() -> Vec<String> {
    let rooms = ["kitchen", "hall", "living_room", "bedroom", "office", "garden", "garage", "bathroom"];
    let kinds = ["light", "switch", "sensor", "cover", "climate"];
    (0..50).map(|k| format!("{}.{}_{}", kinds[k % kinds.len()], rooms[k % rooms.len()], k)).collect()
}

/// The whole prompt, in Phi-3's chat format, sent as a raw completion to every side (so that no
/// side's chat template or grammar trigger differs).
fn prompt(user: &str) -> String {
    format!(
        "<|system|>\nYou are the voice assistant of a smart home. The entities of the house, one id a line:\n{}<|end|>\n\
         <|user|>\n{user}<|end|>\n<|assistant|>\n",
        entity_ids().join("\n")
    )
}

/// The JSON schema that holds a reply to the listed ids.
fn ids_schema() -> serde_json::Value {
    serde_json::json!({"type": "array", "items": {"enum": entity_ids()}, "minItems": 50})
}

/// One reply: which, its user line, and whether a grammar holds it to the ids.
struct Reply {
    name: &'static str,
    user: &'static str,
    held_to_ids: bool,
}

const REPLIES: [Reply; 2] = [
    Reply { name: "copy (ids, grammar)", user: "List every entity id of the house.", held_to_ids: true },
    Reply { name: "free text", user: "Tell me a story about the garden.", held_to_ids: false },
];

/// What one side measured for one reply.
#[derive(Clone, Default)]
struct Measured {
    tok_s: f64,
    drafted: u32,
    accepted: u32,
    text: String,
}

async fn phi3d_reply(phi3d: &Phi3d, reply: &Reply) -> anyhow::Result<Measured> {
    let options = GenerationOptions {
        max_tokens: REPLY_TOKENS as u32,
        temperature: Some(0.0),
        repeat_penalty: Some(1.0),
        // A grammar allows nothing after its end; the schema's minimum keeps it open.
        ignore_eos: !reply.held_to_ids,
        json_schema: if reply.held_to_ids { ids_schema().to_string() } else { String::new() },
        ..GenerationOptions::default()
    };
    let request = CompleteRequest { request_id: String::new(), prompt: prompt(reply.user), options: Some(options) };
    let stream = InferenceClient::new(phi3d.channel()).complete(request).await?.into_inner();
    let Streamed { first, done_at, done } = until_done(stream).await?;
    let tokens = done.usage.unwrap_or_default().completion_tokens;
    let timings = done.timings.unwrap_or_default();
    Ok(Measured {
        tok_s: f64::from(tokens.saturating_sub(1)) / (done_at - first).as_secs_f64(),
        drafted: timings.draft_tokens,
        accepted: timings.accepted_draft_tokens,
        text: done.text,
    })
}

async fn llama_server_reply(server: &LlamaServer, reply: &Reply) -> anyhow::Result<Measured> {
    let mut body = serde_json::json!({
        "prompt": prompt(reply.user), "n_predict": REPLY_TOKENS, "temperature": 0.0, "repeat_penalty": 1.0,
        "stream": true, "cache_prompt": true, "ignore_eos": !reply.held_to_ids,
    });
    if reply.held_to_ids {
        body["json_schema"] = ids_schema();
    }
    let response = server.post("/completion", &body).await?;
    let mut bytes = response.bytes_stream();
    let (mut first, mut tokens, mut drafted, mut accepted) = (None, 0, 0, 0);
    let mut text = String::new();
    let mut buffer = String::new();
    while let Some(chunk) = bytes.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find('\n') {
            let line: String = buffer.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data: ").filter(|data| *data != "[DONE]") else { continue };
            let event: serde_json::Value = serde_json::from_str(data)?;
            if let Some(piece) = event["content"].as_str().filter(|piece| !piece.is_empty()) {
                first.get_or_insert_with(Instant::now);
                text.push_str(piece);
            }
            if let Some(n) = event["timings"]["predicted_n"].as_u64() {
                tokens = n;
            }
            if let Some(n) = event["timings"]["draft_n"].as_u64() {
                drafted = n as u32;
                accepted = event["timings"]["draft_n_accepted"].as_u64().unwrap_or(0) as u32;
            }
        }
    }
    let first = first.context("llama-server streamed no text")?;
    let tokens = if tokens > 0 { tokens as f64 } else { REPLY_TOKENS as f64 };
    Ok(Measured { tok_s: (tokens - 1.0) / first.elapsed().as_secs_f64(), drafted, accepted, text })
}

/// "yes" when every run's text is the base's; otherwise how far the texts agree (the least
/// share of the base's text before the first difference): a batch's logits can differ from
/// one token's in the last bits, enough to change a choice between near-equal tokens.
fn same_text(runs: &[Measured], base: &[Measured]) -> String {
    let agreed = runs
        .iter()
        .zip(base)
        .map(|(run, base)| {
            let common = run.text.chars().zip(base.text.chars()).take_while(|(a, b)| a == b).count();
            if run.text == base.text { 1.0 } else { common as f64 / base.text.chars().count().max(1) as f64 }
        })
        .fold(1.0, f64::min);
    if agreed == 1.0 { "yes".to_owned() } else { format!("to {:.0}%", 100.0 * agreed) }
}

/// The sides: a name and the flags they start with.
struct Side {
    name: &'static str,
    llama_server: bool,
    flags: &'static [&'static str],
}

pub async fn run(setup: &Setup, runs: usize, llama_server: Option<&Path>) -> anyhow::Result<()> {
    println!(
        "\ndrafts: decode of a {REPLY_TOKENS}-token reply, one slot, greedy. System prompt: fifty entity ids; \
         the copy reply is held to them by a JSON schema (an array of the ids), the free reply is a story. \
         Median of {runs} alternating runs; text compared with the plain side's"
    );
    let mut sides = vec![
        Side { name: "phi3d plain", llama_server: false, flags: &["--lookup-draft-max", "0"] },
        Side { name: "phi3d drafts", llama_server: false, flags: &[] },
    ];
    if let Some(binary) = llama_server {
        sides.push(Side { name: "llama-server plain", llama_server: true, flags: &[] });
        if LlamaServer::supports(binary, "--spec-type") {
            sides.push(Side { name: "llama-server ngram", llama_server: true, flags: &NGRAM_SIMPLE });
        } else {
            println!("(this llama-server has no --spec-type: its n-gram drafts are not measured)");
        }
    }
    // measured[side][reply] holds one entry per run.
    let mut measured: Vec<Vec<Vec<Measured>>> = sides.iter().map(|_| REPLIES.iter().map(|_| Vec::new()).collect()).collect();
    let mut footer = None;
    for run in 0..runs {
        for (index, side) in sides.iter().enumerate() {
            for (reply_index, reply) in REPLIES.iter().enumerate() {
                let figures = if side.llama_server {
                    let binary = llama_server.expect("llama-server sides only when given");
                    let server = LlamaServer::start_with(binary, setup, 1, side.flags).await?;
                    // The peer's refusal (a grammar its build cannot sample with) is its row's
                    // result, not the end of the bench.
                    match llama_server_reply(&server, reply).await {
                        Ok(figures) => figures,
                        Err(err) => {
                            println!("run {} {:<20} {:<20} failed: {err}", run + 1, side.name, reply.name);
                            continue;
                        }
                    }
                } else {
                    let cache = tempfile::tempdir()?;
                    let phi3d = Phi3d::start_with(setup, 1, cache.path(), Some(setup.threads), side.flags).await?;
                    if footer.is_none() {
                        footer = Some(super::prompt_cache::describe(&phi3d, setup).await?);
                    }
                    phi3d_reply(&phi3d, reply).await?
                };
                println!(
                    "run {} {:<20} {:<20} {:>7.2} tok/s, {} of {} drafted tokens accepted",
                    run + 1,
                    side.name,
                    reply.name,
                    figures.tok_s,
                    figures.accepted,
                    figures.drafted
                );
                measured[index][reply_index].push(figures);
            }
        }
    }
    let mut header = format!("{:<20}", "");
    for reply in &REPLIES {
        header.push_str(&format!("{:>12}{:>8}{:>10}{:>10}", format!("{} tok/s", &reply.name[..4]), "ratio", "accepted", "same text"));
    }
    println!("\nmedian\n{header}");
    let plain: Vec<f64> = (0..REPLIES.len()).map(|reply| median_value(measured[0][reply].iter().map(|m| m.tok_s).collect())).collect();
    for (index, side) in sides.iter().enumerate() {
        let mut line = format!("{:<20}", side.name);
        for reply in 0..REPLIES.len() {
            let runs = &measured[index][reply];
            if runs.is_empty() {
                line.push_str(&format!("{:>12}{:>8}{:>10}{:>10}", "failed", "-", "-", "-"));
                continue;
            }
            let tok_s = median_value(runs.iter().map(|m| m.tok_s).collect());
            let (drafted, accepted): (u32, u32) = runs.iter().fold((0, 0), |(d, a), m| (d + m.drafted, a + m.accepted));
            let rate = if drafted > 0 { format!("{:.0}%", 100.0 * f64::from(accepted) / f64::from(drafted)) } else { "-".into() };
            // The text of the side's own engine without drafts: phi3d's plain side, or llama-server's.
            let base = if side.llama_server { sides.iter().position(|s| s.llama_server).unwrap() } else { 0 };
            let same = if index == base {
                "base".to_owned()
            } else if measured[base][reply].is_empty() {
                "-".to_owned()
            } else {
                same_text(runs, &measured[base][reply])
            };
            line.push_str(&format!("{tok_s:>12.2}{:>8.2}{rate:>10}{same:>10}", tok_s / plain[reply]));
        }
        println!("{line}");
    }
    println!("ratio: against phi3d plain. {}", footer.unwrap_or_default());
    Ok(())
}
