//! Reading the world back: the attributes a picture shows (found procedurally, without any
//! model) and those a caption states. The evaluator compares the two.

use super::render::{SIDE, inside};
use super::{Background, Colour, Gender, Position, Scene, Shape, Size};
use image::RgbImage;

/// What a picture or a caption says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributes {
    pub size: Size,
    pub colour: Colour,
    pub shape: Shape,
    pub position: Position,
    pub background: Background,
}

impl From<&Scene> for Attributes {
    fn from(s: &Scene) -> Self {
        Self {
            size: s.size,
            colour: s.colour,
            shape: s.shape,
            position: s.position,
            background: s.background,
        }
    }
}

/// Squared Euclidean distance of two RGB colours.
pub fn dist2(a: [u8; 3], b: [u8; 3]) -> i32 {
    (0..3).map(|c| (a[c] as i32 - b[c] as i32).pow(2)).sum()
}

/// The palette colour the reader names a pixel of colour `rgb`.
pub fn colour_name(rgb: [u8; 3]) -> Colour {
    nearest(&Colour::ALL, |c| dist2(rgb, c.rgb()) as f64)
}

fn nearest<T: Copy>(options: &[T], key: impl Fn(T) -> f64) -> T {
    *options
        .iter()
        .min_by(|a, b| key(**a).total_cmp(&key(**b)))
        .expect("options are not empty")
}

/// Reads a picture: background from the border, colour as the palette colour nearest to the
/// clearly-foreground pixels, position from their centroid, shape by the silhouette (IoU with
/// rendered shapes at that centroid), size from the area against that shape's two sizes.
/// `None` when no shape is visible.
pub fn read_picture(img: &RgbImage) -> Option<Attributes> {
    let (w, h) = img.dimensions();
    let border: Vec<[u8; 3]> = img
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x == w - 1 || *y == h - 1)
        .map(|(_, _, p)| p.0)
        .collect();
    let background = nearest(&Background::ALL, |b| {
        border
            .iter()
            .map(|&p| dist2(p, b.rgb()) as f64)
            .sum::<f64>()
    });
    let bg = background.rgb();
    // Foreground colour: the palette colour most of the pixels clearly off the background
    // are nearest to (faint halos included, so that a small shape still votes).
    let mut colour_votes = [0usize; 6];
    let mut visible = 0usize;
    for p in img.pixels() {
        if dist2(p.0, bg) > 60 * 60 {
            visible += 1;
            let c = colour_name(p.0);
            colour_votes[Colour::ALL.iter().position(|&k| k == c).expect("listed")] += 1;
        }
    }
    if visible < 8 {
        return None;
    }
    let best = (0..6)
        .max_by_key(|&i| colour_votes[i])
        .expect("six colours");
    let colour = Colour::ALL[best];
    // The silhouette: pixels nearer the shape's colour than the background, i.e. at least
    // half covered by an anti-aliased (or blurred) edge, so a soft edge neither grows nor
    // shrinks the shape.
    let fg = colour.rgb();
    let mut mask = vec![false; (w * h) as usize];
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
    for (x, y, p) in img.enumerate_pixels() {
        if dist2(p.0, fg) < dist2(p.0, bg) {
            mask[(y * w + x) as usize] = true;
            sx += x as f64 + 0.5;
            sy += y as f64 + 0.5;
            n += 1.0;
        }
    }
    if n < 8.0 {
        return None;
    }
    let (cx, cy) = (sx / n, sy / n);
    let position = nearest(&Position::ALL, |p| {
        let (px, py) = p.centre();
        (px - cx).powi(2) + (py - cy).powi(2)
    });
    // Silhouettes (pixel centres inside the shape) are compared at the measured centroid, after
    // removing the shape's own centroid offset from its centre.
    let silhouette_r = |shape: Shape, r: f64| -> Vec<bool> {
        let (ox, oy) = shape_centroid_offset(shape, r);
        binary_silhouette(shape, r, cx - ox, cy - oy)
    };
    let area = |shape: Shape, size: Size| {
        silhouette_r(shape, size.radius())
            .iter()
            .filter(|&&b| b)
            .count() as f64
    };
    let iou = |m: &[bool]| {
        let inter = m.iter().zip(&mask).filter(|(a, b)| **a && **b).count() as f64;
        let union = m.iter().zip(&mask).filter(|(a, b)| **a || **b).count() as f64;
        inter / union.max(1.0)
    };
    let mut best_shape = (Shape::Circle, f64::MIN);
    for shape in Shape::ALL {
        // Radii span the jitter of both sizes.
        let score = [9.5, 10.0, 10.5, 14.5, 15.0, 15.5]
            .iter()
            .map(|&r| iou(&silhouette_r(shape, r)))
            .fold(f64::MIN, f64::max);
        if score > best_shape.1 {
            best_shape = (shape, score);
        }
    }
    let shape = best_shape.0;
    let size = nearest(&Size::ALL, |s| (area(shape, s) - n).abs());
    Some(Attributes {
        size,
        colour,
        shape,
        position,
        background,
    })
}

/// Pixels whose centre lies inside `shape` of radius `r` centred at `(cx, cy)`.
fn binary_silhouette(shape: Shape, r: f64, cx: f64, cy: f64) -> Vec<bool> {
    (0..SIDE * SIDE)
        .map(|i| {
            let (x, y) = ((i % SIDE) as f64 + 0.5, (i / SIDE) as f64 + 0.5);
            inside(shape, x - cx, y - cy, r)
        })
        .collect()
}

/// Where the centroid of a shape's pixels lies relative to its centre (not at it for the
/// triangle and the heart).
fn shape_centroid_offset(shape: Shape, r: f64) -> (f64, f64) {
    let c = SIDE as f64 / 2.0;
    let m = binary_silhouette(shape, r, c, c);
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
    for (i, _) in m.iter().enumerate().filter(|(_, b)| **b) {
        sx += (i as u32 % SIDE) as f64 + 0.5;
        sy += (i as u32 / SIDE) as f64 + 0.5;
        n += 1.0;
    }
    (sx / n - c, sy / n - c)
}

/// A caption read back: its attributes, and whether its adjectives agree with the noun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedCaption {
    pub attributes: Attributes,
    pub grammatical: bool,
}

/// Parses `{size} {colour} {shape} {position} на {background} фоне`. Adjectives are recognised
/// in any gender, so a caption with a wrong agreement still parses (with `grammatical` false).
pub fn parse_caption(text: &str) -> Option<ParsedCaption> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let genders = [Gender::Masculine, Gender::Feminine, Gender::Neuter];
    let find_adj = |word: &str, forms: &dyn Fn(Gender) -> String| {
        genders.iter().find(|&&g| forms(g) == word).copied()
    };
    let (&size_w, rest) = words.split_first()?;
    let (size, size_g) = Size::ALL
        .iter()
        .find_map(|&s| find_adj(size_w, &|g| s.adjective(g).to_string()).map(|g| (s, g)))?;
    let (&colour_w, rest) = rest.split_first()?;
    let (colour, colour_g) = Colour::ALL
        .iter()
        .find_map(|&c| find_adj(colour_w, &|g| c.adjective(g)).map(|g| (c, g)))?;
    let (&shape_w, rest) = rest.split_first()?;
    let shape = *Shape::ALL.iter().find(|s| s.noun() == shape_w)?;
    let rest = rest.join(" ");
    let position = *Position::ALL
        .iter()
        .find(|p| rest.starts_with(&format!("{} на ", p.phrase())))?;
    let tail = rest[position.phrase().len()..].trim_start();
    let background = *Background::ALL
        .iter()
        .find(|b| tail == format!("на {} фоне", b.phrase()))?;
    Some(ParsedCaption {
        attributes: Attributes {
            size,
            colour,
            shape,
            position,
            background,
        },
        grammatical: size_g == shape.gender() && colour_g == shape.gender(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::render::render;
    use super::super::sample;
    use super::*;

    #[test]
    fn every_rendered_scene_reads_back_right() {
        let mut wrong = Vec::new();
        for scene in sample(300, 7, false).iter().chain(&sample(60, 8, true)) {
            let got = read_picture(&render(scene));
            if got != Some(Attributes::from(scene)) {
                wrong.push((scene.caption(), got));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} misread: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }

    #[test]
    fn captions_parse_and_agreement_is_checked() {
        for scene in sample(100, 3, false) {
            let parsed = parse_caption(&scene.caption()).expect("a world caption parses");
            assert_eq!(parsed.attributes, Attributes::from(&scene));
            assert!(parsed.grammatical);
        }
        let bad = parse_caption("большой красная звезда слева на белом фоне").unwrap();
        assert!(!bad.grammatical);
        assert!(parse_caption("большая красная звезда").is_none());
        assert!(parse_caption("рыжий кот на окне").is_none());
    }
}
