//! `--profile N`: where the time of a Stage-2 step goes. The device is synchronised at each
//! section boundary and the wall time since the last boundary is added to that section, so
//! the sections sum to the step (the synchronisation itself removes the overlap a normal
//! step has: profiled steps run a little slower than unprofiled ones).

use std::cell::RefCell;
use std::time::Instant;

use tch::Device;

/// Accumulates seconds per named section over the profiled steps.
#[derive(Debug)]
pub struct SectionTimer {
    device: Device,
    state: RefCell<TimerState>,
}

#[derive(Debug)]
struct TimerState {
    last: Instant,
    /// (section, seconds), in first-seen order.
    totals: Vec<(&'static str, f64)>,
    steps: usize,
}

impl SectionTimer {
    pub fn new(device: Device) -> Self {
        SectionTimer {
            device,
            state: RefCell::new(TimerState {
                last: Instant::now(),
                totals: Vec::new(),
                steps: 0,
            }),
        }
    }

    fn synchronize(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Starts a profiled step: the time until the next mark belongs to it.
    pub fn start_step(&self) {
        self.synchronize();
        let mut state = self.state.borrow_mut();
        state.last = Instant::now();
        state.steps += 1;
    }

    /// Ends a section: the time since the last boundary is added to `section`.
    pub fn mark(&self, section: &'static str) {
        self.synchronize();
        let now = Instant::now();
        let mut state = self.state.borrow_mut();
        let seconds = (now - state.last).as_secs_f64();
        state.last = now;
        match state.totals.iter_mut().find(|(name, _)| *name == section) {
            Some((_, total)) => *total += seconds,
            None => state.totals.push((section, seconds)),
        }
    }

    /// Milliseconds per profiled step for each section, in the order first seen.
    pub fn milliseconds_per_step(&self) -> Vec<(String, f64)> {
        let state = self.state.borrow();
        let steps = state.steps.max(1) as f64;
        state
            .totals
            .iter()
            .map(|(name, seconds)| (name.to_string(), 1e3 * seconds / steps))
            .collect()
    }
}

/// The breakdown as a Markdown table with each section's share.
pub fn render(sections: &[(String, f64)]) -> String {
    let total: f64 = sections.iter().map(|(_, ms)| ms).sum();
    let mut out = String::from("| section | ms per step | share |\n|---|---:|---:|\n");
    for (name, ms) in sections {
        out += &format!(
            "| {name} | {ms:.2} | {:.1}% |\n",
            100.0 * ms / total.max(1e-12)
        );
    }
    out += &format!("| **step** | **{total:.2}** | 100% |\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_accumulate_per_step_in_first_seen_order() {
        let timer = SectionTimer::new(Device::Cpu);
        for _ in 0..2 {
            timer.start_step();
            std::thread::sleep(std::time::Duration::from_millis(20));
            timer.mark("forward");
            std::thread::sleep(std::time::Duration::from_millis(5));
            timer.mark("optimizer");
        }
        let sections = timer.milliseconds_per_step();
        assert_eq!(sections[0].0, "forward");
        assert_eq!(sections[1].0, "optimizer");
        // Per step, not summed over the two steps; sleeps last at least what they ask.
        assert!(
            sections[0].1 >= 20.0 && sections[0].1 < 200.0,
            "{sections:?}"
        );
        assert!(
            sections[1].1 >= 5.0 && sections[1].1 < sections[0].1,
            "{sections:?}"
        );
        let table = render(&sections);
        assert!(table.contains("| forward |") && table.contains("**step**"));
    }
}
