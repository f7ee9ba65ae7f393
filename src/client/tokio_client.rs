//! The async client for tokio: the same [`ClientSession`] as the blocking
//! client, driven by a task spawned on the caller's runtime.
//!
//! ```text
//!   caller ── submit/status/cancel/wait ──► session.start(request), send;
//!             (async)                       wait on a Notify for the answer
//!   driver task ── select! { recv_from, sleep_until(poll_timeout), poke }
//!               ── session.handle_datagram / handle_timeout ──► send
//! ```
//!
//! An [`AsyncTask`] is a handle to a task on the server: `.await` it for the
//! final state. Dropping it detaches (the task keeps running on the server,
//! as a dropped `tokio::task::JoinHandle` leaves its task running); cancel
//! with [`AsyncTask::cancel`]. The choice follows tokio: a handle is a way
//! to look at work, not the owner of it, and a task that must stop when
//! its caller gives up says so with `cancel`.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use super::{
    addresses_of, canonical, destination, no_server, open_socket, wall_clock_ns, Answer,
    ClientConfig, ClientError, ClientEvent, ClientSession, KnownNames, Request, RequestId, Resume,
    State, SubmitOptions, TaskStatus, DRAIN_AT_MOST,
};
use crate::engine::TaskId;
use crate::wire::{CancelOutcome, MAX_DATAGRAM};

/// A connected async client. Heartbeats come from a task spawned on the
/// runtime that called [`AsyncClient::connect`]. Dropping it stops that task
/// without a BYE (the session then expires on the server); call
/// [`AsyncClient::bye`] to end the session cleanly.
pub struct AsyncClient {
    shared: Arc<Shared>,
}

struct Shared {
    socket: UdpSocket,
    dual_stack: bool,
    session: Mutex<ClientSession>,
    /// Notified (all waiters) whenever the session took something in.
    changed: Notify,
    /// Wakes the driver: a request was started (its retry may be due before
    /// what the driver sleeps for), or the client is closing.
    poke: Notify,
    closed: AtomicBool,
}

/// A task on the server. `.await` it for its final state (pushed by the
/// server, or asked for with STATUS when no push has come for a while).
/// Dropping it detaches: the task runs on. The await outlives lost
/// sessions and a server that is away (it keeps asking), so put a
/// `tokio::time::timeout` around it where waiting forever is wrong.
///
/// The driver sleeps on tokio's clock but the session reads
/// `std::time::Instant`: do not run the client under paused tokio time
/// (`start_paused`), where the two part ways.
pub struct AsyncTask {
    shared: Arc<Shared>,
    id: TaskId,
}

impl AsyncClient {
    /// Opens a session (HELLO, waiting for WELCOME) and starts heartbeating
    /// from a spawned task. With [`ClientConfig::names`] and no servers, the
    /// names are looked up first, and again every
    /// [`ServerNames::every`](super::ServerNames::every) in a task of their
    /// own.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn connect(mut config: ClientConfig) -> Result<AsyncClient, ClientError> {
        // The names' first lookup, if made here, is where the resolver
        // starts from.
        let mut known = None;
        if let (Some(names), true) = (&config.names, config.servers.is_empty()) {
            let each = lookup(&names.names).await?;
            config.servers = each.servers(true).unwrap_or_default();
            known = Some(each);
        }
        if config.servers.is_empty() {
            return Err(no_server());
        }
        let (socket, dual_stack) = open_socket(&config.servers)?;
        socket.set_nonblocking(true)?;
        let names = config.names.clone();
        let session = ClientSession::new(config, Instant::now(), wall_clock_ns());
        let shared = Arc::new(Shared {
            socket: UdpSocket::from_std(socket)?,
            dual_stack,
            session: Mutex::new(session),
            changed: Notify::new(),
            poke: Notify::new(),
            closed: AtomicBool::new(false),
        });
        shared.send_queued(&mut shared.session.lock());
        tokio::spawn(Arc::clone(&shared).drive());
        if let Some(names) = names {
            tokio::spawn(Arc::clone(&shared).resolve(names.names, names.every, known));
        }
        let client = AsyncClient { shared };
        let opened = client
            .shared
            .until(|s| s.opened())
            .await
            .unwrap_or(Err(ClientError::Closed));
        opened.map(|()| client)
    }

    /// `(client_id, incarnation)` of the current session.
    pub fn session(&self) -> (u64, u64) {
        self.shared.session.lock().session()
    }

    /// The host the session is on.
    pub fn server(&self) -> SocketAddr {
        self.shared.session.lock().server()
    }

    /// Where this session is now (see [`ClientConfig::resume`]).
    pub fn resume_point(&self) -> Resume {
        self.shared.session.lock().resume_point()
    }

    /// The TTL the server granted.
    pub fn ttl(&self) -> Duration {
        self.shared.session.lock().ttl()
    }

    /// The last heartbeat round-trip time measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.session.lock().rtt()
    }

    /// Submits `job` with `payload`; the handle's `.await` gives its final
    /// state. If this future is dropped before the server answered (a
    /// timeout around it), the server may still have started the task: it
    /// runs on, unseen, until it ends or the session does.
    pub async fn submit(&self, job: &str, payload: &[u8]) -> Result<AsyncTask, ClientError> {
        self.submit_with(job, payload, SubmitOptions::default())
            .await
    }

    /// Submits with a delay and/or deadline.
    pub async fn submit_with(
        &self,
        job: &str,
        payload: &[u8],
        options: SubmitOptions,
    ) -> Result<AsyncTask, ClientError> {
        let request = Request::Submit {
            job: job.to_owned(),
            payload: payload.to_vec(),
            delay: options.delay,
            deadline: options.deadline,
        };
        match self.shared.call(request).await? {
            Answer::Accepted(id) => Ok(AsyncTask {
                shared: Arc::clone(&self.shared),
                id,
            }),
            other => unreachable!("a SUBMIT answered {other:?}"),
        }
    }

    /// Submits and waits for the final state.
    pub async fn run(&self, job: &str, payload: &[u8]) -> Result<TaskStatus, ClientError> {
        self.submit(job, payload).await?.await
    }

    /// A handle to a task submitted earlier (by id), to await or cancel.
    pub fn task(&self, id: TaskId) -> AsyncTask {
        AsyncTask {
            shared: Arc::clone(&self.shared),
            id,
        }
    }

    /// The next unsolicited event: a pushed final state, a lost, reopened
    /// or moved session. `None` once the client is closed.
    pub async fn next_event(&self) -> Option<ClientEvent> {
        self.shared
            .until(|s| {
                s.poll_event()
                    .map(Some)
                    .or_else(|| closed(s).then_some(None))
            })
            .await
            .flatten()
    }

    /// Ends the session with BYE (its tasks are cancelled, reason left) and
    /// stops the client. As with the blocking client, UNKNOWN_SESSION to a
    /// retried BYE is success; to the first, [`ClientError::SessionLost`].
    pub async fn bye(self) -> Result<(), ClientError> {
        self.shared.call(Request::Bye).await.map(|_| ())
    }
}

impl Drop for AsyncClient {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl AsyncTask {
    /// The task's id on the server.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// Asks for the task's state now.
    pub async fn status(&self) -> Result<TaskStatus, ClientError> {
        match self.shared.call(Request::Status(self.id)).await? {
            Answer::Status(status) => Ok(status),
            other => unreachable!("a STATUS answered {other:?}"),
        }
    }

    /// Cancels the task (reason `cancelled`); awaiting the handle then gives
    /// its final state.
    pub async fn cancel(&self) -> Result<CancelOutcome, ClientError> {
        match self.shared.call(Request::Cancel(self.id)).await? {
            Answer::Cancel(outcome) => Ok(outcome),
            other => unreachable!("a CANCEL answered {other:?}"),
        }
    }
}

impl IntoFuture for AsyncTask {
    type Output = Result<TaskStatus, ClientError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.shared.wait(self.id).await })
    }
}

/// Abandons a request whose caller stopped waiting.
struct Abandon<'a> {
    shared: &'a Shared,
    id: Option<RequestId>,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.session.lock().abandon(id);
        }
    }
}

fn closed(s: &ClientSession) -> bool {
    s.state() == State::Closed
}

impl Shared {
    /// Waits until `check` (run under the session's lock) gives something,
    /// or the client closes (`None`).
    async fn until<T>(&self, mut check: impl FnMut(&mut ClientSession) -> Option<T>) -> Option<T> {
        loop {
            // Registered before the check, so a change between the two
            // still wakes this waiter.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(found) = check(&mut self.session.lock()) {
                return Some(found);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            changed.await;
        }
    }

    /// Starts `request` and waits for its answer (the session retries it).
    /// A caller that stops waiting (its future dropped: a timeout, a
    /// `select!`) abandons the request, so its retries and answer are not
    /// kept.
    async fn call(&self, request: Request) -> Result<Answer, ClientError> {
        let id = {
            let mut s = self.session.lock();
            let id = s.start(Instant::now(), request);
            self.send_queued(&mut s);
            id
        };
        self.poke.notify_one();
        let mut waiting = Abandon {
            shared: self,
            id: Some(id),
        };
        let answer = self.until(|s| s.completion(id)).await;
        if answer.is_some() {
            waiting.id = None;
        }
        answer.unwrap_or(Err(ClientError::Closed))
    }

    /// The task's final state: from the server's push, or by asking with
    /// STATUS when no push has come for half a second (it may have been
    /// lost). The task's [`ClientEvent::TaskEnded`] is consumed with it.
    async fn wait(&self, task: TaskId) -> Result<TaskStatus, ClientError> {
        loop {
            let pushed = self.until(|s| {
                if let Some(status) = s.final_state(task).cloned() {
                    s.claim_event(task);
                    return Some(Ok(status));
                }
                closed(s).then_some(Err(ClientError::Closed))
            });
            match tokio::time::timeout(Duration::from_millis(500), pushed).await {
                Ok(Some(result)) => return result,
                Ok(None) => return Err(ClientError::Closed),
                Err(_) => {}
            }
            match self.call(Request::Status(task)).await {
                Ok(Answer::Status(status))
                    if status.is_final() || status == TaskStatus::Unknown =>
                {
                    self.session.lock().claim_event(task);
                    return Ok(status);
                }
                Ok(_) | Err(ClientError::Timeout) | Err(ClientError::SessionLost) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends every datagram the session has ready, without waiting: one
    /// that the socket cannot take now is lost, and the session retries.
    fn send_queued(&self, s: &mut ClientSession) {
        let to = destination(s.server(), self.dual_stack);
        while let Some(datagram) = s.poll_transmit() {
            let _ = self.socket.try_send_to(&datagram, to);
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.session.lock().close();
        self.poke.notify_one();
        self.changed.notify_waiters();
    }

    /// The driver: takes datagrams and time into the session, and sends
    /// what it has, until the client closes.
    async fn drive(self: Arc<Shared>) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        while !self.closed.load(Ordering::Acquire) {
            let due = self.session.lock().poll_timeout();
            let sleep = async {
                match due {
                    Some(due) => tokio::time::sleep_until(due.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    let now = Instant::now();
                    let mut s = self.session.lock();
                    if let Ok((n, from)) = received {
                        s.handle_datagram(now, canonical(from), &buf[..n]);
                        // Whatever else waits is taken in before timeouts
                        // are judged, boundedly (see the blocking client).
                        for _ in 0..DRAIN_AT_MOST {
                            let Ok((n, from)) = self.socket.try_recv_from(&mut buf) else {
                                break;
                            };
                            s.handle_datagram(now, canonical(from), &buf[..n]);
                        }
                    }
                }
                () = sleep => {}
                () = self.poke.notified() => {}
            }
            {
                let mut s = self.session.lock();
                s.handle_timeout(Instant::now());
                self.send_queued(&mut s);
            }
            self.changed.notify_waiters();
        }
    }

    /// Looks `names` up again every `every` (at least a second) and hands
    /// a changed list to the session (see [`KnownNames`]), starting from
    /// `known` if connecting looked them up already.
    async fn resolve(
        self: Arc<Shared>,
        names: Vec<String>,
        every: Duration,
        known: Option<KnownNames>,
    ) {
        let every = every.max(Duration::from_secs(1));
        let mut known = match known {
            Some(known) => known,
            None => {
                let mut first = Vec::with_capacity(names.len());
                for name in &names {
                    first.push(lookup_one(name).await);
                }
                KnownNames(first)
            }
        };
        loop {
            tokio::time::sleep(every).await;
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            for (i, name) in names.iter().enumerate() {
                known.update(i, lookup_one(name).await);
            }
            if let Some(servers) = known.servers(self.dual_stack) {
                let mut s = self.session.lock();
                s.set_servers(Instant::now(), &servers);
                self.send_queued(&mut s);
            }
        }
    }
}

async fn lookup_one(name: &str) -> Vec<SocketAddr> {
    tokio::net::lookup_host(name)
        .await
        .map(|found| found.collect())
        .unwrap_or_default()
}

/// Every name's addresses; an error naming the first without one.
async fn lookup(names: &[String]) -> Result<KnownNames, ClientError> {
    let mut known = Vec::with_capacity(names.len());
    for name in names {
        known.push(addresses_of(name, tokio::net::lookup_host(name).await?)?);
    }
    Ok(KnownNames(known))
}
