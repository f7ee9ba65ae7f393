//! The worker pool: named jobs, run on a fixed set of threads, each polling
//! a shared cancel flag.
//!
//! ```text
//!   server loop ── run(task) ──► WorkQueue (one lock) ◄── claim ── worker 0..n
//!               ── cancel(task) ─┘  queued: withdrawn,          │ catch_unwind(job(&ctx))
//!                                   running: flag set           │
//!        ▲                                                      │
//!        └──── Report (Started / Finished) over a channel ◄─────┘ then wake the loop
//! ```
//!
//! The queue is the one owner of a queued task's fate: under its lock a
//! worker claims the task or the loop withdraws it, so a task reported
//! cancelled before it started never runs, and a cancelled queued task's
//! payload is freed the moment it is cancelled.
//!
//! Cancellation is cooperative, as it must be for threads: the loop flips a
//! task's [`CancelFlag`] and the job sees it at its next
//! [`TaskContext::is_cancelled`] or inside [`TaskContext::sleep`], which
//! waits on a condition variable and so returns as soon as the flag flips
//! rather than at the end of the sleep. A job that panics is caught
//! (`catch_unwind`, as tokio's task harness does): the task fails with the
//! panic message and the worker takes the next item.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use crate::engine::{Effect, JobId, JobOutcome, JobTable, PayloadRule, TaskEvent, TaskId};
use crate::wire::{CancelReason, MAX_JOB_LEN, MAX_TEXT_LEN};

/// A task's cancel flag, shared by the loop that flips it and the worker
/// that polls it.
#[derive(Default)]
pub struct CancelFlag {
    /// 0 while not cancelled, else the [`CancelReason`] byte.
    reason: AtomicU8,
    lock: Mutex<()>,
    wake: Condvar,
}

impl CancelFlag {
    /// A flag that is not set.
    pub fn new() -> CancelFlag {
        CancelFlag::default()
    }

    /// Sets the flag (the first reason wins) and wakes a sleeping task.
    pub fn cancel(&self, reason: CancelReason) {
        let first = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            // Taking the lock orders this notify after a sleeper's check of
            // the flag, so the wake-up cannot be lost between the two.
            let _guard = self.lock.lock();
            self.wake.notify_all();
        }
    }

    /// Why the task was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        CancelReason::from_byte(self.reason.load(Ordering::Acquire))
    }

    /// Whether the flag is set.
    pub fn is_cancelled(&self) -> bool {
        self.reason.load(Ordering::Acquire) != 0
    }

    fn sleep(&self, duration: Duration) -> Result<(), Cancelled> {
        let until = Instant::now() + duration;
        let mut guard = self.lock.lock();
        loop {
            if let Some(reason) = self.reason() {
                return Err(Cancelled { reason });
            }
            if self.wake.wait_until(&mut guard, until).timed_out() {
                return self
                    .reason()
                    .map_or(Ok(()), |reason| Err(Cancelled { reason }));
            }
        }
    }
}

impl fmt::Debug for CancelFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CancelFlag").field(&self.reason()).finish()
    }
}

/// What a job sees: its payload and its cancel flag.
pub struct TaskContext<'a> {
    task: TaskId,
    payload: &'a [u8],
    flag: &'a CancelFlag,
}

impl<'a> TaskContext<'a> {
    /// A context for running a job outside the pool (tests, benchmarks).
    pub fn new(task: TaskId, payload: &'a [u8], flag: &'a CancelFlag) -> TaskContext<'a> {
        TaskContext {
            task,
            payload,
            flag,
        }
    }

    /// The task's id, as its client knows it.
    pub fn task_id(&self) -> TaskId {
        self.task
    }

    /// The SUBMIT's payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Whether the task should stop. Poll it often: a job that does not
    /// poll cannot be stopped.
    pub fn is_cancelled(&self) -> bool {
        self.flag.is_cancelled()
    }

    /// Why the task was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.flag.reason()
    }

    /// `Err(Cancelled)` once the task is cancelled, so a job can write
    /// `ctx.check()?` between steps.
    pub fn check(&self) -> Result<(), Cancelled> {
        self.flag
            .reason()
            .map_or(Ok(()), |reason| Err(Cancelled { reason }))
    }

    /// Sleeps for `duration`, returning early with `Err(Cancelled)` as soon
    /// as the task is cancelled.
    pub fn sleep(&self, duration: Duration) -> Result<(), Cancelled> {
        self.flag.sleep(duration)
    }
}

/// The task was cancelled; returned by [`TaskContext::sleep`] and
/// [`TaskContext::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    /// Why.
    pub reason: CancelReason,
}

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cancelled ({})", self.reason)
    }
}

impl std::error::Error for Cancelled {}

/// A job's failure: the text the client receives as the `error` of a failed
/// TASK_STATE.
///
/// Made from text with [`JobError::new`]; any error converts into one (its
/// `Display` text, then each `source`'s, joined by ": "), so `?` works
/// inside a job on I/O errors, parse errors, [`Cancelled`] and the rest. For that reason it does not implement
/// [`std::error::Error`] itself: a type that did could not also convert
/// from every error (Rust's coherence rules; anyhow's `Error` makes the
/// same choice). It is `Display`, and [`JobError::into_boxed`] gives a
/// `Box<dyn Error>` where one is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError(pub String);

impl JobError {
    /// A failure with this text: `Err(JobError::new("no such page"))`.
    pub fn new(text: impl Into<String>) -> JobError {
        JobError(text.into())
    }

    /// The text, as a boxed error.
    pub fn into_boxed(self) -> Box<dyn std::error::Error + Send + Sync> {
        self.0.into()
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for JobError {
    /// The error's text and its sources'. (For [`Cancelled`] the server
    /// records the cancel reason itself; this text is only seen if the job
    /// stops for another reason.)
    fn from(e: E) -> JobError {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(inner) = source {
            text.push_str(": ");
            text.push_str(&inner.to_string());
            source = inner.source();
        }
        JobError(text)
    }
}

/// What a job returns: a result for a done TASK_STATE, or an error text.
pub type JobResult = Result<Vec<u8>, JobError>;

/// A job body.
pub type JobFn = dyn Fn(&TaskContext<'_>) -> JobResult + Send + Sync;

/// The jobs a server can run, by name.
#[derive(Default, Clone)]
pub struct Registry {
    table: JobTable,
    bodies: Vec<Arc<JobFn>>,
}

impl Registry {
    /// No jobs.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The standard jobs of the protocol: `sleep`, `spin`, `echo`, `fail`
    /// and `panic`.
    pub fn with_standard_jobs() -> Registry {
        let mut r = Registry::new();
        for (name, rule, body) in standard_jobs() {
            r.register(name, rule, body)
                .expect("standard job names are valid and distinct");
        }
        r
    }

    /// Adds a job called `name` (1 to 32 bytes, unused) whose payloads must
    /// satisfy `rule` (others get REJECTED 4 without reaching the job).
    pub fn register<F>(
        &mut self,
        name: &str,
        rule: PayloadRule,
        body: F,
    ) -> Result<(), RegistryError>
    where
        F: Fn(&TaskContext<'_>) -> JobResult + Send + Sync + 'static,
    {
        if name.is_empty() || name.len() > MAX_JOB_LEN {
            return Err(RegistryError::BadName(name.to_owned()));
        }
        if self.table.lookup(name).is_some() {
            return Err(RegistryError::Duplicate(name.to_owned()));
        }
        if self.bodies.len() >= usize::from(u16::MAX) {
            return Err(RegistryError::Full);
        }
        self.table.add(name, rule);
        self.bodies.push(Arc::new(body));
        Ok(())
    }

    /// Names and payload rules, for the engine.
    pub fn table(&self) -> JobTable {
        self.table.clone()
    }

    /// Runs job `id` in the calling thread, catching a panic.
    pub fn run(&self, id: JobId, ctx: &TaskContext<'_>) -> JobOutcome {
        let Some(body) = self.bodies.get(usize::from(id.0)) else {
            return JobOutcome::Failed(format!("no job with id {}", id.0));
        };
        match catch_unwind(AssertUnwindSafe(|| body(ctx))) {
            Ok(Ok(result)) => JobOutcome::Done(result),
            Ok(Err(JobError(text))) => JobOutcome::Failed(text),
            Err(panic) => JobOutcome::Failed(format!("{PANIC_PREFIX}{}", panic_text(&*panic))),
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("jobs", &self.table)
            .finish()
    }
}

/// Why a job could not be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// Empty or longer than 32 bytes.
    BadName(String),
    /// Already registered.
    Duplicate(String),
    /// 65535 jobs already.
    Full,
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::BadName(n) => {
                write!(f, "job name {n:?} must be 1 to {MAX_JOB_LEN} bytes")
            }
            RegistryError::Duplicate(n) => write!(f, "job {n:?} is already registered"),
            RegistryError::Full => f.write_str("too many jobs"),
        }
    }
}

impl std::error::Error for RegistryError {}

/// Installs a panic hook that keeps panics on worker threads quiet (their
/// message is already the failed task's error, and a flood of panicking
/// jobs must not flood stderr) and leaves every other thread's panics to
/// the hook that was there before. Call once, early; the `tether` binary
/// does.
pub fn quiet_worker_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let on_worker = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with(WORKER_PREFIX));
            if !on_worker {
                previous(info);
            }
        }));
    });
}

const WORKER_PREFIX: &str = "tether-worker-";

/// What a failed task's error starts with when its job panicked.
const PANIC_PREFIX: &str = "panicked: ";

fn panic_text(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "non-text panic payload"
    }
}

type StandardJob = (&'static str, PayloadRule, fn(&TaskContext<'_>) -> JobResult);

pub(crate) fn standard_jobs() -> [StandardJob; 5] {
    [
        ("sleep", PayloadRule::Exactly(4), job_sleep),
        ("spin", PayloadRule::Exactly(8), job_spin),
        ("echo", PayloadRule::Any, |ctx| Ok(ctx.payload().to_vec())),
        (
            "fail",
            PayloadRule::Text {
                max_len: MAX_TEXT_LEN,
            },
            |ctx| {
                Err(JobError(
                    String::from_utf8_lossy(ctx.payload()).into_owned(),
                ))
            },
        ),
        (
            "panic",
            PayloadRule::Text {
                max_len: MAX_TEXT_LEN - PANIC_PREFIX.len(),
            },
            |ctx| panic!("{}", String::from_utf8_lossy(ctx.payload())),
        ),
    ]
}

fn job_sleep(ctx: &TaskContext<'_>) -> JobResult {
    let mut ms = [0u8; 4];
    ms.copy_from_slice(ctx.payload());
    ctx.sleep(Duration::from_millis(u64::from(u32::from_be_bytes(ms))))?;
    Ok(Vec::new())
}

/// Burns CPU on a xorshift64 generator, polling the flag every 4096 rounds.
fn job_spin(ctx: &TaskContext<'_>) -> JobResult {
    let mut rounds = [0u8; 8];
    rounds.copy_from_slice(ctx.payload());
    let rounds = u64::from_be_bytes(rounds);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut done = 0u64;
    while done < rounds {
        ctx.check()?;
        let batch = (rounds - done).min(4096);
        for _ in 0..batch {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
        }
        done += batch;
    }
    Ok(std::hint::black_box(state).to_be_bytes().to_vec())
}

/// A worker's report on a task, for [`crate::engine::Engine::handle_task_event`],
/// with when it happened: the loop may read it later, and a task's run time
/// must not depend on when the loop got round to it.
pub type Report = (TaskId, TaskEvent, Instant);

/// What [`WorkQueue::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was still queued: it is gone and will never run. Report
    /// [`TaskEvent::Withdrawn`] to the engine.
    Withdrawn,
    /// A worker has it: its flag is set, and the worker reports it finished
    /// when the job stops.
    Signalled,
    /// Not held: it already finished (its report is on its way) or was never
    /// queued.
    NotHeld,
}

/// What [`WorkQueue::apply`] did with an engine effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The task is queued for a worker.
    Queued,
    /// The task was cancelled, with this outcome.
    Cancel(TaskId, CancelOutcome),
}

impl Applied {
    /// What the engine must be told now, if anything: a withdrawn task will
    /// never run; a task whose job had already returned when the cancel
    /// came ends as its job said, not cancelled (its report is on the way).
    pub fn report(self) -> Option<(TaskId, TaskEvent)> {
        match self {
            Applied::Cancel(task, CancelOutcome::Withdrawn) => Some((task, TaskEvent::Withdrawn)),
            Applied::Cancel(task, CancelOutcome::NotHeld) => {
                Some((task, TaskEvent::AlreadyReturned))
            }
            Applied::Queued | Applied::Cancel(_, CancelOutcome::Signalled) => None,
        }
    }
}

/// A task a worker took from the queue.
#[derive(Debug)]
pub struct Claim {
    /// The task.
    pub task: TaskId,
    /// Which job.
    pub job: JobId,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its cancel flag, also held by the queue.
    pub flag: Arc<CancelFlag>,
}

/// A task still running after its flag was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowCancel {
    /// The task.
    pub task: TaskId,
    /// Whose task it is.
    pub client_id: u64,
    /// Which job.
    pub job: JobId,
    /// How long ago its flag was set.
    pub ignoring: Duration,
    /// Why it was cancelled.
    pub reason: Option<CancelReason>,
}

struct Waiting {
    client_id: u64,
    job: JobId,
    payload: Vec<u8>,
}

struct Running {
    client_id: u64,
    job: JobId,
    flag: Arc<CancelFlag>,
    /// When its flag was set, and whether it has been reported as slow.
    cancelled_at: Option<(Instant, bool)>,
}

/// The tasks the pool holds, and the one place that decides whether a
/// queued task still starts: a worker's [`WorkQueue::claim`] and the loop's
/// [`WorkQueue::cancel`] both run under the pool's lock, so a task is either
/// withdrawn (and never runs) or claimed (and then cancelled through its
/// flag), never both.
///
/// Plain data, no threads or locks: [`Pool`] wraps it in a mutex, and tests
/// drive it directly. A withdrawn task's payload is freed at once; its id
/// stays in the order queue until a worker passes it or the queue is
/// compacted (when such ids outnumber the queued ones), so the queue holds
/// at most twice what the engine counts as queued.
#[derive(Default)]
pub struct WorkQueue {
    order: VecDeque<TaskId>,
    waiting: HashMap<TaskId, Waiting>,
    running: HashMap<TaskId, Running>,
    /// Bytes of the waiting tasks' payloads.
    waiting_bytes: usize,
}

impl WorkQueue {
    /// An empty queue.
    pub fn new() -> WorkQueue {
        WorkQueue::default()
    }

    /// Queues a task for a worker.
    pub fn push(&mut self, task: TaskId, client_id: u64, job: JobId, payload: Vec<u8>) {
        self.waiting_bytes += payload.len();
        let previous = self.waiting.insert(
            task,
            Waiting {
                client_id,
                job,
                payload,
            },
        );
        debug_assert!(previous.is_none(), "{task} queued twice");
        self.order.push_back(task);
    }

    /// Cancels `task` for `reason`: withdraws it if it is still queued, sets
    /// its flag if a worker has it. `now` dates the flag for the slow-cancel
    /// report.
    pub fn cancel(&mut self, task: TaskId, reason: CancelReason, now: Instant) -> CancelOutcome {
        if let Some(w) = self.waiting.remove(&task) {
            self.waiting_bytes -= w.payload.len();
            self.compact();
            return CancelOutcome::Withdrawn;
        }
        match self.running.get_mut(&task) {
            Some(r) => {
                r.flag.cancel(reason);
                r.cancelled_at.get_or_insert((now, false));
                CancelOutcome::Signalled
            }
            None => CancelOutcome::NotHeld,
        }
    }

    /// The oldest queued task, now running on the caller's thread.
    pub fn claim(&mut self) -> Option<Claim> {
        while let Some(task) = self.order.pop_front() {
            let Some(w) = self.waiting.remove(&task) else {
                continue; // withdrawn
            };
            self.waiting_bytes -= w.payload.len();
            let flag = Arc::new(CancelFlag::new());
            self.running.insert(
                task,
                Running {
                    client_id: w.client_id,
                    job: w.job,
                    flag: Arc::clone(&flag),
                    cancelled_at: None,
                },
            );
            return Some(Claim {
                task,
                job: w.job,
                payload: w.payload,
                flag,
            });
        }
        None
    }

    /// Carries out an engine [`Effect`]: queues a task to run, or cancels
    /// one (see [`Applied::report`] for what the engine must hear of it).
    pub fn apply(&mut self, effect: Effect, now: Instant) -> Applied {
        match effect {
            Effect::Run {
                task,
                client_id,
                job,
                payload,
            } => {
                self.push(task, client_id, job, payload);
                Applied::Queued
            }
            Effect::Cancel { task, reason } => {
                Applied::Cancel(task, self.cancel(task, reason, now))
            }
        }
    }

    /// A worker's job for `task` returned.
    pub fn finish(&mut self, task: TaskId) {
        self.running.remove(&task);
    }

    /// Tasks waiting for a worker.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Tasks on a worker.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Entries in the order queue, withdrawn ones included.
    pub fn order_len(&self) -> usize {
        self.order.len()
    }

    /// Bytes of the queued tasks' payloads.
    pub fn queued_bytes(&self) -> usize {
        self.waiting_bytes
    }

    /// Running tasks whose flag was set `threshold` or more before `now`
    /// and that have not been reported yet (each is reported once), and when
    /// the next one could become slow.
    pub fn slow_cancels(
        &mut self,
        now: Instant,
        threshold: Duration,
        out: &mut Vec<SlowCancel>,
    ) -> Option<Instant> {
        let mut next = None::<Instant>;
        for (&task, r) in self.running.iter_mut() {
            let Some((at, reported)) = r.cancelled_at.as_mut() else {
                continue;
            };
            if *reported {
                continue;
            }
            let ignoring = now.saturating_duration_since(*at);
            if ignoring >= threshold {
                *reported = true;
                out.push(SlowCancel {
                    task,
                    client_id: r.client_id,
                    job: r.job,
                    ignoring,
                    reason: r.flag.reason(),
                });
            } else {
                let due = *at + threshold;
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    /// Running tasks whose flag is set: at the end of a shutdown's grace,
    /// the ones that ignored it.
    pub fn still_cancelling(&self) -> Vec<(TaskId, u64, JobId)> {
        let mut tasks: Vec<_> = self
            .running
            .iter()
            .filter(|(_, r)| r.cancelled_at.is_some())
            .map(|(&t, r)| (t, r.client_id, r.job))
            .collect();
        tasks.sort_unstable_by_key(|t| t.0);
        tasks
    }

    fn compact(&mut self) {
        if self.order.len() > 2 * self.waiting.len() + 64 {
            let waiting = &self.waiting;
            self.order.retain(|t| waiting.contains_key(t));
        }
    }
}

impl fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue")
            .field("queued", &self.waiting.len())
            .field("running", &self.running.len())
            .field("order", &self.order.len())
            .finish()
    }
}

struct Shared {
    queue: Mutex<WorkQueue>,
    /// Signalled when a task is queued or the pool closes.
    ready: Condvar,
    closed: AtomicBool,
}

/// Where a worker sends a task's reports, and how it wakes their reader.
pub struct Route {
    /// The reader's channel.
    pub reports: Sender<Report>,
    /// Called after each report (the server wakes its event loop there).
    pub notify: Arc<dyn Fn() + Send + Sync>,
}

/// A fixed set of worker threads taking tasks from a [`WorkQueue`].
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `workers` threads running jobs from `registry`. Each report
    /// goes to `reports`, then `notify` is called (the server wakes its
    /// event loop there).
    pub fn start(
        workers: usize,
        registry: Arc<Registry>,
        reports: Sender<Report>,
        notify: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Pool> {
        Pool::start_routed(workers, registry, vec![Route { reports, notify }], |_| 0)
    }

    /// One pool for several readers: each task's reports go to
    /// `routes[route_of(task)]`. The server runs a pool per shard instead
    /// (a shared queue costs every task more than it balances, see
    /// BENCHMARKS.md "The worker pool"); `cargo bench --bench pool`
    /// measures the two with this.
    pub fn start_routed(
        workers: usize,
        registry: Arc<Registry>,
        routes: Vec<Route>,
        route_of: fn(TaskId) -> usize,
    ) -> std::io::Result<Pool> {
        let routes: Arc<[Route]> = routes.into();
        let shared = Arc::new(Shared {
            queue: Mutex::new(WorkQueue::new()),
            ready: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        let mut pool = Pool {
            shared,
            threads: Vec::with_capacity(workers),
        };
        for i in 0..workers.max(1) {
            let shared = Arc::clone(&pool.shared);
            let registry = Arc::clone(&registry);
            let routes = Arc::clone(&routes);
            pool.threads.push(
                std::thread::Builder::new()
                    .name(format!("{WORKER_PREFIX}{i}"))
                    .spawn(move || worker(&shared, &registry, &routes, route_of))?,
            );
        }
        Ok(pool)
    }

    /// Queues a task. The engine bounds how many wait: it emits a task to
    /// run only within its queue limit, and counts a cancelled one until
    /// [`Pool::cancel`] has withdrawn it.
    pub fn run(&self, task: TaskId, client_id: u64, job: JobId, payload: Vec<u8>) {
        self.shared.queue.lock().push(task, client_id, job, payload);
        self.shared.ready.notify_one();
    }

    /// Cancels a task (see [`WorkQueue::cancel`]).
    pub fn cancel(&self, task: TaskId, reason: CancelReason, now: Instant) -> CancelOutcome {
        self.shared.queue.lock().cancel(task, reason, now)
    }

    /// Carries out an engine [`Effect`] (see [`WorkQueue::apply`]).
    pub fn apply(&self, effect: Effect, now: Instant) -> Applied {
        let applied = self.shared.queue.lock().apply(effect, now);
        if applied == Applied::Queued {
            self.shared.ready.notify_one();
        }
        applied
    }

    /// Runs `f` on the queue, under the pool's lock: for counts and reports,
    /// never for long.
    pub fn with_queue<T>(&self, f: impl FnOnce(&mut WorkQueue) -> T) -> T {
        f(&mut self.shared.queue.lock())
    }

    /// Number of worker threads.
    pub fn size(&self) -> usize {
        self.threads.len()
    }

    /// Stops taking work and waits for the workers to finish what they hold.
    pub fn join(mut self) {
        self.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        // Under the lock, so a worker between its check and its wait cannot
        // miss the wake-up.
        let _guard = self.shared.queue.lock();
        self.shared.ready.notify_all();
    }
}

impl Drop for Pool {
    /// Idle workers exit; a job still running finishes on its own thread,
    /// which is not waited for (a job ignoring its flag must not hold up a
    /// shutdown past its grace).
    fn drop(&mut self) {
        self.close();
    }
}

fn worker(shared: &Shared, registry: &Registry, routes: &[Route], route_of: fn(TaskId) -> usize) {
    let report = |task, event| {
        let route = &routes[route_of(task) % routes.len()];
        if route.reports.send((task, event, Instant::now())).is_ok() {
            (route.notify)();
        }
    };
    loop {
        let claim = {
            let mut queue = shared.queue.lock();
            loop {
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                if let Some(claim) = queue.claim() {
                    break claim;
                }
                shared.ready.wait(&mut queue);
            }
        };
        report(claim.task, TaskEvent::Started);
        let ctx = TaskContext::new(claim.task, &claim.payload, &claim.flag);
        let outcome = registry.run(claim.job, &ctx);
        shared.queue.lock().finish(claim.task);
        report(claim.task, TaskEvent::Finished(outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_error_becomes_a_job_error_with_its_sources() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("page 3 failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let job = |text: &str| -> JobResult {
            let n: u32 = text.parse()?; // ParseIntError, through `?`
            if n == 3 {
                Err(Outer(std::io::Error::other("connection reset")))?;
            }
            Ok(n.to_be_bytes().to_vec())
        };
        assert_eq!(job("7"), Ok(vec![0, 0, 0, 7]));
        assert_eq!(
            job("x"),
            Err(JobError::new("invalid digit found in string"))
        );
        assert_eq!(
            job("3").unwrap_err().to_string(),
            "page 3 failed: connection reset"
        );
        let cancelled: JobError = Cancelled {
            reason: CancelReason::Expired,
        }
        .into();
        assert!(cancelled.0.starts_with("cancelled"), "{cancelled}");
    }

    fn run(registry: &Registry, name: &str, payload: &[u8], flag: &CancelFlag) -> JobOutcome {
        let id = registry.table().lookup(name).unwrap();
        registry.run(id, &TaskContext::new(TaskId(1), payload, flag))
    }

    #[test]
    fn standard_jobs_behave_as_specified() {
        let r = Registry::with_standard_jobs();
        let flag = CancelFlag::new();
        assert_eq!(
            run(&r, "echo", b"abc", &flag),
            JobOutcome::Done(b"abc".to_vec())
        );
        assert_eq!(
            run(&r, "fail", b"nope", &flag),
            JobOutcome::Failed("nope".into())
        );
        assert_eq!(
            run(&r, "sleep", &1u32.to_be_bytes(), &flag),
            JobOutcome::Done(vec![])
        );
        match run(&r, "spin", &10_000u64.to_be_bytes(), &flag) {
            JobOutcome::Done(state) => assert_eq!(state.len(), 8),
            other => panic!("{other:?}"),
        }
        match run(&r, "panic", b"kaboom", &flag) {
            JobOutcome::Failed(text) => assert!(text.contains("kaboom"), "{text}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.table().lookup("sleep").map(|id| id.0), Some(0));
    }

    #[test]
    fn cancelled_jobs_stop_at_their_next_poll() {
        let r = Registry::with_standard_jobs();
        let flag = CancelFlag::new();
        flag.cancel(CancelReason::Expired);
        flag.cancel(CancelReason::Left);
        assert_eq!(
            flag.reason(),
            Some(CancelReason::Expired),
            "first reason wins"
        );
        assert!(matches!(
            run(&r, "spin", &u64::MAX.to_be_bytes(), &flag),
            JobOutcome::Failed(_)
        ));
        assert!(matches!(
            run(&r, "sleep", &u32::MAX.to_be_bytes(), &flag),
            JobOutcome::Failed(_)
        ));
    }

    #[test]
    fn sleep_wakes_when_the_flag_flips_from_another_thread() {
        let flag = Arc::new(CancelFlag::new());
        let sleeper = {
            let flag = Arc::clone(&flag);
            std::thread::spawn(move || {
                let ctx = TaskContext::new(TaskId(1), &[], &flag);
                ctx.sleep(Duration::from_secs(3600))
            })
        };
        flag.cancel(CancelReason::Deadline);
        // Bounded by the join: an hour-long sleep that ignored the flag
        // would hang here rather than pass.
        assert_eq!(
            sleeper.join().unwrap(),
            Err(Cancelled {
                reason: CancelReason::Deadline
            })
        );
    }

    #[test]
    fn registry_refuses_bad_and_duplicate_names() {
        let mut r = Registry::with_standard_jobs();
        let ok = |_: &TaskContext<'_>| -> JobResult { Ok(vec![]) };
        assert!(matches!(
            r.register("", PayloadRule::Any, ok),
            Err(RegistryError::BadName(_))
        ));
        assert!(matches!(
            r.register(&"x".repeat(33), PayloadRule::Any, ok),
            Err(RegistryError::BadName(_))
        ));
        assert!(matches!(
            r.register("echo", PayloadRule::Any, ok),
            Err(RegistryError::Duplicate(_))
        ));
        assert!(r.register("mine", PayloadRule::Any, ok).is_ok());
    }

    #[test]
    fn pool_survives_panics_and_reports_each_task() {
        let registry = Arc::new(Registry::with_standard_jobs());
        let panic_job = registry.table().lookup("panic").unwrap();
        let echo_job = registry.table().lookup("echo").unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let pool = Pool::start(2, registry, tx, Arc::new(|| {})).unwrap();
        for i in 0..20u64 {
            let job = if i % 2 == 0 { panic_job } else { echo_job };
            pool.run(TaskId(i), 1, job, b"p".to_vec());
        }
        let mut finished = 0;
        while finished < 20 {
            let (task, event, _) = rx.recv_timeout(Duration::from_secs(10)).expect("report");
            if let TaskEvent::Finished(outcome) = event {
                finished += 1;
                assert_eq!(matches!(outcome, JobOutcome::Failed(_)), task.0 % 2 == 0);
            }
        }
        assert_eq!(pool.size(), 2);
        pool.join();
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_queued_task_is_either_withdrawn_or_claimed_never_both() {
        let mut q = WorkQueue::new();
        q.push(TaskId(1), 7, JobId(0), vec![1; 100]);
        q.push(TaskId(2), 7, JobId(0), vec![2; 100]);
        assert_eq!(q.queued_bytes(), 200);
        let claim = q.claim().expect("task 1 is first");
        assert_eq!(claim.task, TaskId(1));
        // The worker won task 1: cancelling it can only set its flag.
        assert_eq!(
            q.cancel(TaskId(1), CancelReason::Cancelled, now()),
            CancelOutcome::Signalled
        );
        assert_eq!(claim.flag.reason(), Some(CancelReason::Cancelled));
        // Task 2 is still queued: it is withdrawn, its payload freed, and
        // no worker can claim it afterwards.
        assert_eq!(
            q.cancel(TaskId(2), CancelReason::Left, now()),
            CancelOutcome::Withdrawn
        );
        assert_eq!(q.queued_bytes(), 0);
        assert!(q.claim().is_none());
        q.finish(TaskId(1));
        assert_eq!(
            q.cancel(TaskId(1), CancelReason::Cancelled, now()),
            CancelOutcome::NotHeld
        );
        assert_eq!((q.queued(), q.running()), (0, 0));
    }

    #[test]
    fn submit_cancel_cycles_behind_busy_workers_hold_no_memory() {
        // Every worker busy, a client loops SUBMIT (1 KiB) then CANCEL: each
        // cancelled task leaves the queue with its payload at once.
        let mut q = WorkQueue::new();
        q.push(TaskId(u64::MAX), 1, JobId(0), vec![0; 4]);
        let _busy = q.claim().unwrap();
        for i in 0..100_000u64 {
            q.push(TaskId(i), 1, JobId(0), vec![0; 1024]);
            assert_eq!(
                q.cancel(TaskId(i), CancelReason::Cancelled, now()),
                CancelOutcome::Withdrawn
            );
            assert!(q.order_len() <= 65, "order queue grew to {}", q.order_len());
        }
        assert_eq!((q.queued(), q.queued_bytes(), q.running()), (0, 0, 1));
    }

    #[test]
    fn slow_cancels_are_reported_once_each() {
        let mut q = WorkQueue::new();
        let t0 = now();
        q.push(TaskId(1), 9, JobId(3), vec![]);
        let _c = q.claim().unwrap();
        let mut out = Vec::new();
        assert_eq!(q.slow_cancels(t0, Duration::from_secs(1), &mut out), None);
        q.cancel(TaskId(1), CancelReason::Expired, t0);
        let next = q.slow_cancels(t0, Duration::from_secs(1), &mut out);
        assert_eq!(next, Some(t0 + Duration::from_secs(1)));
        assert!(out.is_empty());
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            q.slow_cancels(later, Duration::from_secs(1), &mut out),
            None
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].task, out[0].client_id, out[0].job),
            (TaskId(1), 9, JobId(3))
        );
        assert_eq!(out[0].reason, Some(CancelReason::Expired));
        q.slow_cancels(later, Duration::from_secs(1), &mut out);
        assert_eq!(out.len(), 1, "reported once");
        assert_eq!(q.still_cancelling(), vec![(TaskId(1), 9, JobId(3))]);
    }
}
