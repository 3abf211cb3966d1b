//! Development aid: reconstructions of a VQGAN checkpoint from `rudolph world train`.
use rudolph::world::recipe::{picture_batch, reconstruction_rates, vqgan_config};
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(&args[1]);
    let yml = dir.join("check.config.yml");
    std::fs::write(&yml, serde_yaml::to_string(&vqgan_config())?)?;
    let dev = candle_core::Device::Cpu;
    let vae = rudolph::vae::Vqgan::load(&dir.join("weights.safetensors"), Some(&yml), &dev)?;
    let scenes = rudolph::world::sample(16, 99, false);
    let (img, _) = picture_batch(&scenes, 1.0, &dev)?;
    let codes = vae.encode_codes(&img)?;
    let rec = vae.decode_codes(&codes)?;
    let both = candle_core::Tensor::cat(&[img, rec], 0)?;
    let grid = rudolph::image::grid(&both, 16)?;
    rudolph::image::save_png(&rudolph::image::to_rgb8(&grid)?, &dir.join("check.png"))?;
    let n: usize = args.get(2).map_or(50, |s| s.parse().unwrap());
    println!(
        "{}",
        serde_json::to_string(&reconstruction_rates(
            &vae,
            &rudolph::world::sample(n, 5, false)
        )?)?
    );
    println!(
        "{}",
        serde_json::to_string(&reconstruction_rates(
            &vae,
            &rudolph::world::sample(n, 5, true)
        )?)?
    );
    Ok(())
}
