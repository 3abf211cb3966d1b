//! Drawing a scene: 64×64 pixels, the shape anti-aliased by 4×4 supersampling and blended over
//! the background.

use super::{Scene, Shape};
use image::RgbImage;

pub const SIDE: u32 = 64;
/// Samples per pixel along each axis.
const SUPERSAMPLING: u32 = 4;

/// Whether the point `(x, y)` (pixels, relative to the shape's centre, y down) lies inside a
/// `shape` of radius `r`.
pub fn inside(shape: Shape, x: f64, y: f64, r: f64) -> bool {
    match shape {
        Shape::Circle => x * x + y * y <= r * r,
        Shape::Square => x.abs() <= 0.85 * r && y.abs() <= 0.85 * r,
        Shape::Triangle => in_polygon(&regular_polygon(3, r, r), x, y),
        Shape::Star => in_polygon(&regular_polygon(5, r, 0.4 * r), x, y),
        Shape::Heart => {
            // (u² + v² − 1)³ − u²v³ ≤ 0 spans u ∈ [−1.14, 1.14], v ∈ [−1, 1.25]; scale it to
            // the radius and centre its height.
            let s = r / 1.15;
            let (u, v) = (x / s, -y / s + 0.12);
            let q = u * u + v * v - 1.0;
            q * q * q - u * u * v * v * v <= 0.0
        }
    }
}

/// Vertices of a regular polygon (`inner == outer`) or a star (inner vertices at radius
/// `inner` between the tips), with a tip pointing up.
fn regular_polygon(points: usize, outer: f64, inner: f64) -> Vec<(f64, f64)> {
    let step = std::f64::consts::PI / points as f64;
    let start = -std::f64::consts::FRAC_PI_2;
    if (inner - outer).abs() < f64::EPSILON {
        return (0..points)
            .map(|i| {
                let a = start + 2.0 * step * i as f64;
                (outer * a.cos(), outer * a.sin())
            })
            .collect();
    }
    (0..2 * points)
        .map(|i| {
            let a = start + step * i as f64;
            let rad = if i % 2 == 0 { outer } else { inner };
            (rad * a.cos(), rad * a.sin())
        })
        .collect()
}

/// Even–odd rule.
fn in_polygon(poly: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The picture of a scene.
pub fn render(scene: &Scene) -> RgbImage {
    render_in(scene, scene.colour.rgb())
}

/// The picture of a scene with its shape drawn in `fg` instead of its colour.
pub fn render_in(scene: &Scene, fg: [u8; 3]) -> RgbImage {
    let (cx, cy) = scene.position.centre();
    let (cx, cy) = (cx + scene.jitter.0, cy + scene.jitter.1);
    let r = scene.size.radius() + scene.radius_jitter;
    let bg = scene.background.rgb();
    let n = SUPERSAMPLING;
    RgbImage::from_fn(SIDE, SIDE, |px, py| {
        let mut hits = 0;
        for sy in 0..n {
            for sx in 0..n {
                // Pixel (px, py) covers [px, px + 1) × [py, py + 1).
                let x = px as f64 + (sx as f64 + 0.5) / n as f64 - cx;
                let y = py as f64 + (sy as f64 + 0.5) / n as f64 - cy;
                hits += inside(scene.shape, x, y, r) as u32;
            }
        }
        let cover = hits as f64 / (n * n) as f64;
        image::Rgb(
            [0, 1, 2].map(|c| (bg[c] as f64 * (1.0 - cover) + fg[c] as f64 * cover).round() as u8),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    /// Every shape lands where its caption says, in its colour, over its background.
    #[test]
    fn pictures_show_what_the_caption_says() {
        for shape in Shape::ALL {
            for position in Position::ALL {
                let scene =
                    Scene::exact(Size::Big, Colour::Purple, shape, position, Background::Grey);
                let img = render(&scene);
                let (mut sx, mut sy, mut count) = (0.0, 0.0, 0.0);
                for (x, y, p) in img.enumerate_pixels() {
                    if p.0 == Colour::Purple.rgb() {
                        sx += x as f64 + 0.5;
                        sy += y as f64 + 0.5;
                        count += 1.0;
                    }
                }
                assert!(count > 100.0, "{shape:?} has too few full pixels: {count}");
                let (cx, cy) = position.centre();
                // The triangle's and heart's centroids sit a little off their centre.
                assert!(
                    (sx / count - cx).abs() < 3.0 && (sy / count - cy).abs() < 4.0,
                    "{shape:?} at {position:?}"
                );
                assert_eq!(img.get_pixel(0, 0).0, Background::Grey.rgb());
            }
        }
    }

    #[test]
    fn small_shapes_cover_less_than_big_ones() {
        for shape in Shape::ALL {
            let area = |size| {
                let scene = Scene::exact(
                    size,
                    Colour::Red,
                    shape,
                    Position::Centre,
                    Background::Black,
                );
                render(&scene).pixels().filter(|p| p.0 != [0, 0, 0]).count()
            };
            assert!(area(Size::Small) * 3 < area(Size::Big) * 2, "{shape:?}");
        }
    }
}
