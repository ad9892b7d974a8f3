// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Round trips through the driver side and the device side of both layouts.
#![cfg(feature = "driver")]
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::sync::Arc;

use virtio_core::driver::{DriverBuffer, DriverQueue};
use virtio_core::{DescriptorChain, Error, GuestMemoryView, Queue, RingLayout};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 22;

fn setup(
    layout: RingLayout,
    size: u16,
    event_idx: bool,
) -> (GuestMemoryMmap<()>, DriverQueue, Queue) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let driver = DriverQueue::new(layout, size, 0x1000, event_idx);
    driver.init(&mem).unwrap();
    let view = Arc::new(GuestMemoryView::new(Arc::new(mem.clone())).unwrap());
    let queue = Queue::new(driver.config(true), view).unwrap();
    (mem, driver, queue)
}

fn echo_round_trip(layout: RingLayout, size: u16, rounds: usize, indirect: bool) {
    let (mem, mut driver, mut queue) = setup(layout, size, true);
    let mut chain = DescriptorChain::new();
    for round in 0..rounds {
        let base = 0x100000 + (round % 16) as u64 * 0x1000;
        mem.write_slice(&[round as u8; 64], GuestAddress(base))
            .unwrap();
        let bufs = [
            DriverBuffer {
                addr: base,
                len: 40,
                writable: false,
            },
            DriverBuffer {
                addr: base + 40,
                len: 24,
                writable: false,
            },
            DriverBuffer {
                addr: base + 0x800,
                len: 100,
                writable: true,
            },
        ];
        let id = if indirect {
            driver.add_indirect_chain(&mem, 0x200000, &bufs).unwrap()
        } else {
            driver.add_chain(&mem, &bufs).unwrap()
        };
        assert!(queue.pop_into(&mut chain).unwrap(), "round {round}");
        assert_eq!(chain.id(), id);
        assert_eq!(chain.readable_len(), 64);
        assert_eq!(chain.writable_len(), 100);
        let mut data = Vec::new();
        chain.reader().read_to_end(&mut data).unwrap();
        assert_eq!(data, vec![round as u8; 64]);
        let mut w = chain.writer();
        w.write_all(&data).unwrap();
        let written = w.bytes_written() as u32;
        queue.add_used(chain.id(), written).unwrap();
        assert_eq!(driver.pop_used(&mem).unwrap(), Some((id, 64)));
        let mut back = [0u8; 64];
        mem.read_slice(&mut back, GuestAddress(base + 0x800))
            .unwrap();
        assert_eq!(back, [round as u8; 64]);
        assert!(!queue.pop_into(&mut chain).unwrap());
    }
}

#[test]
fn split_round_trip_wraps_u16_index() {
    echo_round_trip(RingLayout::Split, 4, 70_000, false);
}

#[test]
fn split_indirect_round_trip() {
    echo_round_trip(RingLayout::Split, 8, 100, true);
}

#[test]
fn packed_round_trip_wraps_ring_many_times() {
    echo_round_trip(RingLayout::Packed, 5, 1000, false);
}

#[test]
fn packed_indirect_round_trip() {
    echo_round_trip(RingLayout::Packed, 3, 100, true);
}

#[test]
fn packed_size_one_direct_chain_of_one() {
    let (mem, mut driver, mut queue) = setup(RingLayout::Packed, 1, false);
    for _ in 0..10 {
        let id = driver
            .add_chain(
                &mem,
                &[DriverBuffer {
                    addr: 0x100000,
                    len: 8,
                    writable: true,
                }],
            )
            .unwrap();
        let chain = queue.pop().unwrap().unwrap();
        queue.add_used(chain.id(), 8).unwrap();
        assert_eq!(driver.pop_used(&mem).unwrap(), Some((id, 8)));
    }
}

#[test]
fn split_avail_overrun_breaks_queue() {
    let (mem, _driver, mut queue) = setup(RingLayout::Split, 4, false);
    mem.write_obj(5u16, GuestAddress(queue.config().driver_area + 2))
        .unwrap();
    assert!(matches!(queue.pop(), Err(Error::AvailIndexOverrun { .. })));
    assert_eq!(queue.pop().unwrap_err(), Error::Broken);
}
