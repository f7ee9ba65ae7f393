//! The loop watching itself and telling the outside: lifecycle events to
//! the logs, the event stream and the histograms; counters published for
//! the metrics endpoint; warnings about slow iterations, jobs slow to stop
//! and answers withheld under a flood. None of it changes what the loop
//! does, and none of it may cost the loop much: publishing happens at most
//! every 50 ms, the slow-cancel scan only when a cancelled job may have
//! become slow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Ending, Engine, Event, JobTable, TaskId};
use crate::metrics::{EdgeStats, Metrics};
use crate::observe::{log_event, EventStream, WallClock};
use crate::pool::Pool;
use crate::wire::TaskReport;

use super::notify::Notifier;

/// How often the loop publishes its counters for the metrics endpoint.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// Shortest time between two warnings about shed replies.
const SHED_REPORT_EVERY: Duration = Duration::from_secs(10);

/// What one loop iteration did, for the slow-loop warning.
#[derive(Debug, Default)]
pub(super) struct Iteration {
    pub(super) datagrams: u64,
    pub(super) expired: u64,
    pub(super) reports: u64,
    pub(super) effects: u64,
    pub(super) replies: u64,
}

pub(super) struct Watch {
    pub(super) metrics: Arc<Metrics>,
    /// The server's own counters (outside the engine).
    pub(super) edge: EdgeStats,
    pub(super) iteration: Iteration,
    events: Option<EventStream>,
    wall: WallClock,
    jobs: JobTable,
    slow_loop: Duration,
    slow_cancel: Duration,
    next_slow_cancel_check: Option<Instant>,
    /// While changes wait to be published, when the loop must wake for them.
    publish_due: Option<Instant>,
    last_publish: Instant,
    /// Stranger replies shed when the last warning about it was logged.
    shed_reported: u64,
    next_shed_report: Instant,
    /// systemd, when it asked to be told (readiness, the watchdog).
    notifier: Option<Notifier>,
    /// The other shards, whose progress the watchdog pings vouch for too:
    /// each one's iterations when it was last woken for a ping.
    siblings: Vec<(Arc<Metrics>, Option<u64>)>,
}

/// What the loop watches for.
pub(super) struct Thresholds {
    pub(super) slow_loop: Duration,
    pub(super) slow_cancel: Duration,
}

impl Watch {
    pub(super) fn new(
        metrics: Arc<Metrics>,
        events: Option<EventStream>,
        wall: WallClock,
        jobs: JobTable,
        thresholds: Thresholds,
        now: Instant,
    ) -> Watch {
        Watch {
            metrics,
            edge: EdgeStats::default(),
            iteration: Iteration::default(),
            events,
            wall,
            jobs,
            slow_loop: thresholds.slow_loop,
            slow_cancel: thresholds.slow_cancel,
            next_slow_cancel_check: None,
            publish_due: None,
            last_publish: now,
            shed_reported: 0,
            next_shed_report: now,
            notifier: None,
            siblings: Vec::new(),
        }
    }

    /// Tells systemd through `notifier` (the first shard does), vouching
    /// for `siblings` as well as for this loop.
    pub(super) fn set_notifier(&mut self, notifier: Option<Notifier>, siblings: Vec<Arc<Metrics>>) {
        if notifier.is_some() {
            self.notifier = notifier;
            self.siblings = siblings.into_iter().map(|m| (m, None)).collect();
        }
    }

    /// The loop is about to start: the service is ready.
    pub(super) fn ready(&self, status: &str) {
        if let Some(notifier) = &self.notifier {
            notifier.ready(status);
        }
    }

    /// A graceful shutdown began: probes and the service manager hear so.
    pub(super) fn stopping(&self) {
        self.metrics.health.stopping();
        if let Some(notifier) = &self.notifier {
            notifier.stopping();
        }
    }

    /// When the loop must wake for the watch's own sake, if ever.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        let watchdog = self.notifier.as_ref().and_then(Notifier::wake_at);
        [self.next_slow_cancel_check, self.publish_due, watchdog]
            .into_iter()
            .flatten()
            .min()
    }

    /// A running task's flag was set at `now`: from `slow_cancel` later, a
    /// job still running is reported.
    pub(super) fn cancel_signalled(&mut self, now: Instant) {
        let due = now + self.slow_cancel;
        self.next_slow_cancel_check = Some(self.next_slow_cancel_check.map_or(due, |d| d.min(due)));
    }

    /// Hands the engine's lifecycle events to the histograms, the logs and
    /// the event stream.
    pub(super) fn observe(&mut self, engine: &mut Engine) {
        while let Some(event) = engine.poll_event() {
            match event {
                Event::TaskEnded {
                    run_us: Some(us), ..
                } => self.metrics.task_run.observe_us(us),
                Event::SessionEnded {
                    lateness_us: Some(us),
                    ..
                } => self.metrics.expiry_lateness.observe_us(us),
                _ => {}
            }
            let error = match event {
                Event::TaskEnded {
                    task,
                    ending: Ending::Failed,
                    ..
                } => match engine.task_report(task) {
                    TaskReport::Failed(text) => Some(text.to_owned()),
                    _ => None,
                },
                _ => None,
            };
            log_event(&event, &self.jobs, error.as_deref());
            if let Some(stream) = self.events.as_mut() {
                let at = match event {
                    Event::SessionOpened { at, .. }
                    | Event::SessionEnded { at, .. }
                    | Event::TaskAccepted { at, .. }
                    | Event::TaskEnded { at, .. } => at,
                };
                stream.send(event, self.wall.at(at), error);
            }
        }
    }

    /// Reopens the event stream's file (SIGHUP).
    pub(super) fn reopen_events(&mut self) {
        match self.events.as_mut() {
            Some(stream) => stream.reopen(),
            None => tracing::info!("SIGHUP: no --events file to reopen"),
        }
    }

    /// Warns, once per task, about tasks still running `slow_cancel` after
    /// their flag was set. Scans (the running tasks only) at most every
    /// 100 ms, and only while a cancelled task may become slow.
    pub(super) fn check_slow_cancels(&mut self, now: Instant, pool: &Pool) {
        match self.next_slow_cancel_check {
            Some(at) if now >= at => {}
            _ => return,
        }
        let mut slow = Vec::new();
        let threshold = self.slow_cancel;
        let next = pool.with_queue(|q| q.slow_cancels(now, threshold, &mut slow));
        self.next_slow_cancel_check = next.map(|due| due.max(now + Duration::from_millis(100)));
        for s in slow {
            self.edge.slow_cancels += 1;
            tracing::warn!(
                task_id = s.task.0,
                client_id = s.client_id,
                job = self.jobs.name(s.job),
                ignoring_ms = s.ignoring.as_millis() as u64,
                reason = ?s.reason.map(|r| r.name()),
                "task keeps running after its cancel flag was set: it does not poll is_cancelled() or sleep through the context"
            );
        }
    }

    /// Times the iteration that began at `woke`, warns if it was slow, and
    /// publishes the counters when they are due.
    pub(super) fn end_iteration(
        &mut self,
        woke: Instant,
        now: Instant,
        engine: &Engine,
        pool: &Pool,
    ) {
        let took = now.saturating_duration_since(woke);
        self.metrics.sessions.answer(engine);
        self.metrics.health.iteration_done();
        if let Some(notifier) = self.notifier.as_mut() {
            if notifier.wake_at().is_some_and(|due| now >= due) {
                // A ping vouches for every shard: each was woken at the last
                // ping and must have completed an iteration since. A stuck
                // shard stops the pings, and systemd restarts the server.
                // A shard already shutting down has nothing left to prove.
                let all_alive = self.siblings.iter().all(|(m, seen)| {
                    m.health.is_stopping() || seen.is_none_or(|seen| m.health.iterations() != seen)
                });
                if all_alive {
                    notifier.tick(now);
                    for (m, seen) in &mut self.siblings {
                        *seen = Some(m.health.iterations());
                        m.health.wake();
                    }
                } else {
                    // Look again shortly, rather than at once (which would
                    // spin): no ping meanwhile, so a shard that stays stuck
                    // lets the watchdog fire.
                    notifier.postpone(now + Duration::from_millis(100));
                }
            }
        }
        self.metrics
            .loop_iteration
            .observe_us(took.as_micros() as u64);
        if took > self.slow_loop {
            self.edge.slow_loops += 1;
            let i = &self.iteration;
            tracing::warn!(
                took_ms = took.as_secs_f64() * 1e3,
                datagrams = i.datagrams,
                sessions_expired = i.expired,
                worker_reports = i.reports,
                task_commands = i.effects,
                replies = i.replies,
                "slow event loop iteration: replies and expiries were delayed by as much"
            );
        }
        self.iteration = Iteration::default();
        self.report_shed_replies(now, engine);
        // At a hundred thousand wake-ups a second, publishing every time
        // would be a measurable share of the loop; every 50 ms is plenty
        // for a scrape.
        if now.duration_since(self.last_publish) >= PUBLISH_EVERY {
            self.publish(engine, pool);
            self.last_publish = now;
            self.publish_due = None;
        } else if self.publish_due.is_none() {
            self.publish_due = Some(self.last_publish + PUBLISH_EVERY);
        }
    }

    /// Stores every counter where the metrics endpoint reads it.
    pub(super) fn publish(&mut self, engine: &Engine, pool: &Pool) {
        self.edge.sessions_live = engine.live_sessions() as u64;
        self.edge.events_dropped = self.events.as_ref().map_or(0, |e| e.dropped());
        (self.edge.pool_queued, self.edge.pool_running) =
            pool.with_queue(|q| (q.queued() as u64, q.running() as u64));
        self.metrics.publish(engine.stats(), &self.edge);
    }

    /// At shutdown: the event stream's last lines, the last counters, and a
    /// warning for each job that ignored its flag past the grace. Returns
    /// those tasks.
    pub(super) fn finish(&mut self, engine: &Engine, pool: &Pool) -> Vec<TaskId> {
        let still_running = pool.with_queue(|q| q.still_cancelling());
        for &(task, client_id, job) in &still_running {
            tracing::warn!(
                task_id = task.0,
                client_id,
                job = self.jobs.name(job),
                "task still running at the end of the grace period: it ignored its cancel flag"
            );
        }
        if let Some(events) = self.events.as_mut() {
            events.finish();
        }
        self.publish(engine, pool);
        still_running.into_iter().map(|(task, _, _)| task).collect()
    }

    /// Warns, at most every `SHED_REPORT_EVERY`, that answers to strangers
    /// were shed because the socket was flooded.
    fn report_shed_replies(&mut self, now: Instant, engine: &Engine) {
        if now < self.next_shed_report {
            return;
        }
        let shed = engine.stats().replies_shed;
        if shed > self.shed_reported {
            tracing::warn!(
                replies_not_sent = shed - self.shed_reported,
                "socket flooded: answers to strangers (UNKNOWN_SESSION, REJECTED or WELCOME to a new HELLO) were not sent, so that live sessions' datagrams are read first; those clients retry"
            );
            self.shed_reported = shed;
            self.next_shed_report = now + SHED_REPORT_EVERY;
        }
    }
}
