//! Turning the engine's lifecycle events into log lines and a JSON-lines
//! event stream.
//!
//! Logs go through `tracing`: sessions and task endings at debug, with the
//! cause of every cancellation spelled out, so "why was my task cancelled?"
//! is answered by the log alone; nothing per heartbeat above trace.
//!
//! The event stream is written by a thread of its own. The loop hands it
//! events through a bounded channel and never waits: when the writer falls
//! behind, events are dropped and counted, never the loop slowed. A file
//! target is reopened on request (SIGHUP, after logrotate moved it).
//!
//! Ids (client, incarnation, task) are u64 and are written as decimal
//! strings: JSON numbers past 2^53 lose digits in JavaScript and jq 1.6.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// What the loop hands the writer.
enum Record {
    /// An event, when it happened, a failed task's error text, and the
    /// shard it happened in (when the server has several).
    Event(Event, SystemTime, Option<String>, Option<u32>),
    /// Reopen the file (sent after setting the flag, to wake the writer).
    Reopen,
}

/// The loop's end of the event stream.
pub struct EventStream {
    tx: Option<Sender<Record>>,
    thread: Option<JoinHandle<()>>,
    dropped: u64,
    reopen: Arc<AtomicBool>,
    shard: Option<u32>,
}

fn open_append(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl EventStream {
    /// Opens the target and starts the writer thread.
    pub fn start(target: &EventsTarget, jobs: JobTable) -> io::Result<EventStream> {
        let out: Box<dyn Write + Send> = match target {
            EventsTarget::Stdout => Box::new(io::stdout()),
            EventsTarget::File(path) => Box::new(open_append(path)?),
        };
        let path = match target {
            EventsTarget::File(path) => Some(path.clone()),
            EventsTarget::Stdout => None,
        };
        let reopen = Arc::new(AtomicBool::new(false));
        let reopen_asked = Arc::clone(&reopen);
        let (tx, rx) = crossbeam_channel::bounded::<Record>(EVENT_BUFFER);
        let thread = std::thread::Builder::new()
            .name("tether-events".into())
            .spawn(move || {
                let mut out = BufWriter::new(out);
                // A failed reopen is retried (at most once a second) with
                // the records that follow, rather than writing on into a
                // file logrotate is about to compress.
                let mut next_try = std::time::Instant::now();
                while let Ok(record) = rx.recv() {
                    if reopen_asked.load(Ordering::Acquire) && std::time::Instant::now() >= next_try {
                        match &path {
                            None => reopen_asked.store(false, Ordering::Release),
                            Some(path) => {
                                let _ = out.flush();
                                match open_append(path) {
                                    Ok(file) => {
                                        reopen_asked.store(false, Ordering::Release);
                                        out = BufWriter::new(Box::new(file));
                                        tracing::info!(path = %path.display(), "event stream reopened");
                                    }
                                    Err(e) => {
                                        next_try = std::time::Instant::now() + Duration::from_secs(1);
                                        tracing::warn!(
                                            "cannot reopen the event stream (retrying each second meanwhile, writing to the old file): {e}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                    if let Record::Event(event, at, error, shard) = record {
                        let line = json_line(&event, at, &jobs, error.as_deref());
                        let _ = match shard {
                            // `{"shard":N,` then the rest of the object.
                            Some(shard) => writeln!(out, "{{\"shard\":{shard},{}", &line[1..]),
                            None => writeln!(out, "{line}"),
                        };
                    }
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
            reopen,
            shard: None,
        })
    }

    /// Another shard's end of the same stream: its events carry `"shard"`.
    /// The writer stops once every end is finished; the end `start`
    /// returned waits for it.
    pub fn for_shard(&self, shard: u32) -> EventStream {
        EventStream {
            tx: self.tx.clone(),
            thread: None,
            dropped: 0,
            reopen: Arc::clone(&self.reopen),
            shard: Some(shard),
        }
    }

    /// Marks this end's events as shard `shard`'s.
    pub fn set_shard(&mut self, shard: u32) {
        self.shard = Some(shard);
    }

    /// Hands an event (and a failed task's error text) to the writer
    /// without waiting.
    pub fn send(&mut self, event: Event, at: SystemTime, error: Option<String>) {
        if let Some(tx) = &self.tx {
            match tx.try_send(Record::Event(event, at, error, self.shard)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped += 1
                }
            }
        }
    }

    /// Asks the writer to reopen its file before writing anything more
    /// (logrotate's convention for SIGHUP). Never waits: with the channel
    /// full the writer is busy and sees the flag at its next event.
    pub fn reopen(&mut self) {
        self.reopen.store(true, Ordering::Release);
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Record::Reopen);
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

/// One event as a JSON object on one line; `error` is a failed task's
/// error text.
pub fn json_line(event: &Event, at: SystemTime, jobs: &JobTable, error: Option<&str>) -> String {
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
            r#"{{"ts":"{ts}","event":"session_opened","client_id":"{client_id}","incarnation":"{incarnation}","ttl_ms":{ttl_ms},"peer":"{peer}"}}"#
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
                r#"{{"ts":"{ts}","event":"session_ended","client_id":"{client_id}","incarnation":"{incarnation}","reason":"{}""#,
                reason.name()
            );
            if let Some(us) = lateness_us {
                line.push_str(&format!(r#","lateness_ms":{:.3}"#, ms(us)));
            }
            if let Some(by) = replaced_by {
                line.push_str(&format!(r#","replaced_by":"{by}""#));
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
            r#"{{"ts":"{ts}","event":"task_accepted","task_id":"{task}","client_id":"{client_id}","incarnation":"{incarnation}","job":"{}","state":"accepted"}}"#,
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
                r#"{{"ts":"{ts}","event":"task_ended","task_id":"{task}","client_id":"{client_id}","incarnation":"{incarnation}","job":"{}","state":"{state}""#,
                escape(jobs.name(job))
            );
            if let Some(reason) = reason {
                line.push_str(&format!(r#","reason":"{reason}""#));
            }
            if let Some(cause) = cause {
                line.push_str(&format!(r#","cause":"{}""#, escape(&cause.to_string())));
            }
            if let Some(error) = error {
                line.push_str(&format!(r#","error":"{}""#, escape(error)));
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

/// Logs one event through `tracing` at debug; `error` is a failed task's
/// error text.
pub fn log_event(event: &Event, jobs: &JobTable, error: Option<&str>) {
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
                error,
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
        let line = json_line(&event, SystemTime::UNIX_EPOCH, &jobs, None);
        assert_eq!(
            line,
            r#"{"ts":"1970-01-01T00:00:00.000000Z","event":"task_ended","task_id":"5","client_id":"9","incarnation":"3","job":"sleep","state":"cancelled","reason":"cancelled","cause":"CANCEL from 127.0.0.1:4000 (session incarnation 3)","run_ms":1.500}"#
        );
    }

    #[test]
    fn ids_past_two_to_the_53_keep_every_digit_and_failures_carry_their_error() {
        let mut jobs = JobTable::default();
        jobs.add("fail", PayloadRule::Any);
        let event = Event::TaskEnded {
            task: TaskId(u64::MAX),
            client_id: 15_606_566_006_069_359_346,
            incarnation: (1 << 53) + 1,
            job: JobId(0),
            ending: Ending::Failed,
            cause: None,
            run_us: Some(10),
            at: Timestamp(0),
        };
        let line = json_line(&event, SystemTime::UNIX_EPOCH, &jobs, Some("disk \"full\""));
        for part in [
            r#""task_id":"18446744073709551615""#,
            r#""client_id":"15606566006069359346""#,
            r#""incarnation":"9007199254740993""#,
            r#""state":"failed""#,
            r#""error":"disk \"full\"""#,
        ] {
            assert!(line.contains(part), "{part} missing from {line}");
        }
    }

    #[test]
    fn escapes_quotes_and_control_characters() {
        assert_eq!(escape("a\"b\\c\n"), "a\\\"b\\\\c\\u000a");
    }
}
