//! AdamW with PyTorch's update rule, step for step (`torch.optim.AdamW`, single-tensor path),
//! and state that can be saved and restored so a resumed run continues exactly.

use candle_core::{Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One parameter and its two moments.
#[derive(Debug)]
pub struct Slot {
    pub name: String,
    pub param: Var,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub slots: Vec<Slot>,
    /// Steps taken so far (the bias corrections use it).
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let zeros = param.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                    param,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            slots,
            step: 0,
        })
    }

    /// Applies one update with `grad(name)` for each parameter (a parameter without a gradient,
    /// e.g. a frozen one, is left untouched and keeps its moments).
    pub fn step(&mut self, grad: impl Fn(&Var) -> Option<Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        for slot in &mut self.slots {
            let Some(g) = grad(&slot.param) else {
                continue;
            };
            let p = slot
                .param
                .as_tensor()
                .affine(1.0 - lr * c.weight_decay, 0.0)?;
            // lerp: m + (1 − β1)(g − m)
            slot.exp_avg = (&slot.exp_avg + ((&g - &slot.exp_avg)? * (1.0 - c.beta1))?)?;
            slot.exp_avg_sq = ((&slot.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((slot.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + c.eps)?;
            let update = (&slot.exp_avg / denom)?.affine(-step_size, 0.0)?;
            slot.param.set(&(p + update)?)?;
        }
        Ok(())
    }

    /// The moments, named `exp_avg.<tensor>` / `exp_avg_sq.<tensor>` (what a checkpoint saves).
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("exp_avg.{}", s.name), s.exp_avg.clone()),
                    (format!("exp_avg_sq.{}", s.name), s.exp_avg_sq.clone()),
                ]
            })
            .collect()
    }
}
