//! A task as the engine keeps it, from SUBMIT to its final state.

use slab::Slab;

use super::types::SessionIndex;
use super::{Cause, JobId, TaskId, Timestamp};
use crate::wire::{CancelReason, TaskReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskState {
    Scheduled,
    Queued,
    Running,
    Done,
    Failed,
    Cancelled(CancelReason),
}

impl TaskState {
    pub(crate) fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Done | TaskState::Failed | TaskState::Cancelled(_)
        )
    }
}

#[derive(Debug)]
pub(crate) struct Task {
    pub(crate) id: TaskId,
    pub(crate) client_id: u64,
    /// The owning session's slab index; meaningful while unfinished.
    pub(crate) session: SessionIndex,
    pub(crate) job: JobId,
    pub(crate) state: TaskState,
    /// Set when a running task has been told to stop; wins over whatever
    /// the job returns afterwards.
    pub(crate) cancelling: Option<Cause>,
    pub(crate) started_at: Option<Timestamp>,
    pub(crate) deadline_ms: u32,
    /// The payload until the task is queued, then the result or error text.
    pub(crate) data: Vec<u8>,
    pub(crate) ended_at: Timestamp,
}

impl Task {
    pub(crate) fn report(&self) -> TaskReport<'_> {
        match self.state {
            TaskState::Scheduled => TaskReport::Scheduled,
            TaskState::Queued => TaskReport::Queued,
            TaskState::Running => TaskReport::Running,
            TaskState::Done => TaskReport::Done(&self.data),
            // Failed texts are stored already truncated to a valid length.
            TaskState::Failed => {
                TaskReport::Failed(std::str::from_utf8(&self.data).unwrap_or("error"))
            }
            TaskState::Cancelled(reason) => TaskReport::Cancelled(reason),
        }
    }
}

pub(crate) fn is_task(tasks: &Slab<Task>, id: TaskId) -> bool {
    tasks.get(id.index()).is_some_and(|t| t.id == id)
}

pub(crate) fn find_task(tasks: &Slab<Task>, client_id: u64, id: TaskId) -> Option<&Task> {
    tasks
        .get(id.index())
        .filter(|t| t.id == id && t.client_id == client_id)
}
