//! Gradients summed over the ranks in buckets: parameters grouped in reverse registration
//! order (the order the backward pass finishes them) into buckets of about
//! [`DEFAULT_BUCKET_BYTES`], one element kind per bucket; each bucket's gradients are
//! flattened into one buffer, summed by one collective call, and copied back.

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::Collective;
use crate::linear::Param;

/// About 25 MB per bucket, PyTorch DDP's default: few enough calls that launch latency
/// does not matter, small enough that the flat copy stays a small share of memory.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

struct Bucket {
    names: Vec<String>,
    /// Shallow clones of the parameters: their `.grad()` is the live gradient.
    params: Vec<Tensor>,
    kind: Kind,
}

/// The bucket plan of a set of trainable parameters.
pub struct GradientBuckets {
    buckets: Vec<Bucket>,
}

impl GradientBuckets {
    /// Groups `params` (in registration order) from the last to the first: a bucket closes
    /// when the next parameter would take it past `bucket_bytes` or has another kind; a
    /// parameter larger than `bucket_bytes` gets a bucket of its own.
    pub fn plan(params: &[&Param], bucket_bytes: usize) -> GradientBuckets {
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut bytes = 0usize;
        for p in params.iter().rev() {
            let kind = p.tensor.kind();
            let size = p.tensor.numel() * kind.elt_size_in_bytes();
            let fits = buckets
                .last()
                .is_some_and(|b| b.kind == kind && bytes + size <= bucket_bytes);
            if !fits {
                buckets.push(Bucket {
                    names: Vec::new(),
                    params: Vec::new(),
                    kind,
                });
                bytes = 0;
            }
            let bucket = buckets.last_mut().expect("pushed above");
            bucket.names.push(p.name.clone());
            bucket.params.push(p.tensor.shallow_clone());
            bytes += size;
        }
        GradientBuckets { buckets }
    }

    /// Parameter names, bucket by bucket, in the order they are reduced.
    pub fn names(&self) -> Vec<Vec<String>> {
        self.buckets.iter().map(|b| b.names.clone()).collect()
    }

    /// Replaces every gradient with its sum over the ranks. With one rank the sum is the
    /// gradient itself, so nothing is copied. A gradient that is undefined (no backward
    /// reached the parameter) contributes zeros and stays undefined: every rank runs the
    /// same graph, so it is undefined on every rank.
    pub fn all_reduce_sum(&self, collective: &dyn Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for (index, bucket) in self.buckets.iter().enumerate() {
            let grads: Vec<Tensor> = bucket.params.iter().map(Tensor::grad).collect();
            let flat_parts: Vec<Tensor> = grads
                .iter()
                .zip(&bucket.params)
                .map(|(g, p)| {
                    if g.defined() {
                        g.reshape([-1])
                    } else {
                        Tensor::zeros([p.numel() as i64], (bucket.kind, p.device()))
                    }
                })
                .collect();
            let mut flat = Tensor::cat(&flat_parts, 0);
            collective.all_reduce_sum(&mut flat).with_context(|| {
                format!(
                    "summing gradient bucket {index} ({} parameters from '{}')",
                    bucket.names.len(),
                    bucket.names[0]
                )
            })?;
            let mut offset = 0i64;
            for (g, p) in grads.iter().zip(&bucket.params) {
                let n = p.numel() as i64;
                if g.defined() {
                    let mut g = g.shallow_clone();
                    g.copy_(&flat.narrow(0, offset, n).view_as(&g));
                }
                offset += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::local::on_ranks;
    use crate::parallel::Shard;
    use tch::Device;

    fn param(name: &str, shape: &[i64], kind: Kind) -> Param {
        Param::new(
            name.into(),
            Tensor::zeros(shape, (kind, Device::Cpu)).set_requires_grad(true),
        )
    }

    #[test]
    fn plan_goes_backward_and_respects_the_cap_and_kinds() {
        // f32: a 10 x 10 = 400 bytes, b 10 = 40, c 100 = 400, d 5 = 10 bytes in bf16, e 30 = 120.
        let params = [
            param("a", &[10, 10], Kind::Float),
            param("b", &[10], Kind::Float),
            param("c", &[100], Kind::Float),
            param("d", &[5], Kind::BFloat16),
            param("e", &[30], Kind::Float),
        ];
        let refs: Vec<&Param> = params.iter().collect();
        let plan = GradientBuckets::plan(&refs, 450);
        // Backward: e (120), then d (other kind: new bucket), then c (400: new, kind
        // change), b (400 + 40 <= 450: joins c), a (400: over the cap: own bucket).
        assert_eq!(
            plan.names(),
            vec![vec!["e"], vec!["d"], vec!["c", "b"], vec!["a"]]
        );
        // A cap below every parameter: one bucket each; a huge cap: one per kind run.
        assert_eq!(GradientBuckets::plan(&refs, 1).names().len(), 5);
        assert_eq!(
            GradientBuckets::plan(&refs, usize::MAX).names(),
            vec![vec!["e"], vec!["d"], vec!["c", "b", "a"]]
        );
        let all: Vec<String> = plan.names().concat();
        assert_eq!(all, vec!["e", "d", "c", "b", "a"]);
    }

    /// Inputs and targets of a deterministic regression problem, in f64.
    fn problem(rows: usize, inputs: usize, outputs: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let value = |i: usize, j: usize, salt: usize| {
            (((i * 31 + j * 17 + salt * 7) % 23) as f64 - 11.0) / 7.0
        };
        let x = (0..rows)
            .map(|i| (0..inputs).map(|j| value(i, j, 1)).collect())
            .collect();
        let t = (0..rows)
            .map(|i| (0..outputs).map(|j| value(i, j, 2)).collect())
            .collect();
        (x, t)
    }

    fn weights(inputs: usize, outputs: usize) -> (Vec<f64>, Vec<f64>) {
        let w = (0..outputs * inputs)
            .map(|k| ((k * 13 % 19) as f64 - 9.0) / 10.0)
            .collect();
        let b = (0..outputs).map(|k| (k as f64 - 1.0) / 4.0).collect();
        (w, b)
    }

    /// The gradient of the mean over all rows of 0.5 ||W x + b - t||^2, in plain f64:
    /// the reference the ranks' summed gradients must equal.
    fn reference_gradient(
        x: &[Vec<f64>],
        t: &[Vec<f64>],
        w: &[f64],
        b: &[f64],
    ) -> (Vec<f64>, Vec<f64>) {
        let (outputs, inputs) = (b.len(), x[0].len());
        let mut dw = vec![0.0; outputs * inputs];
        let mut db = vec![0.0; outputs];
        for (xi, ti) in x.iter().zip(t) {
            for o in 0..outputs {
                let y: f64 = (0..inputs).map(|j| w[o * inputs + j] * xi[j]).sum::<f64>() + b[o];
                let r = (y - ti[o]) / x.len() as f64;
                db[o] += r;
                for j in 0..inputs {
                    dw[o * inputs + j] += r * xi[j];
                }
            }
        }
        (dw, db)
    }

    /// One rank's gradients, as the trainer computes them: its shard of the rows in
    /// micro-batches, each micro-batch's mean loss weighted by its share of the global
    /// batch, then the buckets summed over the ranks.
    fn rank_gradients(
        g: &dyn Collective,
        x: &[Vec<f64>],
        t: &[Vec<f64>],
        micro_batch: usize,
        bucket_bytes: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let (outputs, inputs) = (t[0].len(), x[0].len());
        let (w0, b0) = weights(inputs, outputs);
        let w = Param::new(
            "w".into(),
            Tensor::from_slice(&w0)
                .reshape([outputs as i64, inputs as i64])
                .set_requires_grad(true),
        );
        let b = Param::new("b".into(), Tensor::from_slice(&b0).set_requires_grad(true));
        let rows = Shard::of(g).range(x.len());
        let mine: Vec<usize> = rows.collect();
        for chunk in mine.chunks(micro_batch) {
            let xs: Vec<f64> = chunk.iter().flat_map(|&i| x[i].clone()).collect();
            let ts: Vec<f64> = chunk.iter().flat_map(|&i| t[i].clone()).collect();
            let xs = Tensor::from_slice(&xs).reshape([chunk.len() as i64, inputs as i64]);
            let ts = Tensor::from_slice(&ts).reshape([chunk.len() as i64, outputs as i64]);
            let y = xs.matmul(&w.tensor.tr()) + &b.tensor;
            let per_row = (y - ts).square().sum_dim_intlist(1, false, Kind::Double) * 0.5;
            let loss = per_row.mean(Kind::Double) * (chunk.len() as f64 / x.len() as f64);
            loss.backward();
        }
        let plan = GradientBuckets::plan(&[&w, &b], bucket_bytes);
        plan.all_reduce_sum(g).unwrap();
        (
            Vec::<f64>::try_from(&w.tensor.grad().reshape([-1])).unwrap(),
            Vec::<f64>::try_from(&b.tensor.grad()).unwrap(),
        )
    }

    fn assert_close(got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                "{what}[{i}]: {a} against {b}"
            );
        }
    }

    #[test]
    fn summed_rank_gradients_equal_the_union_batch_gradient() {
        let (inputs, outputs) = (6, 3);
        for rows in [12usize, 13] {
            let (x, t) = problem(rows, inputs, outputs);
            let (w, b) = weights(inputs, outputs);
            let (dw, db) = reference_gradient(&x, &t, &w, &b);
            // Even and uneven shards, micro-batches that split the shards unevenly, and
            // buckets of one parameter each (8 bytes) or both together.
            for world in [1usize, 2, 3, 4, 5] {
                for (micro_batch, bucket_bytes) in [(2usize, 8usize), (4, DEFAULT_BUCKET_BYTES)] {
                    let results = on_ranks(world, |g| {
                        rank_gradients(g, &x, &t, micro_batch, bucket_bytes)
                    });
                    for (rank, (gw, gb)) in results.iter().enumerate() {
                        let what =
                            format!("rows {rows} world {world} rank {rank} micro {micro_batch}");
                        assert_close(gw, &dw, &format!("{what} dW"));
                        assert_close(gb, &db, &format!("{what} db"));
                    }
                }
            }
        }
    }

    #[test]
    fn equal_shards_mean_of_rank_means_is_the_global_mean() {
        // With equal shards, a rank's loss weighted by its share is its mean loss / N: the
        // sum over ranks is the mean over ranks of per-rank mean losses, the global mean.
        let values: Vec<f64> = (0..12).map(|i| (i * i % 7) as f64 + 0.25).collect();
        let global = values.iter().sum::<f64>() / values.len() as f64;
        for world in [1usize, 2, 3, 4, 6] {
            let per_rank_means: Vec<f64> = (0..world)
                .map(|r| {
                    let range = Shard::new(r, world).unwrap().range(values.len());
                    values[range.clone()].iter().sum::<f64>() / range.len() as f64
                })
                .collect();
            let mean_of_means = per_rank_means.iter().sum::<f64>() / world as f64;
            assert!((mean_of_means - global).abs() < 1e-12, "world {world}");
            let summed = on_ranks(world, |g| {
                let mut t = Tensor::from_slice(&[per_rank_means[g.rank()] / world as f64]);
                g.all_reduce_sum(&mut t).unwrap();
                t.double_value(&[0])
            });
            assert!(
                summed.iter().all(|s| (s - global).abs() < 1e-12),
                "world {world}"
            );
        }
    }
}
