// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host side of TAP mode: a Linux TAP interface (`/dev/net/tun`) with a vnet header,
//! one non-blocking file descriptor per queue pair.
//!
//! [`Tap::open`] attaches to the named interface (creating it if it does not exist) with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` for more than one queue
//! pair. Every frame read from or written to a [`TapQueue`] starts with a vnet header
//! (`struct virtio_net_hdr`, §5.1.6) whose length [`Tap::set_vnet_hdr_len`] sets to the
//! negotiated one (10 or 12 bytes), so guest buffers can be passed to `readv`/`writev`
//! as they are. When the length is 12 the kernel does not fill `num_buffers` in a header
//! it delivers (recent kernels write 0, older ones skip the field): the device must set
//! it ([`crate::hdr::set_num_buffers`], §5.1.6.4).
//!
//! Offloads: [`Tap::set_offloads`] (TUNSETOFFLOAD) tells the kernel which partial
//! checksums and GSO frames it may hand to the device, i.e. to the guest; they follow the
//! guest's negotiated GUEST_* features ([`TapOffloads::from_guest_features`]). A flag the
//! kernel refuses is dropped, logged, and left out of the returned set, so the device
//! stops offering or using it. Frames the guest sends with offloads (HOST_* features)
//! need no setting: the kernel accepts them with the vnet header.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::size_of;
use std::ops::BitOr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

use crate::features::{bit, Negotiated, VNET_HDR_LEN, VNET_HDR_LEN_LEGACY};

/// The clone device.
pub const TUN_PATH: &str = "/dev/net/tun";

/// Longest interface name (IFNAMSIZ minus the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Most iovecs one `readv`/`writev` takes (IOV_MAX on Linux).
pub const MAX_IOVECS: usize = 1024;

/// TUNSETOFFLOAD flags: what the kernel may hand to the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TapOffloads(u32);

impl TapOffloads {
    /// TUN_F_CSUM: partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM).
    pub const CSUM: TapOffloads = TapOffloads(libc::TUN_F_CSUM);
    /// TUN_F_TSO4: TCPv4 segmentation offload.
    pub const TSO4: TapOffloads = TapOffloads(libc::TUN_F_TSO4);
    /// TUN_F_TSO6: TCPv6 segmentation offload.
    pub const TSO6: TapOffloads = TapOffloads(libc::TUN_F_TSO6);
    /// TUN_F_TSO_ECN: TSO with the ECN (CWR) bit.
    pub const TSO_ECN: TapOffloads = TapOffloads(libc::TUN_F_TSO_ECN);
    /// TUN_F_UFO: UDP fragmentation offload.
    pub const UFO: TapOffloads = TapOffloads(libc::TUN_F_UFO);

    /// Every flag this crate maps, in the order [`Tap::set_offloads`] tries them.
    pub const ALL: [TapOffloads; 5] =
        [Self::CSUM, Self::TSO4, Self::TSO6, Self::TSO_ECN, Self::UFO];

    /// No offload.
    pub const fn empty() -> Self {
        TapOffloads(0)
    }

    /// The TUN_F_* bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: TapOffloads) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag of `other` is set.
    pub const fn intersects(self, other: TapOffloads) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The offloads for the guest's GUEST_* features (feature bits, as negotiated or as
    /// set by VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET): GUEST_CSUM → CSUM, GUEST_TSO4/6 →
    /// TSO4/6, GUEST_ECN → TSO_ECN, GUEST_UFO → UFO.
    pub const fn from_guest_features(features: u64) -> Self {
        let mut f = 0;
        if features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
            f |= libc::TUN_F_CSUM;
        }
        if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            f |= libc::TUN_F_TSO4;
        }
        if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            f |= libc::TUN_F_TSO6;
        }
        if features & bit(VIRTIO_NET_F_GUEST_ECN) != 0 {
            f |= libc::TUN_F_TSO_ECN;
        }
        if features & bit(VIRTIO_NET_F_GUEST_UFO) != 0 {
            f |= libc::TUN_F_UFO;
        }
        TapOffloads(f)
    }

    /// The GUEST_* feature bits these offloads allow (the inverse mapping).
    pub const fn guest_features(self) -> u64 {
        let mut f = 0;
        if self.contains(Self::CSUM) {
            f |= bit(VIRTIO_NET_F_GUEST_CSUM);
        }
        if self.contains(Self::TSO4) {
            f |= bit(VIRTIO_NET_F_GUEST_TSO4);
        }
        if self.contains(Self::TSO6) {
            f |= bit(VIRTIO_NET_F_GUEST_TSO6);
        }
        if self.contains(Self::TSO_ECN) {
            f |= bit(VIRTIO_NET_F_GUEST_ECN);
        }
        if self.contains(Self::UFO) {
            f |= bit(VIRTIO_NET_F_GUEST_UFO);
        }
        f
    }

    /// The name of a single flag, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::CSUM => "TUN_F_CSUM",
            Self::TSO4 => "TUN_F_TSO4",
            Self::TSO6 => "TUN_F_TSO6",
            Self::TSO_ECN => "TUN_F_TSO_ECN",
            Self::UFO => "TUN_F_UFO",
            _ => "TUN_F_*",
        }
    }
}

impl BitOr for TapOffloads {
    type Output = TapOffloads;

    fn bitor(self, rhs: TapOffloads) -> TapOffloads {
        TapOffloads(self.0 | rhs.0)
    }
}

/// A TAP operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Not a usable interface name.
    #[error(
        "invalid TAP interface name {0:?}: use 1 to 15 bytes without '/', ':', whitespace or NUL"
    )]
    InvalidName(String),
    /// Zero queue pairs, or more than the kernel allows (256).
    #[error("a TAP cannot have {0} queues: use 1 to 256 queue pairs")]
    QueueCount(u16),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    /// The kernel lacks a TUN feature the device needs.
    #[error("the kernel's TUN driver lacks {0} (TUNGETFEATURES)")]
    Unsupported(&'static str),
    /// TUNSETIFF failed.
    #[error(
        "cannot attach queue {queue} of TAP {name:?}: {source} (EBUSY: the interface is in use or \
         was created without multi_queue; EINVAL: it exists with other flags, e.g. not a TAP, no \
         vnet_hdr, or a different multi_queue setting; EPERM: CAP_NET_ADMIN is needed)"
    )]
    Attach {
        /// Interface name.
        name: String,
        /// Queue pair index.
        queue: u16,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A vnet header length other than 10 or 12.
    #[error("vnet header length {0} is not supported: it must be 10 or 12 (virtio 1.2 §5.1.6)")]
    InvalidVnetHdrLen(usize),
    /// Another ioctl failed.
    #[error("{op} on TAP {name:?} failed: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// Interface name.
        name: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF, TUNGETIFF, SIOCGIFFLAGS and SIOCSIFFLAGS use it: the name
/// and the `ifr_flags` member of the union.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(size_of::<IfReq>() == size_of::<libc::ifreq>());

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        // The name was validated to be at most MAX_NAME_LEN bytes, so the last byte stays
        // NUL; `zip` bounds the copy anyway.
        for (dst, &src) in r.name.iter_mut().take(MAX_NAME_LEN).zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        r
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Checks an interface name as the kernel's `dev_valid_name` does (an empty name lets
/// the kernel choose one, `tapN`).
pub fn validate_name(name: &str) -> Result<(), TapError> {
    let bad = name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        Err(TapError::InvalidName(name.to_owned()))
    } else {
        Ok(())
    }
}

fn open_tun() -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    Ok(OwnedFd::from(file))
}

/// `ioctl(fd, req, arg)` with a pointer argument.
fn ioctl_ptr<T>(fd: BorrowedFd<'_>, req: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor and `arg` an exclusive reference to a value of
    // the type the request reads or writes (checked by each caller), valid for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The TUN features the kernel supports (TUNGETFEATURES: IFF_* flags).
pub fn probe_features() -> Result<u32, TapError> {
    let fd = open_tun()?;
    tun_features(fd.as_fd())
}

fn tun_features(fd: BorrowedFd<'_>) -> Result<u32, TapError> {
    let mut features: libc::c_uint = 0;
    // TUNGETFEATURES writes an unsigned int.
    ioctl_ptr(fd, libc::TUNGETFEATURES, &mut features).map_err(|source| TapError::Ioctl {
        op: "TUNGETFEATURES",
        name: String::new(),
        source,
    })?;
    Ok(features)
}

/// Most queues of a multi-queue TAP (the kernel's MAX_TAP_QUEUES).
pub const MAX_TAP_QUEUES: u16 = 256;

fn iff(flag: libc::c_int) -> u32 {
    u32::try_from(flag).unwrap_or(0)
}

/// A TAP interface and its per-queue-pair descriptors.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<TapQueue>,
}

impl Tap {
    /// Opens (or creates) the TAP `name` with one non-blocking descriptor per queue pair
    /// (`IFF_MULTI_QUEUE` when `queue_pairs > 1`) and a 12-byte vnet header. An empty name
    /// lets the kernel choose one ([`Self::name`] tells which).
    pub fn open(name: &str, queue_pairs: u16) -> Result<Tap, TapError> {
        validate_name(name)?;
        if queue_pairs == 0 || queue_pairs > MAX_TAP_QUEUES {
            return Err(TapError::QueueCount(queue_pairs));
        }
        let multi = queue_pairs > 1;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut name = name.to_owned();
        let mut queues = Vec::with_capacity(usize::from(queue_pairs));
        for queue in 0..queue_pairs {
            let fd = open_tun()?;
            if queue == 0 {
                let have = tun_features(fd.as_fd())?;
                if have & iff(libc::IFF_VNET_HDR) == 0 {
                    return Err(TapError::Unsupported("IFF_VNET_HDR"));
                }
                if multi && have & iff(libc::IFF_MULTI_QUEUE) == 0 {
                    return Err(TapError::Unsupported("IFF_MULTI_QUEUE"));
                }
            }
            let flags = libc::c_short::try_from(flags).unwrap_or(0);
            let mut req = IfReq::new(&name, flags);
            // TUNSETIFF reads and writes a struct ifreq (name and flags).
            ioctl_ptr(fd.as_fd(), libc::TUNSETIFF, &mut req).map_err(|source| {
                TapError::Attach {
                    name: name.clone(),
                    queue,
                    source,
                }
            })?;
            if queue == 0 {
                name = req.name();
            }
            queues.push(TapQueue { fd });
        }
        let tap = Tap { name, queues };
        tap.set_vnet_hdr_len(VNET_HDR_LEN)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One queue per queue pair: queue k serves receiveq k and transmitq k.
    pub fn queues(&self) -> &[TapQueue] {
        &self.queues
    }

    /// The queues, for the device's per-pair handlers. The interface lives while any of
    /// them is open (unless it is persistent).
    pub fn into_queues(self) -> Vec<TapQueue> {
        self.queues
    }

    fn first(&self) -> Result<BorrowedFd<'_>, TapError> {
        // `open` always makes at least one queue.
        self.queues
            .first()
            .map(|q| q.fd.as_fd())
            .ok_or(TapError::QueueCount(0))
    }

    fn ioctl_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> TapError + '_ {
        move |source| TapError::Ioctl {
            op,
            name: self.name.clone(),
            source,
        }
    }

    /// TUNSETVNETHDRSZ: the vnet header length, 10 or 12 (the device's, shared by all
    /// queues). See [`Negotiated::vnet_hdr_len`].
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        if len != VNET_HDR_LEN && len != VNET_HDR_LEN_LEGACY {
            return Err(TapError::InvalidVnetHdrLen(len));
        }
        let mut sz = libc::c_int::try_from(len).map_err(|_| TapError::InvalidVnetHdrLen(len))?;
        // TUNSETVNETHDRSZ reads an int.
        ioctl_ptr(self.first()?, libc::TUNSETVNETHDRSZ, &mut sz)
            .map_err(self.ioctl_err("TUNSETVNETHDRSZ"))
    }

    /// TUNGETVNETHDRSZ: the current vnet header length.
    pub fn vnet_hdr_len(&self) -> Result<usize, TapError> {
        let mut sz: libc::c_int = 0;
        // TUNGETVNETHDRSZ writes an int.
        ioctl_ptr(self.first()?, libc::TUNGETVNETHDRSZ, &mut sz)
            .map_err(self.ioctl_err("TUNGETVNETHDRSZ"))?;
        usize::try_from(sz).map_err(|_| TapError::InvalidVnetHdrLen(0))
    }

    fn try_set_offloads(&self, o: TapOffloads) -> io::Result<()> {
        let fd = self.first().map_err(io::Error::other)?;
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of TUN_F_*
        // flags), not as a pointer; `fd` is open.
        let r = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(o.bits()),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// TUNSETOFFLOAD: lets the kernel hand `wanted` offloads to the device, and returns the
    /// ones now active. A flag the kernel refuses (EINVAL: unknown to it, or not valid
    /// without another, e.g. TSO without CSUM) is dropped with a warning and the rest are
    /// kept; the device must not offer or enable (for the guest) what is not returned.
    pub fn set_offloads(&self, wanted: TapOffloads) -> Result<TapOffloads, TapError> {
        match self.try_set_offloads(wanted) {
            Ok(()) => return Ok(wanted),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(self.ioctl_err("TUNSETOFFLOAD")(e)),
        }
        let mut active = TapOffloads::empty();
        for flag in TapOffloads::ALL {
            if !wanted.contains(flag) {
                continue;
            }
            match self.try_set_offloads(active | flag) {
                Ok(()) => active = active | flag,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::warn!(
                        "TAP {}: the kernel refused offload {}; continuing without it",
                        self.name,
                        flag.name()
                    );
                }
                Err(e) => return Err(self.ioctl_err("TUNSETOFFLOAD")(e)),
            }
        }
        self.try_set_offloads(active)
            .map_err(self.ioctl_err("TUNSETOFFLOAD"))?;
        Ok(active)
    }

    /// The offloads the kernel accepts, found by trying them all; offloads are left off
    /// afterwards (until [`Self::configure`]), so no GSO frame arrives before the guest
    /// agreed to it. Use the result as [`crate::features::OfferOptions::offloads`].
    pub fn probe_offloads(&self) -> Result<TapOffloads, TapError> {
        let all = TapOffloads::ALL
            .into_iter()
            .fold(TapOffloads::empty(), BitOr::bitor);
        let supported = self.set_offloads(all)?;
        self.set_offloads(TapOffloads::empty())?;
        Ok(supported)
    }

    /// Applies the negotiated features: the vnet header length and the guest offloads.
    /// Returns the offloads active (see [`Self::set_offloads`]).
    pub fn configure(&self, features: Negotiated) -> Result<TapOffloads, TapError> {
        self.set_vnet_hdr_len(features.vnet_hdr_len())?;
        self.set_offloads(TapOffloads::from_guest_features(features.guest_offloads()))
    }

    /// Brings the interface up or down (SIOCSIFFLAGS IFF_UP; needs CAP_NET_ADMIN in the
    /// interface's network namespace).
    pub fn set_link_up(&self, up: bool) -> Result<(), TapError> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(self.ioctl_err("socket(AF_INET)")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor we just opened and own.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(&self.name, 0);
        // SIOCGIFFLAGS and SIOCSIFFLAGS read/write a struct ifreq (name and flags).
        ioctl_ptr(sock.as_fd(), libc::SIOCGIFFLAGS, &mut req)
            .map_err(self.ioctl_err("SIOCGIFFLAGS"))?;
        let iff_up = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
        if up {
            req.flags |= iff_up;
        } else {
            req.flags &= !iff_up;
        }
        ioctl_ptr(sock.as_fd(), libc::SIOCSIFFLAGS, &mut req)
            .map_err(self.ioctl_err("SIOCSIFFLAGS"))
    }
}

/// One queue of a TAP: a non-blocking descriptor that reads and writes whole frames, each
/// behind a vnet header.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
}

/// Whether an error of [`TapQueue::readv`] or [`TapQueue::writev`] means "try again when
/// the descriptor is ready" (EAGAIN) rather than a failure.
pub fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn check_iovecs(n: usize) -> io::Result<libc::c_int> {
    if n > MAX_IOVECS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{n} buffers is more than the {MAX_IOVECS} one readv/writev takes"),
        ));
    }
    libc::c_int::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn ssize_result(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

impl TapQueue {
    /// Reads one frame (vnet header first) into `bufs`. A frame larger than the buffers
    /// is truncated by the kernel. `Err` of kind [`io::ErrorKind::WouldBlock`] when no
    /// frame is queued; EINTR is retried.
    pub fn readv(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let n = check_iovecs(bufs.len())?;
        loop {
            // SAFETY: IoSliceMut is ABI-compatible with struct iovec on Unix; `bufs` holds
            // `n` of them, each describing memory writable for the duration of the call.
            let r = unsafe {
                libc::readv(
                    self.fd.as_raw_fd(),
                    bufs.as_mut_ptr().cast::<libc::iovec>(),
                    n,
                )
            };
            match ssize_result(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Writes one frame (vnet header first) gathered from `bufs`. `Err` of kind
    /// [`io::ErrorKind::WouldBlock`] when the interface's queue is full; EINTR is retried.
    pub fn writev(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = check_iovecs(bufs.len())?;
        loop {
            // SAFETY: IoSlice is ABI-compatible with struct iovec on Unix; `bufs` holds `n`
            // of them, each describing memory readable for the duration of the call.
            let r = unsafe {
                libc::writev(self.fd.as_raw_fd(), bufs.as_ptr().cast::<libc::iovec>(), n)
            };
            match ssize_result(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// [`Self::readv`] into one buffer.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.readv(&mut [IoSliceMut::new(buf)])
    }

    /// [`Self::writev`] from one buffer.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.writev(&[IoSlice::new(buf)])
    }

    /// TUNSETQUEUE: attaches (`true`) or detaches this queue of a multi-queue TAP. The
    /// kernel spreads frames for the guest over the attached queues only, so the device
    /// detaches the queues of pairs the driver does not use (all but pair 0 until
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, §5.1.6.5.6) lest their frames wait unread.
    pub fn set_enabled(&self, enabled: bool) -> io::Result<()> {
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = IfReq::new("", libc::c_short::try_from(flag).unwrap_or(0));
        // TUNSETQUEUE reads a struct ifreq (flags).
        ioctl_ptr(self.fd.as_fd(), libc::TUNSETQUEUE, &mut req)
    }

    /// TUNGETIFF: the interface name and IFF_* flags this queue is attached with.
    pub fn attached(&self) -> io::Result<(String, u32)> {
        let mut req = IfReq::new("", 0);
        // TUNGETIFF writes a struct ifreq (name and flags).
        ioctl_ptr(self.fd.as_fd(), libc::TUNGETIFF, &mut req)?;
        Ok((req.name(), u32::from(req.flags as u16)))
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The interface index of `name` in the caller's network namespace, if it exists.
pub fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

#[cfg(test)]
mod tests;
