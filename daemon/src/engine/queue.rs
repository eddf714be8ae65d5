//! The queue: a bounded FIFO of tasks between the async services and the worker thread.
//!
//! Full means the daemon is saturated; the service answers RESOURCE_EXHAUSTED at once instead
//! of letting clients pile up behind a device that cannot keep up. A queued task whose client
//! cancelled or went away gives up its place at once: it is ended (as cancelled) whenever the
//! queue is touched, so it neither counts against `queue_size` nor waits for a slot.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::task::Task;

/// The sending half, held by the engine handle. The queue closes when the last clone goes.
#[derive(Clone)]
pub struct TaskQueue {
    senders: Arc<Senders>,
    capacity: usize,
}

/// The receiving half, owned by the worker thread.
pub struct TaskReceiver {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    arrived: Condvar,
}

struct State {
    tasks: VecDeque<Task>,
    closed: bool,
}

/// Closes the queue when the last sender is dropped.
struct Senders(Arc<Shared>);

impl Drop for Senders {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.arrived.notify_all();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is full: {capacity} requests are already waiting; retry later or raise queue_size")]
    Full { capacity: usize },
    #[error("the engine has stopped")]
    Closed,
}

pub fn task_queue(capacity: usize) -> (TaskQueue, TaskReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { tasks: VecDeque::new(), closed: false }),
        arrived: Condvar::new(),
    });
    (TaskQueue { senders: Arc::new(Senders(shared.clone())), capacity }, TaskReceiver { shared })
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere never leaves the queue half-updated: every change is one call.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Ends every task nobody waits for any more.
    fn drop_abandoned(&mut self) {
        self.tasks.retain(|task| {
            if task.is_abandoned() {
                task.end_cancelled();
                return false;
            }
            true
        });
    }
}

impl TaskQueue {
    /// Enqueues without ever blocking the caller.
    pub fn try_push(&self, task: Task) -> Result<(), QueueError> {
        let shared = &self.senders.0;
        let mut state = shared.lock();
        if state.closed {
            return Err(QueueError::Closed);
        }
        state.drop_abandoned();
        if state.tasks.len() >= self.capacity {
            return Err(QueueError::Full { capacity: self.capacity });
        }
        state.tasks.push_back(task);
        drop(state);
        shared.arrived.notify_one();
        Ok(())
    }

    /// Closes the queue at shutdown even while handles remain (a client connection that is
    /// still open holds one): the worker finishes what it has, saves, and ends.
    pub fn close(&self) {
        let shared = &self.senders.0;
        shared.lock().closed = true;
        shared.arrived.notify_all();
    }

    /// Tasks waiting for a slot.
    pub fn depth(&self) -> usize {
        let mut state = self.senders.0.lock();
        state.drop_abandoned();
        state.tasks.len()
    }
}

impl TaskReceiver {
    /// Waits for the next task; `None` once the queue is closed and empty (shutdown).
    pub fn pop(&self) -> Option<Task> {
        let mut state = self.shared.lock();
        loop {
            state.drop_abandoned();
            if let Some(task) = state.tasks.pop_front() {
                return Some(task);
            }
            if state.closed {
                return None;
            }
            state = self.shared.arrived.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// The next task if one is waiting.
    pub fn try_pop(&self) -> Option<Task> {
        let mut state = self.shared.lock();
        state.drop_abandoned();
        state.tasks.pop_front()
    }

    /// Puts a task the worker could not start yet back at the head of the queue.
    pub fn push_front(&self, task: Task) {
        self.shared.lock().tasks.push_front(task);
    }

    /// Ends queued tasks whose clients gave up, so that they hear at once.
    pub fn drop_abandoned(&self) {
        self.shared.lock().drop_abandoned();
    }
}

/// The worker is gone (it ended or panicked): nothing queued will run, so every waiting task
/// hears so at once, and later pushes are refused.
impl Drop for TaskReceiver {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        for task in state.tasks.drain(..) {
            let _ = task.events.send(super::task::Event::Failed(super::task::EngineError::ShuttingDown));
        }
    }
}
