//! The shapes world: a fixed, procedurally drawn world of one coloured shape on a plain
//! background, with a Russian caption for every picture. It is what the built-in model learns,
//! and it is fixed so that anyone can check a model against it.

pub mod dataset;
pub mod eval;
pub mod read;
pub mod recipe;
pub mod render;
pub mod tokenizer;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Grammatical gender, which the size and colour adjectives agree with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gender {
    Masculine,
    Feminine,
    Neuter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Heart,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Self::Circle,
        Self::Square,
        Self::Triangle,
        Self::Star,
        Self::Heart,
    ];

    pub fn noun(self) -> &'static str {
        match self {
            Self::Circle => "круг",
            Self::Square => "квадрат",
            Self::Triangle => "треугольник",
            Self::Star => "звезда",
            Self::Heart => "сердце",
        }
    }

    pub fn gender(self) -> Gender {
        match self {
            Self::Star => Gender::Feminine,
            Self::Heart => Gender::Neuter,
            _ => Gender::Masculine,
        }
    }
}

/// The palette: name stems and RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
}

impl Colour {
    pub const ALL: [Colour; 6] = [
        Self::Red,
        Self::Orange,
        Self::Yellow,
        Self::Green,
        Self::Blue,
        Self::Purple,
    ];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::Red => [220, 30, 30],
            Self::Orange => [255, 140, 0],
            Self::Yellow => [250, 220, 20],
            Self::Green => [30, 170, 50],
            Self::Blue => [20, 40, 200],
            Self::Purple => [140, 40, 190],
        }
    }

    /// The adjective agreeing with `gender` (синий/синяя/синее: soft stem; the rest hard).
    pub fn adjective(self, gender: Gender) -> String {
        let (stem, soft) = match self {
            Self::Red => ("красн", false),
            Self::Orange => ("оранжев", false),
            Self::Yellow => ("жёлт", false),
            Self::Green => ("зелён", false),
            Self::Blue => ("син", true),
            Self::Purple => ("фиолетов", false),
        };
        let ending = match (gender, soft) {
            (Gender::Masculine, false) => "ый",
            (Gender::Masculine, true) => "ий",
            (Gender::Feminine, false) => "ая",
            (Gender::Feminine, true) => "яя",
            (Gender::Neuter, false) => "ое",
            (Gender::Neuter, true) => "ее",
        };
        format!("{stem}{ending}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Big,
    Small,
}

impl Size {
    pub const ALL: [Size; 2] = [Self::Big, Self::Small];

    /// Nominal radius in pixels.
    pub fn radius(self) -> f64 {
        match self {
            Self::Big => 15.0,
            Self::Small => 10.0,
        }
    }

    pub fn adjective(self, gender: Gender) -> &'static str {
        match (self, gender) {
            (Self::Big, Gender::Masculine) => "большой",
            (Self::Big, Gender::Feminine) => "большая",
            (Self::Big, Gender::Neuter) => "большое",
            (Self::Small, Gender::Masculine) => "маленький",
            (Self::Small, Gender::Feminine) => "маленькая",
            (Self::Small, Gender::Neuter) => "маленькое",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    Left,
    Right,
    Top,
    Bottom,
    Centre,
}

impl Position {
    pub const ALL: [Position; 5] = [
        Self::Left,
        Self::Right,
        Self::Top,
        Self::Bottom,
        Self::Centre,
    ];

    /// Nominal centre `(x, y)` in pixels.
    pub fn centre(self) -> (f64, f64) {
        match self {
            Self::Left => (16.0, 32.0),
            Self::Right => (48.0, 32.0),
            Self::Top => (32.0, 16.0),
            Self::Bottom => (32.0, 48.0),
            Self::Centre => (32.0, 32.0),
        }
    }

    pub fn phrase(self) -> &'static str {
        match self {
            Self::Left => "слева",
            Self::Right => "справа",
            Self::Top => "сверху",
            Self::Bottom => "снизу",
            Self::Centre => "в центре",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    White,
    Black,
    Grey,
}

impl Background {
    pub const ALL: [Background; 3] = [Self::White, Self::Black, Self::Grey];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::White => [255, 255, 255],
            Self::Black => [0, 0, 0],
            Self::Grey => [128, 128, 128],
        }
    }

    /// The prepositional form used in «на … фоне».
    pub fn phrase(self) -> &'static str {
        match self {
            Self::White => "белом",
            Self::Black => "чёрном",
            Self::Grey => "сером",
        }
    }
}

/// Colour+shape pairs kept out of all training, to test generalisation.
pub const HELD_OUT: [(Colour, Shape); 4] = [
    (Colour::Red, Shape::Circle),
    (Colour::Blue, Shape::Square),
    (Colour::Green, Shape::Triangle),
    (Colour::Orange, Shape::Star),
];

/// One scene: what is drawn, and the jitter that makes each picture different.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scene {
    pub size: Size,
    pub colour: Colour,
    pub shape: Shape,
    pub position: Position,
    pub background: Background,
    /// Offset of the centre from the nominal one, each within ±1.5 px.
    pub jitter: (f64, f64),
    /// Offset of the radius, within ±0.5 px.
    pub radius_jitter: f64,
}

impl Scene {
    /// The scene exactly as its caption says: centred, of the nominal radius.
    pub fn exact(
        size: Size,
        colour: Colour,
        shape: Shape,
        position: Position,
        background: Background,
    ) -> Self {
        Self {
            size,
            colour,
            shape,
            position,
            background,
            jitter: (0.0, 0.0),
            radius_jitter: 0.0,
        }
    }

    /// Every exact scene of the world, each once.
    pub fn every() -> impl Iterator<Item = Scene> {
        Size::ALL.into_iter().flat_map(|size| {
            Colour::ALL.into_iter().flat_map(move |colour| {
                Shape::ALL.into_iter().flat_map(move |shape| {
                    Position::ALL.into_iter().flat_map(move |position| {
                        Background::ALL.into_iter().map(move |background| {
                            Scene::exact(size, colour, shape, position, background)
                        })
                    })
                })
            })
        })
    }

    pub fn is_held_out(&self) -> bool {
        HELD_OUT.contains(&(self.colour, self.shape))
    }

    /// «большая красная звезда слева на белом фоне».
    pub fn caption(&self) -> String {
        format!("{} {}", self.noun_phrase(), self.place())
    }

    /// The caption without its colour, «большая звезда слева на белом фоне»: true of the scene
    /// in any colour, so the prompt of a recoloured picture.
    pub fn colourless_caption(&self) -> String {
        format!(
            "{} {} {}",
            self.size.adjective(self.shape.gender()),
            self.shape.noun(),
            self.place()
        )
    }

    /// The caption's first half, the adjectives agreeing with the noun: «большая красная звезда».
    pub fn noun_phrase(&self) -> String {
        let g = self.shape.gender();
        format!(
            "{} {} {}",
            self.size.adjective(g),
            self.colour.adjective(g),
            self.shape.noun()
        )
    }

    /// The caption after the noun: «слева на белом фоне».
    pub fn place(&self) -> String {
        format!(
            "{} на {} фоне",
            self.position.phrase(),
            self.background.phrase()
        )
    }

    /// A uniformly drawn scene among the seen pairs (or, with `held_out`, among the held-out).
    pub fn random(rng: &mut impl Rng, held_out: bool) -> Self {
        loop {
            let scene = Scene {
                size: Size::ALL[pick(rng, 2)],
                colour: Colour::ALL[pick(rng, 6)],
                shape: Shape::ALL[pick(rng, 5)],
                position: Position::ALL[pick(rng, 5)],
                background: Background::ALL[pick(rng, 3)],
                jitter: (uniform(rng, 1.5), uniform(rng, 1.5)),
                radius_jitter: uniform(rng, 0.5),
            };
            if scene.is_held_out() == held_out {
                return scene;
            }
        }
    }
}

/// An index below `n`, uniformly (`n` is tiny, so the modulo bias is negligible).
fn pick(rng: &mut impl Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// Uniform in `[−half, half]`.
fn uniform(rng: &mut impl Rng, half: f64) -> f64 {
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (2.0 * u - 1.0) * half
}

/// `n` scenes from `seed`, the same on every run.
pub fn sample(n: usize, seed: u64, held_out: bool) -> Vec<Scene> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| Scene::random(&mut rng, held_out)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_agree_in_gender() {
        let scene = Scene::exact;
        assert_eq!(
            scene(
                Size::Big,
                Colour::Red,
                Shape::Star,
                Position::Left,
                Background::White
            )
            .caption(),
            "большая красная звезда слева на белом фоне"
        );
        assert_eq!(
            scene(
                Size::Small,
                Colour::Blue,
                Shape::Heart,
                Position::Centre,
                Background::Black
            )
            .caption(),
            "маленькое синее сердце в центре на чёрном фоне"
        );
        assert_eq!(
            scene(
                Size::Small,
                Colour::Blue,
                Shape::Heart,
                Position::Centre,
                Background::Black
            )
            .colourless_caption(),
            "маленькое сердце в центре на чёрном фоне"
        );
        assert_eq!(
            scene(
                Size::Small,
                Colour::Blue,
                Shape::Circle,
                Position::Top,
                Background::Grey
            )
            .caption(),
            "маленький синий круг сверху на сером фоне"
        );
    }

    #[test]
    fn sampling_respects_the_held_out_pairs_and_the_seed() {
        let seen = sample(500, 1, false);
        assert!(seen.iter().all(|s| !s.is_held_out()));
        let held = sample(100, 1, true);
        assert!(held.iter().all(|s| s.is_held_out()));
        assert_eq!(seen, sample(500, 1, false));
        assert_ne!(seen, sample(500, 2, false));
        assert!(
            seen.iter()
                .all(|s| s.jitter.0.abs() <= 1.5 && s.radius_jitter.abs() <= 0.5)
        );
    }
}
