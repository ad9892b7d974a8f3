// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The block device's vhost-user face: a [`virtio_core::vhost_user::Device`] over a
//! [`BlockDevice`], whose queue groups ([`BlkQueues`]) each drive one [`BlockQueue`]
//! per started queue. The daemon's `main.rs` only parses options and runs the server.

use std::sync::Arc;

use log::info;
use virtio_core::vhost_user::Vring;
use virtio_core::vhost_user::{
    Device, DeviceError, Events, GroupContext, GroupInfo, Interest, Processed, ProtocolFeatures,
    QueueContext, QueueHandler,
};
use virtio_core::GuestMemoryView;

use crate::{BlockDevice, BlockQueue, QueueError};

/// The vhost-user block device.
pub struct BlkDevice {
    dev: Arc<BlockDevice>,
}

impl BlkDevice {
    /// Serves `dev`.
    pub fn new(dev: BlockDevice) -> Self {
        BlkDevice { dev: Arc::new(dev) }
    }

    /// The block device (for a resize on SIGHUP).
    pub fn block_device(&self) -> &BlockDevice {
        &self.dev
    }
}

/// The handler of one group of block queues (by default one queue per group: the
/// server's `--queues-per-thread`): one [`BlockQueue`] per started queue, its io_uring
/// completion eventfd registered with the queue index as token.
pub struct BlkQueues {
    dev: Arc<BlockDevice>,
    dev_queues: Vec<(u16, BlockQueue)>,
}

impl BlkQueues {
    /// The block processor of `queue` and its vring, if both are there.
    fn queue_and_vring<'c>(
        &'c mut self,
        ctx: &'c mut GroupContext<'_>,
        queue: u16,
    ) -> Option<(&'c mut BlockQueue, &'c mut Vring)> {
        let q = self
            .dev_queues
            .iter_mut()
            .find(|(i, _)| *i == queue)
            .map(|(_, q)| q)?;
        Some((q, ctx.vring(queue)?))
    }
}

fn device_error(e: QueueError) -> DeviceError {
    match e {
        QueueError::Queue(q) => DeviceError::Queue(q),
        QueueError::Engine(io) => DeviceError::Io(io),
    }
}

impl QueueHandler for BlkQueues {
    fn queue_started(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: &QueueContext,
    ) -> Result<(), DeviceError> {
        let q = self.dev.create_queue(queue.index, queue.size)?;
        if let Some(fd) = q.completion_fd() {
            ctx.register(fd, Interest::READABLE, u32::from(queue.index))?;
        }
        info!(
            "queue {}: started ({:?} ring, {} entries)",
            queue.index, queue.layout, queue.size
        );
        self.dev_queues.push((queue.index, q));
        Ok(())
    }

    fn process(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<Processed, DeviceError> {
        let Some((q, vring)) = self.queue_and_vring(ctx, queue) else {
            return Ok(Processed::Empty);
        };
        q.process_available(vring).map_err(device_error)?;
        Ok(if q.is_throttled() {
            Processed::Throttled
        } else {
            Processed::Empty
        })
    }

    fn handle_event(
        &mut self,
        ctx: &mut GroupContext<'_>,
        token: u32,
        _events: Events,
    ) -> Result<(), DeviceError> {
        let Ok(index) = u16::try_from(token) else {
            return Ok(());
        };
        let Some((q, vring)) = self.queue_and_vring(ctx, index) else {
            return Ok(());
        };
        q.process_completions(vring).map_err(device_error)?;
        Ok(())
    }

    fn drain(&mut self, ctx: &mut GroupContext<'_>, queue: u16) -> Result<(), DeviceError> {
        let Some((q, vring)) = self.queue_and_vring(ctx, queue) else {
            return Ok(());
        };
        q.drain(vring).map_err(device_error)?;
        Ok(())
    }

    fn queue_stopped(&mut self, ctx: &mut GroupContext<'_>, queue: u16) {
        ctx.unregister(u32::from(queue));
        if let Some(pos) = self.dev_queues.iter().position(|(i, _)| *i == queue) {
            let (_, q) = self.dev_queues.swap_remove(pos);
            info!(
                "queue {queue}: stopped; counters since the daemon started: {:?}",
                q.metrics().snapshot()
            );
            if let Some(c) = q.path_counts() {
                info!(
                    "queue {queue}: operations of this ring: {} inline, {} through io_uring ({} \
                     of them after RWF_NOWAIT said they would block, {} inline writes stalled)",
                    c.inline, c.uring, c.would_block, c.stalls
                );
            }
            // Dropping the queue waits (bounded) for operations still in flight.
            drop(q);
        }
    }

    fn memory_changed(&mut self, _memory: &Arc<GuestMemoryView>) {
        for (_, q) in &mut self.dev_queues {
            q.release_idle_memory();
        }
    }
}

impl Device for BlkDevice {
    type Handler = BlkQueues;

    fn features(&self) -> u64 {
        self.dev.features()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::CONFIG | ProtocolFeatures::INFLIGHT_SHMFD
    }

    fn num_queues(&self) -> u16 {
        self.dev.num_queues()
    }

    fn max_queue_size(&self) -> u16 {
        self.dev.max_queue_size()
    }

    fn set_features(&self, features: u64) -> Result<(), DeviceError> {
        self.dev.set_acked_features(features);
        Ok(())
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.dev.read_config(offset, buf);
        Ok(())
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        self.dev
            .write_config(offset, data)
            .map_err(|e| DeviceError::Other(e.to_string()))
    }

    fn start_group(&self, _group: &GroupInfo) -> Result<BlkQueues, DeviceError> {
        Ok(BlkQueues {
            dev: Arc::clone(&self.dev),
            dev_queues: Vec::new(),
        })
    }

    fn reset(&self) {
        self.dev.reset();
    }
}
