// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of the vhost-user device side.

use std::io;

/// What went wrong serving a vhost-user frontend.
///
/// Most variants describe a request the frontend got wrong; the server logs them, answers
/// the request with a failure (where the protocol allows one) and keeps the connection.
/// Socket errors end the connection; the server then waits for the next frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading from or writing to the vhost-user socket failed.
    #[error("vhost-user socket: {0}")]
    Socket(#[source] io::Error),
    /// The frontend closed the connection.
    #[error("the frontend closed the connection")]
    Disconnected,
    /// A message header that cannot be valid (bad version, reply flag on a request, or a
    /// payload larger than the protocol allows).
    #[error("malformed message header: request {request}, flags {flags:#x}, size {size}")]
    BadHeader {
        /// Request code.
        request: u32,
        /// Header flags.
        flags: u32,
        /// Payload size.
        size: u32,
    },
    /// A request whose payload does not have the size its type requires.
    #[error("{request}: payload of {got} bytes, expected {expected}")]
    BadPayloadSize {
        /// Request name.
        request: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A request came with the wrong number of file descriptors.
    #[error("{request}: {got} file descriptors attached, expected {expected}")]
    BadFdCount {
        /// Request name.
        request: &'static str,
        /// Descriptors received.
        got: usize,
        /// Descriptors expected.
        expected: usize,
    },
    /// A request the server does not implement, or one needing an unnegotiated feature.
    #[error("request {name} ({code}) is not supported{why}")]
    Unsupported {
        /// Request code.
        code: u32,
        /// Request name.
        name: &'static str,
        /// Why (e.g. ": protocol feature CONFIG was not negotiated").
        why: String,
    },
    /// SET_FEATURES or SET_PROTOCOL_FEATURES with bits that were not offered.
    #[error("{what} {requested:#x} include bits {unsupported:#x} that were not offered")]
    UnofferedFeatures {
        /// "virtio features" or "protocol features".
        what: &'static str,
        /// The value the frontend set.
        requested: u64,
        /// The bits not offered.
        unsupported: u64,
    },
    /// A vring index at or above the number of queues.
    #[error("vring index {index} is out of range: the device has {num_queues} queues")]
    InvalidQueueIndex {
        /// The index in the request.
        index: u32,
        /// The device's number of queues.
        num_queues: u16,
    },
    /// SET_VRING_NUM with a size the device or the ring layout does not allow.
    #[error("vring {index}: size {size} is invalid ({why})")]
    InvalidQueueSize {
        /// Vring index.
        index: u16,
        /// Requested size.
        size: u32,
        /// Why it is refused.
        why: &'static str,
    },
    /// A ring-configuration request for a ring that is running.
    #[error(
        "vring {index}: {request} while the ring is running (stop it with GET_VRING_BASE first)"
    )]
    RingRunning {
        /// Vring index.
        index: u16,
        /// Request name.
        request: &'static str,
    },
    /// A ring address (frontend virtual address) outside every memory region.
    #[error("vring {index}: {area} address {addr:#x} is not inside any memory region")]
    RingAddressNotMapped {
        /// Vring index.
        index: u16,
        /// "descriptor", "available" or "used".
        area: &'static str,
        /// The frontend address.
        addr: u64,
    },
    /// A ring could not be started.
    #[error("vring {index}: cannot start: {why}")]
    RingStart {
        /// Vring index.
        index: u16,
        /// Why.
        why: String,
    },
    /// The ring layout rejected the configuration or base.
    #[error("vring {index}: {source}")]
    Queue {
        /// Vring index.
        index: u16,
        /// The ring error.
        #[source]
        source: crate::Error,
    },
    /// A memory region that cannot be used (empty, overflowing, overlapping, too many).
    #[error("memory region (guest {guest_addr:#x}, size {size:#x}, user {user_addr:#x}): {why}")]
    BadMemoryRegion {
        /// Guest-physical start.
        guest_addr: u64,
        /// Size.
        size: u64,
        /// Frontend virtual start.
        user_addr: u64,
        /// Why it is refused.
        why: String,
    },
    /// mmap of a memory region or inflight area failed.
    #[error("mmap of {what} ({len:#x} bytes) failed: {source}")]
    Mmap {
        /// What was mapped.
        what: &'static str,
        /// Mapping length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Building the guest memory view failed.
    #[error("guest memory table: {0}")]
    Memory(#[from] crate::memory::MemoryError),
    /// An inflight-tracking area that does not fit the queues it must describe.
    #[error("inflight area: {0}")]
    BadInflight(String),
    /// The config space access was refused by the device.
    #[error("config space: {0}")]
    Config(#[source] DeviceError),
    /// The device refused an operation.
    #[error("device: {0}")]
    Device(#[source] DeviceError),
    /// The frontend shrank the file behind guest memory (or the inflight area) and the
    /// daemon touched a page past its end: the SIGBUS was caught, the mapping replaced
    /// with anonymous memory, and the connection is closed.
    #[error(
        "the frontend shrank the file behind {0} while it was mapped (SIGBUS caught); \
         closing the connection"
    )]
    MemoryTruncated(String),
    /// A queue worker thread is gone (it panicked or could not be started).
    #[error("queue worker {0} is not running")]
    WorkerGone(usize),
    /// Creating a thread, eventfd, epoll set or memfd failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket path could not be bound.
    #[error("binding the vhost-user socket {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No backend channel (SET_BACKEND_REQ_FD) is set up on the current connection.
    #[error("no backend request channel: the frontend did not negotiate BACKEND_REQ or is not connected")]
    NoBackendChannel,
    /// The frontend answered a backend request with a failure.
    #[error("the frontend refused backend request {0}")]
    BackendRequestRefused(&'static str),
}

/// Errors a [`Device`](super::Device) or [`QueueHandler`](super::QueueHandler) reports.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A virtqueue error (a malformed ring or chain): the queue is broken.
    #[error("virtqueue: {0}")]
    Queue(#[from] crate::Error),
    /// An I/O error of the device's backing resource.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The device has no config space.
    #[error("the device has no config space")]
    NoConfigSpace,
    /// A config space access outside the config space.
    #[error("access of {len} bytes at offset {offset} is outside the {size}-byte config space")]
    ConfigOutOfRange {
        /// Offset of the access.
        offset: u32,
        /// Length of the access.
        len: usize,
        /// Size of the config space.
        size: usize,
    },
    /// A write to a read-only config space field.
    #[error("config space bytes at offset {offset} (len {len}) are read-only")]
    ConfigReadOnly {
        /// Offset of the write.
        offset: u32,
        /// Length of the write.
        len: usize,
    },
    /// Features the device cannot work with.
    #[error("features {0:#x} are not acceptable to the device")]
    Features(u64),
    /// A request the device does not implement.
    #[error("the device does not support {0}")]
    Unsupported(&'static str),
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}

/// Result type of the vhost-user module.
pub(crate) type Result<T> = std::result::Result<T, Error>;
