//! The loss-curve PNG, drawn pixel by pixel (no plotting dependency): axes with tick labels and
//! names (STEP, LOSS) in a tiny bitmap font, the training loss as a blue line, validation losses
//! as red squares, and a legend naming both. The y axis spans 0 to the highest loss.

use crate::error::Result;
use image::{Rgb, RgbImage};
use std::path::Path;

/// The points to draw: `(step, loss)`.
#[derive(Debug, Clone, Default)]
pub struct Curve {
    pub train: Vec<(u64, f32)>,
    pub val: Vec<(u64, f32)>,
}

const WIDTH: u32 = 640;
const HEIGHT: u32 = 400;
const MARGIN: i64 = 40;
const X_NAME: &str = "STEP";
const Y_NAME: &str = "LOSS";
const TRAIN_NAME: &str = "TRAINING";
const VAL_NAME: &str = "VALIDATION";

/// Draws `curve` into a PNG at `path`.
pub fn draw_loss_curve(curve: &Curve, path: &Path) -> Result<()> {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let (w, h) = (WIDTH as i64, HEIGHT as i64);
    let black = Rgb([0, 0, 0]);
    let grey = Rgb([220, 220, 220]);
    let max_loss_for_ticks = curve
        .train
        .iter()
        .chain(&curve.val)
        .map(|p| p.1)
        .filter(|l| l.is_finite())
        .fold(0f32, f32::max)
        .max(1e-6);
    // Quarter grid lines, each labelled with its loss.
    for q in 0..=4 {
        let y = h - MARGIN - (h - 2 * MARGIN) * q / 4;
        if q > 0 {
            line(&mut img, (MARGIN, y), (w - MARGIN, y), grey);
        }
        let label = format!("{:.2}", max_loss_for_ticks * q as f32 / 4.0);
        text(&mut img, 2, (y - 5).max(0), &label, black);
    }
    line(
        &mut img,
        (MARGIN, h - MARGIN),
        (w - MARGIN, h - MARGIN),
        black,
    );
    line(&mut img, (MARGIN, MARGIN), (MARGIN, h - MARGIN), black);
    let points = curve.train.iter().chain(&curve.val);
    let max_step = points.clone().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let max_loss = points
        .map(|p| p.1)
        .filter(|l| l.is_finite())
        .fold(0f32, f32::max)
        .max(1e-6) as f64;
    let at = |(step, loss): (u64, f32)| -> (i64, i64) {
        let x = MARGIN + ((w - 2 * MARGIN) as f64 * step as f64 / max_step) as i64;
        let frac = if loss.is_finite() {
            loss as f64 / max_loss
        } else {
            1.0
        };
        let y = h - MARGIN - ((h - 2 * MARGIN) as f64 * frac) as i64;
        (x, y)
    };
    text(&mut img, MARGIN - 4, h - MARGIN + 8, "0", black);
    let last = format!("{}", max_step as u64);
    text(
        &mut img,
        w - MARGIN - 8 * last.len() as i64 + 8,
        h - MARGIN + 8,
        &last,
        black,
    );
    // The axes' names: the x axis's centred under its tick labels, the y axis's above it.
    text(
        &mut img,
        (w - 8 * X_NAME.len() as i64) / 2,
        h - MARGIN + 20,
        X_NAME,
        black,
    );
    text(&mut img, 2, MARGIN - 22, Y_NAME, black);
    let blue = Rgb([30, 90, 200]);
    let red = Rgb([210, 40, 40]);
    for pair in curve.train.windows(2) {
        line(&mut img, at(pair[0]), at(pair[1]), blue);
    }
    if let [only] = curve.train.as_slice() {
        square(&mut img, at(*only), 1, blue);
    }
    for &p in &curve.val {
        square(&mut img, at(p), 3, red);
    }
    // The legend, top right above the plot: a sample of each curve and its name.
    let mut x = w - MARGIN;
    let y = MARGIN - 22;
    let entries: &[(&str, bool)] = if curve.val.is_empty() {
        &[(TRAIN_NAME, false)]
    } else {
        &[(TRAIN_NAME, false), (VAL_NAME, true)]
    };
    for &(name, is_val) in entries.iter().rev() {
        x -= 8 * name.len() as i64;
        text(&mut img, x, y, name, black);
        x -= 24;
        if is_val {
            square(&mut img, (x + 8, y + 4), 3, red);
        } else {
            for dy in 4..=5 {
                line(&mut img, (x, y + dy), (x + 16, y + dy), blue);
            }
        }
        x -= 16;
    }
    crate::image::save_image(&img, path)?;
    Ok(())
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham's line.
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        put(img, x, y, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn square(img: &mut RgbImage, (x, y): (i64, i64), r: i64, c: Rgb<u8>) {
    for yy in y - r..=y + r {
        for xx in x - r..=x + r {
            put(img, xx, yy, c);
        }
    }
}

/// 3×5 bitmaps of the characters the labels need, one row per 3-bit line (bit 2 = left).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        'A' => [2, 5, 7, 5, 5],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'G' => [3, 4, 5, 5, 3],
        'I' => [7, 2, 2, 2, 7],
        'L' => [4, 4, 4, 4, 7],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'V' => [5, 5, 5, 5, 2],
        _ => return None,
    })
}

/// Writes `s` with its top-left corner at `(x, y)`, each font pixel drawn 2×2.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch) else { continue };
        let x0 = x + 8 * i as i64;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        put(img, x0 + 2 * col + dx, y + 2 * r as i64 + dy, c);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every label the plot writes is drawn whole: a character without a glyph would be skipped
    /// silently.
    #[test]
    fn every_label_character_has_a_glyph() {
        for label in [X_NAME, Y_NAME, TRAIN_NAME, VAL_NAME, "0123456789."] {
            for c in label.chars() {
                assert!(glyph(c).is_some(), "no glyph for {c:?} in {label}");
            }
        }
    }
}
