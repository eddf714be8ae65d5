//! Tool calling: how tools are offered to the model, how its calls are constrained and parsed,
//! and the agent loop that runs them (generate → call → result → generate).
//!
//! Two prompt formats: Phi-4-mini's native one ([`phi4`]) for models that have the
//! `<|tool_call|>` token, and the generic JSON one ([`generic`]) for Phi-3 / Phi-3.5 and every
//! other model. Both are driven through [`ToolFormat`], so the loop does not care which.

pub mod agent;
pub mod conversation;
pub mod generic;
pub mod phi4;
pub mod schema_guard;
pub mod toolset;

use serde_json::Value;

use crate::engine::LoadedModel;
use crate::engine::task::Grammar;
use toolset::{OfferedTool, StepMode};

/// Who wrote a message of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    System,
    User,
    Assistant,
    Tool,
}

impl ChatRole {
    /// The role's name in chat templates.
    pub fn template_name(self) -> &'static str {
        match self {
            ChatRole::System => "system",
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
            ChatRole::Tool => "tool",
        }
    }
}

/// One message of a chat request, checked (`service::validate`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
    /// The calls an assistant message made.
    pub tool_calls: Vec<CallRecord>,
    /// For a tool message: the id of the call it answers.
    pub tool_call_id: String,
}

impl ChatMessage {
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        ChatMessage { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: String::new() }
    }
}

/// A call made earlier in the conversation, with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    pub id: String,
    pub name: String,
    pub arguments: Value,
}

/// Why a conversation cannot become a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("the model has no chat template; use Complete with a raw prompt")]
    NoChatTemplate,
    /// The request's messages are at fault; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("the prompt is {bytes} bytes of text, more than the context of {ctx_size} tokens can hold \
             (at most {most} bytes with this model's vocabulary); shorten the prompt or raise ctx_size")]
    TooLong { bytes: usize, most: usize, ctx_size: u32 },
}

/// A call the model made, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: Value,
}

/// What one generation step amounted to.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelReply {
    Answer(String),
    Calls(Vec<ParsedCall>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Generic,
    Phi4Native,
}

impl ToolFormat {
    /// Phi-4-mini's format when the vocabulary has its call token, else the generic one.
    pub fn detect(model: &LoadedModel) -> ToolFormat {
        let vocab = model.model.vocab();
        let tokens = vocab.tokenize(phi4::CALL_OPEN.as_bytes(), false, true);
        if tokens.len() == 1 { ToolFormat::Phi4Native } else { ToolFormat::Generic }
    }

    /// Text added to the system message to offer the tools, the same for every step of a
    /// turn: the step's own instruction comes last ([`ToolFormat::step_text`]), so that
    /// successive steps share their prefix. What the plugins wrote in it is marked plain text
    /// (`conversation::mark_untrusted`); only Phi-4's tool tags are markup.
    pub fn system_text(self, tools: &[OfferedTool]) -> String {
        match self {
            ToolFormat::Generic => conversation::mark_untrusted(&generic::system_instruction(tools)),
            ToolFormat::Phi4Native => phi4::system_addition(tools),
        }
    }

    /// A last system turn saying what this step may do; Phi-4-mini's native format says it
    /// with the grammar alone.
    pub fn step_text(self, mode: &StepMode) -> Option<String> {
        match self {
            ToolFormat::Generic => Some(generic::step_instruction(mode)),
            ToolFormat::Phi4Native => None,
        }
    }

    /// How the system text joins the user's own system message.
    pub fn separator(self) -> &'static str {
        match self {
            ToolFormat::Generic => "\n\n",
            ToolFormat::Phi4Native => "",
        }
    }

    /// Every step of either format has a grammar: the answer-only step too, so that
    /// `max_steps` holds.
    pub fn grammar(self, tools: &[OfferedTool], mode: &StepMode) -> Result<Grammar, String> {
        match self {
            ToolFormat::Generic => {
                let schema = generic::reply_schema(tools, mode);
                Ok(Grammar { gbnf: schema_grammar(&schema)?, trigger: None })
            }
            ToolFormat::Phi4Native => phi4::grammar(tools, mode).map(|(gbnf, trigger)| Grammar { gbnf, trigger }),
        }
    }

    /// The call tokens must come out as text for the native format to be parsed.
    pub fn renders_special_tokens(self) -> bool {
        self == ToolFormat::Phi4Native
    }

    pub fn parse(self, text: &str) -> Result<ModelReply, String> {
        match self {
            ToolFormat::Generic => generic::parse_reply(text),
            ToolFormat::Phi4Native => phi4::parse_reply(text),
        }
    }

    pub fn stream(self) -> ReplyStream {
        match self {
            ToolFormat::Generic => ReplyStream::Generic(generic::ResponseStream::default()),
            ToolFormat::Phi4Native => ReplyStream::Phi4(phi4::AnswerStream::default()),
        }
    }

    /// An assistant turn that made calls, as the model would have written it, marked plain
    /// text but for Phi-4's call tags.
    pub fn render_calls(self, calls: &[ParsedCall]) -> String {
        match self {
            ToolFormat::Generic => conversation::mark_untrusted(
                &calls.iter().map(|call| generic::render_call(&call.name, &call.arguments)).collect::<Vec<_>>().join("\n"),
            ),
            ToolFormat::Phi4Native => phi4::render_calls(calls),
        }
    }

    /// An assistant answer, as the model would have written it.
    pub fn render_answer(self, text: &str) -> String {
        match self {
            ToolFormat::Generic => generic::render_response(text),
            ToolFormat::Phi4Native => text.to_owned(),
        }
    }

    /// The role and content of the turn that gives a tool's result to the model.
    pub fn result_turn(self, name: &str, content: &str, is_error: bool) -> (&'static str, String) {
        match self {
            ToolFormat::Generic => ("user", generic::render_result(name, content, is_error)),
            ToolFormat::Phi4Native => (phi4::RESULT_ROLE, phi4::render_result(name, content, is_error)),
        }
    }
}

/// llama.cpp's grammar for a JSON schema, without its optional whitespace: on a small device
/// every token counts, and a small model given the choice may fill its budget with newlines
/// and indentation instead of finishing the call.
pub fn schema_grammar(schema: &Value) -> Result<String, String> {
    let gbnf = llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|err| err.to_string())?;
    Ok(gbnf
        .lines()
        .map(|line| if line.starts_with("space ::=") { "space ::= \" \"?" } else { line })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Follows a reply as it is generated, handing out the text meant for the user.
pub enum ReplyStream {
    Generic(generic::ResponseStream),
    Phi4(phi4::AnswerStream),
}

impl ReplyStream {
    pub fn push(&mut self, text: &str) -> String {
        match self {
            ReplyStream::Generic(stream) => stream.push(text),
            ReplyStream::Phi4(stream) => stream.push(text),
        }
    }
}
