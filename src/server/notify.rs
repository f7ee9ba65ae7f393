//! systemd's service notification protocol (`sd_notify(3)`), spoken
//! directly: one datagram per message to the Unix socket named by
//! `$NOTIFY_SOCKET`. With `Type=notify` systemd counts the service as
//! started at `READY=1` (sent once the sockets are bound), and with
//! `WatchdogSec=` restarts it when `WATCHDOG=1` stops coming: the loop
//! sends it itself, every half of `$WATCHDOG_USEC`, so a loop stuck in one
//! iteration stops the pings and gets restarted. Without `$NOTIFY_SOCKET`
//! (not run by systemd) nothing is sent and the loop is never woken for it.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// A connection to the service manager, if one asked for notifications.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
    /// How often to send `WATCHDOG=1`, when the watchdog is on.
    watchdog_every: Option<Duration>,
    next_watchdog: Option<Instant>,
    /// Whether a failed send was already reported (once is enough: the
    /// watchdog would repeat it every few seconds).
    warned: std::cell::Cell<bool>,
}

/// `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`, as read from the
/// environment (passed in so tests need not set process-wide variables).
#[derive(Debug, Default, Clone)]
pub struct NotifyEnv {
    /// Where to send: a path, or `@name` for the abstract namespace.
    pub socket: Option<String>,
    /// The watchdog timeout in microseconds.
    pub watchdog_usec: Option<String>,
    /// The process the watchdog is meant for.
    pub watchdog_pid: Option<String>,
}

impl NotifyEnv {
    /// The process's environment.
    pub fn from_process() -> NotifyEnv {
        NotifyEnv {
            socket: std::env::var("NOTIFY_SOCKET").ok(),
            watchdog_usec: std::env::var("WATCHDOG_USEC").ok(),
            watchdog_pid: std::env::var("WATCHDOG_PID").ok(),
        }
    }
}

impl Notifier {
    /// `None` when no service manager asked (`$NOTIFY_SOCKET` unset or
    /// empty); an error when it asked in a way that cannot be honoured.
    pub fn new(env: &NotifyEnv, now: Instant) -> io::Result<Option<Notifier>> {
        let Some(name) = env.socket.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let to = if let Some(abstract_name) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        } else {
            SocketAddr::from_pathname(name)?
        };
        let for_us = env
            .watchdog_pid
            .as_deref()
            .is_none_or(|pid| pid.parse() == Ok(std::process::id()));
        let watchdog_every = env
            .watchdog_usec
            .as_deref()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|&usec| usec > 0 && for_us)
            // Half the timeout, as sd_watchdog_enabled(3) advises.
            .map(|usec| Duration::from_micros(usec / 2));
        Ok(Some(Notifier {
            socket: UnixDatagram::unbound()?,
            to,
            watchdog_every,
            next_watchdog: watchdog_every.map(|every| now + every),
            warned: std::cell::Cell::new(false),
        }))
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.to) {
            if !self.warned.replace(true) {
                tracing::warn!(
                    "cannot notify the service manager ({message:?}): {e}; later failures are not reported"
                );
            }
        }
    }

    /// The sockets are bound: the service is up.
    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    /// A graceful shutdown has begun.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down");
    }

    /// When the loop must wake to ping the watchdog, if it is on.
    pub fn wake_at(&self) -> Option<Instant> {
        self.next_watchdog
    }

    /// Moves the next ping's check to `at`, without pinging.
    pub fn postpone(&mut self, at: Instant) {
        if self.next_watchdog.is_some() {
            self.next_watchdog = Some(at);
        }
    }

    /// Pings the watchdog if a ping is due at `now`.
    pub fn tick(&mut self, now: Instant) {
        if let (Some(due), Some(every)) = (self.next_watchdog, self.watchdog_every) {
            if now >= due {
                self.send("WATCHDOG=1");
                self.next_watchdog = Some(now + every);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(name: &str) -> (UnixDatagram, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("tether-notify-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (socket, path)
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn without_a_notify_socket_nothing_is_sent_and_nothing_is_due() {
        let env = NotifyEnv {
            watchdog_usec: Some("1000000".into()),
            ..NotifyEnv::default()
        };
        assert!(Notifier::new(&env, Instant::now()).unwrap().is_none());
    }

    #[test]
    fn ready_then_watchdog_pings_at_half_the_timeout() {
        let (socket, path) = listener("ready");
        let env = NotifyEnv {
            socket: Some(path.to_str().unwrap().into()),
            watchdog_usec: Some("2000000".into()),
            watchdog_pid: Some(std::process::id().to_string()),
        };
        let start = Instant::now();
        let mut notifier = Notifier::new(&env, start).unwrap().unwrap();
        notifier.ready("listening");
        assert!(receive(&socket).starts_with("READY=1\nSTATUS=listening\n"));
        assert_eq!(notifier.wake_at(), Some(start + Duration::from_secs(1)));
        notifier.tick(start + Duration::from_millis(999));
        notifier.tick(start + Duration::from_secs(1));
        assert_eq!(
            receive(&socket),
            "WATCHDOG=1",
            "the early tick sent nothing"
        );
        assert_eq!(notifier.wake_at(), Some(start + Duration::from_secs(2)));
        notifier.stopping();
        assert!(receive(&socket).starts_with("STOPPING=1"));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn without_watchdog_usec_the_loop_is_never_woken_to_ping() {
        let (_socket, path) = listener("nowatchdog");
        let env = NotifyEnv {
            socket: Some(path.to_str().unwrap().into()),
            ..NotifyEnv::default()
        };
        let notifier = Notifier::new(&env, Instant::now()).unwrap().unwrap();
        assert_eq!(notifier.wake_at(), None);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_watchdog_meant_for_another_process_is_not_pinged() {
        let (_socket, path) = listener("other");
        let env = NotifyEnv {
            socket: Some(path.to_str().unwrap().into()),
            watchdog_usec: Some("2000000".into()),
            watchdog_pid: Some((std::process::id() + 1).to_string()),
        };
        let notifier = Notifier::new(&env, Instant::now()).unwrap().unwrap();
        assert_eq!(notifier.wake_at(), None);
        let _ = std::fs::remove_file(path);
    }
}
