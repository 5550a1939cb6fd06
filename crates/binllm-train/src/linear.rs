//! The block linear layer every q/k/v/o/gate/up/down projection uses, and the weight forms
//! it can take: the full-precision weight, the Stage-1 binarized form, the paper's
//! progressive form, the final sign form, and the baselines (STE, ternary, OneBit).
//!
//! All forms compute one effective weight `[out, in]` and then a plain `x @ W^T (+ b)`:
//! the Stage-1 input scale `s` multiplies the weight's columns rather than the activations,
//! which is the same function (`Q(W/s) @ (s*x) = (Q(W/s) diag(s)) @ x`) at a fraction of the
//! memory traffic during training.

use tch::{Kind, Tensor};

/// `F(x, t) = tanh(t x) / tanh(t)`: the identity as t -> 0, sign(x) as t -> inf.
/// Written with ordinary differentiable ops, so autograd gives the exact derivative
/// `t (1 - tanh(t x)^2) / tanh(t)` (no straight-through estimator).
pub fn progressive_sign(x: &Tensor, t: f64) -> Tensor {
    if t <= 1e-6 {
        // tanh(t x)/tanh(t) -> x; dividing two vanishing numbers would only add rounding.
        return x.shallow_clone();
    }
    // tanh saturates to exactly +-1 for large t: no overflow, no NaN.
    (x * t).tanh() / t.tanh()
}

/// sign with sign(0) = +1, so every weight is exactly +-1.
pub fn sign_pm1(x: &Tensor) -> Tensor {
    x.ge(0.0).to_kind(x.kind()) * 2.0 - 1.0
}

/// Forward sign(x), backward the clipped straight-through estimator (gradient 1 where
/// |x| <= 1, else 0). Written as `sign + (c - c.detach())` rather than `c + (sign - c)
/// .detach()`: the added term is exactly zero, so the forward value is exactly +-1 and a
/// model trained in this form computes bit for bit what the sign form ships.
pub fn ste_sign(x: &Tensor) -> Tensor {
    let clipped = x.clamp(-1.0, 1.0);
    sign_pm1(x) + (&clipped - clipped.detach())
}

/// The smallest analytical scale: a row of zeros (pruned rows, or zero blocks of a
/// quantized file) would otherwise divide 0 by 0 in `W / S_a`.
const MIN_ROW_SCALE: f64 = 1e-12;

/// Per-row mean of |W|: the analytical scale S_a (at least [`MIN_ROW_SCALE`]).
pub fn row_abs_mean(w: &Tensor) -> Tensor {
    w.abs()
        .mean_dim(&[-1i64][..], true, w.kind())
        .clamp_min(MIN_ROW_SCALE)
}

/// How a block linear turns its parameters into the weight it multiplies by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightForm {
    /// The latent weight as it is, `W~ diag(s)`: the full-precision function.
    Full,
    /// Stage 1 (binary-aware initialisation): `Q(W/s) diag(s)` with `Q(V) = mean|V| sign(V)`,
    /// the gradient reaching `s` through `surrogate`.
    Stage1 { surrogate: Stage1Surrogate },
    /// The paper's Stage-2 form: `S_l S_a F(W~/S_a, t) diag(s)`.
    Progressive { t: f64 },
    /// The exported form: `(S_l S_a) sign(W~) diag(s)`.
    Sign,
    /// Baseline: the sign form in the forward pass, clipped straight-through backward.
    Ste,
    /// Baseline: BitNet b1.58 absmean ternary weights with a straight-through estimator.
    Ternary,
    /// Baseline: OneBit's `diag(a) sign(W~) diag(b)`, straight-through through the sign.
    OneBit,
}

/// How Stage 1 lets the gradient through `sign`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage1Surrogate {
    /// Straight-through, clipped to |V / S_a| <= 1 (our default).
    ClippedSte,
    /// The progressive function F with a large t (its exact gradient).
    Progressive { t: f64 },
}

/// Which per-row scales the binary forms use (an ablation switch of the paper).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ScaleMode {
    /// S_l (learned, init 1) times S_a (recomputed from W~ every forward): the paper's.
    Dual,
    /// S_a only; S_l stays 1 and is not trained.
    Analytical,
    /// One learned scale per row: S_l times S_a frozen at its initial value.
    Learnable,
}

/// A named parameter tensor. Names follow the Hugging Face layout (`...q_proj.weight`) with
/// binllm's additions (`...q_proj.row_scale`, `...q_proj.input_scale`).
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
}

impl Param {
    pub fn new(name: String, tensor: Tensor) -> Self {
        Param { name, tensor }
    }

    fn share(&self) -> Param {
        Param::new(self.name.clone(), self.tensor.shallow_clone())
    }
}

/// One block linear: the latent weight `W~` (`[out, in]`), its optional bias, and the
/// vectors the binary forms add.
#[derive(Debug)]
pub struct BlockLinear {
    pub weight: Param,
    pub bias: Option<Param>,
    /// Stage-1 input scale `s` (`[in]`); possibly shared with sibling linears (q/k/v,
    /// gate/up) so it can fold into the preceding RMSNorm at export.
    pub input_scale: Option<Param>,
    /// Learned row scale S_l (`[out, 1]`), or OneBit's output vector `a`.
    pub row_scale: Option<Param>,
    /// S_a frozen at initialisation ([`ScaleMode::Learnable`]), `[out, 1]`; never trained.
    pub frozen_abs_mean: Option<Param>,
    /// OneBit's input vector `b` (`[in]`).
    pub column_scale: Option<Param>,
    pub detach_abs_mean: bool,
    /// When set, `input_scale` holds one value per (kv head, dim) and is expanded over the
    /// `group` query heads sharing each kv head: `[kv_heads, group, head_dim]`. That is what
    /// lets o_proj's scale fold exactly into v_proj's rows at export.
    pub input_scale_groups: Option<[i64; 3]>,
}

impl BlockLinear {
    pub fn new(weight: Param, bias: Option<Param>) -> Self {
        BlockLinear {
            weight,
            bias,
            input_scale: None,
            row_scale: None,
            frozen_abs_mean: None,
            column_scale: None,
            detach_abs_mean: false,
            input_scale_groups: None,
        }
    }

    pub fn out_features(&self) -> i64 {
        self.weight.tensor.size()[0]
    }

    pub fn in_features(&self) -> i64 {
        self.weight.tensor.size()[1]
    }

    /// The Stage-1 input scale as a `[in]` vector (expanded over head groups when tied);
    /// `[layers, in]` for a [stacked](BlockLinear::stacked) linear.
    pub fn input_scale_vector(&self) -> Option<Tensor> {
        let s = &self.input_scale.as_ref()?.tensor;
        Some(match self.input_scale_groups {
            Some([kv_heads, group, head_dim]) => {
                let layers: Vec<i64> = s.size()[..s.dim() - 1].to_vec();
                let shape = |dims: [i64; 3]| [layers.as_slice(), &dims].concat();
                let flat = [layers.as_slice(), &[-1]].concat();
                s.view(shape([kv_heads, 1, head_dim]).as_slice())
                    .expand(shape([kv_heads, group, head_dim]).as_slice(), false)
                    .reshape(flat.as_slice())
            }
            None => s.shallow_clone(),
        })
    }

    /// Whether [`BlockLinear::stacked`] computes `form` for this layer exactly as
    /// [`BlockLinear::effective_weight`] does: every form whose arithmetic is per row or per
    /// column (not Ternary's one scale per matrix, not OneBit's, and not Stage 1, which runs
    /// a few steps only).
    pub fn stacks(form: WeightForm) -> bool {
        matches!(
            form,
            WeightForm::Progressive { .. } | WeightForm::Sign | WeightForm::Ste
        )
    }

    /// One linear holding `linears` (the same projection of every layer, all of one shape
    /// and with the same vectors) stacked along a new first dimension, so a form's
    /// effective weights for all layers come from one chain of tensor ops instead of one
    /// chain per layer: the same values (every op is per element, per row or per column),
    /// and the gradient flows back to each layer's parameters through the stack. None when
    /// the layers differ in shape or in which vectors they have.
    pub fn stacked(linears: &[&BlockLinear]) -> Option<BlockLinear> {
        let first = linears.first()?;
        let same = linears.iter().all(|l| {
            l.weight.tensor.size() == first.weight.tensor.size()
                && l.input_scale.is_some() == first.input_scale.is_some()
                && l.row_scale.is_some() == first.row_scale.is_some()
                && l.frozen_abs_mean.is_some() == first.frozen_abs_mean.is_some()
                && l.column_scale.is_some() == first.column_scale.is_some()
                && l.detach_abs_mean == first.detach_abs_mean
                && l.input_scale_groups == first.input_scale_groups
        });
        if !same {
            return None;
        }
        let stack = |pick: &dyn Fn(&BlockLinear) -> Option<&Param>| -> Option<Param> {
            let tensors: Vec<&Tensor> = linears
                .iter()
                .map(|l| pick(l).map(|p| &p.tensor))
                .collect::<Option<_>>()?;
            let name = format!("stacked {}", pick(first)?.name);
            Some(Param::new(name, Tensor::stack(&tensors, 0)))
        };
        Some(BlockLinear {
            weight: stack(&|l| Some(&l.weight))?,
            bias: None,
            input_scale: stack(&|l| l.input_scale.as_ref()),
            row_scale: stack(&|l| l.row_scale.as_ref()),
            frozen_abs_mean: stack(&|l| l.frozen_abs_mean.as_ref()),
            column_scale: stack(&|l| l.column_scale.as_ref()),
            detach_abs_mean: first.detach_abs_mean,
            input_scale_groups: first.input_scale_groups,
        })
    }

    /// S_a as the current scale mode defines it.
    fn analytical_scale(&self, latent: &Tensor) -> Tensor {
        match &self.frozen_abs_mean {
            Some(frozen) => frozen.tensor.shallow_clone(),
            None if self.detach_abs_mean => row_abs_mean(latent).detach(),
            None => row_abs_mean(latent),
        }
    }

    /// S_l S_a: the per-row scale of the binary forms.
    fn binary_row_scale(&self, latent: &Tensor) -> Tensor {
        let sa = self.analytical_scale(latent);
        match &self.row_scale {
            Some(sl) => &sl.tensor * sa,
            None => sa,
        }
    }

    /// The weight this layer multiplies by under `form`.
    pub fn effective_weight(&self, form: WeightForm) -> Tensor {
        let latent = &self.weight.tensor;
        let weight = match form {
            WeightForm::Full => latent.shallow_clone(),
            WeightForm::Stage1 { surrogate } => {
                // Stage 1 keeps W fixed and learns s: V = W / s, binarized, then * s below.
                let v = match self.input_scale_vector() {
                    Some(s) => latent / s,
                    None => latent.shallow_clone(),
                };
                let sa = row_abs_mean(&v);
                let unit = &v / &sa;
                let signs = match surrogate {
                    Stage1Surrogate::ClippedSte => ste_sign(&unit),
                    Stage1Surrogate::Progressive { t } => progressive_sign(&unit, t),
                };
                sa * signs
            }
            WeightForm::Progressive { t } => {
                let sa = self.analytical_scale(latent);
                let scale = match &self.row_scale {
                    Some(sl) => &sl.tensor * &sa,
                    None => sa.shallow_clone(),
                };
                scale * progressive_sign(&(latent / &sa), t)
            }
            WeightForm::Sign => self.binary_row_scale(latent) * sign_pm1(latent),
            WeightForm::Ste => {
                let sa = self.analytical_scale(latent);
                let scale = match &self.row_scale {
                    Some(sl) => &sl.tensor * &sa,
                    None => sa.shallow_clone(),
                };
                scale * ste_sign(&(latent / &sa))
            }
            WeightForm::Ternary => {
                // BitNet b1.58: one absmean scale per matrix, round-clip to {-1, 0, 1}.
                let gamma = latent.abs().mean(latent.kind()) + 1e-8;
                let ternary = (latent / &gamma).round().clamp(-1.0, 1.0) * &gamma;
                latent + (ternary - latent).detach()
            }
            WeightForm::OneBit => {
                let a = &self
                    .row_scale
                    .as_ref()
                    .expect("OneBit needs its row vector")
                    .tensor;
                let b = &self
                    .column_scale
                    .as_ref()
                    .expect("OneBit needs its column vector")
                    .tensor;
                let sa = row_abs_mean(latent).detach();
                a * ste_sign(&(latent / sa)) * b.unsqueeze(0)
            }
        };
        match self.input_scale_vector() {
            // [in] -> [1, in], or [layers, in] -> [layers, 1, in] when stacked.
            Some(s) => weight * s.unsqueeze(-2),
            None => weight,
        }
    }

    pub fn forward(&self, x: &Tensor, form: WeightForm) -> Tensor {
        self.apply(x, &self.effective_weight(form))
    }

    /// `x @ weight^T (+ bias)` with an effective weight already built.
    pub fn apply(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        x.linear(weight, self.bias.as_ref().map(|b| &b.tensor))
    }

    /// Relative Frobenius error of the Stage-1 binarized weight against the full one.
    pub fn binary_reconstruction_error(&self, surrogate: Stage1Surrogate) -> f64 {
        tch::no_grad(|| {
            let full = self.effective_weight(WeightForm::Full);
            let binary = self.effective_weight(WeightForm::Stage1 { surrogate });
            let err = (&binary - &full).norm().double_value(&[]);
            err / full.norm().double_value(&[]).max(1e-30)
        })
    }

    /// All parameters of this layer, in a fixed order (shared input scales included: the
    /// caller de-duplicates by name).
    pub fn params(&self) -> Vec<&Param> {
        [
            Some(&self.weight),
            self.bias.as_ref(),
            self.input_scale.as_ref(),
            self.row_scale.as_ref(),
            self.column_scale.as_ref(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        [
            Some(&mut self.weight),
            self.bias.as_mut(),
            self.input_scale.as_mut(),
            self.row_scale.as_mut(),
            self.column_scale.as_mut(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Adds the Stage-1 input scale (ones), shared through `shared` when given, and with
    /// `groups` (`[kv_heads, group, head_dim]`) stored once per kv head.
    pub fn attach_input_scale(
        &mut self,
        shared: Option<&Param>,
        name: String,
        groups: Option<[i64; 3]>,
    ) {
        let len = match groups {
            Some([kv_heads, _, head_dim]) => kv_heads * head_dim,
            None => self.in_features(),
        };
        self.input_scale_groups = groups;
        self.input_scale = Some(match shared {
            Some(p) => p.share(),
            None => Param::new(
                name,
                Tensor::ones([len], (Kind::Float, self.weight.tensor.device())),
            ),
        });
    }

    /// Adds S_l (ones) and, for [`ScaleMode::Learnable`], freezes S_a at its current value.
    pub fn attach_row_scale(&mut self, mode: ScaleMode, detach_abs_mean: bool) {
        let device = self.weight.tensor.device();
        self.detach_abs_mean = detach_abs_mean;
        if mode == ScaleMode::Learnable {
            let name = self.weight.name.replace(".weight", ".frozen_abs_mean");
            self.frozen_abs_mean = Some(Param::new(
                name,
                tch::no_grad(|| row_abs_mean(&self.weight.tensor)),
            ));
        }
        if mode != ScaleMode::Analytical {
            let name = self.weight.name.replace(".weight", ".row_scale");
            self.row_scale = Some(Param::new(
                name,
                Tensor::ones([self.out_features(), 1], (Kind::Float, device)),
            ));
        }
    }

    /// OneBit's initialisation: `|W| ~ a b^T` (rank one, by power iteration on |W|, whose
    /// leading singular vectors are non-negative), so `W ~ diag(a) sign(W) diag(b)`.
    pub fn attach_onebit_vectors(&mut self) {
        let (a, b) = tch::no_grad(|| {
            let abs = self.weight.tensor.abs().to_kind(Kind::Double);
            let mut v = Tensor::ones([self.in_features()], (Kind::Double, abs.device()));
            v = &v / v.norm();
            let mut u = abs.mv(&v);
            for _ in 0..50 {
                u = abs.mv(&v);
                u = &u / u.norm();
                v = abs.tr().mv(&u);
                v = &v / v.norm();
            }
            let sigma = u.dot(&abs.mv(&v));
            let root = sigma.sqrt();
            (
                (&u * &root).unsqueeze(1).to_kind(Kind::Float),
                (&v * &root).to_kind(Kind::Float),
            )
        });
        let row = self.weight.name.replace(".weight", ".row_scale");
        let col = self.weight.name.replace(".weight", ".column_scale");
        self.row_scale = Some(Param::new(row, a));
        self.column_scale = Some(Param::new(col, b));
    }
}
