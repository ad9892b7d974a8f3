// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fuzz input format: a fixed header describing guest memory and the queue, then a
//! stream of commands (memory writes by the "driver", and device operations).
//!
//! All integers are little-endian. A short input is padded with zeros, so every byte
//! string decodes to something; a truncated command ends the stream.
//!
//! ```text
//! header (HEADER_LEN bytes)
//!   [0]      flags: bit 0 VIRTIO_F_EVENT_IDX, bit 1 VIRTIO_F_INDIRECT_DESC
//!   [1..3]   queue size (u16, passed as is: invalid sizes must fail with a typed error)
//!   [3]      number of guest memory regions: 1 + b % 3
//!   [4..10]  per region slot i: [4+2i] gap in pages before it (b % 4; 0: adjacent to the
//!            previous region), [5+2i] length in pages (1 + b % 32)
//!   [10..22] descriptor area, driver area, device area (u32 guest addresses each)
//! commands, until the input ends (op = first byte % 8)
//!   0 Write    addr u32, n u8, n bytes               driver writes guest memory
//!   1 Repeat   addr u32, count u16, m u8, m' bytes   writes the item (m' = 1 + m % 16)
//!                                                    `count` times back to back
//!   2 Pop      n u8                                  device pops up to n + 1 chains
//!   3 Complete n u8, mode u8                         device add_used's up to n + 1 popped
//!                                                    chains; mode bit 0: one batch, bit 1:
//!                                                    newest first, bit 2: len = writable_len
//!   4 Notify   bits u8                               bit 0 needs_notification, bit 1
//!                                                    enable_notification, bit 2
//!                                                    disable_notification, bit 3
//!                                                    has_available
//!   5 SetBase  base u32                              set_vring_base (a device reset)
//!   6, 7       no operation
//! ```
//!
//! Guest memory starts zeroed; once the commands are done the harness drains the queue
//! (pops until empty, bounded) and returns everything it popped.

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 22;
/// Guest page size used for region placement.
pub const PAGE: u64 = 0x1000;
/// Most guest memory regions.
pub const MAX_REGIONS: usize = 3;
/// Most pages in one region.
pub const MAX_REGION_PAGES: u8 = 32;

/// One decoded guest memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// True if `gpa` is inside the region.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.start && gpa < self.end()
    }
}

/// The raw header fields, as the generator writes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderSpec {
    /// VIRTIO_F_EVENT_IDX.
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC.
    pub indirect_desc: bool,
    /// Queue size.
    pub size: u16,
    /// `(gap pages, length pages)` of each region (1 to 3 of them).
    pub regions: Vec<(u8, u8)>,
    /// Descriptor area.
    pub desc_table: u32,
    /// Driver area (split avail ring, packed driver event suppression).
    pub driver_area: u32,
    /// Device area (split used ring, packed device event suppression).
    pub device_area: u32,
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// VIRTIO_F_EVENT_IDX.
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC.
    pub indirect_desc: bool,
    /// Queue size.
    pub size: u16,
    /// Guest memory regions, sorted and non-overlapping.
    pub regions: Vec<Region>,
    /// Descriptor area.
    pub desc_table: u64,
    /// Driver area.
    pub driver_area: u64,
    /// Device area.
    pub device_area: u64,
}

impl HeaderSpec {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = u8::from(self.event_idx) | (u8::from(self.indirect_desc) << 1);
        h[1..3].copy_from_slice(&self.size.to_le_bytes());
        assert!((1..=MAX_REGIONS).contains(&self.regions.len()));
        h[3] = u8::try_from(self.regions.len() - 1).unwrap_or(0);
        for (i, &(gap, pages)) in self.regions.iter().enumerate() {
            assert!(gap < 4 && (1..=MAX_REGION_PAGES).contains(&pages));
            h[4 + 2 * i] = gap;
            h[5 + 2 * i] = pages - 1;
        }
        h[10..14].copy_from_slice(&self.desc_table.to_le_bytes());
        h[14..18].copy_from_slice(&self.driver_area.to_le_bytes());
        h[18..22].copy_from_slice(&self.device_area.to_le_bytes());
        h
    }

    /// The regions this header describes.
    pub fn layout(&self) -> Vec<Region> {
        decode_header(&self.encode()).regions
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Decodes a header (`h` is exactly [`HEADER_LEN`] bytes).
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Header {
    let nregions = 1 + usize::from(h[3]) % MAX_REGIONS;
    let mut regions = Vec::with_capacity(nregions);
    let mut next = 0u64;
    for i in 0..nregions {
        let gap = u64::from(h[4 + 2 * i] % 4);
        let pages = 1 + u64::from(h[5 + 2 * i] % MAX_REGION_PAGES);
        let start = next + gap * PAGE;
        regions.push(Region {
            start,
            len: pages * PAGE,
        });
        next = start + pages * PAGE;
    }
    Header {
        event_idx: h[0] & 1 != 0,
        indirect_desc: h[0] & 2 != 0,
        size: u16_at(h, 1),
        regions,
        desc_table: u64::from(u32_at(h, 10)),
        driver_area: u64::from(u32_at(h, 14)),
        device_area: u64::from(u32_at(h, 18)),
    }
}

/// One command of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd<'a> {
    /// Write `data` at `addr` (clipped to guest memory by the harness).
    Write {
        /// Guest address.
        addr: u64,
        /// Bytes.
        data: &'a [u8],
    },
    /// Write `item` `count` times from `addr`.
    Repeat {
        /// Guest address.
        addr: u64,
        /// Repetitions.
        count: u16,
        /// The item (1 to 16 bytes).
        item: &'a [u8],
    },
    /// Pop up to `max` chains (1 to 256).
    Pop {
        /// Most chains.
        max: u16,
    },
    /// add_used up to `max` popped chains (1 to 256).
    Complete {
        /// Most chains.
        max: u16,
        /// As one `add_used_batch`.
        batch: bool,
        /// Newest first.
        lifo: bool,
        /// Report the whole writable length as written (else 0).
        full_len: bool,
    },
    /// Notification calls.
    Notify {
        /// See the module documentation.
        bits: u8,
    },
    /// `set_vring_base`.
    SetBase {
        /// The base.
        base: u32,
    },
    /// Nothing.
    Nop,
}

/// Splits an input into its header and command stream.
pub fn split_input(data: &[u8]) -> (Header, Commands<'_>) {
    let mut h = [0u8; HEADER_LEN];
    let n = data.len().min(HEADER_LEN);
    h[..n].copy_from_slice(&data[..n]);
    (
        decode_header(&h),
        Commands {
            data: &data[n..],
            pos: 0,
        },
    )
}

/// Iterator over the commands of an input.
#[derive(Clone, Debug)]
pub struct Commands<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Commands<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn take_up_to(&mut self, n: usize) -> &'a [u8] {
        let end = (self.pos + n).min(self.data.len());
        let s = &self.data[self.pos..end];
        self.pos = end;
        s
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16_at(b, 0))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32_at(b, 0))
    }
}

impl<'a> Iterator for Commands<'a> {
    type Item = Cmd<'a>;

    fn next(&mut self) -> Option<Cmd<'a>> {
        let op = self.u8()?;
        Some(match op % 8 {
            0 => {
                let addr = u64::from(self.u32()?);
                let n = usize::from(self.u8()?);
                Cmd::Write {
                    addr,
                    data: self.take_up_to(n),
                }
            }
            1 => {
                let addr = u64::from(self.u32()?);
                let count = self.u16()?;
                let m = 1 + usize::from(self.u8()? % 16);
                Cmd::Repeat {
                    addr,
                    count,
                    item: self.take(m)?,
                }
            }
            2 => Cmd::Pop {
                max: 1 + u16::from(self.u8()?),
            },
            3 => {
                let max = 1 + u16::from(self.u8()?);
                let mode = self.u8()?;
                Cmd::Complete {
                    max,
                    batch: mode & 1 != 0,
                    lifo: mode & 2 != 0,
                    full_len: mode & 4 != 0,
                }
            }
            4 => Cmd::Notify { bits: self.u8()? },
            5 => Cmd::SetBase { base: self.u32()? },
            _ => Cmd::Nop,
        })
    }
}

/// Writes inputs in the format above (used by the corpus generator and the tests).
#[derive(Clone, Debug, Default)]
pub struct Encoder {
    bytes: Vec<u8>,
}

impl Encoder {
    /// Starts an input with `header`.
    pub fn new(header: &HeaderSpec) -> Self {
        Encoder {
            bytes: header.encode().to_vec(),
        }
    }

    /// The encoded input.
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }

    /// Writes `data` at `addr` (split into commands of at most 255 bytes).
    pub fn write(&mut self, addr: u32, data: &[u8]) -> &mut Self {
        for (i, chunk) in data.chunks(255).enumerate() {
            let a = addr + u32::try_from(i * 255).unwrap_or(u32::MAX);
            self.bytes.push(0);
            self.bytes.extend_from_slice(&a.to_le_bytes());
            self.bytes.push(u8::try_from(chunk.len()).unwrap_or(0));
            self.bytes.extend_from_slice(chunk);
        }
        self
    }

    /// Writes `item` (1 to 16 bytes) `count` times from `addr`.
    pub fn repeat(&mut self, addr: u32, count: u16, item: &[u8]) -> &mut Self {
        assert!((1..=16).contains(&item.len()));
        self.bytes.push(1);
        self.bytes.extend_from_slice(&addr.to_le_bytes());
        self.bytes.extend_from_slice(&count.to_le_bytes());
        self.bytes.push(u8::try_from(item.len() - 1).unwrap_or(0));
        self.bytes.extend_from_slice(item);
        self
    }

    /// Pops up to `max` (1 to 256) chains.
    pub fn pop(&mut self, max: u16) -> &mut Self {
        assert!((1..=256).contains(&max));
        self.bytes.push(2);
        self.bytes.push(u8::try_from(max - 1).unwrap_or(0));
        self
    }

    /// Completes up to `max` (1 to 256) chains.
    pub fn complete(&mut self, max: u16, batch: bool, lifo: bool, full_len: bool) -> &mut Self {
        assert!((1..=256).contains(&max));
        self.bytes.push(3);
        self.bytes.push(u8::try_from(max - 1).unwrap_or(0));
        self.bytes
            .push(u8::from(batch) | u8::from(lifo) << 1 | u8::from(full_len) << 2);
        self
    }

    /// Notification calls (see the module documentation for `bits`).
    pub fn notify(&mut self, bits: u8) -> &mut Self {
        self.bytes.push(4);
        self.bytes.push(bits);
        self
    }

    /// `set_vring_base(base)`.
    pub fn set_base(&mut self, base: u32) -> &mut Self {
        self.bytes.push(5);
        self.bytes.extend_from_slice(&base.to_le_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let spec = HeaderSpec {
            event_idx: true,
            indirect_desc: false,
            size: 8,
            regions: vec![(1, 4), (0, 2)],
            desc_table: 0x1000,
            driver_area: 0x2000,
            device_area: 0x3000,
        };
        let mut e = Encoder::new(&spec);
        e.write(0x1234, &[1, 2, 3])
            .repeat(0x10, 3, &[9; 16])
            .pop(256)
            .complete(1, true, false, true)
            .notify(0xf)
            .set_base(7);
        let bytes = e.finish();
        let (h, cmds) = split_input(&bytes);
        assert_eq!(
            h.regions,
            vec![
                Region {
                    start: 0x1000,
                    len: 0x4000
                },
                Region {
                    start: 0x5000,
                    len: 0x2000
                }
            ]
        );
        assert_eq!(h.size, 8);
        assert!(h.event_idx && !h.indirect_desc);
        let cmds: Vec<_> = cmds.collect();
        assert_eq!(
            cmds,
            vec![
                Cmd::Write {
                    addr: 0x1234,
                    data: &[1, 2, 3]
                },
                Cmd::Repeat {
                    addr: 0x10,
                    count: 3,
                    item: &[9; 16]
                },
                Cmd::Pop { max: 256 },
                Cmd::Complete {
                    max: 1,
                    batch: true,
                    lifo: false,
                    full_len: true
                },
                Cmd::Notify { bits: 0xf },
                Cmd::SetBase { base: 7 },
            ]
        );
    }
}
