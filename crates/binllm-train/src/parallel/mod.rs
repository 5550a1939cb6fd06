//! Data parallelism: one process per GPU, each on its own slice of every step's windows,
//! gradients summed over the ranks before clipping and AdamW, so every rank takes the same
//! optimizer step (`docs/MULTI_GPU.md`).
//!
//! | item | holds |
//! |---|---|
//! | [`Collective`] | sum and broadcast over the ranks; [`Single`] (one rank, no-ops), [`local::LocalGroup`] (threads of one process: CPU tests), [`nccl::NcclGroup`] (NCCL, loaded with `dlopen` at run time) |
//! | [`Shard`] | which part of a step's global batch a rank trains on |
//! | [`buckets::GradientBuckets`] | gradients flattened into ~25 MB buckets in backward order and summed |
//! | [`RankEnv`] | what the launcher passes a child process (`BINLLM_RANK`, ...) |
//!
//! Each rank weights its micro-batch losses by their share of the *global* batch
//! (`windows / windows_per_step`), so the sum of the ranks' gradients is the gradient of the
//! whole step, whatever the number of ranks and however unevenly the windows divide. The
//! gradients are summed after the backward pass of the last micro-batch, not overlapped with
//! it: overlapping bucket reductions with the backward pass needs gradient hooks that `tch`
//! does not expose.

pub mod buckets;
pub mod local;
pub mod nccl;

use std::ops::Range;

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// The operations data parallelism needs across ranks. Every rank calls the same operations
/// in the same order (NCCL's rule); tensors are contiguous and on the rank's device.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `tensor` on every rank with the element-wise sum over the ranks.
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()>;
    /// Replaces `tensor` on every rank with rank 0's.
    fn broadcast_from_root(&self, tensor: &mut Tensor) -> Result<()>;
    /// Returns once every rank has reached it.
    fn barrier(&self) -> Result<()>;

    /// Whether this rank writes the run's files (checkpoints, metrics, summary, model).
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// The sum over the ranks of one number (carried in f64 on `device`).
    fn all_reduce_sum_f64(&self, value: f64, device: Device) -> Result<f64> {
        if self.world_size() == 1 {
            return Ok(value);
        }
        let mut t = Tensor::from_slice(&[value]).to_device(device);
        self.all_reduce_sum(&mut t)?;
        Ok(t.double_value(&[0]))
    }

    /// Replaces `tensor` with the element-wise mean over the ranks.
    fn all_reduce_mean(&self, tensor: &mut Tensor) -> Result<()> {
        self.all_reduce_sum(tensor)?;
        if self.world_size() > 1 {
            let _guard = tch::no_grad_guard();
            let _ = tensor.divide_scalar_(self.world_size() as f64);
        }
        Ok(())
    }
}

/// One rank: every operation is the identity. A single-GPU (or CPU) run goes through the
/// same trainer code as a multi-GPU one with this.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _tensor: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast_from_root(&self, _tensor: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Rank `rank` of `world_size`: which contiguous part of a run of windows it trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world_size: usize,
}

impl Shard {
    pub const SINGLE: Shard = Shard {
        rank: 0,
        world_size: 1,
    };

    pub fn new(rank: usize, world_size: usize) -> Result<Shard> {
        ensure!(world_size >= 1, "the world size must be at least 1");
        ensure!(
            rank < world_size,
            "rank {rank} is out of range for a world of {world_size}"
        );
        Ok(Shard { rank, world_size })
    }

    pub fn of(collective: &dyn Collective) -> Shard {
        Shard {
            rank: collective.rank(),
            world_size: collective.world_size(),
        }
    }

    /// This rank's part of `0..total`: the ranks' parts are disjoint, cover `0..total` in
    /// rank order and differ in length by at most one (the first ranks get the shorter).
    pub fn range(&self, total: usize) -> Range<usize> {
        total * self.rank / self.world_size..total * (self.rank + 1) / self.world_size
    }
}

/// Environment variables by which `binllm convert --gpus N` tells a child process its place.
pub const RANK_VAR: &str = "BINLLM_RANK";
pub const WORLD_SIZE_VAR: &str = "BINLLM_WORLD_SIZE";
/// The NCCL unique id rank 0 created, as 256 hex digits.
pub const NCCL_ID_VAR: &str = "BINLLM_NCCL_ID";

/// A child process's place in a multi-GPU run, read from the environment the launcher set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub shard: Shard,
    pub nccl_id: nccl::UniqueId,
}

impl RankEnv {
    /// None when this process was not started by the launcher (no `BINLLM_RANK`).
    pub fn from_env() -> Result<Option<RankEnv>> {
        let get = |name: &str| std::env::var(name).ok();
        RankEnv::parse(
            get(RANK_VAR).as_deref(),
            get(WORLD_SIZE_VAR).as_deref(),
            get(NCCL_ID_VAR).as_deref(),
        )
    }

    fn parse(rank: Option<&str>, world: Option<&str>, id: Option<&str>) -> Result<Option<RankEnv>> {
        let Some(rank) = rank else {
            return Ok(None);
        };
        let rank: usize = rank
            .parse()
            .with_context(|| format!("{RANK_VAR}={rank}: not a rank"))?;
        let world =
            world.with_context(|| format!("{RANK_VAR} is set but {WORLD_SIZE_VAR} is not"))?;
        let world: usize = world
            .parse()
            .with_context(|| format!("{WORLD_SIZE_VAR}={world}: not a count"))?;
        let id = id.with_context(|| format!("{RANK_VAR} is set but {NCCL_ID_VAR} is not"))?;
        Ok(Some(RankEnv {
            shard: Shard::new(rank, world)?,
            nccl_id: nccl::UniqueId::from_hex(id)
                .with_context(|| format!("{NCCL_ID_VAR}: bad NCCL unique id"))?,
        }))
    }
}

/// Checks the tensor kinds a collective can carry, naming the operation on failure.
pub(crate) fn check_kind(kind: Kind, what: &str) -> Result<()> {
    match kind {
        Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half => Ok(()),
        other => bail!("{what}: tensors of kind {other:?} are not supported (f32, f64, bf16, f16)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_are_disjoint_cover_and_balance() {
        for total in [0usize, 1, 5, 7, 12, 13, 64, 101] {
            for world in 1..=9 {
                let mut next = 0;
                let mut lengths = Vec::new();
                for rank in 0..world {
                    let r = Shard::new(rank, world).unwrap().range(total);
                    assert_eq!(r.start, next, "total {total} world {world} rank {rank}");
                    next = r.end;
                    lengths.push(r.len());
                }
                assert_eq!(next, total);
                let (lo, hi) = (lengths.iter().min().unwrap(), lengths.iter().max().unwrap());
                assert!(hi - lo <= 1, "total {total} world {world}: {lengths:?}");
            }
        }
    }

    #[test]
    fn shard_rejects_a_rank_outside_the_world() {
        assert!(Shard::new(2, 2).is_err());
        assert!(Shard::new(0, 0).is_err());
    }

    #[test]
    fn rank_env_parses_and_rejects() {
        let id = nccl::UniqueId([7u8; nccl::UNIQUE_ID_BYTES]);
        let hex = id.to_hex();
        assert_eq!(RankEnv::parse(None, None, None).unwrap(), None);
        let env = RankEnv::parse(Some("1"), Some("3"), Some(&hex))
            .unwrap()
            .unwrap();
        assert_eq!(
            env.shard,
            Shard {
                rank: 1,
                world_size: 3
            }
        );
        assert_eq!(env.nccl_id, id);
        assert!(RankEnv::parse(Some("3"), Some("3"), Some(&hex)).is_err());
        assert!(RankEnv::parse(Some("x"), Some("3"), Some(&hex)).is_err());
        assert!(RankEnv::parse(Some("1"), None, Some(&hex)).is_err());
        assert!(RankEnv::parse(Some("1"), Some("2"), Some("abc")).is_err());
    }

    #[test]
    fn single_is_the_identity() {
        let mut t = Tensor::from_slice(&[1.5f32, -2.0, 3.25]);
        let before = Vec::<f32>::try_from(&t).unwrap();
        Single.all_reduce_sum(&mut t).unwrap();
        Single.all_reduce_mean(&mut t).unwrap();
        Single.broadcast_from_root(&mut t).unwrap();
        Single.barrier().unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), before);
        assert_eq!(Single.all_reduce_sum_f64(0.1, Device::Cpu).unwrap(), 0.1);
        assert!(Single.is_writer());
    }
}
