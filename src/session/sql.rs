//! Recognises the few one-statement SQL commands the broker answers itself
//! (`LISTEN`, `UNLISTEN`, `DEALLOCATE`), from a simple Query's text. Anything else, including
//! several statements, is left to the server.

use crate::proto::split_cstr;

/// A command the broker may answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `LISTEN channel`
    Listen(String),
    /// `UNLISTEN channel`, or `UNLISTEN *` (`None`).
    Unlisten(Option<String>),
    /// `DEALLOCATE [PREPARE] name`, or `DEALLOCATE ALL` (`None`).
    Deallocate(Option<String>),
}

/// The verbs `parse` recognises (lowercase).
const VERBS: [&[u8]; 3] = [b"listen", b"unlisten", b"deallocate"];

/// Parses a Query message body (NUL-terminated text). Runs on every simple Query in
/// transaction mode, so anything else is turned away on its first word, without allocating.
pub fn parse(body: &[u8]) -> Option<Command> {
    let verb = body.trim_ascii_start().split(|b| b.is_ascii_whitespace() || *b == 0).next().unwrap_or_default();
    if !VERBS.iter().any(|v| verb.eq_ignore_ascii_case(v)) {
        return None;
    }
    let text = std::str::from_utf8(split_cstr(body)?.0).ok()?.trim().trim_end_matches(';').trim_end();
    let (verb, rest) = text.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    match verb.to_ascii_lowercase().as_str() {
        "listen" => identifier(rest).map(Command::Listen),
        "unlisten" if rest == "*" => Some(Command::Unlisten(None)),
        "unlisten" => identifier(rest).map(|n| Command::Unlisten(Some(n))),
        "deallocate" => {
            let rest = match rest.split_once(char::is_whitespace) {
                Some((w, after)) if w.eq_ignore_ascii_case("prepare") => after.trim_start(),
                _ => rest,
            };
            if rest.eq_ignore_ascii_case("all") {
                return Some(Command::Deallocate(None));
            }
            identifier(rest).map(|n| Command::Deallocate(Some(n)))
        }
        _ => None,
    }
}

/// One SQL identifier: `"Quoted ""as is"""`, or unquoted and folded to lower case. As in
/// PostgreSQL's scanner (UTF-8 databases), only ASCII letters fold, and any non-ASCII
/// character may appear in an unquoted name.
fn identifier(s: &str) -> Option<String> {
    if let Some(quoted) = s.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        return (!inner.is_empty() && !inner.replace("\"\"", "").contains('"')).then(|| inner.replace("\"\"", "\""));
    }
    let start = |c: char| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii();
    let ok = s.chars().next().is_some_and(start) && s.chars().all(|c| start(c) || c.is_ascii_digit() || c == '$');
    ok.then(|| s.to_ascii_lowercase())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn listen_and_unlisten_are_recognised() {
        assert_eq!(parse(b"LISTEN employee_changes\0"), Some(Command::Listen("employee_changes".into())));
        assert_eq!(parse(b"  listen \"Mixed Case\" ;\0"), Some(Command::Listen("Mixed Case".into())));
        assert_eq!(parse(b"UNLISTEN *\0"), Some(Command::Unlisten(None)));
        assert_eq!(parse(b"unlisten Foo\0"), Some(Command::Unlisten(Some("foo".into()))));
    }

    #[test]
    fn deallocate_forms_are_recognised() {
        assert_eq!(parse(b"DEALLOCATE s1\0"), Some(Command::Deallocate(Some("s1".into()))));
        assert_eq!(parse(b"  deallocate prepare Foo ;\0"), Some(Command::Deallocate(Some("foo".into()))));
        assert_eq!(parse(b"DEALLOCATE \"Mixed\"\"Q\"\0"), Some(Command::Deallocate(Some("Mixed\"Q".into()))));
        assert_eq!(parse(b"DEALLOCATE ALL\0"), Some(Command::Deallocate(None)));
    }

    #[test]
    fn unquoted_names_fold_ascii_letters_only() {
        let dealloc = |sql: &str| parse(format!("{sql}\0").as_bytes());
        assert_eq!(dealloc("DEALLOCATE ÉTAT"), Some(Command::Deallocate(Some("État".into()))));
        assert_eq!(dealloc("DEALLOCATE \"ÉTAT\""), Some(Command::Deallocate(Some("ÉTAT".into()))));
        assert_eq!(dealloc("DEALLOCATE s€1"), Some(Command::Deallocate(Some("s€1".into()))));
        assert_eq!(dealloc("DEALLOCATE ǅx"), Some(Command::Deallocate(Some("ǅx".into()))));
    }

    #[test]
    fn anything_else_is_left_to_the_server() {
        assert_eq!(parse(b"SELECT 1\0"), None);
        assert_eq!(parse(b"LISTEN a; SELECT 1\0"), None);
        assert_eq!(parse(b"LISTEN\0"), None);
        assert_eq!(parse(b"DEALLOCATE a; SELECT 1\0"), None);
        assert_eq!(parse(b"LISTEN 1abc\0"), None);
        assert_eq!(parse(b"LISTENING x\0"), None);
        assert_eq!(parse(b"\0"), None);
    }
}
