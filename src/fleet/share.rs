//! The arithmetic of fleet mode, apart from any I/O: the shares one round gives every member,
//! from what the fleet's table and `pg_stat_activity` show.
//!
//! Safety rests on one invariant. A member never holds more than the larger of the share the
//! last round wrote in its row and what it last reported there (`held`): it raises its cap
//! only to a share a round has written, and reports a lower figure only once its cap is
//! lowered. A round counts every member at the largest of its previous share, its report and
//! its servers on the server (its *base*), and gives out only what those bases, the
//! connections that are not the fleet's and the servers of members without a row leave of
//! `usable`. So the fleet never holds more than `usable`, whoever runs the round.

/// One member's row as a round reads it, with its servers counted on the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// Instance id.
    pub id: String,
    /// The share the last round gave it (-1: no room).
    pub share: i32,
    /// What it last reported it may hold: its cap or its servers, whichever was more.
    pub held: u32,
    /// Its server connections on the server now.
    pub servers: u32,
    /// No heartbeat for two intervals.
    pub stale: bool,
}

impl Row {
    /// The most it may hold now.
    fn base(&self) -> u32 {
        (self.share.max(0) as u32).max(self.held).max(self.servers)
    }
}

/// What one round read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundInput {
    /// `server_max_connections - reserved` (and the server's own reservations with `auto`).
    pub usable: u32,
    /// Client connections that are not this fleet's.
    pub others: u32,
    /// The fleet's rows.
    pub rows: Vec<Row>,
    /// Servers tagged with the fleet's name whose instance has no row (yet, or any more).
    pub strangers: u32,
}

/// What one round decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Live members (a heartbeat within two intervals, or servers on the server).
    pub instances: u32,
    /// The fair share of each.
    pub fair: u32,
    /// Connections of the fleet on the server.
    pub total: u32,
    /// Every live member's new share (-1: its knock does not fit; close it and retry).
    pub shares: Vec<(String, i32)>,
    /// Members gone: stale and without servers; their rows are deleted.
    pub dead: Vec<String>,
    /// Every member's share equals what it may hold already: nothing is moving.
    pub settled: bool,
}

impl Allocation {
    /// The share of member `id`, if the round saw it.
    pub fn share_of(&self, id: &str) -> Option<i32> {
        self.shares.iter().find(|(m, _)| m == id).map(|(_, s)| *s)
    }
}

/// The shares of a round. `floor` (`fleet_min_budget`) is what a member gets at once when it
/// fits; that much is kept free so a joiner gets in at once while the others shrink.
pub fn allocate(input: &RoundInput, floor: u32) -> Allocation {
    let (live, dead): (Vec<&Row>, Vec<&Row>) = input.rows.iter().partition(|r| !r.stale || r.servers > 0);
    let n = live.len().max(1) as i64;
    let available = i64::from(input.usable) - i64::from(input.others);
    // Servers without a row are shared out like connections that are not the fleet's.
    let fair = ((available - i64::from(input.strangers) - i64::from(floor)).max(0) / n) as u32;
    let want = fair.max(floor);
    let committed: i64 = live.iter().map(|r| i64::from(r.base())).sum::<i64>() + i64::from(input.strangers);
    let mut room = available - committed;
    // Those furthest below their due are served first.
    let mut order = live.clone();
    order.sort_by(|a, b| (a.base(), &a.id).cmp(&(b.base(), &b.id)));
    let mut decided: Vec<(&Row, i32)> = Vec::with_capacity(order.len());
    for r in order {
        let base = r.base();
        let share = if want <= base {
            // Lowering: its base stays counted until it reports the lower figure.
            want
        } else {
            let grant = (i64::from(want - base)).min(room.max(0));
            room -= grant;
            base + grant as u32
        };
        decided.push((r, share as i32));
    }
    // Overcommitted by joiners' knocks: those that hold nothing else leave and knock later.
    for (r, share) in decided.iter_mut().rev() {
        if room >= 0 {
            break;
        }
        if r.share <= 0 && r.held == 0 && r.servers <= 1 && *share <= 1 {
            room += i64::from(r.servers);
            *share = -1;
        }
    }
    // Nothing is moving: every member holds (or may hold) exactly its share.
    let settled = decided.iter().all(|(r, s)| *s >= 0 && *s as u32 == r.base());
    let shares = decided.iter().map(|(r, s)| (r.id.clone(), *s)).collect();
    Allocation {
        instances: live.len() as u32,
        fair,
        total: live.iter().map(|r| r.servers).sum::<u32>() + input.strangers,
        shares,
        dead: dead.iter().map(|r| r.id.clone()).collect(),
        settled,
    }
}

/// Where a member stands with `share` when the fair share is `fair`.
pub fn standing(share: i32, fair: u32, floor: u32) -> Standing {
    let want = fair.max(floor);
    match share {
        s if s < 0 => Standing::NoRoom,
        0 => Standing::Waiting,
        s if (s as u32) < want => Standing::Growing,
        _ if fair < floor => Standing::Floor,
        _ => Standing::Fair,
    }
}

/// Where an instance stands after a round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Standing {
    /// No round has given it a share yet.
    #[default]
    Starting,
    /// Its share is the fair one.
    Fair,
    /// Below its fair share until peers shrink to theirs.
    Growing,
    /// More instances than fair shares of `fleet_min_budget`: it holds the floor.
    Floor,
    /// Its knock fits but not one server connection: it waits for peers to shrink.
    Waiting,
    /// Even its knock does not fit: it closes it and knocks again later.
    NoRoom,
    /// The fleet's table cannot be reached; the cap is frozen at what is held.
    Unreachable,
}

impl Standing {
    /// Name for SHOW BUDGET, /health and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Starting => "starting",
            Standing::Fair => "fair",
            Standing::Growing => "growing",
            Standing::Floor => "floor",
            Standing::Waiting => "waiting",
            Standing::NoRoom => "no_room",
            Standing::Unreachable => "unreachable",
        }
    }

    /// True when the instance cannot serve from a share of its own.
    pub fn is_starved(self) -> bool {
        matches!(self, Standing::Waiting | Standing::NoRoom | Standing::Unreachable | Standing::Starting)
    }
}

/// The outcome of one round for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Live instances, this one included.
    pub instances: u32,
    /// The fair share of each.
    pub fair: u32,
    /// The cap this instance may hold now.
    pub share: u32,
    /// Connections of the fleet on the server.
    pub fleet_total: u32,
    /// Where it stands.
    pub standing: Standing,
}

#[cfg(test)]
#[path = "share_tests.rs"]
mod tests;
