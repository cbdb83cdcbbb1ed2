//! Where the fault-matrix tests pause a cutover, to break something at that moment.

use std::time::Duration;

use tracing::warn;

/// Where the fault-matrix tests may pause a cutover: the moment just before a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    Hold,
    /// In a fleet, after the `Hold` is committed and before the members' acks are read.
    Acks,
    Fence,
    Barrier,
    Sequences,
    Reverse,
    Flip,
    Release,
    Drain,
}

impl FaultPoint {
    /// The name `REDIRECT_FAULT_PAUSE` takes.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Hold => "hold",
            Self::Acks => "acks",
            Self::Fence => "fence",
            Self::Barrier => "barrier",
            Self::Sequences => "sequences",
            Self::Reverse => "reverse",
            Self::Flip => "flip",
            Self::Release => "release",
            Self::Drain => "drain",
        }
    }
}

/// A fault-injection point for the fault-matrix tests: with `REDIRECT_FAULT_PAUSE=<point>`
/// the cutover pauses (`REDIRECT_FAULT_PAUSE_MS`, default 3000) just before that step, so a
/// test can kill the controller, cut a link or fill a disk at exactly that moment. The lease
/// keeps being renewed meanwhile, as it would during any slow step. Unset, it costs nothing.
pub(crate) async fn fault_point(point: FaultPoint) {
    if std::env::var("REDIRECT_FAULT_PAUSE").is_ok_and(|s| s == point.name()) {
        let ms = std::env::var("REDIRECT_FAULT_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        warn!(
            step = point.name(),
            ms, "fault point: pausing before this step"
        );
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
