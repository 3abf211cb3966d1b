//! Training data drawn from the world, in the format `rudolph train` reads: pictures beside a
//! `data.jsonl` with one line per picture.

use super::{Scene, recipe, render, sample};
use crate::error::{Error, Result};
use crate::progress::ProgressSink;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes the pictures of `scenes` and a `data.jsonl` of their captions into `out` (created);
/// returns the `data.jsonl`.
pub fn write_scenes(scenes: &[Scene], out: &Path, progress: &dyn ProgressSink) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let jsonl = out.join("data.jsonl");
    let mut lines = std::io::BufWriter::new(std::fs::File::create(&jsonl).map_err(io(&jsonl))?);
    progress.start(scenes.len() as u64, "drawing scenes", "pictures");
    draw(scenes, "", out, &mut lines, &jsonl, progress)?;
    Ok(jsonl)
}

/// Appends `m` pictures of seen scenes (drawn from `seed`, apart from the captioned ones) with
/// their shapes in colours off the palette ([`recipe::recolour`]) to the `data.jsonl` in `out`,
/// as `recoloured-NNNNNN.png`: with no text (the model learns to draw every outline in many
/// colours, as its unconditional branch) or, when `prompted`, each prompted by its caption
/// without the colour ([`Scene::colourless_caption`]), so that the shape's word alone decides
/// the outline.
pub fn append_recoloured(
    m: usize,
    prompted: bool,
    seed: u64,
    out: &Path,
    progress: &dyn ProgressSink,
) -> Result<()> {
    use rand::SeedableRng;
    let jsonl = out.join("data.jsonl");
    let mut lines = append_to(&jsonl)?;
    let stream = seed ^ 0x7ec0_10e5;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(stream);
    progress.start(m as u64, "drawing recoloured", "pictures");
    for (i, scene) in sample(m, stream, false).iter().enumerate() {
        let name = format!("recoloured-{i:06}.png");
        let colour = recipe::recolour(scene, &mut rng);
        crate::image::save_image(&render::render_in(scene, colour), &out.join(&name))?;
        let line = match prompted {
            true => serde_json::json!({ "image": name, "prompt": scene.colourless_caption() }),
            false => serde_json::json!({ "image": name }),
        };
        writeln!(lines, "{line}").map_err(io(&jsonl))?;
        progress.advance(1);
    }
    progress.finish();
    lines.flush().map_err(io(&jsonl))?;
    Ok(())
}

/// Appends `m` captioned scenes of the held-out colour+shape pairs (drawn from `seed`, apart
/// from the seen ones) to the `data.jsonl` in `out`, as `held-out-NNNNNN.png`: training on
/// them beside seen scenes teaches a model those pairs without forgetting the others.
pub fn append_held_out(m: usize, seed: u64, out: &Path, progress: &dyn ProgressSink) -> Result<()> {
    let jsonl = out.join("data.jsonl");
    let mut lines = append_to(&jsonl)?;
    progress.start(m as u64, "drawing held-out scenes", "pictures");
    let scenes = sample(m, seed ^ 0x04e1_d0a7, true);
    draw(&scenes, "held-out-", out, &mut lines, &jsonl, progress)
}

/// Renders each scene into `out` as `PREFIXNNNNNN.png` and writes its line of `data.jsonl`
/// (exactly the trainer's format; the caption states every attribute of the scene), advancing
/// `progress` once a picture and finishing it.
fn draw(
    scenes: &[Scene],
    prefix: &str,
    out: &Path,
    lines: &mut impl Write,
    jsonl: &Path,
    progress: &dyn ProgressSink,
) -> Result<()> {
    for (i, scene) in scenes.iter().enumerate() {
        let name = format!("{prefix}{i:06}.png");
        crate::image::save_image(&render::render(scene), &out.join(&name))?;
        let line = serde_json::json!({ "image": name, "text": scene.caption() });
        writeln!(lines, "{line}").map_err(io(jsonl))?;
        progress.advance(1);
    }
    progress.finish();
    lines.flush().map_err(io(jsonl))?;
    Ok(())
}

/// A writer that adds lines to the end of an existing `data.jsonl`.
fn append_to(jsonl: &Path) -> Result<std::io::BufWriter<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(jsonl)
        .map_err(io(jsonl))?;
    Ok(std::io::BufWriter::new(file))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
