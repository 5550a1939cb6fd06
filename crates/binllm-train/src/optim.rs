//! AdamW over named parameters, on PyTorch's fused kernel, with gradient clipping and the
//! state a checkpoint needs to resume exactly.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use crate::linear::Param;
use crate::shim::{self, AdamState};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// How one parameter is updated: its learning rate as a multiple of the step's, and
/// whether weight decay applies to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroup {
    pub lr_mult: f64,
    pub decay: bool,
}

struct Slot {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    group: ParamGroup,
}

/// AdamW with decoupled weight decay, by default on matrices only (norms, biases and scale
/// vectors are not decayed: pulling a scale towards zero would fight the method).
pub struct AdamW {
    config: AdamWConfig,
    slots: BTreeMap<String, Slot>,
}

impl AdamW {
    pub fn new(params: &[&Param], config: AdamWConfig) -> Self {
        AdamW::with_groups(params, config, |_, t| ParamGroup {
            lr_mult: 1.0,
            // Matrices only: a `[out, 1]` row scale is a vector in disguise.
            decay: t.dim() >= 2 && t.size().iter().all(|&d| d > 1),
        })
    }

    /// AdamW whose parameters each get the group `group(name, tensor)` says.
    pub fn with_groups(
        params: &[&Param],
        config: AdamWConfig,
        group: impl Fn(&str, &Tensor) -> ParamGroup,
    ) -> Self {
        let slots = params
            .iter()
            .map(|p| {
                let t = &p.tensor;
                let slot = Slot {
                    param: t.shallow_clone(),
                    exp_avg: t.zeros_like().detach(),
                    exp_avg_sq: t.zeros_like().detach(),
                    step: Tensor::zeros([], (Kind::Float, t.device())),
                    group: group(&p.name, t),
                };
                (p.name.clone(), slot)
            })
            .collect();
        AdamW { config, slots }
    }

    /// The group of the parameter named `name`, if this optimizer holds it.
    pub fn group_of(&self, name: &str) -> Option<ParamGroup> {
        self.slots.get(name).map(|s| s.group)
    }

    /// Global L2 norm of all gradients (parameters without a gradient count as zero).
    pub fn grad_norm(&self) -> Tensor {
        let norms: Vec<Tensor> = self
            .slots
            .values()
            .filter_map(|s| {
                let g = s.param.grad();
                g.defined().then(|| g.to_kind(Kind::Float).norm())
            })
            .collect();
        Tensor::stack(&norms, 0).norm()
    }

    /// Scales the gradients down so their global norm is at most `max_norm`.
    pub fn clip_gradients(&self, total_norm: f64, max_norm: f64) {
        if max_norm <= 0.0 || total_norm <= max_norm {
            return;
        }
        let factor = max_norm / (total_norm + 1e-6);
        tch::no_grad(|| {
            for s in self.slots.values() {
                let mut g = s.param.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(factor);
                }
            }
        });
    }

    /// One update at learning rate `lr` (times each group's multiplier), then drops the
    /// gradients. One fused call per distinct group.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let mut groups: Vec<ParamGroup> = Vec::new();
        for s in self.slots.values() {
            if !groups.contains(&s.group) {
                groups.push(s.group);
            }
        }
        for group in groups {
            let grads: Vec<(&Slot, Tensor)> = self
                .slots
                .values()
                .filter(|s| s.group == group)
                .filter_map(|s| {
                    let g = s.param.grad();
                    g.defined().then_some((s, g))
                })
                .collect();
            if grads.is_empty() {
                continue;
            }
            let states: Vec<AdamState> = grads
                .iter()
                .map(|(s, g)| AdamState {
                    param: &s.param,
                    grad: g,
                    exp_avg: &s.exp_avg,
                    exp_avg_sq: &s.exp_avg_sq,
                    step: &s.step,
                })
                .collect();
            let wd = if group.decay {
                self.config.weight_decay
            } else {
                0.0
            };
            let group_lr = lr * group.lr_mult;
            tch::no_grad(|| {
                shim::fused_adamw(&states, group_lr, self.config.betas, wd, self.config.eps)
            })?;
        }
        let params: Vec<&Tensor> = self.slots.values().map(|s| &s.param).collect();
        shim::set_grads_to_none(&params);
        Ok(())
    }

    /// The optimizer state as named tensors for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, s) in &self.slots {
            out.insert(format!("adamw.exp_avg.{name}"), s.exp_avg.shallow_clone());
            out.insert(
                format!("adamw.exp_avg_sq.{name}"),
                s.exp_avg_sq.shallow_clone(),
            );
            out.insert(format!("adamw.step.{name}"), s.step.shallow_clone());
        }
        out
    }

    /// Restores the state saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (name, s) in &mut self.slots {
                for (key, dst) in [
                    (format!("adamw.exp_avg.{name}"), &mut s.exp_avg),
                    (format!("adamw.exp_avg_sq.{name}"), &mut s.exp_avg_sq),
                    (format!("adamw.step.{name}"), &mut s.step),
                ] {
                    let src = tensors
                        .get(&key)
                        .with_context(|| format!("checkpoint lacks optimizer state '{key}'"))?;
                    dst.copy_(&src.view(dst.size().as_slice()).to_device(dst.device()));
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AdamW written out in float64, as in the paper by Loshchilov & Hutter / PyTorch docs.
    fn reference_adamw(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        t: i32,
        lr: f64,
        c: AdamWConfig,
    ) {
        for i in 0..p.len() {
            p[i] -= lr * c.weight_decay * p[i];
            m[i] = c.betas.0 * m[i] + (1.0 - c.betas.0) * g[i];
            v[i] = c.betas.1 * v[i] + (1.0 - c.betas.1) * g[i] * g[i];
            let mh = m[i] / (1.0 - c.betas.0.powi(t));
            let vh = v[i] / (1.0 - c.betas.1.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + c.eps);
        }
    }

    #[test]
    fn groups_take_their_own_rate_and_decay() {
        let config = AdamWConfig {
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let init = [0.5f32, -1.25, 2.0, 0.75];
        let a = Param::new(
            "a".into(),
            Tensor::from_slice(&init)
                .view([2, 2])
                .set_requires_grad(true),
        );
        let b = Param::new(
            "b".into(),
            Tensor::from_slice(&init)
                .view([2, 2])
                .set_requires_grad(true),
        );
        let mut opt = AdamW::with_groups(&[&a, &b], config, |name, _| ParamGroup {
            lr_mult: if name == "a" { 1.0 } else { 3.0 },
            decay: name == "a",
        });
        assert_eq!(
            opt.group_of("b"),
            Some(ParamGroup {
                lr_mult: 3.0,
                decay: false
            })
        );
        let k = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).view([2, 2]);
        ((&a.tensor * &k).sum(Kind::Float) + (&b.tensor * &k).sum(Kind::Float)).backward();
        let g: Vec<f64> = Vec::<f32>::try_from(k.flatten(0, -1))
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        opt.step(1e-2).unwrap();
        for (param, lr, wd) in [(&a, 1e-2, 0.1), (&b, 3e-2, 0.0)] {
            let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
            let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
            reference_adamw(
                &mut p,
                &g,
                &mut m,
                &mut v,
                1,
                lr,
                AdamWConfig {
                    weight_decay: wd,
                    ..config
                },
            );
            let ours = Vec::<f32>::try_from(param.tensor.detach().flatten(0, -1)).unwrap();
            for (x, y) in ours.iter().zip(&p) {
                assert!(
                    (*x as f64 - y).abs() < 1e-6,
                    "{}: {ours:?} vs {p:?}",
                    param.name
                );
            }
        }
    }

    #[test]
    fn fused_adamw_matches_a_float64_reference() {
        let config = AdamWConfig {
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let init = [0.5f32, -1.25, 2.0, 0.0, 3.5, -0.75];
        let weight = Tensor::from_slice(&init)
            .view([2, 3])
            .set_requires_grad(true);
        let param = Param::new("w".into(), weight.shallow_clone());
        let mut opt = AdamW::new(&[&param], config);
        let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0.0; 6], vec![0.0; 6]);
        for t in 1..=3 {
            // loss = sum(w^3 * k): gradient 3 w^2 k, different every step.
            let k = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5, -0.25, 1.5]).view([2, 3]);
            (weight.pow_tensor_scalar(3) * &k)
                .sum(Kind::Float)
                .backward();
            let g: Vec<f64> = Vec::<f32>::try_from(weight.grad().flatten(0, -1))
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .collect();
            opt.step(1e-2).unwrap();
            reference_adamw(&mut p, &g, &mut m, &mut v, t, 1e-2, config);
        }
        let ours = Vec::<f32>::try_from(weight.detach().flatten(0, -1)).unwrap();
        for (a, b) in ours.iter().zip(&p) {
            assert!((*a as f64 - b).abs() < 1e-6, "{ours:?} vs {p:?}");
        }
    }
}
