//! The queue: a bounded FIFO of tasks between the async services and the worker thread.
//!
//! Full means the daemon is saturated; the service answers RESOURCE_EXHAUSTED at once instead
//! of letting clients pile up behind a device that cannot keep up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvError, SyncSender, TryRecvError, TrySendError};

use super::task::Task;

/// The sending half, held by the engine handle.
#[derive(Clone)]
pub struct TaskQueue {
    sender: SyncSender<Task>,
    waiting: Arc<AtomicUsize>,
    capacity: usize,
}

/// The receiving half, owned by the worker thread.
pub struct TaskReceiver {
    receiver: Receiver<Task>,
    waiting: Arc<AtomicUsize>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is full: {capacity} requests are already waiting; retry later or raise queue_size")]
    Full { capacity: usize },
    #[error("the engine has stopped")]
    Closed,
}

pub fn task_queue(capacity: usize) -> (TaskQueue, TaskReceiver) {
    let (sender, receiver) = mpsc::sync_channel(capacity);
    let waiting = Arc::new(AtomicUsize::new(0));
    (
        TaskQueue { sender, waiting: waiting.clone(), capacity },
        TaskReceiver { receiver, waiting },
    )
}

impl TaskQueue {
    /// Enqueues without ever blocking the caller.
    pub fn try_push(&self, task: Task) -> Result<(), QueueError> {
        // Count first so that the worker's decrement can never run before the increment.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        match self.sender.try_send(task) {
            Ok(()) => Ok(()),
            Err(err) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match err {
                    TrySendError::Full(_) => QueueError::Full { capacity: self.capacity },
                    TrySendError::Disconnected(_) => QueueError::Closed,
                })
            }
        }
    }

    /// Tasks waiting for a slot.
    pub fn depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl TaskReceiver {
    /// Waits for the next task; `Err` once every sender is gone (shutdown).
    pub fn pop(&self) -> Result<Task, RecvError> {
        let task = self.receiver.recv()?;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Ok(task)
    }

    /// The next task if one is waiting.
    pub fn try_pop(&self) -> Result<Task, TryRecvError> {
        let task = self.receiver.try_recv()?;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Ok(task)
    }
}
