#![allow(clippy::unwrap_used)]

use super::*;

fn peer(id: &str, lease: bool, claim: u32, servers: u32) -> Peer {
    Peer { id: id.into(), lease, claim, servers }
}

fn snap(usable: u32, others: u32, peers: Vec<Peer>) -> Snapshot {
    Snapshot { usable, others, peers }
}

#[test]
fn a_lone_instance_gets_everything_but_its_lease_and_room_for_a_joiner() {
    let d = decide(&snap(52, 1, vec![peer("a", true, 0, 0)]), "a", 2);
    // 52 usable - 1 other - 1 lease - (2 floor + 1 lease) kept for a joiner.
    assert_eq!((d.instances, d.fair, d.share, d.standing), (1, 47, 47, Standing::Fair));
}

#[test]
fn a_joiner_gets_its_floor_at_once_and_grows_later() {
    let d = decide(&snap(52, 1, vec![peer("a", true, 47, 20), peer("b", true, 0, 0)]), "b", 2);
    assert_eq!(d.fair, 23);
    assert_eq!((d.share, d.standing), (2, Standing::Growing));
}

#[test]
fn an_incumbent_shrinks_to_the_fair_share_when_a_peer_joins() {
    let d = decide(&snap(52, 1, vec![peer("a", true, 47, 47), peer("b", true, 2, 0)]), "a", 2);
    assert_eq!((d.share, d.standing), (23, Standing::Fair));
}

#[test]
fn a_joiner_whose_lease_does_not_fit_gets_no_room() {
    let full = vec![peer("a", true, 47, 47), peer("b", true, 2, 2), peer("c", true, 0, 0)];
    let d = decide(&snap(52, 1, full), "c", 2);
    assert_eq!((d.share, d.standing), (0, Standing::NoRoom));
}

#[test]
fn servers_of_an_instance_without_lease_still_count() {
    // "z" lost its lease but its servers are still open: they are not free.
    let d = decide(&snap(52, 1, vec![peer("a", true, 0, 0), peer("z", false, 0, 30)]), "a", 2);
    assert_eq!(d.instances, 1);
    assert_eq!(d.share, 52 - 1 - 30 - 1, "what is left after the orphaned servers");
    assert_eq!(d.standing, Standing::Growing);
    assert_eq!(d.fleet_total, 31);
}

#[test]
fn connections_that_are_not_the_fleets_shrink_every_share() {
    let d = decide(&snap(52, 21, vec![peer("a", true, 0, 0), peer("b", true, 13, 13)]), "a", 2);
    assert_eq!(d.fair, (52 - 21 - 2 - 3) / 2);
}

#[test]
fn too_many_instances_for_fair_shares_hold_the_floor_while_it_fits() {
    let mut peers: Vec<Peer> = (0..10).map(|i| peer(&format!("p{i}"), true, 2, 2)).collect();
    peers.push(peer("me", true, 0, 0));
    let d = decide(&snap(34, 0, peers.clone()), "me", 2);
    assert!(d.fair < 2);
    assert_eq!((d.share, d.standing), (2, Standing::Floor));
    peers.extend((10..13).map(|i| peer(&format!("p{i}"), true, 2, 2)));
    let d = decide(&snap(34, 0, peers), "me", 2);
    assert_eq!((d.share, d.standing), (0, Standing::NoRoom), "13 x (2 + 1) + 1 > 34");
}

#[test]
fn parse_reads_leases_claims_and_server_counts() {
    let peers = parse_peers("a 12,a/14 1,b/3 1,c 2,bogus,d/x 1, 5");
    assert_eq!(peers, vec![peer("a", true, 14, 12), peer("b", true, 3, 0), peer("c", false, 0, 2)]);
    assert!(parse_peers("").is_empty());
}

/// One simulated broker: worst case, it uses every connection its cap allows at once.
#[derive(Clone)]
struct Sim {
    id: String,
    lease: bool,
    claim: u32,
    servers: u32,
}

fn total(others: u32, fleet: &[Sim]) -> u32 {
    others + fleet.iter().map(|s| s.servers + u32::from(s.lease)).sum::<u32>()
}

/// One round of `fleet[i]` following the protocol of `super::super::Member`.
fn round(usable: u32, others: u32, fleet: &mut [Sim], i: usize, floor: u32) -> Decision {
    let s = snap(
        usable,
        others,
        fleet.iter().map(|m| peer(&m.id, m.lease, if m.lease { m.claim } else { 0 }, m.servers)).collect(),
    );
    let d = decide(&s, &fleet[i].id, floor);
    let m = &mut fleet[i];
    if d.standing == Standing::NoRoom && m.servers == 0 {
        m.lease = false;
        m.claim = 0;
        return d;
    }
    if d.share < m.servers {
        // Lowered cap first; busy servers close only after the claim is published.
        m.claim = d.share.max(m.servers);
        m.servers = d.share;
    } else {
        m.claim = d.share;
        m.servers = d.share;
    }
    d
}

#[test]
fn joining_one_at_a_time_never_overcommits_and_converges_to_fair() {
    let (usable, others, floor) = (52, 1, 2);
    let mut fleet = vec![Sim { id: "a".into(), lease: true, claim: 0, servers: 0 }];
    round(usable, others, &mut fleet, 0, floor);
    for j in 1..6 {
        fleet.push(Sim { id: format!("j{j}"), lease: false, claim: 0, servers: 0 });
    }
    // Joiners knock (open a lease) one at a time between rounds of everyone.
    for step in 0..60 {
        for i in 0..fleet.len() {
            if !fleet[i].lease {
                if step % 2 == 1 {
                    continue;
                }
                fleet[i].lease = true;
            }
            let d = round(usable, others, &mut fleet, i, floor);
            assert!(
                total(others, &fleet) <= usable,
                "step {step}: instance {i} made the total {} > {usable} ({d:?})",
                total(others, &fleet)
            );
        }
    }
    assert!(fleet.iter().all(|m| m.lease), "every joiner got in");
    let fair = (usable - others - 6 - (floor + 1)) / 6;
    for m in &fleet {
        assert!(
            m.claim.abs_diff(fair) <= 1 && m.servers.abs_diff(fair) <= 1,
            "{} holds {}, fair {fair}",
            m.id,
            m.servers
        );
    }
}

#[test]
fn leaving_instances_free_their_share_for_the_rest() {
    let (usable, others, floor) = (52, 1, 2);
    let mut fleet: Vec<Sim> = (0..6).map(|i| Sim { id: format!("i{i}"), lease: true, claim: 7, servers: 7 }).collect();
    fleet.truncate(2);
    for _ in 0..3 {
        for i in 0..fleet.len() {
            round(usable, others, &mut fleet, i, floor);
            assert!(total(others, &fleet) <= usable);
        }
    }
    let fair = (usable - others - 2 - (floor + 1)) / 2;
    assert!(fleet.iter().all(|m| m.servers == fair), "each has {fair}");
}
