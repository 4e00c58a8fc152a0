//! Device time of one compute pass, from timestamps written at its beginning and
//! end (wgpu feature `TIMESTAMP_QUERY`). Only wgpu and std, so that the bench
//! kernels (`examples/bench_report/kernels.rs`) time their passes with the same
//! code.

use std::time::Duration;

/// Bytes of the two resolved timestamps (`wgpu::QUERY_SIZE` each).
pub(crate) const TIMER_BYTES: u64 = 16;

/// A query set for one pass's two timestamps and the buffer they resolve into.
pub(crate) struct PassTimer {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
}

impl PassTimer {
    /// A timer on `device`, or `None` when the device was created without
    /// `TIMESTAMP_QUERY` (not every adapter has it; on GL only with
    /// `GL_ARB_timer_query`).
    pub(crate) fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Option<Self> {
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return None;
        }
        Some(Self {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("pass timer"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolved: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("pass timer"),
                size: TIMER_BYTES,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            period_ns: queue.get_timestamp_period() as f64,
        })
    }

    /// The timestamp writes of the pass to time (its beginning and its end).
    pub(crate) fn writes(&self) -> wgpu::ComputePassTimestampWrites<'_> {
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }
    }

    /// After the timed pass: resolves both timestamps and copies them to byte `at`
    /// (a multiple of 4) of `dst` (`COPY_DST`), `TIMER_BYTES` bytes.
    pub(crate) fn copy_to(&self, encoder: &mut wgpu::CommandEncoder, dst: &wgpu::Buffer, at: u64) {
        encoder.resolve_query_set(&self.queries, 0..2, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, dst, at, TIMER_BYTES);
    }

    /// The time between the two timestamps, from the `TIMER_BYTES` bytes that
    /// [`Self::copy_to`] wrote; `None` when the end does not follow the beginning
    /// (some drivers' counters can wrap or be reset between the two).
    pub(crate) fn elapsed(&self, bytes: &[u8]) -> Option<Duration> {
        let tick = |i: usize| {
            let b: [u8; 8] = bytes.get(8 * i..8 * i + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(b))
        };
        let ticks = tick(1)?.checked_sub(tick(0)?)?;
        Some(Duration::from_nanos((ticks as f64 * self.period_ns) as u64))
    }
}
