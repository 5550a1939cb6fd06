//! An in-process [`Collective`]: the ranks are threads of one process sharing buffers. It
//! sums in f64 in rank order, so its result does not depend on thread timing; CPU tests
//! use it to check data parallelism without GPUs.

use std::sync::{Arc, Barrier, Mutex};

use anyhow::{anyhow, ensure, Result};
use tch::{Device, Kind, Tensor};

use super::{check_kind, Collective};

struct Shared {
    /// Each rank's contribution to the operation in flight, by rank.
    slots: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

/// One rank of a group of threads; [`LocalGroup::new`] makes all of them.
pub struct LocalGroup {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// The `world_size` ranks of a new group, rank `r` at index `r`; give each to its thread.
    pub fn new(world_size: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); world_size]),
            barrier: Barrier::new(world_size),
        });
        (0..world_size)
            .map(|rank| LocalGroup {
                rank,
                world_size,
                shared: shared.clone(),
            })
            .collect()
    }

    fn slots(&self) -> Result<std::sync::MutexGuard<'_, Vec<Vec<f64>>>> {
        self.shared
            .slots
            .lock()
            .map_err(|_| anyhow!("a rank of the in-process group panicked"))
    }

    /// Posts this rank's values, waits for every rank's, and returns `combine(all slots)`.
    fn exchange(
        &self,
        tensor: &Tensor,
        combine: impl Fn(&[Vec<f64>]) -> Result<Vec<f64>>,
    ) -> Result<Vec<f64>> {
        let values = Vec::<f64>::try_from(
            tensor
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .reshape([-1]),
        )?;
        self.slots()?[self.rank] = values;
        self.shared.barrier.wait();
        let combined = combine(&self.slots()?);
        // Nobody posts the next operation's values before everyone has read these.
        self.shared.barrier.wait();
        combined
    }
}

fn write_back(tensor: &mut Tensor, values: &[f64]) {
    let _guard = tch::no_grad_guard();
    let source = Tensor::from_slice(values)
        .reshape(tensor.size())
        .to_kind(tensor.kind())
        .to_device(tensor.device());
    tensor.copy_(&source);
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        check_kind(tensor.kind(), "all-reduce")?;
        let summed = self.exchange(tensor, |slots| {
            let n = slots[0].len();
            ensure!(
                slots.iter().all(|s| s.len() == n),
                "all-reduce: the ranks passed tensors of different sizes ({:?})",
                slots.iter().map(Vec::len).collect::<Vec<_>>()
            );
            Ok((0..n)
                .map(|i| slots.iter().map(|s| s[i]).sum::<f64>())
                .collect())
        })?;
        write_back(tensor, &summed);
        Ok(())
    }

    fn broadcast_from_root(&self, tensor: &mut Tensor) -> Result<()> {
        check_kind(tensor.kind(), "broadcast")?;
        let root = self.exchange(tensor, |slots| {
            ensure!(
                slots.iter().all(|s| s.len() == slots[0].len()),
                "broadcast: the ranks passed tensors of different sizes"
            );
            Ok(slots[0].clone())
        })?;
        write_back(tensor, &root);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

/// Runs `f(rank's collective)` on one thread per rank and returns the results by rank.
#[cfg(test)]
pub(crate) fn on_ranks<T: Send>(world_size: usize, f: impl Fn(&LocalGroup) -> T + Sync) -> Vec<T> {
    let groups = LocalGroup::new(world_size);
    std::thread::scope(|s| {
        let handles: Vec<_> = groups.iter().map(|g| s.spawn(|| f(g))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_sums_every_rank_exactly() {
        for world in [1usize, 2, 3, 5] {
            let results = on_ranks(world, |g| {
                // Rank r holds [r, 10 r, -r + 0.5]: small integers and halves, exact in f32.
                let r = g.rank() as f32;
                let mut t = Tensor::from_slice(&[r, 10.0 * r, 0.5 - r]);
                g.all_reduce_sum(&mut t).unwrap();
                Vec::<f32>::try_from(&t).unwrap()
            });
            let s: f32 = (0..world).map(|r| r as f32).sum();
            let expected = vec![s, 10.0 * s, 0.5 * world as f32 - s];
            for got in results {
                assert_eq!(got, expected, "world {world}");
            }
        }
    }

    #[test]
    fn all_reduce_mean_and_bf16_and_shape() {
        let results = on_ranks(4, |g| {
            let r = g.rank() as f64;
            let mut t = Tensor::from_slice(&[r, 2.0 * r, 4.0, -r])
                .reshape([2, 2])
                .to_kind(Kind::BFloat16);
            g.all_reduce_mean(&mut t).unwrap();
            (
                t.size(),
                t.kind(),
                Vec::<f64>::try_from(&t.to_kind(Kind::Double).reshape([-1])).unwrap(),
            )
        });
        for (size, kind, values) in results {
            assert_eq!(size, vec![2, 2]);
            assert_eq!(kind, Kind::BFloat16);
            // Mean of 0..4 is 1.5: every entry is exact in bf16.
            assert_eq!(values, vec![1.5, 3.0, 4.0, -1.5]);
        }
    }

    #[test]
    fn broadcast_copies_rank_zero() {
        let results = on_ranks(3, |g| {
            let mut t = Tensor::from_slice(&[g.rank() as f32 + 1.0, 7.0]);
            g.broadcast_from_root(&mut t).unwrap();
            g.barrier().unwrap();
            Vec::<f32>::try_from(&t).unwrap()
        });
        assert!(results.iter().all(|v| v == &vec![1.0, 7.0]), "{results:?}");
    }

    #[test]
    fn mismatched_sizes_fail_on_every_rank() {
        let results = on_ranks(2, |g| {
            let mut t = Tensor::zeros([g.rank() as i64 + 1], (Kind::Float, Device::Cpu));
            g.all_reduce_sum(&mut t).is_err()
        });
        assert_eq!(results, vec![true, true]);
    }

    #[test]
    fn integer_tensors_are_refused() {
        let mut t = Tensor::from_slice(&[1i64]);
        assert!(LocalGroup::new(1)[0].all_reduce_sum(&mut t).is_err());
    }
}
