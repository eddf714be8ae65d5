//! `phi3d chat` and `phi3d status`: small gRPC clients of a running daemon.

use std::fmt::Write as _;
use std::io::{BufRead, Write};

use phi3d_proto::v1::admin_client::AdminClient;
use phi3d_proto::v1::inference_client::InferenceClient;
use phi3d_proto::v1::{
    ChatRequest, GenerationOptions, GetStatusRequest, ListToolsRequest, Message, Role, StopReason, ToolChoice, ToolOptions,
    chat_event,
};

use super::connect::{Connection, ServerArgs};
use crate::engine::memory_plan::human_bytes;

#[derive(clap::Args)]
pub struct ChatArgs {
    /// What to say; without it, an interactive conversation on stdin
    prompt: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
    /// A system message to start the conversation with
    #[arg(long)]
    system: Option<String>,
    /// Longest reply in tokens (0: the daemon's default)
    #[arg(long, default_value_t = 0)]
    max_tokens: u32,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Print token counts and speed after each reply (on stderr)
    #[arg(long)]
    stats: bool,
    /// Let the model call plugin tools: none, auto or required (default: the daemon's)
    #[arg(long, value_parser = ["none", "auto", "required"])]
    tools: Option<String>,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let mut client = InferenceClient::new(args.server.connect().await?);
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message { role: Role::System as i32, content: system.clone(), ..Message::default() });
    }
    if let Some(prompt) = &args.prompt {
        messages.push(Message { role: Role::User as i32, content: prompt.clone(), ..Message::default() });
        turn(&mut client, &args, &mut messages).await?;
        return Ok(());
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            continue;
        }
        messages.push(Message { role: Role::User as i32, content: line.to_owned(), ..Message::default() });
        turn(&mut client, &args, &mut messages).await?;
    }
}

/// Streams one reply to stdout and appends it to the conversation.
async fn turn(client: &mut InferenceClient<Connection>, args: &ChatArgs, messages: &mut Vec<Message>) -> anyhow::Result<()> {
    let request = ChatRequest {
        request_id: String::new(),
        messages: messages.clone(),
        options: Some(GenerationOptions {
            max_tokens: args.max_tokens,
            temperature: args.temperature,
            seed: args.seed,
            ..GenerationOptions::default()
        }),
        tools: args.tools.as_deref().map(|choice| ToolOptions {
            choice: match choice {
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                _ => ToolChoice::Auto,
            } as i32,
            ..ToolOptions::default()
        }),
    };
    let mut stream = client.chat(request).await.map_err(status_error)?.into_inner();
    let mut stdout = std::io::stdout();
    while let Some(event) = stream.message().await.map_err(status_error)? {
        match event.event {
            Some(chat_event::Event::Delta(delta)) => {
                stdout.write_all(delta.text.as_bytes())?;
                stdout.flush()?;
            }
            Some(chat_event::Event::Done(done)) => {
                writeln!(stdout)?;
                if args.stats {
                    let usage = done.usage.unwrap_or_default();
                    let timings = done.timings.unwrap_or_default();
                    eprintln!(
                        "[{:?}: {} prompt + {} reply tokens, first token {:.0} ms, {:.1} tokens/s]",
                        StopReason::try_from(done.stop_reason).unwrap_or(StopReason::Unspecified),
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        timings.first_token_ms,
                        timings.tokens_per_second
                    );
                }
                messages.push(Message { role: Role::Assistant as i32, content: done.text, ..Message::default() });
            }
            Some(chat_event::Event::ToolCall(call)) => {
                eprintln!("[calling {} {}]", call.name, call.arguments_json);
            }
            Some(chat_event::Event::ToolResult(result)) => {
                let outcome = if result.is_error { "failed" } else { "returned" };
                eprintln!("[{} {outcome} in {:.0} ms: {}]", result.name, result.duration_ms, result.content);
            }
            Some(chat_event::Event::Started(_)) | None => {}
        }
    }
    Ok(())
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = AdminClient::new(args.server.connect().await?);
    let status = client.get_status(GetStatusRequest {}).await.map_err(status_error)?.into_inner();
    let mut out = String::new();
    let model = status.model.unwrap_or_default();
    writeln!(out, "phi3d {}  up {}s", status.version, status.uptime_seconds)?;
    if model.loaded {
        writeln!(out, "model      {} ({}, {} parameters)", model.name, model.architecture, model.parameters)?;
        writeln!(out, "file       {} ({} bytes)", model.path, model.size_bytes)?;
        writeln!(out, "context    {} tokens (trained {}), KV cache {} bytes", model.context_length, model.trained_context_length, status.kv_cache_bytes)?;
    } else if !status.waiting_for.is_empty() {
        writeln!(out, "model      {} waiting: {}", model.path, status.waiting_for)?;
    } else {
        writeln!(out, "model      {} loading, {}%", model.path, status.load_progress_percent)?;
    }
    // Only a model spread over RPC workers has more than one place.
    if status.layers.len() > 1 {
        for span in &status.layers {
            let layers = if span.has_layers { format!("{}-{}", span.first_layer, span.last_layer) } else { String::new() };
            let output = match (span.has_layers, span.output) {
                (true, true) => " and the output layer",
                (false, true) => "the output layer",
                _ => "",
            };
            writeln!(out, "layers     {layers}{output} on {}", span.device)?;
        }
    }
    writeln!(out, "requests   {} active, {} queued, {} slot(s)", status.active_requests, status.queue_depth, status.slots)?;
    if model.loaded {
        writeln!(out, "kv cells   {} of {} in use", status.kv_cells_used, status.kv_cells_total)?;
        for slot in &status.slot_status {
            let state = phi3d_proto::v1::slot_status::State::try_from(slot.state)
                .map_or("unknown", |state| state.as_str_name().trim_start_matches("STATE_"))
                .to_lowercase();
            let request = if slot.request_id.is_empty() { String::new() } else { format!(", request {}", slot.request_id) };
            writeln!(out, "  slot {}   {state}, {} tokens{request}", slot.index, slot.tokens)?;
        }
        writeln!(
            out,
            "prompt cache {} in the KV cache, {} in RAM ({} of {}), {} on disk",
            status.cache_entries_in_memory,
            status.cache_entries_in_ram,
            human_bytes(status.cache_ram_bytes),
            human_bytes(status.cache_ram_budget_bytes),
            status.cache_entries_on_disk
        )?;
        if let Some(threads) = &status.threads {
            let how = if threads.adaptive { format!("adaptive, at most {}", threads.max) } else { "fixed".to_owned() };
            writeln!(out, "threads    {} per token, {} per batch ({how})", threads.single, threads.batch)?;
        }
        if status.recent_decode_tokens_per_second > 0.0 {
            writeln!(out, "decode     {:.2} tokens/s lately", status.recent_decode_tokens_per_second)?;
        }
    }
    if let Some(plan) = &status.memory_plan {
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        writeln!(
            out,
            "memory     {:.2} GiB planned (weights {:.2}, KV {:.2} {}, compute {:.2}) of {:.2} GiB available",
            gib(plan.total_bytes),
            gib(plan.weights_bytes),
            gib(plan.kv_cache_bytes),
            plan.kv_type,
            gib(plan.compute_bytes),
            gib(plan.budget_bytes)
        )?;
    }
    if !status.cpu_features.is_empty() {
        let variant = if status.cpu_variant.is_empty() { String::new() } else { format!("variant {}: ", status.cpu_variant) };
        writeln!(out, "cpu        {variant}{}", status.cpu_features)?;
    }
    if !status.board.is_empty() {
        writeln!(out, "board      {}", status.board)?;
    }
    print_all(&out)
}

pub async fn tools(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = AdminClient::new(args.server.connect().await?);
    let listing = client.list_tools(ListToolsRequest {}).await.map_err(status_error)?.into_inner();
    let mut out = String::new();
    writeln!(out, "sandbox: {}", listing.sandbox_support)?;
    if listing.tools.is_empty() && listing.skipped.is_empty() {
        writeln!(out, "no tools (no plugin manifests in the plugins directory)")?;
    }
    for tool in listing.tools {
        writeln!(out, "\n{}  (plugin {})", tool.name, tool.plugin)?;
        if !tool.description.is_empty() {
            writeln!(out, "  {}", tool.description)?;
        }
        writeln!(out, "  arguments: {}", tool.input_schema_json)?;
        for protection in tool.protections {
            writeln!(out, "  - {protection}")?;
        }
    }
    for tool in listing.skipped {
        writeln!(out, "\n{}  (plugin {}): skipped, not offered to the model: {}", tool.name, tool.plugin, tool.reason)?;
    }
    print_all(&out)
}

/// Writes a command's whole output at once. A reader that has gone away (`phi3d status | head
/// -1`) ends the command quietly, as it ends any Unix tool, where `println!` would panic: Rust
/// ignores SIGPIPE, which must stay ignored for the gRPC connection (a Unix socket raises it).
fn print_all(text: &str) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => Ok(written?),
    }
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}
