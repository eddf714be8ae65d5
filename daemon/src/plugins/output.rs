//! A tool result as the text the model reads, cut to the plugin's `max_output_bytes`.
//!
//! The model only reads text, so each MCP content block becomes text: text as is, embedded
//! text resources by their text, and binary blocks (images, audio, blobs) by a short note
//! instead of their base64, which would only burn context. When a result has no content
//! but structured content, that JSON is the text.

use rmcp::model::{CallToolResult, ContentBlock, ResourceContents};

/// The text of `result`, and whether it had to be cut to `max_bytes`.
pub fn render(result: &CallToolResult, max_bytes: usize) -> (String, bool) {
    let mut parts: Vec<String> = result.content.iter().map(block_text).collect();
    if parts.is_empty()
        && let Some(structured) = &result.structured_content
    {
        parts.push(structured.to_string());
    }
    cut(parts.join("\n"), max_bytes)
}

/// Cuts `text` to at most `max_bytes` (on a character boundary) and says so at the end.
pub fn cut(mut text: String, max_bytes: usize) -> (String, bool) {
    if text.len() <= max_bytes {
        return (text, false);
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("\n[output cut at {max_bytes} bytes]"));
    (text, true)
}

fn block_text(block: &ContentBlock) -> String {
    match block {
        ContentBlock::Text(text) => text.text.clone(),
        ContentBlock::Image(image) => format!("[image: {}, {} base64 bytes]", image.mime_type, image.data.len()),
        ContentBlock::Audio(audio) => format!("[audio: {}, {} base64 bytes]", audio.mime_type, audio.data.len()),
        ContentBlock::Resource(embedded) => match &embedded.resource {
            ResourceContents::TextResourceContents { text, .. } => text.clone(),
            ResourceContents::BlobResourceContents { uri, blob, .. } => {
                format!("[resource {uri}: {} base64 bytes]", blob.len())
            }
            // rmcp marks these enums non-exhaustive: kinds added by later MCP versions.
            _ => "[resource of an unknown kind]".to_owned(),
        },
        ContentBlock::ResourceLink(link) => format!("[link: {}]", link.uri),
        _ => "[content of an unknown kind]".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(json: serde_json::Value) -> CallToolResult {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn blocks_become_text() {
        let r = result(serde_json::json!({
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "image", "data": "aGk=", "mimeType": "image/png"},
                {"type": "resource", "resource": {"uri": "file:///a", "text": "inside"}},
                {"type": "resource", "resource": {"uri": "file:///b", "blob": "AAAA"}},
            ]
        }));
        assert_eq!(
            render(&r, 1000),
            ("hello\n[image: image/png, 4 base64 bytes]\ninside\n[resource file:///b: 4 base64 bytes]".into(), false)
        );
    }

    #[test]
    fn structured_content_when_there_is_no_text() {
        let r = result(serde_json::json!({"content": [], "structuredContent": {"t": 1}}));
        assert_eq!(render(&r, 1000).0, "{\"t\":1}");
    }

    #[test]
    fn cut_on_a_char_boundary_and_reported() {
        assert_eq!(cut("abc".into(), 3), ("abc".into(), false));
        let (text, was_cut) = cut("aé€x".into(), 4);
        assert!(was_cut);
        assert_eq!(text, "aé\n[output cut at 4 bytes]");
    }
}
