//! Where in a TOML text a mistake is, for the one-line errors of config files and plugin
//! manifests alike: the line of a byte offset (toml's errors carry a span), the line that sets
//! a key (for mistakes found after parsing), and toml's message on one line (its Display is a
//! multi-line snippet).

/// The 1-based line holding byte `offset`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The first line that sets `field`: a top-level key (`ctx_size = ...`, or its own table
/// `[sandbox]`), or `table.key` (the key inside `[table]`, or the dotted or inline form at the
/// top).
pub fn key_line(text: &str, field: &str) -> Option<usize> {
    let (table, key) = field.split_once('.').map_or((None, field), |(table, key)| (Some(table), key));
    let mut current: Option<String> = None;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
            current = Some(header.trim().to_owned());
            if table.is_none() && current.as_deref() == Some(key) {
                return Some(index + 1);
            }
            continue;
        }
        let assigned = line.split_once('=').map(|(left, _)| left.trim().trim_matches('"'));
        let here = match (table, current.as_deref()) {
            (None, None) => assigned == Some(key),
            (Some(table), Some(current)) if table == current => assigned == Some(key),
            (Some(table), None) => assigned == Some(&format!("{table}.{key}")) || assigned == Some(table),
            _ => false,
        };
        if here {
            return Some(index + 1);
        }
    }
    None
}

/// toml's message for `err`, on one line.
pub fn message(err: &toml::de::Error) -> String {
    err.message().trim().replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_at_the_top_in_their_table_or_dotted() {
        let text = "a = 1\n\"b\" = 2\nc.d = 3\n[e]\nf = 4\n[g]\n";
        assert_eq!(key_line(text, "a"), Some(1));
        assert_eq!(key_line(text, "b"), Some(2));
        assert_eq!(key_line(text, "c.d"), Some(3));
        assert_eq!(key_line(text, "e.f"), Some(5));
        assert_eq!(key_line(text, "g"), Some(6));
        assert_eq!(key_line(text, "f"), None, "f is e's, not a top-level key");
        assert_eq!(line_of(text, 7), 2);
    }
}
