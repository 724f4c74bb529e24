//! The pauses between attempts to get a connection back: from 100 ms doubling to 5 s,
//! each one jittered (between half of it and all of it), so that clients that lost the
//! same daemon do not all come back at the same moment.

use std::time::Duration;

const START: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pause: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { pause: START }
    }
}

impl Backoff {
    /// The next pause (jittered); the one after it is twice as long, up to 5 s.
    pub fn next_pause(&mut self) -> Duration {
        let half = self.pause / 2;
        let spread = half.as_nanos().max(1) as u64;
        let wait = half + Duration::from_nanos(crate::ids::random_u64() % spread);
        self.pause = (self.pause * 2).min(MAX);
        wait
    }

    /// Back to the shortest pause (the connection worked again).
    pub fn reset(&mut self) {
        self.pause = START;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_to_five_seconds_each_jittered_below_its_step() {
        let mut b = Backoff::default();
        let steps = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for ms in steps {
            let p = b.next_pause();
            let step = Duration::from_millis(ms);
            assert!(p >= step / 2 && p <= step, "{p:?} for a {step:?} step");
        }
        b.reset();
        assert!(b.next_pause() <= START);
    }
}
