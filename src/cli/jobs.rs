//! cargo's job count with a farm behind the wrapper: as many jobs as the
//! farm has free execution slots (`scheduler status`), never fewer than
//! this machine's cores (cargo's default), at most `[wrapper] max_jobs`.
//! The user's `-j`/`--jobs` or `CARGO_BUILD_JOBS` always wins. Compiles
//! that still run here take one of the wrapper's local slots, so a high
//! `-j` does not oversubscribe this machine (`wrapper/src/slots.rs`).

use std::time::Duration;

use remote_apis::client::ClientOptions;

use crate::admin::proto::GetSchedulerStatusRequest;

/// What `cargo distbuild` does about `-j`.
#[derive(Debug, PartialEq, Eq)]
pub enum Jobs {
    /// The user chose (`-j`, `--jobs`, `CARGO_BUILD_JOBS`) or no farm is
    /// behind the wrapper: cargo decides.
    Leave,
    /// Pass `-j N`.
    Set { jobs: u32, free: u32 },
    /// The farm's slots could not be read: cargo decides, and the line
    /// says why.
    Unknown(String),
}

/// Whether cargo's arguments (before a `--`) set the job count.
pub fn user_set_jobs(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-j" || a == "--jobs" || a.starts_with("--jobs=") || (a.starts_with("-j") && a.len() > 2))
}

/// The job count for `free` free slots on the farm.
pub fn choose(free: u32, cores: u32, max_jobs: u32) -> u32 {
    free.max(cores).min(max_jobs).max(1)
}

/// Decides, asking the farm only when it matters. `status` reads the
/// free slots (`slots - busy_slots`).
pub async fn decide<F, Fut>(args: &[String], env_jobs: Option<&str>, farm: bool, max_jobs: u32, status: F) -> Jobs
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<u32, String>>,
{
    if !farm || user_set_jobs(args) || env_jobs.is_some_and(|v| !v.is_empty()) {
        return Jobs::Leave;
    }
    match status().await {
        Ok(free) => Jobs::Set { jobs: choose(free, cores(), max_jobs), free },
        Err(e) => Jobs::Unknown(e),
    }
}

fn cores() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

/// The farm's free execution slots (the admin GetSchedulerStatus).
pub async fn free_slots(server: &str, options: &ClientOptions) -> Result<u32, String> {
    let call = async {
        let mut admin = super::status::admin(server, options).await.map_err(|e| e.to_string())?;
        let s = admin
            .get_scheduler_status(GetSchedulerStatusRequest {})
            .await
            .map_err(|s| format!("GetSchedulerStatus: {}: {}", s.code(), s.message()))?
            .into_inner();
        Ok(s.slots.saturating_sub(s.busy_slots))
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| Err("GetSchedulerStatus: no answer in 5 s".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn the_users_job_count_is_recognised() {
        for (args, want) in [
            ("--release", false),
            ("-j 4", true),
            ("-j4", true),
            ("--jobs 4", true),
            ("--jobs=4", true),
            ("-p app --release", false),
            ("-- -j 4", false),
            ("--tests -- --jobs=2", false),
        ] {
            assert_eq!(user_set_jobs(&words(args)), want, "{args}");
        }
    }

    #[test]
    fn jobs_follow_free_slots_between_the_cores_and_the_cap() {
        assert_eq!(choose(40, 8, 64), 40);
        assert_eq!(choose(200, 8, 64), 64, "capped");
        assert_eq!(choose(0, 8, 64), 8, "a busy farm: cargo's default");
        assert_eq!(choose(40, 8, 4), 4, "a cap below the cores wins");
        assert_eq!(choose(0, 0, 0), 1);
    }

    #[tokio::test]
    async fn the_farm_is_asked_only_when_nobody_chose() {
        let asked = std::cell::Cell::new(0);
        let status = |r: Result<u32, String>| {
            let asked = &asked;
            move || {
                asked.set(asked.get() + 1);
                async move { r }
            }
        };
        let none: &[String] = &[];
        assert_eq!(decide(&words("-j 2"), None, true, 64, status(Ok(50))).await, Jobs::Leave);
        assert_eq!(decide(none, Some("3"), true, 64, status(Ok(50))).await, Jobs::Leave);
        assert_eq!(decide(none, None, false, 64, status(Ok(50))).await, Jobs::Leave);
        assert_eq!(asked.get(), 0);
        let got = decide(none, Some(""), true, 1000, status(Ok(500))).await;
        assert_eq!(got, Jobs::Set { jobs: 500, free: 500 });
        let got = decide(none, None, true, 64, status(Err("PERMISSION_DENIED".into()))).await;
        assert_eq!(got, Jobs::Unknown("PERMISSION_DENIED".into()));
        assert_eq!(asked.get(), 2);
    }
}
