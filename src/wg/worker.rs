//! The datapath thread: one OS thread per device moves packets both ways and runs the timers.
//!
//! Why one thread for both directions, outside any async runtime:
//! - Latency. A ping costs four datapath hops (out and back on each node). Blocking in `poll`
//!   on every descriptor at once, a packet wakes exactly this thread; and the reply that a
//!   decrypted packet provokes (written to the TUN, answered by the kernel in the same syscall)
//!   is picked up by the same thread on its next turn, with no cross-thread wakeup at all.
//! - Isolation. The agent's runtime (API watches, policy syncs) never delays a packet, and the
//!   datapath never wakes the agent's reactor.
//! - Throughput is not lost: on each node one direction carries the bulk (the other carries
//!   ACKs), and the per-packet work is batched (`Egress::round`, `Ingress::round`).
//!
//! Optionally (`busy_poll`, off by default) the thread keeps polling without sleeping for a
//! while after work: the answer to what it just sent may arrive within that window, caught
//! without a sleep/wakeup cycle. It only pays where the datapath has cores to spare.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::egress::Egress;
use super::ingress::Ingress;
use super::readiness::{wait_readable, Waker};
use super::state::State;
use super::timers::Timers;
use super::tun::Tun;
use super::udp::UdpSockets;

/// What the datapath thread owns and how it is stopped.
pub(crate) struct Datapath {
    pub state: Arc<State>,
    pub tun: Tun,
    pub udp: UdpSockets,
    pub busy_poll: Duration,
}

/// The running thread and its stop switch.
#[derive(Debug)]
pub(crate) struct DatapathThread {
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl DatapathThread {
    /// Starts the thread. The waker is also handed to `state`, so control calls
    /// (`request_handshake`) can wake it.
    pub(crate) fn spawn(dp: Datapath, name: &str) -> std::io::Result<DatapathThread> {
        let waker = Arc::new(Waker::new()?);
        // A State belongs to one device; a second set would only happen on a programming error,
        // and then the first waker stays (the thread below polls the same one).
        let waker = dp.state.waker.get_or_init(|| waker).clone();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = std::thread::Builder::new()
            .name(format!("wg-{name}"))
            .spawn({
                let stop = stop.clone();
                let waker = waker.clone();
                move || run(dp, &stop, &waker)
            })?;
        Ok(DatapathThread {
            handle: Some(handle),
            stop,
            waker,
        })
    }

    /// Asks the thread to stop and waits for it (at most one turn of its loop).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("the datapath thread panicked");
            }
        }
    }
}

impl Drop for DatapathThread {
    fn drop(&mut self) {
        self.stop();
    }
}

// Positions in the poll set.
const TUN: usize = 0;
const UDP4: usize = 1;
const UDP6: usize = 2;
const WAKE: usize = 3;

fn run(dp: Datapath, stop: &AtomicBool, waker: &Waker) {
    let Datapath {
        state,
        tun,
        udp,
        busy_poll,
    } = dp;
    let mut egress = Egress::new();
    let mut ingress4 = Ingress::new();
    let mut ingress6 = Ingress::new();
    let mut timers = Timers::new(Instant::now());
    // Without an IPv6 socket its slot polls the IPv4 socket a second time, and is never read.
    let fds = [
        tun.fd(),
        udp.v4.fd(),
        udp.v6.as_ref().map_or(udp.v4.fd(), |s| s.fd()),
        waker.fd(),
    ];
    let mut ready = [true; 4];
    let mut last_work = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let mut worked = false;
        if ready[TUN] {
            worked |= egress.round(&state, &tun, &udp);
        }
        if ready[UDP4] {
            worked |= ingress4.round(&state, &tun, &udp, &udp.v4);
        }
        if let (true, Some(v6)) = (ready[UDP6], &udp.v6) {
            worked |= ingress6.round(&state, &tun, &udp, v6);
        }
        if ready[WAKE] {
            waker.drain();
        }
        let now = Instant::now();
        state.last_turn_ms.store(state.now_ms(), Ordering::Relaxed);
        timers.run_due(&state, &udp, now);
        if worked {
            last_work = now;
        }
        // Sleep until a packet or the next timer tick: what queued up meanwhile makes the poll
        // return at once, so after work one poll does both the look and the sleep (a separate
        // non-sleeping look first cost a syscall per hop). Within a busy-poll window, only look.
        let spinning = !busy_poll.is_zero() && now.duration_since(last_work) < busy_poll;
        let timeout = if spinning {
            Duration::ZERO
        } else {
            timers.next_due().saturating_duration_since(now)
        };
        if let Err(e) = wait_readable(fds, Some(timeout), &mut ready) {
            // Only EFAULT/EINVAL/ENOMEM are possible here; pause instead of spinning on them.
            tracing::warn!(error = %e, "poll failed");
            std::thread::sleep(Duration::from_millis(10));
            ready = [true; 4];
        }
    }
}
