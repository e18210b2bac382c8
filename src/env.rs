//! The environment variables both sides of the cluster agree on.

#![forbid(unsafe_code)]

/// Makes a process a worker and gives its id (≈ `NODE_UNIQUE_ID`).
pub const ENV_WORKER_ID: &str = "SYNCLUSTER_WORKER_ID";
/// Names the worker's end of the channel (≈ `NODE_CHANNEL_FD`).
pub const ENV_CHANNEL_FD: &str = "SYNCLUSTER_CHANNEL_FD";
/// The pid the worker's variables are meant for (≈ systemd's
/// `LISTEN_PID`), written by the child after fork: a process whose pid
/// differs inherited them and is not a worker.
pub const ENV_WORKER_PID: &str = "SYNCLUSTER_WORKER_PID";
/// Chooses the policy: `rr`, `shared` (`none`, Node's name, also works),
/// `least-loaded` or `reuseport`.
pub const ENV_SCHED_POLICY: &str = "SYNCLUSTER_SCHED_POLICY";
/// Sets the round-robin window (1 to 253).
pub const ENV_RR_WINDOW: &str = "SYNCLUSTER_RR_WINDOW";
/// The extra fds the primary mapped into the worker (`Settings::map_fd`),
/// comma-separated, for `Worker::take_fd`.
pub const ENV_FDS: &str = "SYNCLUSTER_FDS";
