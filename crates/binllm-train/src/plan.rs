//! How a run's budget maps onto optimizer steps, phases and training windows
//! (`RUN/plan.json`).

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::config::ConvertConfig;
use crate::data::Windows;
use crate::parallel::Shard;

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub windows_per_step: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub stage1_steps: usize,
    pub stage2_steps: usize,
    pub steps_per_phase: usize,
    /// The last Stage-2 steps, which train the sign form itself (`--sign-fraction`).
    pub sign_steps: usize,
    pub tokens_per_step: usize,
    pub stage2_tokens: usize,
    pub corpus_tokens: usize,
    pub corpus_documents: usize,
    pub training_windows: usize,
    /// Windows of teacher chat transcripts, and their share of training windows.
    pub chat_windows: usize,
    pub chat_share: f64,
    /// How many times the corpus training windows are gone through (> 1: data repeats).
    pub epochs: f64,
    /// How many times the chat windows are gone through.
    pub chat_epochs: f64,
}

impl Plan {
    pub fn new(config: &ConvertConfig, windows: &Windows, documents: usize) -> Result<Plan> {
        let mut windows_per_step = (config.batch_tokens / config.seq_len).max(1);
        let micro_batch = config.micro_batch.min(windows_per_step);
        windows_per_step -= windows_per_step % micro_batch;
        let tokens_per_step = windows_per_step * config.seq_len;
        let available = windows.train.len();
        let stage2_steps = match (config.steps, config.tokens) {
            (Some(s), _) => s,
            (None, Some(t)) => t / tokens_per_step,
            (None, None) => {
                available.saturating_sub(config.stage1_steps * windows_per_step) / windows_per_step
            }
        };
        let stage2_steps = if config.method.trains() {
            stage2_steps - stage2_steps % config.phases
        } else {
            0
        };
        ensure!(
            !config.method.trains() || stage2_steps >= config.phases,
            "the budget gives {stage2_steps} Stage-2 steps, fewer than the {} phases: raise --tokens/--steps or lower --batch-tokens",
            config.phases
        );
        let stage1_steps = if config.method.trains() {
            config.stage1_steps
        } else {
            0
        };
        let sign_steps = (stage2_steps as f64 * config.sign_fraction).round() as usize;
        let (epochs, chat_epochs) =
            windows.passes((stage1_steps + stage2_steps) * windows_per_step);
        Ok(Plan {
            windows_per_step,
            micro_batch,
            accumulation: windows_per_step / micro_batch,
            stage1_steps,
            stage2_steps,
            steps_per_phase: stage2_steps / config.phases,
            sign_steps,
            tokens_per_step,
            stage2_tokens: stage2_steps * tokens_per_step,
            corpus_tokens: windows.corpus_tokens,
            corpus_documents: documents,
            training_windows: available,
            chat_windows: windows.chat.len(),
            chat_share: windows.chat_share,
            epochs,
            chat_epochs,
        })
    }

    /// Phase (1-based) of Stage-2 step `k`.
    pub fn phase_of(&self, k: usize) -> usize {
        k / self.steps_per_phase.max(1) + 1
    }

    /// Whether Stage-2 step `k` trains the sign form itself.
    pub fn trains_sign_form(&self, k: usize) -> bool {
        k + self.sign_steps >= self.stage2_steps
    }

    /// Window starts of micro-batch `m` of global step `step` (Stage 1 steps come first).
    pub fn micro_batch_windows(&self, windows: &Windows, step: usize, m: usize) -> Vec<usize> {
        let first = step * self.windows_per_step + m * self.micro_batch;
        (first..first + self.micro_batch)
            .map(|i| windows.training_window(i))
            .collect()
    }

    /// The micro-batches rank `shard` trains on at global step `step`: its contiguous part
    /// of the step's `windows_per_step` windows ([`Shard::range`]), cut into micro-batches
    /// of `micro_batch` (the last may be shorter). The ranks' windows together are the
    /// step's windows, whatever the number of ranks; one rank gets exactly
    /// [`Plan::micro_batch_windows`] for `m` in `0..accumulation`.
    pub fn rank_micro_batches(
        &self,
        windows: &Windows,
        step: usize,
        shard: Shard,
    ) -> Vec<Vec<usize>> {
        let first = step * self.windows_per_step;
        let mine: Vec<usize> = shard
            .range(self.windows_per_step)
            .map(|i| windows.training_window(first + i))
            .collect();
        mine.chunks(self.micro_batch.max(1))
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Fails unless every one of `world_size` ranks gets at least one window per step.
    pub fn check_world_size(&self, world_size: usize) -> Result<()> {
        ensure!(
            self.windows_per_step >= world_size,
            "a step has {} windows, fewer than the {world_size} GPUs: raise --batch-tokens or use fewer GPUs",
            self.windows_per_step
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(windows_per_step: usize, micro_batch: usize) -> Plan {
        Plan {
            windows_per_step,
            micro_batch,
            accumulation: windows_per_step / micro_batch,
            stage1_steps: 0,
            stage2_steps: 0,
            steps_per_phase: 0,
            sign_steps: 0,
            tokens_per_step: 0,
            stage2_tokens: 0,
            corpus_tokens: 0,
            corpus_documents: 0,
            training_windows: 0,
            chat_windows: 0,
            chat_share: 0.0,
            epochs: 0.0,
            chat_epochs: 0.0,
        }
    }

    /// 40 training windows of 4 tokens (shuffled by `seed`), and with `chat`, 9 chat windows
    /// at a 30% share.
    fn windows(seed: u64, chat: bool) -> Windows {
        let stream: Vec<u32> = (0..4 * 44 + 1).map(|i| i as u32 % 97).collect();
        let mut w = Windows::new(stream, 4, 4, seed).unwrap();
        if chat {
            let tokens: Vec<u32> = (0..4 * 9 + 1).map(|i| 100 + i as u32).collect();
            w.add_chat(&tokens, 0.3, seed).unwrap();
        }
        w
    }

    #[test]
    fn one_rank_takes_the_single_gpu_micro_batches() {
        for chat in [false, true] {
            let w = windows(3, chat);
            let p = plan(12, 4);
            for step in 0..5 {
                let expected: Vec<Vec<usize>> = (0..p.accumulation)
                    .map(|m| p.micro_batch_windows(&w, step, m))
                    .collect();
                assert_eq!(p.rank_micro_batches(&w, step, Shard::SINGLE), expected);
            }
        }
    }

    #[test]
    fn ranks_together_take_exactly_the_steps_windows() {
        for chat in [false, true] {
            for seed in [1u64, 9] {
                let w = windows(seed, chat);
                for (per_step, micro) in [(12usize, 4usize), (12, 3), (10, 2), (7, 7)] {
                    let p = plan(per_step, micro);
                    for world in 1..=per_step.min(8) {
                        for step in 0..6 {
                            // The single-GPU step, drawn independently of the plan code.
                            let want: Vec<usize> = (0..per_step)
                                .map(|i| w.training_window(step * per_step + i))
                                .collect();
                            let mut got = Vec::new();
                            for rank in 0..world {
                                let shard = Shard::new(rank, world).unwrap();
                                let batches = p.rank_micro_batches(&w, step, shard);
                                assert!(
                                    !batches.is_empty(),
                                    "rank {rank} of {world} has no windows"
                                );
                                assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= micro));
                                got.extend(batches.concat());
                            }
                            assert_eq!(got, want, "chat {chat} seed {seed} {per_step}/{micro} world {world} step {step}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn chat_windows_keep_their_share_across_ranks() {
        let w = windows(5, true);
        let p = plan(10, 2);
        let chat: std::collections::HashSet<usize> = w.chat.iter().copied().collect();
        for world in [1usize, 3, 4] {
            let count: usize = (0..world)
                .map(|r| {
                    p.rank_micro_batches(&w, 0, Shard::new(r, world).unwrap())
                        .concat()
                        .iter()
                        .filter(|s| chat.contains(s))
                        .count()
                })
                .sum();
            // floor(10 * 0.3) chat windows in the first step, whatever the world size.
            assert_eq!(count, 3, "world {world}");
        }
    }

    #[test]
    fn too_many_gpus_for_a_step_is_an_error() {
        assert!(plan(4, 2).check_world_size(4).is_ok());
        assert!(plan(4, 2).check_world_size(5).is_err());
    }
}
