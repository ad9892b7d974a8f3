// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Feature bits: what the device offers, the dependency rules checked when the driver
//! acknowledges them (virtio 1.2 §5.1.3.1), the vnet header length they imply (§5.1.6)
//! and the virtqueue numbering (§5.1.2).

use virtio_bindings::virtio_config::{VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_F_HASH_REPORT,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_NOTF_COAL, VIRTIO_NET_F_RSC_EXT, VIRTIO_NET_F_RSS,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_F_VQ_NOTF_COAL,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::tap::TapOffloads;

/// The mask of feature bit `bit`.
pub const fn bit(bit: u32) -> u64 {
    1u64 << bit
}

/// VHOST_USER_F_PROTOCOL_FEATURES (bit 30): a vhost-user bit that frontends include in
/// SET_FEATURES; it is not a virtio feature and is ignored by [`validate`].
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The most queue pairs a device may have (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX`, §5.1.4).
pub const MAX_QUEUE_PAIRS: u16 = 0x8000;

/// Length of `struct virtio_net_hdr` without `num_buffers` (legacy, no MRG_RXBUF).
pub const VNET_HDR_LEN_LEGACY: usize = 10;
/// Length of `struct virtio_net_hdr_v1` / `virtio_net_hdr_mrg_rxbuf` (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Guest (device-to-driver) offload features, which VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may
/// switch on and off (§5.1.6.5.8).
pub const GUEST_OFFLOAD_FEATURES: u64 = bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_GUEST_USO4)
    | bit(VIRTIO_NET_F_GUEST_USO6);

/// Features that need a control virtqueue (§5.1.3.1: each "Requires VIRTIO_NET_F_CTRL_VQ";
/// NOTF_COAL and VQ_NOTF_COAL from virtio 1.3). CTRL_GUEST_OFFLOADS and CTRL_RX_EXTRA are
/// added although the list omits them: their only use is a control command.
pub const CTRL_VQ_DEPENDENT_FEATURES: u64 = bit(VIRTIO_NET_F_CTRL_RX)
    | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
    | bit(VIRTIO_NET_F_CTRL_VLAN)
    | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
    | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | bit(VIRTIO_NET_F_RSS)
    | bit(VIRTIO_NET_F_NOTF_COAL)
    | bit(VIRTIO_NET_F_VQ_NOTF_COAL);

/// One dependency rule of §5.1.3.1: `feature` requires at least one of `requires`.
struct Rule {
    feature: u32,
    requires: &'static [u32],
}

/// The rules of §5.1.3.1 other than the CTRL_VQ ones (see [`CTRL_VQ_DEPENDENT_FEATURES`]),
/// plus GUEST_USO4/6 → GUEST_CSUM (virtio 1.3) and CTRL_RX_EXTRA → CTRL_RX (its commands
/// extend CTRL_RX's, §5.1.6.5.1).
const RULES: &[Rule] = &[
    Rule {
        feature: VIRTIO_NET_F_GUEST_TSO4,
        requires: &[VIRTIO_NET_F_GUEST_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_GUEST_TSO6,
        requires: &[VIRTIO_NET_F_GUEST_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_GUEST_ECN,
        requires: &[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6],
    },
    Rule {
        feature: VIRTIO_NET_F_GUEST_UFO,
        requires: &[VIRTIO_NET_F_GUEST_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_GUEST_USO4,
        requires: &[VIRTIO_NET_F_GUEST_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_GUEST_USO6,
        requires: &[VIRTIO_NET_F_GUEST_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_HOST_TSO4,
        requires: &[VIRTIO_NET_F_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_HOST_TSO6,
        requires: &[VIRTIO_NET_F_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_HOST_ECN,
        requires: &[VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6],
    },
    Rule {
        feature: VIRTIO_NET_F_HOST_UFO,
        requires: &[VIRTIO_NET_F_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_HOST_USO,
        requires: &[VIRTIO_NET_F_CSUM],
    },
    Rule {
        feature: VIRTIO_NET_F_CTRL_RX_EXTRA,
        requires: &[VIRTIO_NET_F_CTRL_RX],
    },
    Rule {
        feature: VIRTIO_NET_F_RSC_EXT,
        requires: &[VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6],
    },
];

/// The name of a virtio-net feature bit, for error messages and logs.
pub fn feature_name(b: u32) -> &'static str {
    match b {
        VIRTIO_NET_F_CSUM => "CSUM",
        VIRTIO_NET_F_GUEST_CSUM => "GUEST_CSUM",
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS => "CTRL_GUEST_OFFLOADS",
        VIRTIO_NET_F_MTU => "MTU",
        VIRTIO_NET_F_MAC => "MAC",
        VIRTIO_NET_F_GUEST_TSO4 => "GUEST_TSO4",
        VIRTIO_NET_F_GUEST_TSO6 => "GUEST_TSO6",
        VIRTIO_NET_F_GUEST_ECN => "GUEST_ECN",
        VIRTIO_NET_F_GUEST_UFO => "GUEST_UFO",
        VIRTIO_NET_F_HOST_TSO4 => "HOST_TSO4",
        VIRTIO_NET_F_HOST_TSO6 => "HOST_TSO6",
        VIRTIO_NET_F_HOST_ECN => "HOST_ECN",
        VIRTIO_NET_F_HOST_UFO => "HOST_UFO",
        VIRTIO_NET_F_MRG_RXBUF => "MRG_RXBUF",
        VIRTIO_NET_F_STATUS => "STATUS",
        VIRTIO_NET_F_CTRL_VQ => "CTRL_VQ",
        VIRTIO_NET_F_CTRL_RX => "CTRL_RX",
        VIRTIO_NET_F_CTRL_VLAN => "CTRL_VLAN",
        VIRTIO_NET_F_CTRL_RX_EXTRA => "CTRL_RX_EXTRA",
        VIRTIO_NET_F_GUEST_ANNOUNCE => "GUEST_ANNOUNCE",
        VIRTIO_NET_F_MQ => "MQ",
        VIRTIO_NET_F_CTRL_MAC_ADDR => "CTRL_MAC_ADDR",
        VIRTIO_NET_F_NOTF_COAL => "NOTF_COAL",
        VIRTIO_NET_F_VQ_NOTF_COAL => "VQ_NOTF_COAL",
        VIRTIO_NET_F_GUEST_USO4 => "GUEST_USO4",
        VIRTIO_NET_F_GUEST_USO6 => "GUEST_USO6",
        VIRTIO_NET_F_HOST_USO => "HOST_USO",
        VIRTIO_NET_F_HASH_REPORT => "HASH_REPORT",
        VIRTIO_NET_F_RSS => "RSS",
        VIRTIO_NET_F_RSC_EXT => "RSC_EXT",
        VIRTIO_RING_F_INDIRECT_DESC => "INDIRECT_DESC",
        VIRTIO_RING_F_EVENT_IDX => "EVENT_IDX",
        VIRTIO_F_VERSION_1 => "VERSION_1",
        VIRTIO_F_RING_PACKED => "RING_PACKED",
        _ => "unknown",
    }
}

/// A feature set the driver acknowledged that the device refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeatureError {
    /// The driver acknowledged bits the device did not offer (§2.2.1).
    #[error("the driver acknowledged features that were not offered: {0:#x}")]
    NotOffered(u64),
    /// A feature was acknowledged without one it depends on (§5.1.3.1).
    #[error(
        "feature {feature} (bit {bit}) was acknowledged without {requires}, which it requires \
         (virtio 1.2 §5.1.3.1)"
    )]
    MissingDependency {
        /// The feature's name.
        feature: &'static str,
        /// Its bit number.
        bit: u32,
        /// What it requires ("A or B" for alternatives).
        requires: &'static str,
    },
}

/// What to do with features that need a control queue when the driver acknowledges them
/// without VIRTIO_NET_F_CTRL_VQ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CtrlVqPolicy {
    /// Refuse the feature set (§5.1.3.1; what Linux's virtio_net itself enforces).
    #[default]
    Require,
    /// Drop those bits from the negotiated set instead: for frontends that emulate the
    /// control queue themselves and strip CTRL_VQ from SET_FEATURES (DPDK virtio_user,
    /// which turns VQ_PAIRS_SET into SET_VRING_ENABLE calls).
    Mask,
}

/// What the device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferOptions {
    /// Queue pairs the device has (1 ..= [`MAX_QUEUE_PAIRS`]); MQ is offered above 1.
    pub max_queue_pairs: u16,
    /// Offer VIRTIO_NET_F_MTU (the config space then holds the MTU).
    pub mtu: bool,
    /// Offer the control queue and the features that need it.
    pub ctrl_vq: bool,
    /// Offloads the host side can take and give: for a TAP, what
    /// [`crate::tap::Tap::probe_offloads`] found; none in switch mode (peers may not
    /// understand partial checksums or GSO).
    pub offloads: TapOffloads,
}

impl Default for OfferOptions {
    fn default() -> Self {
        OfferOptions {
            max_queue_pairs: 1,
            mtu: false,
            ctrl_vq: true,
            offloads: TapOffloads::empty(),
        }
    }
}

/// The feature bits offered for `opts`.
///
/// Always: VERSION_1, RING_PACKED, EVENT_IDX, INDIRECT_DESC, MRG_RXBUF, MAC, STATUS.
/// With a control queue: CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA, CTRL_MAC_ADDR,
/// CTRL_GUEST_OFFLOADS (when a guest offload is available), and MQ when there is more than
/// one pair (Linux refuses MQ without CTRL_VQ). The checksum and segmentation bits follow
/// `opts.offloads`, so that every offered set satisfies §5.1.3.1.
pub fn offered_features(opts: &OfferOptions) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_RING_PACKED)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS);
    if opts.mtu {
        f |= bit(VIRTIO_NET_F_MTU);
    }
    let o = opts.offloads;
    if o.contains(TapOffloads::CSUM) {
        // Driver-to-device offloads: the TAP takes partial checksums and GSO frames with a
        // vnet header; device-to-driver ones exist only where the kernel accepted the
        // matching TUNSETOFFLOAD flag.
        f |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
        if o.contains(TapOffloads::TSO4) {
            f |= bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO4);
        }
        if o.contains(TapOffloads::TSO6) {
            f |= bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_GUEST_TSO6);
        }
        if o.contains(TapOffloads::TSO_ECN) && o.intersects(TapOffloads::TSO4 | TapOffloads::TSO6) {
            f |= bit(VIRTIO_NET_F_HOST_ECN) | bit(VIRTIO_NET_F_GUEST_ECN);
        }
        if o.contains(TapOffloads::UFO) {
            f |= bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO);
        }
    }
    if opts.ctrl_vq {
        f |= bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_CTRL_RX)
            | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
            | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);
        if f & GUEST_OFFLOAD_FEATURES != 0 {
            f |= bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
        }
        if opts.max_queue_pairs > 1 {
            f |= bit(VIRTIO_NET_F_MQ);
        }
    }
    f
}

/// A validated feature set: what the driver acknowledged (minus the vhost-user bit, and
/// minus what [`CtrlVqPolicy::Mask`] dropped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated(u64);

impl Negotiated {
    /// A feature set taken as is, without validation (for tests and defaults).
    pub const fn from_bits_unchecked(bits: u64) -> Self {
        Negotiated(bits)
    }

    /// The feature bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether feature bit `b` was negotiated.
    pub const fn has(self, b: u32) -> bool {
        b < 64 && self.0 & (1u64 << b) != 0
    }

    /// Length of the vnet header that starts every packet buffer (§5.1.6): 12 bytes
    /// (`num_buffers` included) with VERSION_1 or MRG_RXBUF, else the legacy 10 bytes.
    pub const fn vnet_hdr_len(self) -> usize {
        vnet_hdr_len(self.0)
    }

    /// Whether the device has a control queue.
    pub const fn has_ctrl_vq(self) -> bool {
        self.has(VIRTIO_NET_F_CTRL_VQ)
    }

    /// Number of queue pairs the driver may use: `max_pairs` with MQ, else 1 (§5.1.2).
    pub fn queue_pairs(self, max_pairs: u16) -> u16 {
        if self.has(VIRTIO_NET_F_MQ) {
            max_pairs.max(1)
        } else {
            1
        }
    }

    /// The guest offloads negotiated (the initial value of the offload state, §5.1.6.5.8).
    pub const fn guest_offloads(self) -> u64 {
        self.0 & GUEST_OFFLOAD_FEATURES
    }
}

/// The vnet header length for the feature bits `features` (§5.1.6).
pub const fn vnet_hdr_len(features: u64) -> usize {
    if features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        VNET_HDR_LEN
    } else {
        VNET_HDR_LEN_LEGACY
    }
}

fn requires_text(requires: &[u32]) -> &'static str {
    match requires {
        [VIRTIO_NET_F_GUEST_CSUM] => "GUEST_CSUM",
        [VIRTIO_NET_F_CSUM] => "CSUM",
        [VIRTIO_NET_F_CTRL_RX] => "CTRL_RX",
        [VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6] => "GUEST_TSO4 or GUEST_TSO6",
        [VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6] => "HOST_TSO4 or HOST_TSO6",
        _ => "another feature",
    }
}

/// Validates the features a driver acknowledged with SET_FEATURES against those offered.
///
/// Bit 30 (VHOST_USER_F_PROTOCOL_FEATURES) is ignored. Acknowledged bits must have been
/// offered, and the set must follow the dependency rules of §5.1.3.1; features needing a
/// control queue without CTRL_VQ are refused or dropped according to `policy`.
pub fn validate(
    acked: u64,
    offered: u64,
    policy: CtrlVqPolicy,
) -> Result<Negotiated, FeatureError> {
    let mut acked = acked & !VHOST_USER_F_PROTOCOL_FEATURES;
    let extra = acked & !(offered & !VHOST_USER_F_PROTOCOL_FEATURES);
    if extra != 0 {
        return Err(FeatureError::NotOffered(extra));
    }
    if acked & bit(VIRTIO_NET_F_CTRL_VQ) == 0 {
        let dependent = acked & CTRL_VQ_DEPENDENT_FEATURES;
        if dependent != 0 {
            match policy {
                CtrlVqPolicy::Mask => acked &= !CTRL_VQ_DEPENDENT_FEATURES,
                CtrlVqPolicy::Require => {
                    let b = dependent.trailing_zeros();
                    return Err(FeatureError::MissingDependency {
                        feature: feature_name(b),
                        bit: b,
                        requires: "CTRL_VQ",
                    });
                }
            }
        }
    }
    for rule in RULES {
        if acked & bit(rule.feature) != 0 && !rule.requires.iter().any(|&r| acked & bit(r) != 0) {
            return Err(FeatureError::MissingDependency {
                feature: feature_name(rule.feature),
                bit: rule.feature,
                requires: requires_text(rule.requires),
            });
        }
    }
    Ok(Negotiated(acked))
}

/// What a virtqueue of a net device is for (§5.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// receiveq of queue pair `n` (index 2n).
    Rx(u16),
    /// transmitq of queue pair `n` (index 2n + 1).
    Tx(u16),
    /// The control queue.
    Ctrl,
}

/// Index of the receive queue of queue pair `pair`: 2·pair.
pub const fn rx_queue_index(pair: u16) -> u32 {
    2 * pair as u32
}

/// Index of the transmit queue of queue pair `pair`: 2·pair + 1.
pub const fn tx_queue_index(pair: u16) -> u32 {
    2 * pair as u32 + 1
}

/// Index of the control queue: 2·N, where N is `max_pairs` with MQ (or RSS) and 1
/// otherwise (§5.1.2). A driver without MQ (user-mode Linux) finds it at index 2.
pub fn ctrl_queue_index(features: Negotiated, max_pairs: u16) -> u32 {
    2 * u32::from(features.queue_pairs(max_pairs))
}

/// Number of virtqueues of a device with `max_pairs` queue pairs: 2·N, plus the control
/// queue when `ctrl_vq`.
pub const fn queue_count(max_pairs: u16, ctrl_vq: bool) -> u32 {
    2 * max_pairs as u32 + ctrl_vq as u32
}

/// The role of virtqueue `index` under `features`, or `None` if the negotiated device has
/// no such queue.
pub fn queue_role(index: u32, features: Negotiated, max_pairs: u16) -> Option<QueueRole> {
    let pairs = u32::from(features.queue_pairs(max_pairs));
    if index < 2 * pairs {
        let pair = u16::try_from(index / 2).ok()?;
        Some(if index % 2 == 0 {
            QueueRole::Rx(pair)
        } else {
            QueueRole::Tx(pair)
        })
    } else if features.has_ctrl_vq() && index == 2 * pairs {
        Some(QueueRole::Ctrl)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_offloads() -> TapOffloads {
        TapOffloads::CSUM
            | TapOffloads::TSO4
            | TapOffloads::TSO6
            | TapOffloads::TSO_ECN
            | TapOffloads::UFO
    }

    #[test]
    fn offered_set_satisfies_its_own_rules() {
        for ctrl_vq in [false, true] {
            for pairs in [1, 4] {
                for offloads in [TapOffloads::empty(), TapOffloads::CSUM, all_offloads()] {
                    let opts = OfferOptions {
                        max_queue_pairs: pairs,
                        mtu: true,
                        ctrl_vq,
                        offloads,
                    };
                    let f = offered_features(&opts);
                    assert_eq!(
                        validate(f, f, CtrlVqPolicy::Require),
                        Ok(Negotiated(f)),
                        "{opts:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn offered_follows_tap_offloads() {
        let f = offered_features(&OfferOptions {
            offloads: all_offloads(),
            ..Default::default()
        });
        for b in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        ] {
            assert_ne!(f & bit(b), 0, "{}", feature_name(b));
        }
        let none = offered_features(&OfferOptions::default());
        assert_eq!(none & (GUEST_OFFLOAD_FEATURES | bit(VIRTIO_NET_F_CSUM)), 0);
        assert_eq!(none & bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS), 0);
    }

    #[test]
    fn mq_offered_only_with_ctrl_vq_and_several_pairs() {
        let mq = |pairs, ctrl_vq| {
            offered_features(&OfferOptions {
                max_queue_pairs: pairs,
                ctrl_vq,
                ..Default::default()
            }) & bit(VIRTIO_NET_F_MQ)
                != 0
        };
        assert!(mq(2, true));
        assert!(!mq(1, true));
        assert!(!mq(2, false));
    }

    #[test]
    fn not_offered_bits_are_refused() {
        let offered = bit(VIRTIO_F_VERSION_1);
        assert_eq!(
            validate(
                offered | bit(VIRTIO_NET_F_MQ),
                offered,
                CtrlVqPolicy::Require
            ),
            Err(FeatureError::NotOffered(bit(VIRTIO_NET_F_MQ)))
        );
    }

    #[test]
    fn protocol_features_bit_is_ignored() {
        let offered = bit(VIRTIO_F_VERSION_1);
        let n = validate(
            offered | VHOST_USER_F_PROTOCOL_FEATURES,
            offered,
            CtrlVqPolicy::Require,
        );
        assert_eq!(n, Ok(Negotiated(offered)));
    }

    #[test]
    fn guest_tso4_without_guest_csum_is_refused() {
        let all = u64::MAX;
        let err = validate(bit(VIRTIO_NET_F_GUEST_TSO4), all, CtrlVqPolicy::Require).unwrap_err();
        assert_eq!(
            err,
            FeatureError::MissingDependency {
                feature: "GUEST_TSO4",
                bit: VIRTIO_NET_F_GUEST_TSO4,
                requires: "GUEST_CSUM"
            }
        );
        assert!(err.to_string().contains("GUEST_TSO4"), "{err}");
    }

    #[test]
    fn ecn_requires_either_tso() {
        let all = u64::MAX;
        let base = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_ECN);
        assert!(validate(base, all, CtrlVqPolicy::Require).is_err());
        assert!(validate(
            base | bit(VIRTIO_NET_F_HOST_TSO6),
            all,
            CtrlVqPolicy::Require
        )
        .is_ok());
        let guest = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert!(validate(guest, all, CtrlVqPolicy::Require).is_err());
        assert!(validate(
            guest | bit(VIRTIO_NET_F_GUEST_TSO4),
            all,
            CtrlVqPolicy::Require
        )
        .is_ok());
    }

    #[test]
    fn host_offloads_require_csum() {
        let all = u64::MAX;
        for b in [
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
        ] {
            assert!(
                validate(bit(b), all, CtrlVqPolicy::Require).is_err(),
                "{}",
                feature_name(b)
            );
            assert!(validate(bit(b) | bit(VIRTIO_NET_F_CSUM), all, CtrlVqPolicy::Require).is_ok());
        }
    }

    #[test]
    fn ctrl_features_without_ctrl_vq_are_refused() {
        let all = u64::MAX;
        for b in [
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        ] {
            let err = validate(bit(b), all, CtrlVqPolicy::Require).unwrap_err();
            assert_eq!(
                err,
                FeatureError::MissingDependency {
                    feature: feature_name(b),
                    bit: b,
                    requires: "CTRL_VQ"
                }
            );
            assert!(validate(
                bit(b) | bit(VIRTIO_NET_F_CTRL_VQ),
                all,
                CtrlVqPolicy::Require
            )
            .is_ok());
        }
    }

    #[test]
    fn mask_policy_drops_ctrl_features_without_ctrl_vq() {
        let acked = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_RX);
        let n = validate(acked, u64::MAX, CtrlVqPolicy::Mask).unwrap();
        assert_eq!(n.bits(), bit(VIRTIO_F_VERSION_1));
        assert_eq!(n.queue_pairs(4), 1);
    }

    #[test]
    fn vnet_hdr_len_is_12_with_version_1_or_mrg_rxbuf() {
        assert_eq!(vnet_hdr_len(0), 10);
        assert_eq!(vnet_hdr_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(vnet_hdr_len(bit(VIRTIO_NET_F_MRG_RXBUF)), 12);
        assert_eq!(Negotiated(bit(VIRTIO_F_VERSION_1)).vnet_hdr_len(), 12);
    }

    #[test]
    fn queue_indices_follow_pairs() {
        assert_eq!(rx_queue_index(0), 0);
        assert_eq!(tx_queue_index(0), 1);
        assert_eq!(rx_queue_index(3), 6);
        assert_eq!(tx_queue_index(3), 7);
        assert_eq!(rx_queue_index(u16::MAX), 131070);
        assert_eq!(queue_count(4, true), 9);
        assert_eq!(queue_count(1, false), 2);
    }

    #[test]
    fn ctrl_queue_is_at_2_without_mq() {
        let ctrl = Negotiated(bit(VIRTIO_NET_F_CTRL_VQ));
        assert_eq!(ctrl_queue_index(ctrl, 4), 2);
        assert_eq!(queue_role(2, ctrl, 4), Some(QueueRole::Ctrl));
        assert_eq!(queue_role(3, ctrl, 4), None);
        let mq = Negotiated(bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ));
        assert_eq!(ctrl_queue_index(mq, 4), 8);
        assert_eq!(queue_role(8, mq, 4), Some(QueueRole::Ctrl));
        assert_eq!(queue_role(5, mq, 4), Some(QueueRole::Tx(2)));
        assert_eq!(queue_role(6, mq, 4), Some(QueueRole::Rx(3)));
        assert_eq!(queue_role(9, mq, 4), None);
        assert_eq!(queue_role(2, Negotiated(0), 4), None);
    }
}
