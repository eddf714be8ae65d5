//! Drafts from the prompt (lookup decoding): the text is the one plain decoding gives, for
//! greedy and seeded sampling, under a grammar and with several slots decoding at once, and
//! the drafts are reported in `Timings`, OpenAI's usage and the metrics.

use std::time::Duration;

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use phi3d_proto::v1::{CompleteRequest, GenerationOptions, Timings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{collect, complete_request, exactly, http_address, in_background, tiny_daemon, tiny_model};
use phi3d_tests::harness::Daemon;

/// Fifty entity ids, as a home lists them to the model.
fn entity_ids() -> Vec<String> {
    let rooms = ["kitchen", "hall", "bedroom", "office", "garden"];
    let kinds = ["light", "switch", "sensor", "cover", "lock"];
    (0..50).map(|k| format!("{}.{}_{}", kinds[k % kinds.len()], rooms[(k / 5) % rooms.len()], k)).collect()
}

fn listing() -> String {
    format!("Entities:\n{}\nRepeat every entity id:\n", entity_ids().join("\n"))
}

/// The requests compared: free text that repeats its prompt, seeded sampling, and a reply held
/// to the listed ids by a grammar, as a tool call's `enum` holds it.
fn requests() -> Vec<(&'static str, CompleteRequest)> {
    let repetitive = "one two three four five six seven eight nine ten. ".repeat(12);
    let seeded = GenerationOptions { max_tokens: 48, temperature: Some(0.8), seed: Some(7), ignore_eos: true, ..GenerationOptions::default() };
    let schema = serde_json::json!({"type": "array", "items": {"enum": entity_ids()}, "minItems": 20});
    let held = GenerationOptions { json_schema: schema.to_string(), ..exactly(120) };
    vec![
        ("greedy listing", complete_request(&listing(), exactly(64))),
        ("greedy repetitive", complete_request(&repetitive, exactly(64))),
        ("seeded listing", complete_request(&listing(), seeded.clone())),
        ("seeded repetitive", complete_request(&repetitive, GenerationOptions { seed: Some(99), ..seeded })),
        ("ids under a grammar", complete_request(&listing(), held)),
    ]
}

/// The reply's text and timings.
async fn complete(daemon: &Daemon, request: CompleteRequest) -> (String, Timings) {
    let mut client = daemon.inference().await;
    let reply = collect(client.complete(request).await.unwrap().into_inner()).await.unwrap();
    (reply.text(), reply.done.timings.unwrap())
}

#[tokio::test]
async fn drafts_change_nothing_in_the_text_and_are_reported() {
    let address = http_address();
    let plain = tiny_daemon().arg("--lookup-draft-max").arg("0").start().await;
    let drafting = tiny_daemon().arg("--lookup-draft-max").arg("8").arg("--http-listen").arg(&address).start().await;
    let mut expected = Vec::new();
    let (mut drafted, mut accepted) = (0, 0);
    for (what, request) in requests() {
        let (text, timings) = complete(&plain, request.clone()).await;
        assert_eq!(timings.draft_tokens, 0, "{what}: drafting is off");
        let (with_drafts, timings) = complete(&drafting, request).await;
        assert_eq!(with_drafts, text, "{what}: the text differs with drafts ({timings:?})\n{}", drafting.stderr());
        assert!(timings.accepted_draft_tokens <= timings.draft_tokens, "{what}: {timings:?}");
        drafted += timings.draft_tokens;
        accepted += timings.accepted_draft_tokens;
        expected.push(text);
    }
    eprintln!("one request at a time: {accepted} of {drafted} drafted tokens accepted");
    assert!(drafted > 0, "the prompts repeat themselves: something was drafted");
    assert!(accepted > 0, "some drafted tokens were the sampler's picks ({drafted} drafted)");

    // Several slots decoding at once, each with its drafts in the same batch. A batch of many
    // rows gives logits that differ from one token's in the last bits (see the test below), and
    // this random-weight model's two best tokens are often closer than that (README, "Drafts
    // from the prompt"): how far a text beside the others agrees with the one decoded alone
    // depends on which rows happened to share each batch, with drafts or without. What holds:
    // every reply runs to its length, and the drafts are counted.
    let mut client = drafting.inference().await;
    let mut running = Vec::new();
    for (_, request) in requests() {
        running.push(in_background(client.complete(request).await.unwrap().into_inner()));
    }
    for ((what, request), (reply, expected)) in requests().into_iter().zip(running.into_iter().zip(&expected)) {
        let reply = reply.await.unwrap().unwrap();
        let options = request.options.as_ref().unwrap();
        let usage = reply.done.usage.unwrap();
        if options.ignore_eos {
            assert_eq!(usage.completion_tokens, options.max_tokens, "{what}, beside the others");
        } else {
            assert!(usage.completion_tokens <= options.max_tokens, "{what}, beside the others: {usage:?}");
        }
        let agreed = reply.text().chars().zip(expected.chars()).take_while(|(a, b)| a == b).count();
        eprintln!("{what}, beside the others: the first {agreed} of {} characters as decoded alone", expected.chars().count());
        let timings = reply.done.timings.unwrap();
        drafted += timings.draft_tokens;
        accepted += timings.accepted_draft_tokens;
    }

    // The metrics count every draft of every generation.
    let metrics = http_get(&address, "/metrics").await;
    let counted = |result: &str| -> u32 {
        let key = format!("phi3d_draft_tokens_total{{result=\"{result}\"}} ");
        let line = metrics.lines().find(|line| line.starts_with(&key)).unwrap_or_else(|| panic!("no {key}in {metrics}"));
        line[key.len()..].trim().parse().unwrap()
    };
    assert_eq!(counted("accepted"), accepted, "{metrics}");
    assert_eq!(counted("rejected"), drafted - accepted, "{metrics}");

    // OpenAI's usage names them as predicted tokens.
    let body = serde_json::json!({
        "model": "phi3-test-tiny", "temperature": 0, "max_tokens": 32,
        "messages": [{"role": "user", "content": listing()}],
    });
    let response = http_post(&address, "/v1/chat/completions", &body.to_string()).await;
    let reply: serde_json::Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let details = &reply["usage"]["completion_tokens_details"];
    let kept = details["accepted_prediction_tokens"].as_u64().unwrap_or_else(|| panic!("{reply}"));
    let wasted = details["rejected_prediction_tokens"].as_u64().unwrap_or_else(|| panic!("{reply}"));
    assert!(kept < reply["usage"]["completion_tokens"].as_u64().unwrap().max(1), "{reply}");
    let metrics = http_get(&address, "/metrics").await;
    let now = |result: &str| {
        let key = format!("phi3d_draft_tokens_total{{result=\"{result}\"}} ");
        metrics.lines().find_map(|line| line.strip_prefix(&key)).unwrap().trim().parse::<u64>().unwrap()
    };
    assert_eq!((now("accepted"), now("rejected")), (u64::from(accepted) + kept, u64::from(drafted - accepted) + wasted));
}

#[tokio::test]
async fn a_reply_ends_where_max_tokens_says_whatever_the_draft_length() {
    // Drafts never carry a reply past max_tokens, nor past a stop string.
    let daemon = tiny_daemon().arg("--lookup-draft-max").arg("32").start().await;
    let plain = tiny_daemon().arg("--lookup-draft-max").arg("0").start().await;
    let repetitive = "red green blue. ".repeat(40);
    for max_tokens in [1, 2, 3, 7, 33] {
        let (text, timings) = complete(&daemon, complete_request(&repetitive, exactly(max_tokens))).await;
        let (expected, _) = complete(&plain, complete_request(&repetitive, exactly(max_tokens))).await;
        assert_eq!(text, expected, "max_tokens {max_tokens}: {timings:?}");
    }
    let mut client = daemon.inference().await;
    let reply = collect(client.complete(complete_request(&repetitive, exactly(33))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 33);
    // A stop string found inside an accepted draft ends the reply there.
    let text = reply.text();
    if let Some(stop) = text.get(text.len() / 2..text.len() / 2 + 3).filter(|stop| !stop.trim().is_empty()) {
        let options = GenerationOptions { stop: vec![stop.to_owned()], ..exactly(33) };
        let (cut, _) = complete(&daemon, complete_request(&repetitive, options.clone())).await;
        let (expected, _) = complete(&plain, complete_request(&repetitive, options)).await;
        assert_eq!(cut, expected);
        assert!(!cut.contains(stop), "{cut:?} stops before {stop:?}");
    }
}

/// What drafts rely on, measured on llama.cpp itself: the logits of tokens checked in one
/// batch are those of decoding them one at a time, up to rounding in the last bits, which grows
/// when the batch also carries another sequence's prompt. The most likely token stays the same.
#[test]
fn a_batch_gives_the_logits_of_one_token_at_a_time_up_to_rounding() {
    let backend = LlamaBackend::init().unwrap();
    let model = LlamaModel::load_from_file(&backend, tiny_model(), &LlamaModelParams::default()).unwrap();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(2048))
        .with_n_batch(2048)
        .with_n_ubatch(2048)
        .with_n_seq_max(2)
        .with_n_threads(1)
        .with_n_threads_batch(1)
        .with_kv_unified(true);
    let mut ctx = model.new_context(&backend, params).unwrap();
    let tokenize = |text: &str| model.vocab().tokenize(text.as_bytes(), true, false);
    let prompt = tokenize(&"one two three four five six seven eight nine ten. ".repeat(12));
    let other = tokenize(&listing());
    let checked = &prompt[5..14];
    let start = prompt.len() as i32;
    let mut batch = LlamaBatch::new(2048, 1);
    let add = |batch: &mut LlamaBatch, tokens: &[_], from: i32, seq: i32, logits: bool| {
        for (offset, token) in tokens.iter().enumerate() {
            batch.add(*token, from + offset as i32, &[seq], logits).unwrap();
        }
    };
    add(&mut batch, &prompt, 0, 0, false);
    ctx.decode(&mut batch).unwrap();
    let mut one_at_a_time = Vec::new();
    for (offset, token) in checked.iter().enumerate() {
        batch.clear();
        add(&mut batch, &[*token], start + offset as i32, 0, true);
        ctx.decode(&mut batch).unwrap();
        one_at_a_time.push(ctx.get_logits_ith(0).to_vec());
    }
    let argmax = |logits: &[f32]| logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    for with_other_prompt in [false, true] {
        ctx.clear_kv_cache();
        batch.clear();
        add(&mut batch, &prompt, 0, 0, false);
        ctx.decode(&mut batch).unwrap();
        batch.clear();
        add(&mut batch, checked, start, 0, true);
        if with_other_prompt {
            add(&mut batch, &other, 0, 1, false);
        }
        ctx.decode(&mut batch).unwrap();
        let mut largest = 0f32;
        for (index, single) in one_at_a_time.iter().enumerate() {
            let batched = ctx.get_logits_ith(index as i32);
            largest = batched.iter().zip(single).map(|(a, b)| (a - b).abs()).fold(largest, f32::max);
            assert_eq!(argmax(batched), argmax(single), "position {index}, beside another prompt: {with_other_prompt}");
        }
        eprintln!("checked in one batch (beside another prompt: {with_other_prompt}): logits differ by at most {largest:e}");
        assert!(largest < 0.05, "{largest}");
    }
}

async fn http_exchange(address: &str, request: String) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

async fn http_get(address: &str, path: &str) -> String {
    http_exchange(address, format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")).await
}

async fn http_post(address: &str, path: &str, body: &str) -> String {
    http_exchange(
        address,
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}
