//! Waiting for descriptors on the datapath thread: `poll(2)` over the TUN and the UDP sockets, an
//! eventfd that wakes the thread from other threads, and a bounded wait for write space.
//!
//! Why plain `poll` on a dedicated thread instead of tokio: a packet that arrives while the
//! datapath sleeps costs one wakeup of the thread blocked on it, instead of a reactor wakeup, a
//! task hand-off and often a second thread. That hop repeats four times per round trip.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// An eventfd another thread writes to wake the datapath out of `poll`.
#[derive(Debug)]
pub(crate) struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        Ok(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the descriptor readable until [`Waker::drain`]. Never blocks: when the counter is
    /// saturated the thread is being woken already.
    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter; returns whether anyone had woken us.
    pub(crate) fn drain(&self) -> bool {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        n == 8 && value > 0
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable (or has an error) or `timeout` passes (`None`: forever);
/// `ready[i]` tells which. EINTR counts as a timeout, so callers simply loop.
pub fn wait_readable(
    fds: &[RawFd],
    timeout: Option<Duration>,
    ready: &mut [bool],
) -> io::Result<()> {
    const MAX: usize = 8;
    debug_assert!(fds.len() <= MAX && ready.len() >= fds.len());
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; MAX];
    for (p, &fd) in pfds.iter_mut().zip(fds) {
        p.fd = fd;
        p.events = libc::POLLIN;
    }
    let n = fds.len().min(MAX);
    let rc = poll(&mut pfds[..n], timeout)?;
    for (r, p) in ready.iter_mut().zip(&pfds[..n]) {
        *r = rc > 0 && p.revents != 0;
    }
    Ok(())
}

/// Runs a non-blocking write on `fd` until it no longer reports `WouldBlock`, waiting for write
/// space in between, `limit` in all; after that the `WouldBlock` is returned. Backpressure rather
/// than a drop or a spin, bounded so that a wedged descriptor cannot stall the datapath thread.
pub(crate) fn write_waiting<T>(
    fd: RawFd,
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
fn wait_writable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = [libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    }];
    Ok(poll(&mut pfd, Some(timeout))? > 0)
}

fn poll(pfds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<i32> {
    let ms = match timeout {
        None => -1,
        // Round up, so a 100 µs timeout does not become a busy 0 ms poll.
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    };
    // SAFETY: `pfds` is a valid array of pollfd for its length.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_woken_eventfd_is_readable_until_drained() {
        let w = Waker::new().unwrap();
        let mut ready = [false];
        wait_readable(&[w.raw_fd()], Some(Duration::ZERO), &mut ready).unwrap();
        assert!(!ready[0]);
        assert!(!w.drain());
        w.wake();
        w.wake();
        wait_readable(&[w.raw_fd()], Some(Duration::from_secs(1)), &mut ready).unwrap();
        assert!(ready[0]);
        assert!(w.drain());
        wait_readable(&[w.raw_fd()], Some(Duration::ZERO), &mut ready).unwrap();
        assert!(!ready[0]);
    }

    #[test]
    fn an_eventfd_is_writable() {
        let w = Waker::new().unwrap();
        assert!(wait_writable(w.raw_fd(), Duration::ZERO).unwrap());
    }

    #[test]
    fn writes_are_retried_while_they_would_block_then_given_up() {
        let w = Waker::new().unwrap();
        let mut tries = 0;
        let r = write_waiting(w.raw_fd(), Duration::from_secs(1), || {
            tries += 1;
            if tries < 3 {
                Err(io::Error::from(io::ErrorKind::WouldBlock))
            } else {
                Ok(tries)
            }
        });
        assert_eq!(r.unwrap(), 3);
        let started = Instant::now();
        let r: io::Result<()> = write_waiting(w.raw_fd(), Duration::from_millis(20), || {
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        });
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
