// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Switch mode (no TAP): the forwarding table of a MAC learning switch whose ports are the
//! daemon's vhost-user connections.
//!
//! [`Switch::forward`] looks at the Ethernet header of a frame a port transmitted: it
//! learns the source address on that port, then returns where the frame goes: one port
//! (a known unicast destination), every other port (unknown unicast, broadcast and
//! multicast: [`Switch::flood_ports`]), or nowhere. A frame never goes back to the port it
//! came from.
//!
//! The table is an open-addressing hash table with linear probing and backward-shift
//! deletion, allocated once at [`Switch::new`]: learning and lookup never allocate. It
//! holds at most [`SwitchConfig::max_entries`] addresses; when it is full new addresses
//! are not learned (their frames are flooded) until entries age out. Entries older than
//! [`SwitchConfig::ageing`] are ignored by lookups and removed by [`Switch::expire`]. The
//! hash is SipHash with per-table random keys, so a guest cannot choose addresses that
//! collide.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use crate::config::MacAddr;

/// Identifies a switch port (one per vhost-user connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

/// Table size and ageing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// Most addresses learned at once (1 ..= [`MAX_ENTRIES_LIMIT`]).
    pub max_entries: usize,
    /// How long an address stays known without a frame from it.
    pub ageing: Duration,
    /// Most ports (1 ..= [`MAX_PORTS_LIMIT`]).
    pub max_ports: usize,
}

/// Upper bound of [`SwitchConfig::max_entries`].
pub const MAX_ENTRIES_LIMIT: usize = 1 << 20;
/// Upper bound of [`SwitchConfig::max_ports`].
pub const MAX_PORTS_LIMIT: usize = 4096;

impl Default for SwitchConfig {
    /// 4096 addresses, 300 s ageing (the IEEE 802.1D default), 64 ports.
    fn default() -> Self {
        SwitchConfig {
            max_entries: 4096,
            ageing: Duration::from_secs(300),
            max_ports: 64,
        }
    }
}

/// A switch configuration or port operation that was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    /// max_entries outside its limits.
    #[error("a forwarding table of {0} entries is not supported: use 1 to 1048576")]
    TableSize(usize),
    /// max_ports outside its limits.
    #[error("a switch of {0} ports is not supported: use 1 to 4096")]
    PortCount(usize),
    /// Ageing of zero.
    #[error("the ageing time must be longer than zero")]
    Ageing,
    /// The port already exists.
    #[error("switch port {0:?} already exists")]
    DuplicatePort(PortId),
    /// All ports are in use.
    #[error("the switch already has its maximum of {0} ports")]
    TooManyPorts(usize),
}

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// To this one port.
    Unicast(PortId),
    /// To every port but the ingress one ([`Switch::flood_ports`]).
    Flood,
    /// Nowhere.
    Drop(SwitchDrop),
}

/// Why a frame is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchDrop {
    /// Shorter than an Ethernet header (14 bytes).
    TooShort,
    /// The source address is a group address (invalid, IEEE 802.1D).
    MulticastSource,
    /// The destination was learned on the ingress port itself.
    SamePort,
    /// The ingress port is not a port of the switch.
    UnknownPort,
}

/// What [`Switch::learn`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learn {
    /// A new address.
    Added,
    /// A known address, seen again on the same port.
    Refreshed,
    /// A known address now seen on another port (the station moved).
    Moved {
        /// Where it was.
        from: PortId,
    },
    /// The table is full: not learned.
    TableFull,
    /// A group address, never learned.
    Ignored,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    mac: MacAddr,
    port: PortId,
    seen: Instant,
}

/// The forwarding table and port list.
#[derive(Debug)]
pub struct Switch {
    config: SwitchConfig,
    slots: Box<[Option<Entry>]>,
    mask: usize,
    len: usize,
    hasher: RandomState,
    ports: Vec<PortId>,
}

impl Switch {
    /// An empty switch: the table and the port list are allocated here, once.
    pub fn new(config: SwitchConfig) -> Result<Switch, SwitchError> {
        if config.max_entries == 0 || config.max_entries > MAX_ENTRIES_LIMIT {
            return Err(SwitchError::TableSize(config.max_entries));
        }
        if config.max_ports == 0 || config.max_ports > MAX_PORTS_LIMIT {
            return Err(SwitchError::PortCount(config.max_ports));
        }
        if config.ageing.is_zero() {
            return Err(SwitchError::Ageing);
        }
        // A load factor of at most 1/2 keeps linear probe sequences short.
        let capacity = (config.max_entries * 2).next_power_of_two();
        Ok(Switch {
            config,
            slots: vec![None; capacity].into_boxed_slice(),
            mask: capacity - 1,
            len: 0,
            hasher: RandomState::new(),
            ports: Vec::with_capacity(config.max_ports),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SwitchConfig {
        &self.config
    }

    /// Number of addresses in the table (expired ones included until [`Self::expire`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ports.
    pub fn ports(&self) -> &[PortId] {
        &self.ports
    }

    /// Adds a port.
    pub fn add_port(&mut self, port: PortId) -> Result<(), SwitchError> {
        if self.ports.contains(&port) {
            return Err(SwitchError::DuplicatePort(port));
        }
        if self.ports.len() >= self.config.max_ports {
            return Err(SwitchError::TooManyPorts(self.config.max_ports));
        }
        self.ports.push(port);
        Ok(())
    }

    /// Removes a port and forgets every address learned on it. Returns false if there was
    /// no such port.
    pub fn remove_port(&mut self, port: PortId) -> bool {
        let Some(pos) = self.ports.iter().position(|&p| p == port) else {
            return false;
        };
        self.ports.swap_remove(pos);
        self.remove_where(|e| e.port == port);
        true
    }

    /// Removes entries not refreshed for [`SwitchConfig::ageing`]; returns how many.
    /// Call it periodically (e.g. every few seconds); it walks the whole table.
    pub fn expire(&mut self, now: Instant) -> usize {
        let ageing = self.config.ageing;
        self.remove_where(|e| is_expired(e, now, ageing))
    }

    /// The port `mac` was learned on, unless unknown or expired.
    pub fn lookup(&self, mac: &MacAddr, now: Instant) -> Option<PortId> {
        let i = self.find(mac)?;
        let e = self.slots.get(i).copied().flatten()?;
        (!is_expired(&e, now, self.config.ageing)).then_some(e.port)
    }

    /// Learns that `mac` is reachable through `port`.
    pub fn learn(&mut self, mac: MacAddr, port: PortId, now: Instant) -> Learn {
        if mac.is_multicast() {
            return Learn::Ignored;
        }
        if let Some(i) = self.find(&mac) {
            if let Some(Some(e)) = self.slots.get_mut(i) {
                let from = e.port;
                e.port = port;
                e.seen = now;
                return if from == port {
                    Learn::Refreshed
                } else {
                    Learn::Moved { from }
                };
            }
        }
        if self.len >= self.config.max_entries {
            return Learn::TableFull;
        }
        let mut i = self.home(&mac);
        // The load factor is at most 1/2, so a free slot exists; the bound only guards
        // against a logic error.
        for _ in 0..self.slots.len() {
            match self.slots.get_mut(i) {
                Some(slot @ None) => {
                    *slot = Some(Entry {
                        mac,
                        port,
                        seen: now,
                    });
                    self.len += 1;
                    return Learn::Added;
                }
                Some(Some(_)) => i = (i + 1) & self.mask,
                None => break,
            }
        }
        Learn::TableFull
    }

    /// Decides where a frame transmitted by port `ingress` goes, learning its source
    /// address first. Allocation-free.
    pub fn forward(&mut self, frame: &[u8], ingress: PortId, now: Instant) -> Forward {
        let (Some(dst), Some(src)) = (frame.first_chunk::<6>(), frame.get(6..12)) else {
            return Forward::Drop(SwitchDrop::TooShort);
        };
        if frame.len() < 14 {
            return Forward::Drop(SwitchDrop::TooShort);
        }
        if !self.ports.contains(&ingress) {
            return Forward::Drop(SwitchDrop::UnknownPort);
        }
        let mut s = [0u8; 6];
        s.copy_from_slice(src);
        let src = MacAddr(s);
        if src.is_multicast() {
            return Forward::Drop(SwitchDrop::MulticastSource);
        }
        self.learn(src, ingress, now);
        let dst = MacAddr(*dst);
        if dst.is_multicast() {
            return Forward::Flood;
        }
        match self.lookup(&dst, now) {
            Some(p) if p == ingress => Forward::Drop(SwitchDrop::SamePort),
            Some(p) => Forward::Unicast(p),
            None => Forward::Flood,
        }
    }

    /// The ports a flooded frame from `ingress` goes to: all but `ingress`.
    pub fn flood_ports(&self, ingress: PortId) -> impl Iterator<Item = PortId> + '_ {
        self.ports.iter().copied().filter(move |&p| p != ingress)
    }

    fn home(&self, mac: &MacAddr) -> usize {
        // Truncation is the point: the low bits select the slot.
        #[allow(clippy::cast_possible_truncation)]
        let h = self.hasher.hash_one(mac.0) as usize;
        h & self.mask
    }

    fn find(&self, mac: &MacAddr) -> Option<usize> {
        let mut i = self.home(mac);
        for _ in 0..self.slots.len() {
            match self.slots.get(i)? {
                None => return None,
                Some(e) if e.mac == *mac => return Some(i),
                Some(_) => i = (i + 1) & self.mask,
            }
        }
        None
    }

    /// Empties slot `i` and shifts later entries of its probe sequence back, so that no
    /// lookup stops early at the hole (no tombstones).
    fn remove_at(&mut self, mut hole: usize) {
        if let Some(slot) = self.slots.get_mut(hole) {
            if slot.take().is_some() {
                self.len -= 1;
            }
        }
        let mut j = hole;
        for _ in 0..self.slots.len() {
            j = (j + 1) & self.mask;
            let Some(Some(e)) = self.slots.get(j).copied() else {
                return;
            };
            let home = self.home(&e.mac);
            // The entry at j may move to the hole unless its home lies cyclically in
            // (hole, j]: then the hole is before its home and moving it would hide it.
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                if let Some(dst) = self.slots.get_mut(hole) {
                    *dst = Some(e);
                }
                if let Some(src) = self.slots.get_mut(j) {
                    *src = None;
                }
                hole = j;
            }
        }
    }

    fn remove_where(&mut self, mut pred: impl FnMut(&Entry) -> bool) -> usize {
        let mut removed = 0;
        let mut i = 0;
        let mut steps = 0;
        // A removal may shift the next entry into slot i: look at slot i again. Entries
        // only move backwards, so none is skipped; the step bound guards the loop.
        while i < self.slots.len() && steps < 4 * self.slots.len() + 4 {
            steps += 1;
            match self.slots.get(i).copied().flatten() {
                Some(e) if pred(&e) => {
                    self.remove_at(i);
                    removed += 1;
                }
                _ => i += 1,
            }
        }
        // Entries that wrapped from the start of the table to its end may have shifted
        // into slots 0.. after they were checked: one more pass catches them.
        if removed != 0 {
            let mut i = 0;
            while i < self.slots.len() {
                match self.slots.get(i).copied().flatten() {
                    Some(e) if pred(&e) => {
                        self.remove_at(i);
                        removed += 1;
                    }
                    _ => i += 1,
                }
            }
        }
        removed
    }
}

fn is_expired(e: &Entry, now: Instant, ageing: Duration) -> bool {
    now.saturating_duration_since(e.seen) >= ageing
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PortId = PortId(1);
    const B: PortId = PortId(2);
    const C: PortId = PortId(3);

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([0x02, 0, b[0], b[1], b[2], b[3]])
    }

    fn frame(dst: MacAddr, src: MacAddr) -> [u8; 60] {
        let mut f = [0u8; 60];
        f[..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        f
    }

    fn switch(max_entries: usize) -> Switch {
        let mut s = Switch::new(SwitchConfig {
            max_entries,
            ..Default::default()
        })
        .unwrap();
        for p in [A, B, C] {
            s.add_port(p).unwrap();
        }
        s
    }

    #[test]
    fn unknown_unicast_is_flooded_to_other_ports() {
        let mut s = switch(16);
        let now = Instant::now();
        assert_eq!(s.forward(&frame(mac(2), mac(1)), A, now), Forward::Flood);
        assert_eq!(s.flood_ports(A).collect::<Vec<_>>(), vec![B, C]);
    }

    #[test]
    fn learned_address_is_forwarded_to_its_port() {
        let mut s = switch(16);
        let now = Instant::now();
        s.forward(&frame(mac(2), mac(1)), A, now);
        assert_eq!(
            s.forward(&frame(mac(1), mac(2)), B, now),
            Forward::Unicast(A)
        );
        assert_eq!(
            s.forward(&frame(mac(2), mac(1)), A, now),
            Forward::Unicast(B)
        );
        assert_eq!(s.lookup(&mac(1), now), Some(A));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn broadcast_and_multicast_are_flooded() {
        let mut s = switch(16);
        let now = Instant::now();
        s.learn(mac(9), B, now);
        assert_eq!(
            s.forward(&frame(crate::config::BROADCAST, mac(1)), A, now),
            Forward::Flood
        );
        assert_eq!(
            s.forward(&frame(MacAddr([1, 0, 0x5e, 0, 0, 1]), mac(1)), A, now),
            Forward::Flood
        );
    }

    #[test]
    fn frame_to_its_own_port_is_dropped() {
        let mut s = switch(16);
        let now = Instant::now();
        s.learn(mac(2), A, now);
        assert_eq!(
            s.forward(&frame(mac(2), mac(1)), A, now),
            Forward::Drop(SwitchDrop::SamePort)
        );
    }

    #[test]
    fn multicast_source_is_dropped_and_not_learned() {
        let mut s = switch(16);
        let now = Instant::now();
        let m = MacAddr([1, 0, 0x5e, 0, 0, 1]);
        assert_eq!(
            s.forward(&frame(mac(2), m), A, now),
            Forward::Drop(SwitchDrop::MulticastSource)
        );
        assert_eq!(s.learn(m, A, now), Learn::Ignored);
        assert!(s.is_empty());
    }

    #[test]
    fn short_frame_and_unknown_port_are_dropped() {
        let mut s = switch(16);
        let now = Instant::now();
        assert_eq!(
            s.forward(&[0; 13], A, now),
            Forward::Drop(SwitchDrop::TooShort)
        );
        assert_eq!(s.forward(&[], A, now), Forward::Drop(SwitchDrop::TooShort));
        assert_eq!(
            s.forward(&frame(mac(2), mac(1)), PortId(99), now),
            Forward::Drop(SwitchDrop::UnknownPort)
        );
        assert!(s.is_empty());
    }

    #[test]
    fn station_move_updates_port() {
        let mut s = switch(16);
        let now = Instant::now();
        assert_eq!(s.learn(mac(1), A, now), Learn::Added);
        assert_eq!(s.learn(mac(1), A, now), Learn::Refreshed);
        assert_eq!(s.learn(mac(1), B, now), Learn::Moved { from: A });
        assert_eq!(s.lookup(&mac(1), now), Some(B));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn entries_age_out() {
        let mut s = Switch::new(SwitchConfig {
            ageing: Duration::from_secs(10),
            ..Default::default()
        })
        .unwrap();
        s.add_port(A).unwrap();
        s.add_port(B).unwrap();
        let t0 = Instant::now();
        s.learn(mac(1), A, t0);
        s.learn(mac(2), A, t0 + Duration::from_secs(5));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(s.lookup(&mac(1), t1), None);
        assert_eq!(s.lookup(&mac(2), t1), Some(A));
        assert_eq!(s.forward(&frame(mac(1), mac(3)), B, t1), Forward::Flood);
        assert_eq!(s.expire(t1), 1);
        assert_eq!(s.len(), 2); // mac(2) and the just-learned mac(3)
        assert_eq!(s.lookup(&mac(2), t1), Some(A));
    }

    #[test]
    fn refresh_keeps_entry_alive() {
        let mut s = Switch::new(SwitchConfig {
            ageing: Duration::from_secs(10),
            ..Default::default()
        })
        .unwrap();
        let t0 = Instant::now();
        s.learn(mac(1), A, t0);
        s.learn(mac(1), A, t0 + Duration::from_secs(8));
        assert_eq!(s.lookup(&mac(1), t0 + Duration::from_secs(15)), Some(A));
        assert_eq!(s.expire(t0 + Duration::from_secs(15)), 0);
    }

    #[test]
    fn full_table_stops_learning_and_floods() {
        let mut s = switch(4);
        let now = Instant::now();
        for n in 0..4 {
            assert_eq!(s.learn(mac(n), A, now), Learn::Added);
        }
        assert_eq!(s.learn(mac(4), B, now), Learn::TableFull);
        assert_eq!(s.len(), 4);
        assert_eq!(s.forward(&frame(mac(4), mac(1)), A, now), Forward::Flood);
        // A known address is still refreshed or moved when the table is full.
        assert_eq!(s.learn(mac(0), B, now), Learn::Moved { from: A });
        // Once entries expire there is room again.
        let later = now + s.config().ageing;
        assert_eq!(s.expire(later), 4);
        assert_eq!(s.learn(mac(4), B, later), Learn::Added);
    }

    #[test]
    fn removing_a_port_forgets_its_addresses() {
        let mut s = switch(4096);
        let now = Instant::now();
        for n in 0..3000 {
            s.learn(mac(n), if n % 3 == 0 { A } else { B }, now);
        }
        assert!(s.remove_port(A));
        assert!(!s.remove_port(A));
        assert_eq!(s.len(), 2000);
        for n in 0..3000 {
            let want = if n % 3 == 0 { None } else { Some(B) };
            assert_eq!(s.lookup(&mac(n), now), want, "{n}");
        }
        assert_eq!(s.ports(), &[C, B]);
        assert_eq!(
            s.forward(&frame(mac(1), mac(5000)), A, now),
            Forward::Drop(SwitchDrop::UnknownPort)
        );
    }

    #[test]
    fn table_stays_consistent_under_churn() {
        // Small table, many collisions: learn, expire and remove in a deterministic
        // pseudo-random order and compare with a simple model.
        let mut s = switch(64);
        let mut model = std::collections::HashMap::new();
        let t0 = Instant::now();
        let mut x: u32 = 12345;
        for step in 0..20_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let m = mac(x % 200);
            let port = [A, B, C][usize::try_from((x >> 8) % 3).unwrap()];
            let now = t0 + Duration::from_millis(u64::from(step));
            if (x >> 16) % 50 == 0 {
                s.remove_port(port);
                s.add_port(port).unwrap();
                model.retain(|_, (p, _)| *p != port);
            } else if s.len() < 64 || model.contains_key(&m) {
                s.learn(m, port, now);
                model.insert(m, (port, now));
            }
            if step % 1000 == 999 {
                let removed = s.expire(now);
                let before = model.len();
                model.retain(|_, (_, seen)| {
                    now.saturating_duration_since(*seen) < s.config().ageing
                });
                assert_eq!(removed, before - model.len());
            }
            assert_eq!(s.len(), model.len());
        }
        let now = t0 + Duration::from_millis(20_000);
        for (m, (p, _)) in &model {
            assert_eq!(s.lookup(m, now), Some(*p));
        }
    }

    #[test]
    fn ports_are_bounded_and_unique() {
        let mut s = Switch::new(SwitchConfig {
            max_ports: 2,
            ..Default::default()
        })
        .unwrap();
        s.add_port(A).unwrap();
        assert_eq!(s.add_port(A), Err(SwitchError::DuplicatePort(A)));
        s.add_port(B).unwrap();
        assert_eq!(s.add_port(C), Err(SwitchError::TooManyPorts(2)));
    }

    #[test]
    fn bad_config_is_refused() {
        let bad = |c| Switch::new(c).unwrap_err();
        let d = SwitchConfig::default();
        assert_eq!(
            bad(SwitchConfig {
                max_entries: 0,
                ..d
            }),
            SwitchError::TableSize(0)
        );
        assert_eq!(
            bad(SwitchConfig {
                max_entries: MAX_ENTRIES_LIMIT + 1,
                ..d
            }),
            SwitchError::TableSize(MAX_ENTRIES_LIMIT + 1)
        );
        assert_eq!(
            bad(SwitchConfig { max_ports: 0, ..d }),
            SwitchError::PortCount(0)
        );
        assert_eq!(
            bad(SwitchConfig {
                ageing: Duration::ZERO,
                ..d
            }),
            SwitchError::Ageing
        );
    }
}
