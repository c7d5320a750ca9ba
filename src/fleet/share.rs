//! The arithmetic of fleet mode, apart from any I/O: what one instance may hold, given what
//! `pg_stat_activity` shows of its peers and of everything else.
//!
//! Safety rests on one invariant, kept under the fleet's advisory lock: the claims of all
//! instances (each at least what it holds), one lease connection per instance and every
//! connection that is not the fleet's fit in the usable connections. An instance raises its
//! cap only after publishing a claim that covers it, and publishes a lower claim only once
//! its cap is lowered and its holdings are counted, so what it holds never exceeds its claim.

/// One broker instance of the fleet as the server shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// Instance id.
    pub id: String,
    /// Whether its lease connection is there (it is alive and its claim is published).
    pub lease: bool,
    /// Its published claim (0 without a lease).
    pub claim: u32,
    /// Its pool server connections (tagged with the fleet's application_name).
    pub servers: u32,
}

/// What one round read from the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `server_max_connections - reserved` (and the server's own reservations with `auto`).
    pub usable: u32,
    /// Client connections that are not this fleet's.
    pub others: u32,
    /// Every instance of the fleet that has a lease or a server connection.
    pub peers: Vec<Peer>,
}

/// Where an instance stands after a round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Standing {
    /// No round has completed yet.
    #[default]
    Starting,
    /// Its share is the fair one.
    Fair,
    /// Below its fair share until peers shrink to theirs.
    Growing,
    /// More instances than fair shares of `fleet_min_budget`: it holds the floor.
    Floor,
    /// Its lease fits but not one server connection: it waits for peers to shrink.
    Waiting,
    /// Even its lease connection does not fit: it leaves and retries.
    NoRoom,
    /// The server cannot be reached; the cap is frozen at what is held.
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
    /// Live instances (with a lease), this one included.
    pub instances: u32,
    /// The fair share of each.
    pub fair: u32,
    /// The cap this instance may hold now.
    pub share: u32,
    /// Connections of the fleet on the server: servers and leases.
    pub fleet_total: u32,
    /// Where it stands.
    pub standing: Standing,
}

/// This instance's share. `me` must have its lease in `snap` (the round runs over it).
/// Space for one more instance's lease and floor is kept free, so a joining instance gets
/// in at once while the others shrink to make room for it.
pub fn decide(snap: &Snapshot, me: &str, floor: u32) -> Decision {
    let peers = || snap.peers.iter().filter(|p| p.id != me);
    let instances = peers().filter(|p| p.lease).count() as i64 + 1;
    let committed: i64 = peers().map(|p| i64::from(p.claim.max(p.servers)) + i64::from(p.lease)).sum();
    let available = i64::from(snap.usable) - i64::from(snap.others);
    let room = available - committed - 1;
    let spare = i64::from(floor) + 1;
    let fair = ((available - instances - spare).max(0) / instances) as u32;
    let fleet_total = snap.peers.iter().map(|p| p.servers + u32::from(p.lease)).sum();
    let decision = |share: u32, standing| Decision { instances: instances as u32, fair, share, fleet_total, standing };
    if room < 0 {
        return decision(0, Standing::NoRoom);
    }
    let want = fair.max(floor);
    let share = (i64::from(want).min(room)) as u32;
    let standing = if share == 0 {
        Standing::Waiting
    } else if share < want {
        Standing::Growing
    } else if fair < floor {
        Standing::Floor
    } else {
        Standing::Fair
    };
    decision(share, standing)
}

/// True when some live instance is far from the fair share: the fleet is still moving and
/// rounds should come quickly.
pub fn unsettled(snap: &Snapshot, fair: u32) -> bool {
    snap.peers.iter().any(|p| !p.lease || p.claim.max(p.servers).abs_diff(fair) > 1)
}

/// Parses the per-application_name counts of the snapshot query: entries `"<rest> <count>"`
/// joined by `,`, where rest (after the fleet prefix) is `<id>` for server connections and
/// `<id>/<claim>` for a lease. Entries that do not parse are ignored.
pub fn parse_peers(list: &str) -> Vec<Peer> {
    let mut peers: Vec<Peer> = Vec::new();
    for entry in list.split(',').filter(|e| !e.is_empty()) {
        let Some((rest, count)) = entry.rsplit_once(' ') else { continue };
        let Ok(count) = count.parse::<u32>() else { continue };
        let (id, claim) = match rest.split_once('/') {
            Some((id, claim)) => match claim.parse::<u32>() {
                Ok(c) => (id, Some(c)),
                Err(_) => continue,
            },
            None => (rest, None),
        };
        if id.is_empty() {
            continue;
        }
        let peer = match peers.iter_mut().find(|p| p.id == id) {
            Some(p) => p,
            None => {
                peers.push(Peer { id: id.to_string(), ..Peer::default() });
                let last = peers.len() - 1;
                &mut peers[last]
            }
        };
        match claim {
            Some(c) => {
                peer.lease = true;
                peer.claim = peer.claim.max(c);
            }
            None => peer.servers += count,
        }
    }
    peers
}

#[cfg(test)]
#[path = "share_tests.rs"]
mod tests;
