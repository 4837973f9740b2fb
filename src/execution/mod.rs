//! Remote execution: validation, the scheduler, and the gRPC services in
//! front of it (REAPI Execution, google.longrunning Operations, and the
//! worker gateway that remote workers connect to).

pub mod failed;
pub mod gateway;
pub mod live;
pub mod logstream;
pub mod platform;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod validate;

pub use failed::FailedRun;
pub use scheduler::{Scheduler, SchedulerConfig};
