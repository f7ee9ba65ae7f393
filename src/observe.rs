//! Turning the engine's lifecycle events into log lines and a JSON-lines
//! event stream.
//!
//! Logs go through `tracing`: sessions and task endings at debug, with the
//! cause of every cancellation spelled out, so "why was my task cancelled?"
//! is answered by the log alone; nothing per heartbeat above trace.
//!
//! The event stream is written by a thread of its own. The loop hands it
//! events through a bounded channel and never waits: when the writer falls
//! behind, events are dropped and counted, never the loop slowed.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Sender, TrySendError};

use crate::engine::{Ending, Event, JobTable, Timestamp};

/// Where the event stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsTarget {
    /// Standard output.
    Stdout,
    /// A file, created or appended to.
    File(PathBuf),
}

impl std::str::FromStr for EventsTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<EventsTarget, Self::Err> {
        Ok(if s == "-" {
            EventsTarget::Stdout
        } else {
            EventsTarget::File(PathBuf::from(s))
        })
    }
}

/// Events waiting for the writer, at most.
const EVENT_BUFFER: usize = 65_536;

/// The loop's end of the event stream.
pub struct EventStream {
    tx: Option<Sender<(Event, SystemTime)>>,
    thread: Option<JoinHandle<()>>,
    dropped: u64,
}

impl EventStream {
    /// Opens the target and starts the writer thread.
    pub fn start(target: &EventsTarget, jobs: JobTable) -> io::Result<EventStream> {
        let out: Box<dyn Write + Send> = match target {
            EventsTarget::Stdout => Box::new(io::stdout()),
            EventsTarget::File(path) => Box::new(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
        };
        let (tx, rx) = crossbeam_channel::bounded::<(Event, SystemTime)>(EVENT_BUFFER);
        let thread = std::thread::Builder::new()
            .name("tether-events".into())
            .spawn(move || {
                let mut out = BufWriter::new(out);
                while let Ok((event, at)) = rx.recv() {
                    let _ = writeln!(out, "{}", json_line(&event, at, &jobs));
                    // Flush when caught up, so a reader sees events promptly
                    // without a write per event under load.
                    if rx.is_empty() {
                        let _ = out.flush();
                    }
                }
                let _ = out.flush();
            })?;
        Ok(EventStream {
            tx: Some(tx),
            thread: Some(thread),
            dropped: 0,
        })
    }

    /// Hands an event to the writer without waiting.
    pub fn send(&mut self, event: Event, at: SystemTime) {
        if let Some(tx) = &self.tx {
            match tx.try_send((event, at)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped += 1
                }
            }
        }
    }

    /// Events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Writes what is buffered and stops the writer.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.finish();
    }
}

fn reason_name(ending: Ending) -> (&'static str, Option<&'static str>) {
    match ending {
        Ending::Done => ("done", None),
        Ending::Failed => ("failed", None),
        Ending::Cancelled(reason) => ("cancelled", Some(reason.name())),
    }
}

/// One event as a JSON object on one line.
pub fn json_line(event: &Event, at: SystemTime, jobs: &JobTable) -> String {
    let ts = humantime::format_rfc3339_micros(at);
    let ms = |us: u64| us as f64 / 1000.0;
    match *event {
        Event::SessionOpened {
            client_id,
            incarnation,
            ttl_ms,
            peer,
            ..
        } => format!(
            r#"{{"ts":"{ts}","event":"session_opened","client_id":{client_id},"incarnation":{incarnation},"ttl_ms":{ttl_ms},"peer":"{peer}"}}"#
        ),
        Event::SessionEnded {
            client_id,
            incarnation,
            reason,
            lateness_us,
            replaced_by,
            ..
        } => {
            let mut line = format!(
                r#"{{"ts":"{ts}","event":"session_ended","client_id":{client_id},"incarnation":{incarnation},"reason":"{}""#,
                reason.name()
            );
            if let Some(us) = lateness_us {
                line.push_str(&format!(r#","lateness_ms":{:.3}"#, ms(us)));
            }
            if let Some(by) = replaced_by {
                line.push_str(&format!(r#","replaced_by":{by}"#));
            }
            line.push('}');
            line
        }
        Event::TaskAccepted {
            task,
            client_id,
            incarnation,
            job,
            ..
        } => format!(
            r#"{{"ts":"{ts}","event":"task_accepted","task_id":{task},"client_id":{client_id},"incarnation":{incarnation},"job":"{}","state":"accepted"}}"#,
            escape(jobs.name(job))
        ),
        Event::TaskEnded {
            task,
            client_id,
            incarnation,
            job,
            ending,
            cause,
            run_us,
            ..
        } => {
            let (state, reason) = reason_name(ending);
            let mut line = format!(
                r#"{{"ts":"{ts}","event":"task_ended","task_id":{task},"client_id":{client_id},"incarnation":{incarnation},"job":"{}","state":"{state}""#,
                escape(jobs.name(job))
            );
            if let Some(reason) = reason {
                line.push_str(&format!(r#","reason":"{reason}""#));
            }
            if let Some(cause) = cause {
                line.push_str(&format!(r#","cause":"{}""#, escape(&cause.to_string())));
            }
            if let Some(us) = run_us {
                line.push_str(&format!(r#","run_ms":{:.3}"#, ms(us)));
            }
            line.push('}');
            line
        }
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Logs one event through `tracing` at debug.
pub fn log_event(event: &Event, jobs: &JobTable) {
    match *event {
        Event::SessionOpened {
            client_id,
            incarnation,
            ttl_ms,
            peer,
            ..
        } => tracing::debug!(client_id, incarnation, ttl_ms, %peer, "session opened"),
        Event::SessionEnded {
            client_id,
            incarnation,
            reason,
            lateness_us,
            replaced_by,
            ..
        } => tracing::debug!(
            client_id,
            incarnation,
            reason = reason.name(),
            lateness_ms = lateness_us.map(|us| us as f64 / 1000.0),
            replaced_by,
            "session ended"
        ),
        Event::TaskAccepted { .. } => {}
        Event::TaskEnded {
            task,
            client_id,
            incarnation,
            job,
            ending,
            cause,
            run_us,
            ..
        } => {
            let (state, reason) = reason_name(ending);
            tracing::debug!(
                task_id = task.0,
                client_id,
                incarnation,
                job = jobs.name(job),
                state,
                reason,
                cause = cause.map(|c| c.to_string()),
                run_ms = run_us.map(|us| us as f64 / 1000.0),
                "task ended"
            )
        }
    }
}

/// Converts engine time to wall-clock time for output.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    start: SystemTime,
}

impl WallClock {
    /// Engine time 0 is `start`.
    pub fn new(start: SystemTime) -> WallClock {
        WallClock { start }
    }

    /// The wall-clock time of engine time `t`.
    pub fn at(&self, t: Timestamp) -> SystemTime {
        self.start + Duration::from_micros(t.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Cause, JobId, PayloadRule, TaskId};
    use crate::wire::CancelReason;

    #[test]
    fn task_ended_line_names_the_cause() {
        let mut jobs = JobTable::default();
        jobs.add("sleep", PayloadRule::Exactly(4));
        let event = Event::TaskEnded {
            task: TaskId(5),
            client_id: 9,
            incarnation: 3,
            job: JobId(0),
            ending: Ending::Cancelled(CancelReason::Cancelled),
            cause: Some(Cause::Cancelled {
                from: "127.0.0.1:4000".parse().unwrap(),
                incarnation: 3,
            }),
            run_us: Some(1500),
            at: Timestamp(0),
        };
        let line = json_line(&event, SystemTime::UNIX_EPOCH, &jobs);
        assert_eq!(
            line,
            r#"{"ts":"1970-01-01T00:00:00.000000Z","event":"task_ended","task_id":5,"client_id":9,"incarnation":3,"job":"sleep","state":"cancelled","reason":"cancelled","cause":"CANCEL from 127.0.0.1:4000 (session incarnation 3)","run_ms":1.500}"#
        );
    }

    #[test]
    fn escapes_quotes_and_control_characters() {
        assert_eq!(escape("a\"b\\c\n"), "a\\\"b\\\\c\\u000a");
    }
}
