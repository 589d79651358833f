//! Jittered exponential pauses between retries of a request etcd refused (unavailable, or
//! overloaded by its backpressure): each pause is the current step times a random factor in
//! `[0.5, 1.5)`, so that a crowd of nodes refused together does not come back together, and
//! the step doubles up to [`MAX_BACKOFF`].

use std::time::Duration;

/// The longest step between two retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The pauses of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
}

impl Backoff {
    /// Pauses that start at `first` (then 2×, 4×, ... up to [`MAX_BACKOFF`]).
    pub fn starting_at(first: Duration) -> Self {
        Self { step: first }
    }

    /// The current step, before jitter: the longest the next pause can be is 1.5 times it.
    pub fn step(&self) -> Duration {
        self.step
    }

    /// The next pause: the current step times `0.5 + fraction` (`fraction` a random number
    /// in `[0, 1)`); the step then doubles, up to [`MAX_BACKOFF`].
    pub fn next_pause(&mut self, fraction: f64) -> Duration {
        let pause = self.step.mul_f64(0.5 + fraction.clamp(0.0, 1.0));
        self.step = (self.step * 2).min(MAX_BACKOFF);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_the_maximum_and_pauses_are_jittered_around_them() {
        let mut b = Backoff::starting_at(Duration::from_millis(100));
        assert_eq!(b.next_pause(0.0), Duration::from_millis(50));
        assert_eq!(b.step(), Duration::from_millis(200));
        assert_eq!(b.next_pause(0.5), Duration::from_millis(200));
        assert_eq!(b.next_pause(1.0), Duration::from_millis(600));
        for _ in 0..10 {
            b.next_pause(0.5);
        }
        assert_eq!(b.step(), MAX_BACKOFF);
        assert_eq!(b.next_pause(0.5), MAX_BACKOFF);
        // A fraction outside [0, 1) is clamped: never a zero or an overlong pause.
        assert_eq!(b.next_pause(-3.0), MAX_BACKOFF / 2);
        assert_eq!(b.next_pause(7.0), MAX_BACKOFF * 3 / 2);
    }
}
