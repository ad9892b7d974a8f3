// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backend request channel (BACKEND_REQ): requests the backend sends to the frontend,
//! here the config-change notification daemons send after e.g. a disk resize.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserU64;

use super::error::{Error, Result};
use super::message::{self, backend_req, Header, FLAG_NEED_REPLY, FLAG_VERSION};

/// How long to wait for the frontend's answer to a backend request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Channel {
    stream: UnixStream,
    reply_ack: bool,
    config: bool,
}

/// The connection's slot for the channel; shared with [`ConfigNotifier`]s.
pub(crate) type ChannelSlot = Arc<Mutex<Option<Channel>>>;

pub(crate) fn lock(slot: &ChannelSlot) -> MutexGuard<'_, Option<Channel>> {
    // A panic while holding the lock leaves a plain Option behind: still usable.
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs the channel the frontend passed with SET_BACKEND_REQ_FD.
pub(crate) fn install(slot: &ChannelSlot, stream: UnixStream, reply_ack: bool, config: bool) {
    if let Err(e) = stream.set_read_timeout(Some(REPLY_TIMEOUT)) {
        log::warn!("backend channel: setting a read timeout failed: {e}");
    }
    *lock(slot) = Some(Channel {
        stream,
        reply_ack,
        config,
    });
}

/// A handle daemons keep to tell the frontend the device's config space changed (for
/// example after a disk resize). Cheap to clone; valid across connections: it always
/// targets the frontend currently connected.
///
/// Call it from a daemon thread, never from inside a [`Device`](super::Device) method:
/// the frontend answers by reading the config space (GET_CONFIG) over the main channel,
/// which the connection thread must be free to serve.
#[derive(Clone)]
pub struct ConfigNotifier {
    slot: ChannelSlot,
}

impl std::fmt::Debug for ConfigNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigNotifier")
            .field("connected", &lock(&self.slot).is_some())
            .finish()
    }
}

impl ConfigNotifier {
    pub(crate) fn new(slot: ChannelSlot) -> Self {
        ConfigNotifier { slot }
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. With REPLY_ACK negotiated, waits (up to
    /// 5 s) for the frontend's acknowledgement. Fails with [`Error::NoBackendChannel`] when
    /// no frontend with BACKEND_REQ and CONFIG is connected.
    pub fn notify_config_change(&self) -> Result<()> {
        let guard = lock(&self.slot);
        let ch = guard.as_ref().ok_or(Error::NoBackendChannel)?;
        if !ch.config {
            return Err(Error::NoBackendChannel);
        }
        let mut flags = FLAG_VERSION;
        if ch.reply_ack {
            flags |= FLAG_NEED_REPLY;
        }
        let header = Header {
            request: backend_req::CONFIG_CHANGE_MSG,
            flags,
            size: 0,
        };
        message::send_message(&ch.stream, header, &[], &[])?;
        if !ch.reply_ack {
            return Ok(());
        }
        let mut reply = message::Message::default();
        message::recv_reply(&ch.stream, &mut reply)?;
        if reply.header.request != backend_req::CONFIG_CHANGE_MSG {
            return Err(Error::BadHeader {
                request: reply.header.request,
                flags: reply.header.flags,
                size: reply.header.size,
            });
        }
        let v: VhostUserU64 = reply.body("CONFIG_CHANGE_MSG reply")?;
        if v.value != 0 {
            return Err(Error::BackendRequestRefused("CONFIG_CHANGE_MSG"));
        }
        Ok(())
    }
}
