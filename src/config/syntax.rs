//! Messages for TOML syntax and type errors that name the key but never echo the value.

/// The parser's message with its position, but without the excerpt of the offending line
/// that toml's Display adds: that line may hold a password, and this message is logged.
pub(super) fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = redact_value(e.message().trim_end());
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return message;
    };
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    match key_at(text, at) {
        Some(key) => format!("line {line}, column {column} ({key}): {message}"),
        None => format!("line {line}, column {column}: {message}"),
    }
}

/// The dotted key whose value starts at byte `at`: the section header above it and the key
/// left of the `=` on its line. Names the key without echoing the value (it may be a secret).
fn key_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at)?;
    let line = before.rsplit('\n').next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() {
        return None;
    }
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

/// serde's "invalid type: string \"hunter2\", expected i64" without the value.
fn redact_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let kind = rest.split([' ', ',']).next().unwrap_or_default();
            let expected = rest.rsplit_once(", expected ").map_or("", |(_, e)| e);
            return format!("{}{kind}, expected {expected}", prefix);
        }
    }
    message.to_string()
}
