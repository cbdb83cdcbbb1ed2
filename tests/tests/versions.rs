//! Cutovers across `PostgreSQL` majors (13 and 17/18 from `cargo xtask setup`, 15 from Debian)
//! under the ledger workload, with rollback: the pairs CI runs. The full matrix is
//! `cargo xtask test --matrix` (docs/compatibility.md).

use redirect_tests::{pg::Major, versions};

#[test]
fn logical_13_to_17_cuts_over_and_rolls_back_losing_nothing() {
    let mut steps = Vec::new();
    versions::logical("v1317", Major(13), Major(17), &mut |p| steps.push(p));
    assert_eq!(steps.len(), 2);
}

#[test]
fn logical_15_to_18_cuts_over_and_rolls_back_losing_nothing() {
    let mut steps = Vec::new();
    versions::logical("v1518", Major(15), Major(18), &mut |p| steps.push(p));
    assert_eq!(steps.len(), 2);
}

#[test]
fn physical_17_to_17_promotes_losing_nothing_and_refuses_a_rollback() {
    let mut steps = Vec::new();
    versions::physical("p17", Major(17), &mut |p| steps.push(p));
    assert_eq!(steps.len(), 2);
}

#[test]
fn logical_17_with_standbys_uses_failover_slots_and_rolls_back_losing_nothing() {
    let mut steps = Vec::new();
    versions::logical_with_standbys("v17fo", Major(17), &mut |p| steps.push(p));
    assert_eq!(steps.len(), 2);
}
