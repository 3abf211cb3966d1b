use candle_core::{DType, Device, Tensor};
use rudolph::config::Config;
use rudolph::model::{Rudolph, masks};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let cfg = Config::preset("350m")?;
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let model = Rudolph::random(&cfg, 0, DType::F32, &dev)?;
    println!("build {:?}", t0.elapsed());
    let t = cfg.total_seq_length();
    let mask = masks::causal_mask(1, t, &dev)?;
    let ids = Tensor::zeros((1, t), DType::U32, &dev)?;
    for _ in 0..2 {
        let t0 = Instant::now();
        let _ = model.forward(&ids, &mask)?;
        println!("forward B=1 S={t}: {:?}", t0.elapsed());
    }
    for b in [1usize, 8] {
        let mut cache = model.new_cache();
        let mask = masks::causal_mask(1, t, &dev)?;
        let prompt = Tensor::zeros((b, 64), DType::U32, &dev)?;
        let t0 = Instant::now();
        model.forward_cached_last(&prompt, &mask, &mut cache)?;
        println!("prompt b={b}: {:?}", t0.elapsed());
        let one = Tensor::zeros((b, 1), DType::U32, &dev)?;
        let t0 = Instant::now();
        let steps = 16;
        for _ in 0..steps {
            model.forward_cached_last(&one, &mask, &mut cache)?;
        }
        let dt = t0.elapsed().as_secs_f64() / steps as f64;
        println!(
            "step b={b}: {:.1} ms/step, {:.1} tok/s",
            dt * 1e3,
            b as f64 / dt
        );
    }
    Ok(())
}
