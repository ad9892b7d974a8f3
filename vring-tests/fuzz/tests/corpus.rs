// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replays the checked-in seed corpus and the seed generator's inputs through the harness
//! (no libFuzzer needed), and keeps known virtio-core bugs reproducible.

use std::fs;
use std::path::Path;

use virtio_core::RingLayout;
use vring_fuzz::harness::Summary;
use vring_fuzz::model::Kind;
use vring_fuzz::{harness, seeds};

fn replay_dir(target: &str, layout: RingLayout) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    for entry in fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("entry").path();
        let data = fs::read(&path).expect("corpus file");
        eprintln!("{}", path.display());
        harness::run(layout, &data);
        n += 1;
    }
    n
}

#[test]
fn split_corpus_passes() {
    assert!(replay_dir("split_chain", RingLayout::Split) >= 10);
}

#[test]
fn packed_corpus_passes() {
    assert!(replay_dir("packed_chain", RingLayout::Packed) >= 10);
}

#[test]
fn checked_in_seeds_match_the_generator() {
    for (target, layout) in [
        ("split_chain", RingLayout::Split),
        ("packed_chain", RingLayout::Packed),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        for (name, data) in seeds::seeds(layout) {
            let on_disk = fs::read(dir.join(&name)).unwrap_or_default();
            assert!(on_disk == data, "{target}/{name} is stale: run gen_corpus");
        }
    }
}

/// What each seed is meant to exercise: (popped, completed, errors).
fn expected(name: &str) -> (usize, usize, Vec<Kind>) {
    let name = name.split_once('-').map_or(name, |x| x.1);
    let name = name.split_once('-').map_or(name, |x| x.1);
    match name {
        "valid-direct" => (3, 3, vec![]),
        "valid-indirect" => (3, 3, vec![]),
        "valid-cross-region" => (2, 2, vec![]),
        "valid-wrap" => (24, 24, vec![]),
        // The chain popped before the reset is dropped, not completed.
        "reset" => (2, 1, vec![]),
        "readable-after-writable" => (1, 1, vec![Kind::ReadableAfterWritable]),
        "zero-writable-then-readable" => (0, 0, vec![Kind::ReadableAfterWritable]),
        "outside-memory" => (1, 1, vec![Kind::BufferOutsideMemory]),
        "indirect-not-negotiated" => (0, 0, vec![Kind::IndirectNotNegotiated]),
        "nested-indirect" => (0, 0, vec![Kind::NestedIndirect]),
        "indirect-bad-length" => (0, 0, vec![Kind::InvalidIndirectLength]),
        "indirect-with-next" => (0, 0, vec![Kind::IndirectWithNext]),
        "too-large" => (0, 0, vec![Kind::ChainTooLarge]),
        "loop" | "ring-long-chain" | "indirect-loop" => (0, 0, vec![Kind::ChainTooLong]),
        "next-out-of-range" => (0, 0, vec![Kind::NextOutOfRange]),
        "head-out-of-range" => (0, 0, vec![Kind::HeadOutOfRange]),
        "avail-overrun" => (1, 1, vec![Kind::AvailIndexOverrun]),
        "duplicate-head" => (1, 1, vec![Kind::HeadInUse]),
        "id-in-use" => (1, 1, vec![Kind::BufferIdInUse]),
        "event-desc" => (24, 24, vec![]),
        other => panic!("no expectation for seed {other}"),
    }
}

#[test]
fn seeds_do_what_they_say() {
    for layout in [RingLayout::Split, RingLayout::Packed] {
        for (name, data) in seeds::seeds(layout) {
            let (popped, completed, errors) = expected(&name);
            let got = harness::run(layout, &data);
            let want = Summary {
                config_error: false,
                popped,
                completed,
                errors,
            };
            assert_eq!(got, want, "{layout:?} {name}");
        }
    }
}

/// Empty, short and garbage inputs decode to something and must not fail.
#[test]
fn degenerate_inputs() {
    for layout in [RingLayout::Split, RingLayout::Packed] {
        harness::run(layout, &[]);
        harness::run(layout, &[0xff; 7]);
        harness::run(layout, &[0x5a; 300]);
    }
}

/// Regression: a driver that keeps re-publishing descriptors without waiting for the used
/// ring once overflowed the split ring's u16 in-flight count after 65536 pops; now the
/// pop past `size` chains in flight is a `TooManyInFlight` error.
#[test]
fn regression_split_in_flight_overflow() {
    harness::run(RingLayout::Split, &seeds::split_in_flight_overflow());
}

/// Regression: a head made available again while in flight was once counted twice and
/// leaked; now it is a `HeadInUse` error.
#[test]
fn regression_split_in_flight_leak() {
    harness::run(RingLayout::Split, &seeds::split_in_flight_leak());
}

/// The regression inputs on disk are the generator's.
#[test]
fn regression_files_match_the_generator() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions/split_chain");
    for (name, data) in [
        ("in-flight-overflow", seeds::split_in_flight_overflow()),
        ("in-flight-leak", seeds::split_in_flight_leak()),
    ] {
        assert!(
            fs::read(dir.join(name)).unwrap_or_default() == data,
            "{name} is stale"
        );
    }
}
