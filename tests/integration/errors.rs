//! Bad requests get INVALID_ARGUMENT naming the field, and cost nothing: the daemon serves
//! the next request as if nothing happened.

use phi3d_proto::v1::{ChatRequest, GenerationOptions, Message, Role};

use crate::common::{chat_request, collect, complete_request, exactly, tiny_daemon, user};

fn options(edit: impl FnOnce(&mut GenerationOptions)) -> GenerationOptions {
    let mut options = exactly(4);
    edit(&mut options);
    options
}

#[tokio::test]
async fn invalid_arguments_name_the_field() {
    let daemon = tiny_daemon().arg("--ctx-size").arg("128").start().await;
    let mut client = daemon.inference().await;
    let cases: Vec<(ChatRequest, &str)> = vec![
        (chat_request("hi", options(|o| o.temperature = Some(-1.0))), "options.temperature"),
        (chat_request("hi", options(|o| o.top_p = Some(0.0))), "options.top_p"),
        (chat_request("hi", options(|o| o.top_p = Some(1.01))), "options.top_p"),
        (chat_request("hi", options(|o| o.min_p = Some(2.0))), "options.min_p"),
        (chat_request("hi", options(|o| o.repeat_penalty = Some(-1.0))), "options.repeat_penalty"),
        (chat_request("hi", options(|o| o.stop = vec![String::new()])), "options.stop[0]"),
        (ChatRequest { request_id: String::new(), messages: vec![], options: None, tools: None }, "messages must not be empty"),
        (
            ChatRequest {
                request_id: String::new(),
                messages: vec![user("hi"), Message { role: Role::Unspecified as i32, content: "?".into(), ..Message::default() }],
                options: None,
                tools: None,
            },
            "messages[1].role",
        ),
        (
            ChatRequest {
                request_id: String::new(),
                messages: vec![Message { role: 42, content: "?".into(), ..Message::default() }],
                options: None,
                tools: None,
            },
            "messages[0].role",
        ),
    ];
    for (request, field) in cases {
        let status = client.chat(request).await.expect_err(field);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {}", status.message());
    }
    let status = client.complete(complete_request("", exactly(4))).await.expect_err("empty prompt");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("prompt"), "{}", status.message());

    // Too long for a 128-token context: refused with both numbers, never truncated.
    let long = "many words ".repeat(200);
    let status = client.complete(complete_request(&long, exactly(4))).await.expect_err("prompt too long");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("128"), "{}", status.message());
    let tokens = client
        .tokenize(phi3d_proto::v1::TokenizeRequest { text: long.clone(), add_special: true, parse_special: true })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .len();
    assert!(status.message().contains(&tokens.to_string()), "{tokens}: {}", status.message());

    // None of that disturbed the daemon.
    let reply = collect(client.chat(chat_request("hi", exactly(4))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(reply.done.usage.unwrap().completion_tokens, 4);
    let status = daemon.admin().await.get_status(phi3d_proto::v1::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.active_requests, status.queue_depth), (0, 0));
}
