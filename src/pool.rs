//! The worker pool: named jobs, run on a fixed set of threads, each polling
//! a shared cancel flag.
//!
//! ```text
//!   server loop ──WorkItem──► crossbeam channel ──► worker 0..n
//!        ▲                                            │ catch_unwind(job(&ctx))
//!        └──── Report (Started / Finished) ◄──────────┘ then wake the loop
//! ```
//!
//! Cancellation is cooperative, as it must be for threads: the loop flips a
//! task's [`CancelFlag`] and the job sees it at its next
//! [`TaskContext::is_cancelled`] or inside [`TaskContext::sleep`], which
//! waits on a condition variable and so returns as soon as the flag flips
//! rather than at the end of the sleep. A job that panics is caught
//! (`catch_unwind`, as tokio's task harness does): the task fails with the
//! panic message and the worker takes the next item.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::engine::{JobId, JobOutcome, JobTable, PayloadRule, TaskEvent, TaskId};
use crate::wire::{CancelReason, MAX_JOB_LEN};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError(pub String);

impl From<String> for JobError {
    fn from(text: String) -> JobError {
        JobError(text)
    }
}

impl From<&str> for JobError {
    fn from(text: &str) -> JobError {
        JobError(text.to_owned())
    }
}

impl From<Cancelled> for JobError {
    fn from(c: Cancelled) -> JobError {
        // The server records the cancel reason itself; this text is only
        // seen if the job stops for another reason.
        JobError(c.to_string())
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
            Err(panic) => JobOutcome::Failed(format!("panicked: {}", panic_text(&*panic))),
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
        ("fail", PayloadRule::Any, |ctx| {
            Err(JobError(
                String::from_utf8_lossy(ctx.payload()).into_owned(),
            ))
        }),
        ("panic", PayloadRule::Any, |ctx| {
            panic!("{}", String::from_utf8_lossy(ctx.payload()))
        }),
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

/// A unit of work for a worker.
#[derive(Debug)]
pub struct WorkItem {
    /// The task.
    pub task: TaskId,
    /// Which job.
    pub job: JobId,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its cancel flag, also held by whoever may cancel it.
    pub flag: Arc<CancelFlag>,
}

/// A worker's report on a task, for [`crate::engine::Engine::handle_task_event`].
pub type Report = (TaskId, TaskEvent);

/// A fixed set of worker threads fed by a channel.
pub struct Pool {
    work: Option<Sender<WorkItem>>,
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
        let (tx, rx) = crossbeam_channel::unbounded::<WorkItem>();
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let registry = Arc::clone(&registry);
            let reports = reports.clone();
            let notify = Arc::clone(&notify);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{WORKER_PREFIX}{i}"))
                    .spawn(move || worker(rx, &registry, &reports, &*notify))?,
            );
        }
        Ok(Pool {
            work: Some(tx),
            threads,
        })
    }

    /// Queues a work item. The engine bounds how many wait, so the channel
    /// needs no bound of its own.
    pub fn submit(&self, item: WorkItem) {
        if let Some(work) = &self.work {
            // Fails only once every worker has exited, i.e. never while the
            // pool is alive (a panicking job is caught inside the worker).
            let _ = work.send(item);
        }
    }

    /// Number of worker threads.
    pub fn size(&self) -> usize {
        self.threads.len()
    }

    /// Stops taking work and waits for the workers to finish what they hold.
    pub fn join(mut self) {
        self.work = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(
    rx: Receiver<WorkItem>,
    registry: &Registry,
    reports: &Sender<Report>,
    notify: &dyn Fn(),
) {
    let report = |task, event| {
        if reports.send((task, event)).is_ok() {
            notify();
        }
    };
    while let Ok(item) = rx.recv() {
        if item.flag.is_cancelled() {
            // Cancelled while queued: the engine has already recorded its
            // final state; it only needs to know the item is gone.
            report(
                item.task,
                TaskEvent::Finished(JobOutcome::Failed("cancelled before start".into())),
            );
            continue;
        }
        report(item.task, TaskEvent::Started);
        let ctx = TaskContext::new(item.task, &item.payload, &item.flag);
        let outcome = registry.run(item.job, &ctx);
        report(item.task, TaskEvent::Finished(outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            pool.submit(WorkItem {
                task: TaskId(i),
                job: if i % 2 == 0 { panic_job } else { echo_job },
                payload: b"p".to_vec(),
                flag: Arc::new(CancelFlag::new()),
            });
        }
        let mut finished = 0;
        while finished < 20 {
            let (task, event) = rx.recv_timeout(Duration::from_secs(10)).expect("report");
            if let TaskEvent::Finished(outcome) = event {
                finished += 1;
                assert_eq!(matches!(outcome, JobOutcome::Failed(_)), task.0 % 2 == 0);
            }
        }
        assert_eq!(pool.size(), 2);
        pool.join();
    }
}
