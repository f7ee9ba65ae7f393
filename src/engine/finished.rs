//! Which final task states are kept, and for how long.
//!
//! The protocol keeps a final state for at least 60 s so that a client whose
//! pushed TASK_STATE was lost can ask with STATUS. The states themselves stay
//! in the engine's task slab; this module decides when each one goes:
//!
//! - after `retention` (oldest first, in end order);
//! - early, when more than `max_total` are kept (oldest first);
//! - early, when one client has more than `max_per_client` (that client's
//!   oldest first), so a single client finishing tasks in a loop cannot take
//!   the whole table, and the memory one client holds here is bounded.
//!
//! ```text
//!   order:      (task, ended) of every kept state, end order (ids evicted per
//!               client stay until compacted: they are recognised as gone)
//!   by_client:  client_id → its kept tasks, end order
//! ```
//!
//! Early evictions are counted by the engine (`finished_evicted_early`).

use std::collections::VecDeque;

use super::{FastMap, TaskId, Timestamp};

#[derive(Debug)]
pub(crate) struct FinishedTasks {
    order: VecDeque<(TaskId, u64, Timestamp)>,
    by_client: FastMap<u64, VecDeque<TaskId>>,
    kept: usize,
    max_total: usize,
    max_per_client: usize,
    retention_us: u64,
}

/// Why a final state was let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forget {
    /// Its retention ran out.
    Aged,
    /// It went before its time, for room.
    Early,
}

impl FinishedTasks {
    pub(crate) fn new(max_total: usize, max_per_client: usize, retention_ms: u64) -> FinishedTasks {
        FinishedTasks {
            order: VecDeque::new(),
            by_client: FastMap::default(),
            kept: 0,
            max_total,
            max_per_client: max_per_client.max(1),
            retention_us: retention_ms.saturating_mul(1000),
        }
    }

    /// Final states kept now.
    pub(crate) fn len(&self) -> usize {
        self.kept
    }

    /// Entries in the end-order queue, stale ones included.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.order.len()
    }

    /// Final states kept for `client_id`.
    #[cfg(test)]
    pub(crate) fn of_client(&self, client_id: u64) -> usize {
        self.by_client.get(&client_id).map_or(0, VecDeque::len)
    }

    /// Task `id` of `client_id` reached its final state at `now`. Calls
    /// `forget` for the state of that client this pushes out, if any.
    pub(crate) fn push(
        &mut self,
        id: TaskId,
        client_id: u64,
        now: Timestamp,
        mut forget: impl FnMut(TaskId, Forget),
        is_kept: impl Fn(TaskId) -> bool,
    ) {
        self.order.push_back((id, client_id, now));
        let mine = self.by_client.entry(client_id).or_default();
        mine.push_back(id);
        self.kept += 1;
        if mine.len() > self.max_per_client {
            if let Some(oldest) = mine.pop_front() {
                self.kept -= 1;
                forget(oldest, Forget::Early);
            }
        }
        self.compact(is_kept);
    }

    /// Lets go of the states past their retention at `now`, and the oldest
    /// past the total bound.
    pub(crate) fn age(&mut self, now: Timestamp, mut forget: impl FnMut(TaskId, Forget)) {
        while let Some(&(id, client_id, ended)) = self.order.front() {
            let aged = now.0.saturating_sub(ended.0) >= self.retention_us;
            if !aged && self.kept <= self.max_total {
                break;
            }
            self.order.pop_front();
            // The client's oldest kept state is this one, unless the client
            // bound already let it go (then the entry is stale).
            let Some(mine) = self.by_client.get_mut(&client_id) else {
                continue;
            };
            if mine.front() != Some(&id) {
                continue;
            }
            mine.pop_front();
            if mine.is_empty() {
                self.by_client.remove(&client_id);
            }
            self.kept -= 1;
            forget(id, if aged { Forget::Aged } else { Forget::Early });
        }
    }

    /// Drops stale entries (states the client bound let go, which
    /// `is_kept` no longer finds) once they outnumber the kept ones.
    fn compact(&mut self, is_kept: impl Fn(TaskId) -> bool) {
        if self.order.len() <= 2 * self.kept + 64 {
            return;
        }
        self.order.retain(|&(id, _, _)| is_kept(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_client_cannot_take_the_whole_table() {
        let mut f = FinishedTasks::new(1000, 4, 60_000);
        let mut forgotten = Vec::new();
        let mut kept = std::collections::HashSet::new();
        kept.insert(TaskId(1));
        f.push(
            TaskId(1),
            7,
            Timestamp(0),
            |id, why| forgotten.push((id, why)),
            |_| true,
        );
        for n in 0..100u64 {
            kept.insert(TaskId(100 + n));
            let mut gone = Vec::new();
            f.push(
                TaskId(100 + n),
                9,
                Timestamp(n),
                |id, why| gone.push((id, why)),
                |id| kept.contains(&id),
            );
            for (id, why) in gone {
                kept.remove(&id);
                forgotten.push((id, why));
            }
        }
        assert_eq!(f.of_client(9), 4);
        assert_eq!(f.of_client(7), 1, "the other client's state is kept");
        assert_eq!(f.len(), 5);
        assert_eq!(forgotten.len(), 96);
        assert!(forgotten.iter().all(|&(_, why)| why == Forget::Early));
        assert!(f.queued() <= 2 * f.len() + 65);
    }

    #[test]
    fn states_age_out_in_end_order() {
        let mut f = FinishedTasks::new(1000, 100, 60_000);
        f.push(TaskId(1), 1, Timestamp(0), |_, _| unreachable!(), |_| true);
        f.push(
            TaskId(2),
            2,
            Timestamp(30_000_000),
            |_, _| unreachable!(),
            |_| true,
        );
        let mut gone = Vec::new();
        f.age(Timestamp(59_999_999), |id, why| gone.push((id, why)));
        assert!(gone.is_empty());
        f.age(Timestamp(60_000_000), |id, why| gone.push((id, why)));
        assert_eq!(gone, vec![(TaskId(1), Forget::Aged)]);
        assert_eq!(f.len(), 1);
    }

    proptest! {
        /// Whatever the mix of clients and times: no client keeps more than
        /// its bound, the total bound holds after ageing, every state that
        /// goes is reported exactly once, and the queue stays bounded.
        #[test]
        fn bounds_hold_and_every_state_goes_once(
            ops in proptest::collection::vec((0u64..5, 0u64..3, any::<bool>()), 1..500)
        ) {
            use std::cell::RefCell;
            let mut f = FinishedTasks::new(6, 3, 10);
            let kept = RefCell::new(std::collections::HashSet::new());
            let twice = RefCell::new(Vec::new());
            let forget = |id: TaskId, _| {
                if !kept.borrow_mut().remove(&id) {
                    twice.borrow_mut().push(id);
                }
            };
            let mut now = 0u64;
            for (n, (client, step, age)) in ops.into_iter().enumerate() {
                if age {
                    now += step * 4000;
                    f.age(Timestamp(now), forget);
                } else {
                    let id = TaskId(n as u64);
                    kept.borrow_mut().insert(id);
                    f.push(id, client, Timestamp(now), forget, |id| kept.borrow().contains(&id));
                }
                prop_assert!(twice.borrow().is_empty(), "forgotten twice: {:?}", twice.borrow());
                prop_assert_eq!(f.len(), kept.borrow().len());
                for c in 0..5 {
                    prop_assert!(f.of_client(c) <= 3);
                }
                if age {
                    prop_assert!(f.len() <= 6);
                }
                prop_assert!(f.queued() <= 2 * f.len() + 65);
            }
        }
    }
}
