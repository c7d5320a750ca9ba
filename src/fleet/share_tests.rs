#![allow(clippy::unwrap_used)]

use super::*;

fn row(id: &str, share: i32, held: u32, servers: u32) -> Row {
    Row { id: id.into(), share, held, servers, stale: false }
}

fn input(usable: u32, others: u32, rows: Vec<Row>) -> RoundInput {
    RoundInput { usable, others, rows, strangers: 0 }
}

/// What the fleet may hold after the round, each member at the larger of its base and its
/// new share: never more than `usable - others`.
fn worst_case(i: &RoundInput, a: &Allocation) -> u32 {
    i.rows
        .iter()
        .filter(|r| !a.dead.contains(&r.id))
        .map(|r| r.base().max(a.share_of(&r.id).unwrap_or(0).max(0) as u32))
        .sum::<u32>()
        + i.strangers
}

#[test]
fn a_lone_member_gets_everything_but_room_for_a_joiner() {
    let a = allocate(&input(52, 1, vec![row("a", 0, 0, 1)]), 2);
    // 52 usable - 1 other - 2 (a joiner's floor) kept free.
    assert_eq!((a.instances, a.fair, a.share_of("a")), (1, 49, Some(49)));
}

#[test]
fn a_joiner_gets_its_floor_at_once_and_grows_as_the_incumbent_shrinks() {
    let i = input(52, 1, vec![row("a", 49, 49, 49), row("b", 0, 0, 1)]);
    let a = allocate(&i, 2);
    assert_eq!(a.fair, 24);
    assert_eq!(a.share_of("a"), Some(24));
    assert_eq!(a.share_of("b"), Some(2), "its knock plus what was kept free");
    assert!(worst_case(&i, &a) <= 51);
    // The incumbent reported its lower cap and closed its servers: the joiner grows.
    let i = input(52, 1, vec![row("a", 24, 24, 24), row("b", 2, 2, 2)]);
    let a = allocate(&i, 2);
    assert_eq!((a.share_of("a"), a.share_of("b")), (Some(24), Some(24)));
}

#[test]
fn a_lowered_share_is_counted_at_the_old_one_until_the_member_reports_it() {
    // a was given 24 but still says it may hold 49: b cannot have that room yet.
    let i = input(52, 1, vec![row("a", 24, 49, 30), row("b", 2, 2, 2)]);
    let a = allocate(&i, 2);
    assert_eq!(a.share_of("b"), Some(2));
    assert!(!a.settled);
}

#[test]
fn servers_of_members_without_a_row_are_counted() {
    let mut i = input(20, 0, vec![row("a", 0, 0, 1)]);
    i.strangers = 5;
    let a = allocate(&i, 2);
    assert_eq!(a.share_of("a"), Some(13), "20 - 5 strangers - 2 kept free");
}

#[test]
fn a_stale_member_without_servers_is_dead_and_its_share_freed() {
    let mut gone = row("b", 24, 24, 0);
    gone.stale = true;
    let a = allocate(&input(52, 1, vec![row("a", 24, 24, 24), gone]), 2);
    assert_eq!(a.dead, vec!["b".to_string()]);
    assert_eq!((a.instances, a.share_of("a"), a.share_of("b")), (1, Some(49), None));
}

#[test]
fn a_stale_member_that_still_has_servers_keeps_its_base() {
    let mut stuck = row("b", 24, 24, 10);
    stuck.stale = true;
    let i = input(52, 1, vec![row("a", 24, 24, 24), stuck]);
    let a = allocate(&i, 2);
    assert!(a.dead.is_empty());
    assert!(worst_case(&i, &a) <= 51);
}

#[test]
fn knocks_that_do_not_fit_are_told_to_leave() {
    let i = input(
        10,
        0,
        vec![row("a", 4, 4, 4), row("b", 4, 4, 4), row("c", 0, 0, 1), row("d", 0, 0, 1), row("e", 0, 0, 1)],
    );
    let a = allocate(&i, 1);
    let out: Vec<i32> = ["c", "d", "e"].iter().map(|id| a.share_of(id).unwrap()).collect();
    assert_eq!(out.iter().filter(|s| **s == -1).count(), 1, "{out:?}");
    assert_eq!(standing(-1, a.fair, 1), Standing::NoRoom);
}

#[test]
fn more_members_than_floors_hold_the_floor_while_room_lasts() {
    let rows = (0..6).map(|k| row(&format!("m{k}"), 0, 0, 1)).collect();
    let i = input(8, 0, rows);
    let a = allocate(&i, 2);
    assert_eq!(a.fair, 1);
    assert!(worst_case(&i, &a) <= 8);
    let floors = a.shares.iter().filter(|(_, s)| *s == 2).count();
    assert_eq!(floors, 2, "{:?}", a.shares);
    assert_eq!(standing(2, a.fair, 2), Standing::Floor);
    assert_eq!(standing(1, a.fair, 2), Standing::Growing);
}

#[test]
fn no_round_ever_gives_out_more_than_usable() {
    // Every mix of previous shares, reports and servers for three members on 12 usable.
    let mut checked = 0;
    for s in [-1, 0, 2, 5] {
        for h in [0u32, 3, 6] {
            for v in [0u32, 1, 4] {
                let rows = vec![row("a", s, h, v), row("b", 4, 4, 4), row("c", 0, 0, 1)];
                let i = input(12, 0, rows);
                let start: u32 = i.rows.iter().map(Row::base).sum();
                let a = allocate(&i, 2);
                // Overcommitted already (by the inputs) means no grant at all.
                assert!(worst_case(&i, &a) <= 12.max(start), "{i:?} -> {a:?}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 36);
}

#[test]
fn a_fleet_at_its_shares_is_settled() {
    let a = allocate(&input(52, 1, vec![row("a", 24, 24, 20), row("b", 24, 24, 3)]), 2);
    assert!(a.settled, "{a:?}");
    assert_eq!(standing(24, a.fair, 2), Standing::Fair);
    assert_eq!(standing(0, a.fair, 2), Standing::Waiting);
}
