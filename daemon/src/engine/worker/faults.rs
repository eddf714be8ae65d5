//! Faults on purpose, for the tests that check what a failing worker does to the daemon.
//!
//! `PHI3D_FAULT_INJECTION` lists the faults that are on (comma-separated); each fires only for
//! a request with its id: `worker-panic` (`fault:worker-panic`) panics the worker, so that the
//! daemon must stop with a failure; `worker-wedge` (`fault:worker-wedge`) hangs it for good, so
//! that the systemd watchdog must notice; `sample-panic` (`fault:sample-panic`) panics while
//! sampling that request, which alone must end.

/// The request id that panics the worker when fault injection is on.
const PANIC_REQUEST: &str = "fault:worker-panic";
/// The request id that hangs the worker for good when fault injection is on.
const WEDGE_REQUEST: &str = "fault:worker-wedge";
/// The request id whose sampling panics when fault injection is on.
const SAMPLE_PANIC_REQUEST: &str = "fault:sample-panic";

/// Which faults are on, read once when the worker starts.
pub struct Faults {
    panic: bool,
    wedge: bool,
    sample_panic: bool,
}

impl Faults {
    pub fn from_env() -> Faults {
        let faults = std::env::var("PHI3D_FAULT_INJECTION").unwrap_or_default();
        let on = |fault: &str| faults.split(',').any(|name| name == fault);
        Faults { panic: on("worker-panic"), wedge: on("worker-wedge"), sample_panic: on("sample-panic") }
    }

    /// As a task starts: panics or hangs the worker when the task asks for it.
    pub fn on_start(&self, request_id: &str) {
        if self.panic && request_id == PANIC_REQUEST {
            panic!("fault injection: request {PANIC_REQUEST}");
        }
        if self.wedge && request_id == WEDGE_REQUEST {
            tracing::warn!("fault injection: request {WEDGE_REQUEST} hangs the inference thread");
            loop {
                std::thread::park();
            }
        }
    }

    /// Whether sampling the request in a slot must panic.
    pub fn sample_panics(&self, request_id: Option<&str>) -> bool {
        self.sample_panic && request_id == Some(SAMPLE_PANIC_REQUEST)
    }

    /// The panic [`Faults::sample_panics`] asked for, raised where sampling's panics are caught.
    pub fn panic_sampling() -> ! {
        panic!("fault injection: request {SAMPLE_PANIC_REQUEST}");
    }
}
