// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user wire format: a 12-byte header (request, flags, size), a payload of at
//! most 4 KiB, and file descriptors passed with `SCM_RIGHTS` alongside the header.
//!
//! Payload structures come from the `vhost` crate (`vhost::vhost_user::message`); they are
//! `ByteValued`, and are decoded here by copying, so an unaligned receive buffer is fine.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vm_memory::ByteValued;

use super::error::{Error, Result};

/// Size of the message header.
pub(crate) const HEADER_SIZE: usize = 12;
/// Largest payload accepted (the `vhost` crate's and QEMU's limit).
pub(crate) const MAX_PAYLOAD: usize = 0x1000;
/// Most file descriptors accepted with one message.
pub(crate) const MAX_FDS: usize = 32;

/// Header flags: protocol version (bits 0–1, always 1).
pub(crate) const FLAG_VERSION: u32 = 0x1;
/// Header flags: the version mask.
pub(crate) const FLAG_VERSION_MASK: u32 = 0x3;
/// Header flags: this message is a reply.
pub(crate) const FLAG_REPLY: u32 = 0x4;
/// Header flags: the sender wants a REPLY_ACK answer.
pub(crate) const FLAG_NEED_REPLY: u32 = 0x8;

/// Frontend request codes (vhost-user.rst, "Front-end message types").
#[allow(missing_docs)]
pub(crate) mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SEND_RARP: u32 = 19;
    pub const NET_SET_MTU: u32 = 20;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const IOTLB_MSG: u32 = 22;
    pub const SET_VRING_ENDIAN: u32 = 23;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const CREATE_CRYPTO_SESSION: u32 = 26;
    pub const CLOSE_CRYPTO_SESSION: u32 = 27;
    pub const POSTCOPY_ADVISE: u32 = 28;
    pub const POSTCOPY_LISTEN: u32 = 29;
    pub const POSTCOPY_END: u32 = 30;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const GPU_SET_SOCKET: u32 = 33;
    pub const RESET_DEVICE: u32 = 34;
    pub const VRING_KICK: u32 = 35;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const SET_STATUS: u32 = 39;
    pub const GET_STATUS: u32 = 40;
    pub const GET_SHARED_OBJECT: u32 = 41;
    pub const SET_DEVICE_STATE_FD: u32 = 42;
    pub const CHECK_DEVICE_STATE: u32 = 43;
    pub const GET_SHMEM_CONFIG: u32 = 44;
}

/// Backend request codes (vhost-user.rst, "Back-end message types").
pub(crate) mod backend_req {
    /// The device's configuration space changed.
    pub const CONFIG_CHANGE_MSG: u32 = 2;
}

/// The name of a frontend request, for logs.
pub(crate) fn request_name(code: u32) -> &'static str {
    match code {
        req::GET_FEATURES => "GET_FEATURES",
        req::SET_FEATURES => "SET_FEATURES",
        req::SET_OWNER => "SET_OWNER",
        req::RESET_OWNER => "RESET_OWNER",
        req::SET_MEM_TABLE => "SET_MEM_TABLE",
        req::SET_LOG_BASE => "SET_LOG_BASE",
        req::SET_LOG_FD => "SET_LOG_FD",
        req::SET_VRING_NUM => "SET_VRING_NUM",
        req::SET_VRING_ADDR => "SET_VRING_ADDR",
        req::SET_VRING_BASE => "SET_VRING_BASE",
        req::GET_VRING_BASE => "GET_VRING_BASE",
        req::SET_VRING_KICK => "SET_VRING_KICK",
        req::SET_VRING_CALL => "SET_VRING_CALL",
        req::SET_VRING_ERR => "SET_VRING_ERR",
        req::GET_PROTOCOL_FEATURES => "GET_PROTOCOL_FEATURES",
        req::SET_PROTOCOL_FEATURES => "SET_PROTOCOL_FEATURES",
        req::GET_QUEUE_NUM => "GET_QUEUE_NUM",
        req::SET_VRING_ENABLE => "SET_VRING_ENABLE",
        req::SEND_RARP => "SEND_RARP",
        req::NET_SET_MTU => "NET_SET_MTU",
        req::SET_BACKEND_REQ_FD => "SET_BACKEND_REQ_FD",
        req::IOTLB_MSG => "IOTLB_MSG",
        req::SET_VRING_ENDIAN => "SET_VRING_ENDIAN",
        req::GET_CONFIG => "GET_CONFIG",
        req::SET_CONFIG => "SET_CONFIG",
        req::CREATE_CRYPTO_SESSION => "CREATE_CRYPTO_SESSION",
        req::CLOSE_CRYPTO_SESSION => "CLOSE_CRYPTO_SESSION",
        req::POSTCOPY_ADVISE => "POSTCOPY_ADVISE",
        req::POSTCOPY_LISTEN => "POSTCOPY_LISTEN",
        req::POSTCOPY_END => "POSTCOPY_END",
        req::GET_INFLIGHT_FD => "GET_INFLIGHT_FD",
        req::SET_INFLIGHT_FD => "SET_INFLIGHT_FD",
        req::GPU_SET_SOCKET => "GPU_SET_SOCKET",
        req::RESET_DEVICE => "RESET_DEVICE",
        req::VRING_KICK => "VRING_KICK",
        req::GET_MAX_MEM_SLOTS => "GET_MAX_MEM_SLOTS",
        req::ADD_MEM_REG => "ADD_MEM_REG",
        req::REM_MEM_REG => "REM_MEM_REG",
        req::SET_STATUS => "SET_STATUS",
        req::GET_STATUS => "GET_STATUS",
        req::GET_SHARED_OBJECT => "GET_SHARED_OBJECT",
        req::SET_DEVICE_STATE_FD => "SET_DEVICE_STATE_FD",
        req::CHECK_DEVICE_STATE => "CHECK_DEVICE_STATE",
        req::GET_SHMEM_CONFIG => "GET_SHMEM_CONFIG",
        _ => "UNKNOWN",
    }
}

/// Requests whose sender always waits for a reply body (not a REPLY_ACK). If one of these
/// fails and the protocol has no failure encoding for it, the connection must be closed:
/// the frontend would otherwise wait forever.
pub(crate) fn always_replies(code: u32) -> bool {
    matches!(
        code,
        req::GET_FEATURES
            | req::GET_VRING_BASE
            | req::GET_PROTOCOL_FEATURES
            | req::GET_QUEUE_NUM
            | req::IOTLB_MSG
            | req::GET_CONFIG
            | req::CREATE_CRYPTO_SESSION
            | req::POSTCOPY_ADVISE
            | req::POSTCOPY_END
            | req::GET_INFLIGHT_FD
            | req::GET_MAX_MEM_SLOTS
            | req::GET_STATUS
            | req::GET_SHARED_OBJECT
            | req::SET_DEVICE_STATE_FD
            | req::CHECK_DEVICE_STATE
            | req::GET_SHMEM_CONFIG
    )
}

/// A message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    /// Request code.
    pub request: u32,
    /// Flags (version, reply, need_reply).
    pub flags: u32,
    /// Payload size.
    pub size: u32,
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// True if the sender asked for a REPLY_ACK answer.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// One received message.
#[derive(Debug, Default)]
pub(crate) struct Message {
    /// The header.
    pub header: Header,
    /// The payload (`header.size` bytes).
    pub payload: Vec<u8>,
    /// The file descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// Decodes the payload as exactly one `T`.
    pub fn body<T: ByteValued + Default>(&self, request: &'static str) -> Result<T> {
        decode_exact(&self.payload, request)
    }

    /// Takes the single file descriptor the request must carry.
    pub fn single_fd(&mut self, request: &'static str) -> Result<OwnedFd> {
        if self.fds.len() != 1 {
            return Err(Error::BadFdCount {
                request,
                got: self.fds.len(),
                expected: 1,
            });
        }
        self.fds.pop().ok_or(Error::BadFdCount {
            request,
            got: 0,
            expected: 1,
        })
    }

    /// Fails if any file descriptor came with the request.
    pub fn no_fds(&self, request: &'static str) -> Result<()> {
        if self.fds.is_empty() {
            Ok(())
        } else {
            Err(Error::BadFdCount {
                request,
                got: self.fds.len(),
                expected: 0,
            })
        }
    }
}

/// Decodes `buf` as exactly one `T`.
pub(crate) fn decode_exact<T: ByteValued + Default>(
    buf: &[u8],
    request: &'static str,
) -> Result<T> {
    if buf.len() != size_of::<T>() {
        return Err(Error::BadPayloadSize {
            request,
            got: buf.len(),
            expected: size_of::<T>(),
        });
    }
    decode_prefix(buf, request)
}

/// Decodes the first `size_of::<T>()` bytes of `buf` as a `T`.
pub(crate) fn decode_prefix<T: ByteValued + Default>(
    buf: &[u8],
    request: &'static str,
) -> Result<T> {
    let n = size_of::<T>();
    let src = buf.get(..n).ok_or(Error::BadPayloadSize {
        request,
        got: buf.len(),
        expected: n,
    })?;
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(src);
    Ok(v)
}

fn cmsg_space(fds: usize) -> usize {
    // CMSG_SPACE is a pure size computation.
    // SAFETY: no memory is accessed; the argument fits in u32 for the small counts used.
    unsafe { libc::CMSG_SPACE(u32::try_from(fds * size_of::<RawFd>()).unwrap_or(0)) as usize }
}

/// Receives into `buf` with `recvmsg`, collecting file descriptors passed alongside.
/// Returns the byte count (0 at end of stream).
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    // u64 array: aligned for cmsghdr.
    let mut cmsg_buf = [0u64; 64];
    let cmsg_len = cmsg_space(MAX_FDS).min(std::mem::size_of_val(&cmsg_buf));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_len as _;
    let n = loop {
        // SAFETY: `msg` points to `iov` (covering `buf`) and `cmsg_buf`, both live and
        // writable for the call; the kernel writes at most their declared lengths.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Walk the control messages and take ownership of every descriptor received, even if
    // we then refuse the message (so none leaks).
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // `msg_control`/`msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a valid header inside the control buffer (see above).
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a size computation.
            let data_len = hdr.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = data_len / size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS message is `count` ints (possibly unaligned).
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, inside this control message's data.
                let fd = unsafe { data.add(i).read_unaligned() };
                if fd >= 0 {
                    // SAFETY: the kernel just installed `fd` in our table for us; nothing
                    // else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} file descriptors attached to a message"),
        ));
    }
    Ok(n)
}

/// Reads exactly `buf.len()` bytes (no file descriptors expected).
fn recv_exact(sock: &UnixStream, mut buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<()> {
    while !buf.is_empty() {
        let n = recv_with_fds(sock, buf, fds).map_err(Error::Socket)?;
        if n == 0 {
            return Err(Error::Disconnected);
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

/// Receives one request. `payload` buffers of `msg` are reused.
pub(crate) fn recv_message(sock: &UnixStream, msg: &mut Message) -> Result<()> {
    recv_raw(sock, msg, false)
}

/// Receives one reply (on the backend channel).
pub(crate) fn recv_reply(sock: &UnixStream, msg: &mut Message) -> Result<()> {
    recv_raw(sock, msg, true)
}

fn recv_raw(sock: &UnixStream, msg: &mut Message, reply: bool) -> Result<()> {
    msg.fds.clear();
    msg.payload.clear();
    let mut hdr = [0u8; HEADER_SIZE];
    let n = recv_with_fds(sock, &mut hdr, &mut msg.fds).map_err(Error::Socket)?;
    if n == 0 {
        return Err(Error::Disconnected);
    }
    recv_exact(sock, &mut hdr[n..], &mut msg.fds)?;
    let header = Header::from_bytes(&hdr);
    msg.header = header;
    let size = header.size as usize;
    if header.flags & FLAG_VERSION_MASK != FLAG_VERSION
        || (header.flags & FLAG_REPLY != 0) != reply
        || size > MAX_PAYLOAD
    {
        return Err(Error::BadHeader {
            request: header.request,
            flags: header.flags,
            size: header.size,
        });
    }
    msg.payload.resize(size, 0);
    recv_exact(sock, &mut msg.payload, &mut msg.fds)
}

/// Sends `header` + `parts` (concatenated), with `fds` attached to the first byte.
pub(crate) fn send_message(
    sock: &UnixStream,
    header: Header,
    parts: &[&[u8]],
    fds: &[RawFd],
) -> Result<()> {
    let hdr = header.to_bytes();
    let mut data = Vec::with_capacity(HEADER_SIZE + header.size as usize);
    data.extend_from_slice(&hdr);
    for p in parts {
        data.extend_from_slice(p);
    }
    let mut sent = 0usize;
    let mut first = true;
    while sent < data.len() {
        let rest = &data[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        };
        let mut cmsg_buf = [0u64; 16];
        // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if first && !fds.is_empty() {
            let space = cmsg_space(fds.len());
            if space > std::mem::size_of_val(&cmsg_buf) {
                return Err(Error::Socket(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "too many file descriptors for one message",
                )));
            }
            msg.msg_control = cmsg_buf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer is `space` bytes, enough for one SCM_RIGHTS
            // message of `fds.len()` descriptors (checked above).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len =
                    libc::CMSG_LEN(u32::try_from(std::mem::size_of_val(fds)).unwrap_or(0)) as _;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(*fd);
                }
            }
        }
        // SAFETY: `msg` points to live buffers for the duration of the call; sendmsg only
        // reads them.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Socket(e));
        }
        first = false;
        sent += r as usize;
    }
    Ok(())
}

/// Sends a reply to `request` with `body` as payload.
pub(crate) fn send_reply(
    sock: &UnixStream,
    request: u32,
    body: &[u8],
    fds: &[RawFd],
) -> Result<()> {
    let size = u32::try_from(body.len()).map_err(|_| {
        Error::Socket(io::Error::new(
            io::ErrorKind::InvalidInput,
            "reply too large",
        ))
    })?;
    let header = Header {
        request,
        flags: FLAG_VERSION | FLAG_REPLY,
        size,
    };
    send_message(sock, header, &[body], fds)
}

#[cfg(test)]
#[cfg(feature = "driver")]
pub(crate) mod test_util {
    //! A raw frontend for tests that the `vhost` crate's `Frontend` cannot express.
    use super::*;

    /// Sends a request and, if `reply` is true, reads the reply payload.
    pub fn request(
        sock: &UnixStream,
        request: u32,
        flags: u32,
        body: &[u8],
        fds: &[RawFd],
        reply: bool,
    ) -> Result<Option<Vec<u8>>> {
        let header = Header {
            request,
            flags: FLAG_VERSION | flags,
            size: u32::try_from(body.len()).unwrap_or(0),
        };
        send_message(sock, header, &[body], fds)?;
        if !reply {
            return Ok(None);
        }
        let mut hdr = [0u8; HEADER_SIZE];
        let mut fds = Vec::new();
        recv_exact(sock, &mut hdr, &mut fds)?;
        let h = Header::from_bytes(&hdr);
        assert_eq!(h.request, request, "reply for another request");
        assert_ne!(h.flags & FLAG_REPLY, 0, "reply flag missing");
        let mut payload = vec![0u8; h.size as usize];
        recv_exact(sock, &mut payload, &mut fds)?;
        Ok(Some(payload))
    }

    /// Reads one message (as the frontend side of the backend channel does).
    pub fn read_message(sock: &UnixStream) -> Result<(u32, u32, Vec<u8>)> {
        let mut hdr = [0u8; HEADER_SIZE];
        let mut fds = Vec::new();
        recv_exact(sock, &mut hdr, &mut fds)?;
        let h = Header::from_bytes(&hdr);
        let mut payload = vec![0u8; h.size as usize];
        recv_exact(sock, &mut payload, &mut fds)?;
        Ok((h.request, h.flags, payload))
    }

    /// Sends a reply (as the frontend does on the backend channel).
    pub fn write_reply(sock: &UnixStream, request: u32, body: &[u8]) -> Result<()> {
        send_reply(sock, request, body, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn message_round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let header = Header {
            request: req::SET_VRING_KICK,
            flags: FLAG_VERSION | FLAG_NEED_REPLY,
            size: 8,
        };
        send_message(&a, header, &[&3u64.to_ne_bytes()], &[evt.as_raw_fd()]).unwrap();
        let mut msg = Message::default();
        recv_message(&b, &mut msg).unwrap();
        assert_eq!(msg.header, header);
        assert!(msg.header.need_reply());
        assert_eq!(
            msg.body::<vhost::vhost_user::message::VhostUserU64>("t")
                .unwrap()
                .value,
            3
        );
        assert_eq!(msg.fds.len(), 1);
        // The received descriptor refers to the same eventfd.
        evt.write(5).unwrap();
        let mut v = [0u8; 8];
        let f = std::fs::File::from(msg.fds.pop().unwrap());
        use std::io::Read;
        (&f).read_exact(&mut v).unwrap();
        assert_eq!(u64::from_ne_bytes(v), 5);
        let _ = f.as_fd();
    }

    #[test]
    fn rejects_oversized_payload_and_reply_flag() {
        let (a, b) = UnixStream::pair().unwrap();
        let bad = Header {
            request: 1,
            flags: FLAG_VERSION,
            size: u32::try_from(MAX_PAYLOAD + 1).unwrap(),
        };
        send_message(&a, bad, &[], &[]).unwrap();
        let mut msg = Message::default();
        assert!(matches!(
            recv_message(&b, &mut msg),
            Err(Error::BadHeader { .. })
        ));
        let (a, b) = UnixStream::pair().unwrap();
        let reply = Header {
            request: 1,
            flags: FLAG_VERSION | FLAG_REPLY,
            size: 0,
        };
        send_message(&a, reply, &[], &[]).unwrap();
        assert!(matches!(
            recv_message(&b, &mut msg),
            Err(Error::BadHeader { .. })
        ));
    }

    #[test]
    fn end_of_stream_is_disconnect() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut msg = Message::default();
        assert!(matches!(
            recv_message(&b, &mut msg),
            Err(Error::Disconnected)
        ));
    }

    #[test]
    fn decode_checks_size() {
        let r: Result<vhost::vhost_user::message::VhostUserU64> = decode_exact(&[0u8; 4], "x");
        assert!(matches!(
            r,
            Err(Error::BadPayloadSize {
                got: 4,
                expected: 8,
                ..
            })
        ));
    }
}
