//! SUBMIT: admission against the limits, idempotence by request id, and
//! the rule for which answers a session may forget.

use super::config::{request_memory, retry_window_ms};
use super::session::{reject_text, Request, RequestReply};
use super::stats::move_task_gauge;
use super::task::{Task, TaskState};
use super::types::SessionIndex;
use super::{schedule, Effect, Engine, Event, TaskId, Timestamp};
use crate::wire::{Message, RejectCode};

impl Engine {
    pub(super) fn on_submit(
        &mut self,
        index: SessionIndex,
        request_id: u32,
        delay_ms: u32,
        deadline_ms: u32,
        job: &str,
        payload: &[u8],
    ) {
        let remembered = self.sessions[index.slot()]
            .work
            .as_ref()
            .and_then(|w| w.requests.iter().find(|r| r.id == request_id))
            .map(|r| r.reply);
        let reply = match remembered {
            Some(reply) => reply,
            None if !self.make_request_room(index) => {
                // Every answer it holds may still be retried: admitting this
                // one would mean forgetting one of them, and a late retry of
                // a forgotten SUBMIT would start its task a second time.
                self.stats.tasks_rejected += 1;
                RequestReply::Rejected(RejectCode::TooManyTasks)
            }
            None => {
                let reply = self.admit(index, delay_ms, deadline_ms, job, payload);
                // A rejection is final when it is sent; an acceptance when
                // its task ends (`finish` dates it).
                let ended = matches!(reply, RequestReply::Rejected(_)).then_some(self.now);
                self.sessions[index.slot()]
                    .work
                    .get_or_insert_with(Box::default)
                    .requests
                    .push_back(Request {
                        id: request_id,
                        reply,
                        ended,
                    });
                reply
            }
        };
        match reply {
            RequestReply::Accepted(task) => self.reply(
                index,
                &Message::Accepted {
                    request_id,
                    task_id: task.0,
                },
            ),
            RequestReply::Rejected(code) => self.reply(
                index,
                &Message::Rejected {
                    request_id,
                    code,
                    message: reject_text(code),
                },
            ),
        }
    }

    /// Makes room for one more answered request id, if the session's memory
    /// is full, by forgetting the oldest answer no retry can still ask for:
    /// a rejection, or a task's acceptance once the task has ended, older
    /// than the retry window (`retry_window_ms`). An unfinished task's id is
    /// never forgotten, nor any answer younger than the window, so a late
    /// retry always gets the answer the first try got; if that is all there
    /// is, there is no room.
    fn make_request_room(&mut self, index: SessionIndex) -> bool {
        let limit = request_memory(self.config.max_tasks_per_session);
        let now = self.now;
        let session = &mut self.sessions[index.slot()];
        let window_us = retry_window_ms(session.ttl_ms) * 1000;
        let Some(work) = session.work.as_mut() else {
            return true;
        };
        if work.requests.len() < limit {
            return true;
        }
        let past_retries = |r: &Request| {
            r.ended
                .is_some_and(|ended| now.0.saturating_sub(ended.0) >= window_us)
        };
        let forgettable = work.requests.iter().position(past_retries);
        match forgettable {
            Some(i) => {
                work.requests.remove(i);
                true
            }
            None => false,
        }
    }

    fn admit(
        &mut self,
        index: SessionIndex,
        delay_ms: u32,
        deadline_ms: u32,
        job: &str,
        payload: &[u8],
    ) -> RequestReply {
        if self.shutting_down {
            self.stats.tasks_rejected += 1;
            return RequestReply::Rejected(RejectCode::ShuttingDown);
        }
        let Some(job) = self.config.jobs.lookup(job) else {
            self.stats.tasks_rejected += 1;
            return RequestReply::Rejected(RejectCode::UnknownJob);
        };
        let code = if !self.config.jobs.rule(job).admits(payload) {
            Some(RejectCode::BadRequest)
        } else if self.sessions[index.slot()].unfinished() >= self.config.max_tasks_per_session {
            Some(RejectCode::TooManyTasks)
        } else if self.waiting_tasks >= self.config.max_waiting_tasks {
            Some(RejectCode::QueueFull)
        } else {
            None
        };
        if let Some(code) = code {
            self.stats.tasks_rejected += 1;
            return RequestReply::Rejected(code);
        }
        self.task_serial = self.task_serial.wrapping_add(1);
        let entry = self.tasks.vacant_entry();
        let id = TaskId(u64::from(self.task_serial) << 32 | entry.key() as u64);
        let state = if delay_ms > 0 {
            TaskState::Scheduled
        } else {
            TaskState::Queued
        };
        let session = &mut self.sessions[index.slot()];
        entry.insert(Task {
            id,
            client_id: session.client_id,
            session: index,
            job,
            state,
            cancelling: None,
            started_at: None,
            deadline_ms,
            data: if delay_ms > 0 {
                payload.to_vec()
            } else {
                Vec::new()
            },
            ended_at: Timestamp(0),
        });
        session
            .work
            .get_or_insert_with(Box::default)
            .unfinished
            .push(id);
        let (client_id, incarnation) = (session.client_id, session.incarnation);
        move_task_gauge(&mut self.stats, None, state);
        self.record(Event::TaskAccepted {
            task: id,
            client_id,
            incarnation,
            job,
            at: self.now,
        });
        self.waiting_tasks += 1;
        self.unfinished_tasks += 1;
        self.stats.tasks_accepted += 1;
        if delay_ms > 0 {
            let due = self.ticks.deadline(self.now, u64::from(delay_ms));
            schedule(&mut self.task_wheel, id.wheel_key(), due);
        } else {
            self.effects.push_back(Effect::Run {
                task: id,
                client_id,
                job,
                payload: payload.to_vec(),
            });
        }
        RequestReply::Accepted(id)
    }
}
