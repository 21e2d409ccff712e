//! Waiting for descriptors on the datapath thread: `poll(2)` over the TUN and the UDP sockets, an
//! eventfd that wakes the thread from other threads, and a bounded wait for write space.
//!
//! Why plain `poll` on a dedicated thread instead of tokio: a packet that arrives while the
//! datapath sleeps costs one wakeup of the thread blocked on it, instead of a reactor wakeup, a
//! task hand-off and often a second thread. That hop repeats four times per round trip.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// An eventfd another thread writes to wake the datapath out of `poll`.
#[derive(Debug)]
pub(crate) struct Waker {
    fd: EventFd,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Waker { fd })
    }

    /// Makes the descriptor readable until [`Waker::drain`]. Never blocks: when the counter is
    /// saturated (EAGAIN) the thread is being woken already.
    pub(crate) fn wake(&self) {
        let _ = self.fd.write(1);
    }

    /// Resets the counter; returns whether anyone had woken us.
    pub(crate) fn drain(&self) -> bool {
        self.fd.read().is_ok_and(|value| value > 0)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until one of `fds` is readable (or has an error) or `timeout` passes (`None`: forever);
/// `ready[i]` tells which. EINTR counts as a timeout, so callers simply loop. A descriptor may
/// appear twice (a caller with a fixed layout fills an unused slot that way).
pub fn wait_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout: Option<Duration>,
    ready: &mut [bool; N],
) -> io::Result<()> {
    let mut pfds = fds.map(|fd| PollFd::new(fd, PollFlags::POLLIN));
    let n = poll(&mut pfds, timeout)?;
    for (r, p) in ready.iter_mut().zip(&pfds) {
        // Bits nix does not know (`None`) count as ready: a wrong guess costs one non-blocking
        // attempt, the other way round a stall.
        *r = n > 0 && p.any().unwrap_or(true);
    }
    Ok(())
}

/// Runs a non-blocking write on `fd` until it no longer reports `WouldBlock`, waiting for write
/// space in between, `limit` in all; after that the `WouldBlock` is returned. Backpressure rather
/// than a drop or a spin, bounded so that a wedged descriptor cannot stall the datapath thread.
pub(crate) fn write_waiting<T>(
    fd: BorrowedFd<'_>,
    limit: Duration,
    mut write: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        match write() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !wait_writable(fd, left)? {
                    return Err(e);
                }
            }
            other => return other,
        }
    }
}

/// Waits at most `timeout` for `fd` to take a write. True if it can (or reports an error, which
/// the retried write will then return).
fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = [PollFd::new(fd, PollFlags::POLLOUT)];
    Ok(poll(&mut pfd, Some(timeout))? > 0)
}

fn poll(pfds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<i32> {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        // Round up, so a 100 µs timeout does not become a busy 0 ms poll.
        Some(t) => {
            let ms = t.as_micros().div_ceil(1000);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    };
    match nix::poll::poll(pfds, timeout) {
        Ok(n) => Ok(n),
        Err(Errno::EINTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_woken_eventfd_is_readable_until_drained() {
        let w = Waker::new().unwrap();
        let mut ready = [false];
        wait_readable([w.fd()], Some(Duration::ZERO), &mut ready).unwrap();
        assert!(!ready[0]);
        assert!(!w.drain());
        w.wake();
        w.wake();
        wait_readable([w.fd()], Some(Duration::from_secs(1)), &mut ready).unwrap();
        assert!(ready[0]);
        assert!(w.drain());
        wait_readable([w.fd()], Some(Duration::ZERO), &mut ready).unwrap();
        assert!(!ready[0]);
    }

    #[test]
    fn an_eventfd_is_writable() {
        let w = Waker::new().unwrap();
        assert!(wait_writable(w.fd(), Duration::ZERO).unwrap());
    }

    #[test]
    fn writes_are_retried_while_they_would_block_then_given_up() {
        let w = Waker::new().unwrap();
        let mut tries = 0;
        let r = write_waiting(w.fd(), Duration::from_secs(1), || {
            tries += 1;
            if tries < 3 {
                Err(io::Error::from(io::ErrorKind::WouldBlock))
            } else {
                Ok(tries)
            }
        });
        assert_eq!(r.unwrap(), 3);
        let started = Instant::now();
        let r: io::Result<()> = write_waiting(w.fd(), Duration::from_millis(20), || {
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        });
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
