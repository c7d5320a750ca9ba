//! What a statement's text says it may do to session state, found in one pass over the bytes
//! of every Query and Parse in transaction and statement mode. A hint only asks for a closer
//! look (the probe after the transaction): a false alarm costs one query, a miss costs
//! correctness, so the patterns are wide where that is cheap.

/// What a statement may do, as a set of flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hints(u8);

impl Hints {
    /// Nothing to look at.
    pub const NONE: Hints = Hints(0);
    /// May change a setting (`SET`, `RESET`, `DISCARD`, `set_config`).
    pub const SETTINGS: Hints = Hints(1);
    /// May create state that cannot follow the client to another server.
    pub const PIN: Hints = Hints(2);
    /// May drop such state.
    pub const RELEASE: Hints = Hints(4);
    /// Reads the session's last sequence value (`lastval`, `currval`).
    pub const LASTVAL: Hints = Hints(8);
    /// A statement too long to read: anything may happen.
    pub const ALL: Hints = Hints(15);

    /// True if any flag of `other` is set.
    #[inline]
    pub fn has(self, other: Hints) -> bool {
        self.0 & other.0 != 0
    }
}

impl std::ops::BitOr for Hints {
    type Output = Hints;
    fn bitor(self, rhs: Hints) -> Hints {
        Hints(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Hints {
    fn bitor_assign(&mut self, rhs: Hints) {
        self.0 |= rhs.0;
    }
}

/// The statement text of a Query or Parse body (a Parse's after its statement name).
pub fn statement_text(tag: u8, body: &[u8]) -> Option<&[u8]> {
    match tag {
        crate::proto::tag::QUERY => Some(body),
        crate::proto::tag::PARSE => crate::proto::split_cstr(body).map(|(_, text)| text),
        _ => None,
    }
}

/// Longest statement text [`Recent`] keeps, in bytes: longer ones are read each time.
const RECENT_MAX: usize = 512;

/// The last statement text read and its hints. Clients send the same text again and again
/// (a driver's unnamed statement, `BEGIN`, `COMMIT`), and the broker reads one text twice
/// when it chooses a server by it (`lastval()`): a comparison is cheaper than a reading.
#[derive(Debug, Default)]
pub struct Recent {
    text: Vec<u8>,
    hints: Hints,
}

impl Recent {
    /// The hints of `text`, read again only when it differs from the last one.
    pub fn hints(&mut self, text: &[u8]) -> Hints {
        if text == self.text.as_slice() {
            return self.hints;
        }
        let found = hints(text);
        if text.len() <= RECENT_MAX {
            self.text.clear();
            self.text.extend_from_slice(text);
            self.hints = found;
        }
        found
    }

    /// Gives the kept text's memory back (a client going idle).
    pub fn forget(&mut self) {
        *self = Recent::default();
    }
}

/// Named statements kept at most in [`Statements`]; past it every execution is suspect.
const MAX_STATEMENTS: usize = 1024;

/// The hints of a client's prepared statements whose text hinted at something, so that each
/// execution (a Bind, maybe in a later transaction than its Parse) hints the same. Statements
/// that hint nothing, most of them, are not kept.
#[derive(Debug, Default)]
pub struct Statements {
    names: std::collections::HashMap<Box<[u8]>, Hints>,
    /// More were kept than `MAX_STATEMENTS`: any Bind may run one.
    overflow: bool,
}

impl Statements {
    /// A Parse of `name` whose text hinted `hints`.
    pub fn parsed(&mut self, name: &[u8], hints: Hints) {
        if hints == Hints::NONE {
            if !self.names.is_empty() {
                self.names.remove(name);
            }
        } else if self.names.len() < MAX_STATEMENTS || self.names.contains_key(name) {
            self.names.insert(name.into(), hints);
        } else {
            self.overflow = true;
        }
    }

    /// What a Bind of `name` hints.
    pub fn bound(&self, name: &[u8]) -> Hints {
        if self.overflow {
            return Hints::ALL;
        }
        self.names.get(name).copied().unwrap_or_default()
    }

    /// A Close of statement `name`.
    pub fn closed(&mut self, name: &[u8]) {
        self.names.remove(name);
    }

    /// A Parse or Close the broker answers without a server: kept as if the server saw it.
    /// Custom settings a parsed statement may set are added to `custom`.
    pub fn observe_alone(&mut self, tag: u8, body: &[u8], custom: &mut Vec<String>) {
        let Some((name, rest)) = split_cstr_at(tag, body) else { return };
        if tag != crate::proto::tag::PARSE {
            return self.closed(name);
        }
        let found = hints(rest);
        if found.has(Hints::SETTINGS) {
            custom_names(rest, custom);
        }
        self.parsed(name, found);
    }

    /// True if no Bind can hint anything: Binds need not be read.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && !self.overflow
    }
}

/// A Parse's statement name and text, or a statement Close's name.
fn split_cstr_at(tag: u8, body: &[u8]) -> Option<(&[u8], &[u8])> {
    match tag {
        crate::proto::tag::PARSE => crate::proto::split_cstr(body),
        crate::proto::tag::CLOSE => match body.split_first() {
            Some((&crate::proto::target::STATEMENT, rest)) => crate::proto::split_cstr(rest),
            _ => None,
        },
        _ => None,
    }
}

/// Where a keyword counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// As a statement's first word (`UPDATE t SET x` is no `SET`).
    Start,
    /// As a whole word anywhere.
    Word,
    /// As the start of a word anywhere (`pg_advisory_lock_shared`).
    Prefix,
}

/// The keywords looked for (lowercase), where, and what they hint; grouped by first letter
/// (`BY_FIRST` indexes the groups).
const KEYWORDS: [(&[u8], Place, Hints); 19] = [
    (b"close", Place::Start, Hints::RELEASE),
    (b"currval", Place::Word, Hints::LASTVAL),
    (b"discard", Place::Start, Hints(Hints::SETTINGS.0 | Hints::RELEASE.0)),
    (b"drop", Place::Start, Hints::RELEASE),
    (b"deallocate", Place::Start, Hints::RELEASE),
    (b"hold", Place::Word, Hints::PIN),
    (b"listen", Place::Start, Hints::PIN),
    (b"lastval", Place::Word, Hints::LASTVAL),
    (b"pg_advisory_lock", Place::Prefix, Hints::PIN),
    (b"pg_try_advisory_lock", Place::Prefix, Hints::PIN),
    (b"pg_temp", Place::Prefix, Hints::PIN),
    (b"prepare", Place::Start, Hints::PIN),
    (b"pg_advisory_unlock", Place::Prefix, Hints::RELEASE),
    (b"reset", Place::Start, Hints::SETTINGS),
    (b"set", Place::Start, Hints::SETTINGS),
    (b"set_config", Place::Word, Hints::SETTINGS),
    (b"temp", Place::Word, Hints::PIN),
    (b"temporary", Place::Word, Hints::PIN),
    (b"unlisten", Place::Start, Hints::RELEASE),
];

/// For each letter (`a` = 0), the range of `KEYWORDS` that starts with it.
const BY_FIRST: [(u8, u8); 26] = {
    let mut t = [(0u8, 0u8); 26];
    let mut i = 0;
    while i < KEYWORDS.len() {
        let letter = (KEYWORDS[i].0[0] - b'a') as usize;
        if t[letter].1 == 0 {
            t[letter].0 = i as u8;
        }
        // The groups must be contiguous: a keyword out of its group fails the build.
        assert!(t[letter].1 == 0 || t[letter].1 as usize == i);
        t[letter].1 = i as u8 + 1;
        i += 1;
    }
    t
};

/// Byte classes for the scan: part of an identifier, and the first letter of a keyword.
const IDENT: u8 = 1;
const FIRST: u8 = 2;

/// The class of every byte, so that the scan looks each byte up once.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
            t[b] |= IDENT;
        }
        b += 1;
    }
    let mut i = 0;
    while i < KEYWORDS.len() {
        let first = KEYWORDS[i].0[0];
        t[first as usize] |= FIRST;
        t[first.to_ascii_uppercase() as usize] |= FIRST;
        i += 1;
    }
    t
};

#[inline]
fn is_ident(b: u8) -> bool {
    CLASS[b as usize] & IDENT != 0
}

/// The hints of a statement text (a Query body or a Parse's query; a NUL ends it). Runs on
/// every statement in transaction mode: a byte costs a table lookup, and only a word whose
/// first letter starts a keyword is compared, with that letter's keywords.
pub fn hints(sql: &[u8]) -> Hints {
    let mut out = Hints::NONE;
    // No word of the current statement seen yet.
    let mut at_start = true;
    let mut rest = sql;
    while let Some((&b, tail)) = rest.split_first() {
        let class = CLASS[b as usize];
        if class & IDENT != 0 {
            if class & FIRST != 0 {
                out |= keyword_at(rest, at_start);
            }
            at_start = false;
            let word = tail.iter().position(|&c| !is_ident(c)).unwrap_or(tail.len());
            rest = tail.get(word..).unwrap_or_default();
            continue;
        }
        match b {
            0 => break,
            b';' => at_start = true,
            // Comments before a statement's first word.
            b'-' if at_start && tail.first() == Some(&b'-') => {
                let end = memchr::memchr(b'\n', tail).map_or(tail.len(), |p| p + 1);
                rest = tail.get(end..).unwrap_or_default();
                continue;
            }
            b'/' if at_start && tail.first() == Some(&b'*') => {
                let body = tail.get(1..).unwrap_or_default();
                let end = memchr::memmem::find(body, b"*/").map_or(body.len(), |p| p + 2);
                rest = body.get(end..).unwrap_or_default();
                continue;
            }
            b if b.is_ascii_whitespace() => {}
            _ => at_start = false,
        }
        rest = tail;
    }
    out
}

/// True if a statement text calls `lastval` or `currval` (the word, then `(`): a cheap look
/// for `val` behind `last` or `curr`, run before a server is chosen for the statement.
pub fn reads_lastval(sql: &[u8]) -> bool {
    memchr::memchr2_iter(b'v', b'V', sql).any(|v| {
        let Some(start) = v.checked_sub(4) else { return false };
        sql.get(start..start + 7).is_some_and(|w| {
            w[5..].eq_ignore_ascii_case(b"al")
                && (w[..4].eq_ignore_ascii_case(b"last") || w[..4].eq_ignore_ascii_case(b"curr"))
        }) && (start == 0 || sql.get(start - 1).is_some_and(|&b| !is_ident(b)))
            && sql.get(start + 7..).is_some_and(|rest| rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'('))
    })
}

/// True if a statement text surely creates state that pins its client (the narrower test
/// a refusal needs: `hints` also flags a column named `temp`). Run only when a refusal is
/// possible, before a server is chosen.
pub fn surely_pins(sql: &[u8]) -> bool {
    if !hints(sql).has(Hints::PIN) {
        return false;
    }
    let text = String::from_utf8_lossy(sql.split(|&b| b == 0).next().unwrap_or_default()).to_ascii_lowercase();
    let words: Vec<&str> =
        text.split(|c: char| c.is_ascii_whitespace() || c == '(').filter(|w| !w.is_empty()).collect();
    let joined = words.join(" ");
    const ANYWHERE: [&str; 8] = [
        "pg_advisory_lock",
        "pg_try_advisory_lock",
        "with hold",
        "create temp",
        "create local temp",
        "create global temp",
        "into temp",
        "create table pg_temp.",
    ];
    if ANYWHERE.iter().any(|p| joined.contains(p)) {
        return true;
    }
    joined.split(';').map(str::trim_start).any(|statement| {
        let mut w = statement.split(' ');
        match (w.next(), w.next()) {
            (Some("prepare"), Some(next)) => next != "transaction",
            (Some("listen"), Some(_)) => true,
            _ => false,
        }
    })
}

/// Custom setting names kept per client at most.
pub const MAX_CUSTOM_NAMES: usize = 64;

/// Adds to `out` the custom setting names (`app.tenant`: a dot in them) that a statement
/// which hinted `SETTINGS` sets: the literal first argument of `set_config`, or the name after
/// `SET` / `RESET` (`SESSION` or `LOCAL` skipped). `pg_settings` does not list them, so the
/// probe must ask for them by name. A name passed as a parameter cannot be seen.
pub fn custom_names(sql: &[u8], out: &mut Vec<String>) {
    let text = String::from_utf8_lossy(sql.split(|&b| b == 0).next().unwrap_or_default());
    let lower = text.to_ascii_lowercase();
    let mut found = Vec::new();
    for (at, _) in lower.match_indices("set_config") {
        let rest = text[at + "set_config".len()..].trim_start();
        let Some(rest) = rest.strip_prefix('(').map(str::trim_start) else { continue };
        let Some(rest) = rest.strip_prefix('\'') else { continue };
        let mut name = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                } else {
                    break;
                }
            }
            name.push(c);
        }
        found.push(name);
    }
    for statement in text.split(';') {
        let mut words = statement.split_whitespace();
        let Some(verb) = words.next() else { continue };
        if !verb.eq_ignore_ascii_case("set") && !verb.eq_ignore_ascii_case("reset") {
            continue;
        }
        let mut name = words.next().unwrap_or_default();
        if name.eq_ignore_ascii_case("session") || name.eq_ignore_ascii_case("local") {
            name = words.next().unwrap_or_default();
        }
        // `SET app.tenant = 'x'`, `SET app.tenant='x'`, `SET app.tenant TO 'x'`.
        let name = name.split('=').next().unwrap_or_default();
        found.push(name.to_ascii_lowercase());
    }
    for name in found {
        let custom = name.contains('.') && !name.is_empty() && !name.contains('\0');
        if custom && !out.iter().any(|n| n.eq_ignore_ascii_case(&name)) && out.len() < MAX_CUSTOM_NAMES {
            out.push(name);
        }
    }
}

/// The hints of the keywords that start `word` (the rest of the text from a word's start).
#[inline]
fn keyword_at(word: &[u8], at_start: bool) -> Hints {
    let mut out = Hints::NONE;
    let Some(letter) = word.first().map(|b| (b | 0x20).wrapping_sub(b'a') as usize) else { return out };
    let Some(&(from, to)) = BY_FIRST.get(letter) else { return out };
    for &(keyword, place, hint) in KEYWORDS.get(from as usize..to as usize).unwrap_or_default() {
        if place == Place::Start && !at_start {
            continue;
        }
        let Some(candidate) = word.get(..keyword.len()) else { continue };
        // Byte by byte: most words differ from a keyword in their first bytes.
        if !candidate.iter().zip(keyword).all(|(&a, &k)| a.to_ascii_lowercase() == k) {
            continue;
        }
        let ends = word.get(keyword.len()).is_none_or(|&b| !is_ident(b));
        if place == Place::Prefix || ends {
            out |= hint;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_statements_are_hinted_at_a_statement_start_only() {
        assert!(hints(b"SET statement_timeout = 0").has(Hints::SETTINGS));
        assert!(hints(b"  set local work_mem='1MB'").has(Hints::SETTINGS));
        assert!(hints(b"BEGIN; SET search_path TO app; COMMIT").has(Hints::SETTINGS));
        assert!(hints(b"RESET ALL").has(Hints::SETTINGS));
        assert!(hints(b"discard all").has(Hints::SETTINGS));
        assert!(hints(b"/* app */ SET x = 1").has(Hints::SETTINGS));
        assert!(hints(b"-- note\nSET x = 1").has(Hints::SETTINGS));
        assert!(hints(b"SELECT pg_catalog.set_config('a', 'b', false)").has(Hints::SETTINGS));
        assert!(!hints(b"UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 2").has(Hints::SETTINGS));
        assert!(!hints(b"SELECT * FROM t OFFSET 10").has(Hints::SETTINGS));
        assert!(!hints(b"SELECT settings FROM t").has(Hints::SETTINGS));
    }

    #[test]
    fn pinning_statements_are_hinted() {
        assert!(hints(b"SELECT pg_advisory_lock(1)").has(Hints::PIN));
        assert!(hints(b"select PG_TRY_ADVISORY_LOCK_SHARED($1)").has(Hints::PIN));
        assert!(hints(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1").has(Hints::PIN));
        assert!(hints(b"CREATE TEMP TABLE t (i int)").has(Hints::PIN));
        assert!(hints(b"create temporary table t (i int)").has(Hints::PIN));
        assert!(hints(b"CREATE TABLE pg_temp.t (i int)").has(Hints::PIN));
        assert!(hints(b"PREPARE p AS SELECT 1").has(Hints::PIN));
        assert!(hints(b"BEGIN; LISTEN x").has(Hints::PIN));
        assert!(!hints(b"SELECT pg_advisory_xact_lock(1)").has(Hints::PIN), "released with the transaction");
        assert!(!hints(b"SELECT temperature, holder FROM readings").has(Hints::PIN));
    }

    #[test]
    fn releasing_statements_are_hinted() {
        for sql in [
            &b"SELECT pg_advisory_unlock(1)"[..],
            b"select pg_advisory_unlock_all()",
            b"CLOSE c",
            b"close all",
            b"DROP TABLE t",
            b"DEALLOCATE p",
            b"UNLISTEN *",
            b"DISCARD TEMP",
        ] {
            assert!(hints(sql).has(Hints::RELEASE), "{}", String::from_utf8_lossy(sql));
        }
    }

    #[test]
    fn sequence_reads_are_hinted() {
        assert!(hints(b"SELECT lastval()").has(Hints::LASTVAL));
        assert!(hints(b"SELECT CURRVAL('s')").has(Hints::LASTVAL));
        assert!(!hints(b"SELECT nextval('s')").has(Hints::LASTVAL));
    }

    #[test]
    fn ordinary_statements_hint_nothing() {
        for sql in [
            &b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"[..],
            b"UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
            b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
            b"BEGIN",
            b"END",
            b"",
        ] {
            assert_eq!(hints(sql), Hints::NONE, "{}", String::from_utf8_lossy(sql));
        }
    }

    #[test]
    fn a_statement_that_hinted_hints_again_at_each_execution_until_closed() {
        let mut st = Statements::default();
        assert!(st.is_empty());
        st.parsed(b"s1", hints(b"SELECT pg_advisory_lock($1)"));
        st.parsed(b"s2", hints(b"SELECT 1"));
        assert!(st.bound(b"s1").has(Hints::PIN));
        assert_eq!(st.bound(b"s2"), Hints::NONE);
        st.parsed(b"s1", hints(b"SELECT 2"));
        assert_eq!(st.bound(b"s1"), Hints::NONE, "the name was prepared again");
        st.parsed(b"s3", Hints::SETTINGS);
        st.closed(b"s3");
        assert!(st.is_empty());
    }

    #[test]
    fn past_the_cap_every_execution_is_suspect() {
        let mut st = Statements::default();
        for i in 0..=MAX_STATEMENTS {
            st.parsed(format!("s{i}").as_bytes(), Hints::PIN);
        }
        assert_eq!(st.bound(b"never-prepared"), Hints::ALL);
    }

    #[test]
    fn custom_setting_names_are_taken_from_set_config_and_set() {
        let mut names = Vec::new();
        custom_names(b"SELECT set_config('app.tenant', $1, false), SET_CONFIG ( 'it''s.x', 'v', false)", &mut names);
        custom_names(
            b"SET app.user_id = 7; set local app.local TO 1; RESET App.Gone; SET work_mem = '1MB'",
            &mut names,
        );
        custom_names(b"SELECT set_config('app.tenant', 'again', false)", &mut names);
        assert_eq!(names, ["app.tenant", "it's.x", "app.user_id", "app.local", "app.gone"]);
    }

    #[test]
    fn lastval_and_currval_are_found_before_a_server_is_chosen() {
        assert!(reads_lastval(b"SELECT lastval()"));
        assert!(reads_lastval(b"select CURRVAL('s')"));
        assert!(!reads_lastval(b"SELECT nextval('s')"));
        assert!(!reads_lastval(b"SELECT interval '1 day'"));
        assert!(!reads_lastval(b"val"));
        assert!(reads_lastval(b"SELECT pg_catalog.lastval ()"));
        assert!(!reads_lastval(b"SELECT who FROM lastval_check WHERE id = $1"));
        assert!(!reads_lastval(b"SELECT my_lastval(1)"));
    }

    #[test]
    fn only_statements_that_surely_pin_are_refusable() {
        for sql in [
            &b"SELECT pg_advisory_lock(1)"[..],
            b"select pg_try_advisory_lock_shared($1)",
            b"DECLARE c CURSOR WITH  HOLD FOR SELECT 1",
            b"CREATE TEMP TABLE t (i int)",
            b"create temporary table t (i int)",
            b"SELECT 1 INTO TEMP t",
            b"PREPARE p AS SELECT 1",
            b"BEGIN; LISTEN x",
        ] {
            assert!(surely_pins(sql), "{}", String::from_utf8_lossy(sql));
        }
        for sql in [&b"SELECT temp, holder FROM readings"[..], b"PREPARE TRANSACTION 'x'", b"SELECT 1"] {
            assert!(!surely_pins(sql), "{}", String::from_utf8_lossy(sql));
        }
    }

    #[test]
    fn keywords_are_found_in_any_case_after_any_separator() {
        assert!(hints(b"SELECT x FROM t; -- c\n  /* d */ Set a = 1").has(Hints::SETTINGS));
        assert!(hints(b"SELECT 1;RESET ALL").has(Hints::SETTINGS));
        assert!(hints(b"SELECT (pg_catalog.pg_advisory_lock(1))").has(Hints::PIN));
        assert!(hints(b"select x.lastVal()").has(Hints::LASTVAL));
        assert!(hints(b"DECLARE c CURSOR WITH\tHOLD FOR SELECT 1").has(Hints::PIN));
        assert!(hints(b"CREATE TEMPORARY TABLE t(i int)").has(Hints::PIN));
        assert!(!hints(b"SELECT holder, temperature, mytemp, pg_advisory FROM t WHERE m_temp = 1").has(Hints::PIN));
        assert!(!hints(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;").has(Hints::ALL));
    }

    #[test]
    fn a_text_read_again_gets_the_same_hints() {
        let mut recent = Recent::default();
        assert_eq!(recent.hints(b""), Hints::NONE);
        assert!(recent.hints(b"SET x = 1").has(Hints::SETTINGS));
        assert!(recent.hints(b"SET x = 1").has(Hints::SETTINGS));
        assert_eq!(recent.hints(b"SELECT 1"), Hints::NONE);
        let long = [b"SELECT lastval()".as_slice(), &[b' '; RECENT_MAX]].concat();
        assert!(recent.hints(&long).has(Hints::LASTVAL));
        assert!(recent.hints(&long).has(Hints::LASTVAL));
        assert_eq!(recent.hints(b"SELECT 1"), Hints::NONE);
    }

    #[test]
    fn text_after_a_nul_is_not_read() {
        assert_eq!(hints(b"SELECT 1\0SET x = 1"), Hints::NONE);
    }
}
