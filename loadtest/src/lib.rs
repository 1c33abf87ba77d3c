//! hookgate-load: an open-loop load generator for signed webhooks whose P99 can be trusted.
//!
//! - [`payload`]: deterministic event bodies, signed afresh per request (Stripe, Standard Webhooks, GitHub).
//! - [`attack`]: the schedule (absolute deadlines on a thread of its own), workers, the result collector.
//! - [`recorder`]: HdrHistograms (corrected, uncorrected, send lateness) and counts, in a few shards
//!   the workers share, merged at the end.
//! - [`results`]: the streamed CSV results file that `report`, `plot` and `verify` read.
//! - [`report`]: the summary and its text / JSON / histogram renderings.
//! - [`plot`]: a self-contained HTML page with SVG charts.
//! - [`sink`]: the baseline server: 202 at once, after a delay, or after a one-off stall.
//! - [`verify`]: the loss audit against Postgres and Redis.
//! - [`findmax`]: the search for the highest rate that meets a P99 SLO.
//! - [`tls`]: the client side of `https://` targets.
//! - [`syncprobe`]: the disk's own write + `fdatasync` latency, the floor under a durable ack.

pub mod attack;
pub mod findmax;
pub mod payload;
pub mod plot;
pub mod recorder;
pub mod report;
pub mod results;
pub mod sink;
pub mod syncprobe;
pub mod tls;
pub mod verify;
