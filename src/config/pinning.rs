//! How a database treats session state that cannot follow a client from server to server in
//! transaction mode (advisory locks, `WITH HOLD` cursors, temporary tables, SQL `PREPARE`,
//! `LISTEN` in a block): `session_state` and `max_pinned_clients`.

use super::{ConfigError, Validator};

/// What a statement that would create such state gets (`session_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionState {
    /// The client keeps its server until the state is gone.
    #[default]
    Pin,
    /// The statement is refused.
    Error,
}

impl SessionState {
    /// The config file's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Pin => "pin",
            SessionState::Error => "error",
        }
    }
}

/// The most clients of a pool pinned at once: `max_pinned_clients`, or half the pool size
/// (at least one) when it is not set, so pinned clients never take the whole pool.
pub fn max_pinned(configured: Option<u32>, pool_size: usize) -> usize {
    configured.map_or((pool_size / 2).max(1), |n| n as usize)
}

impl Validator<'_> {
    pub(super) fn session_state(&self, key: &str, v: &Option<String>) -> Result<Option<SessionState>, ConfigError> {
        Ok(match self.string(key, v)?.as_deref() {
            None => None,
            Some("pin") => Some(SessionState::Pin),
            Some("error") => Some(SessionState::Error),
            Some(_) => return Err(self.invalid(key, "must be \"pin\" or \"error\"")),
        })
    }

    pub(super) fn max_pinned_clients(&self, key: &str, v: Option<i64>) -> Result<Option<u32>, ConfigError> {
        v.map(|n| self.int(key, Some(n), 0, 0)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_pool_may_be_pinned_unless_configured() {
        assert_eq!(max_pinned(None, 20), 10);
        assert_eq!(max_pinned(None, 1), 1);
        assert_eq!(max_pinned(Some(0), 20), 0);
        assert_eq!(max_pinned(Some(3), 20), 3);
    }
}
