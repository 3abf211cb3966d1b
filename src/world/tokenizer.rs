//! The world's tokenizer: a YouTokenToMe BPE model designed from the captions' grammar, in
//! which every word is one piece except the adjectives, which are two: stem and ending
//! («красн» + «ая»).
//!
//! Why not BPE trained on the captions: frequency makes whole words of the seen forms and
//! leaves a held-out caption's unseen form in pieces no training caption uses. Trained on the
//! seen captions, «оранжевая» (feminine agrees only with «звезда», and the orange star is held
//! out) became «▁оранже» + «вая», two ids the model never sees in training, so it can neither
//! read nor write that caption; and «красный» (masculine), a piece of its own, appears with
//! only two shapes, since the red circle is held out. Here the colour stem is one piece across
//! genders, seen with four or five shapes, and the ending carries the agreement: every
//! held-out caption is spelled with pieces that seen captions use.
//!
//! The merges spell each word's piece left to right from its `▁` (`▁`+к, `▁к`+р, …), all
//! before any ending's merges, so a word's stem is complete before its ending can form and no
//! merge spans the two.

use super::{Background, Colour, Gender, Position, Shape, Size};
use crate::tokenizer::{TrainedBpe, bpe_from_merges};
use std::collections::HashMap;

/// YouTokenToMe's word-start mark.
const SPACE: char = '\u{2581}';
/// Ids 0–3 are pad, unk, bos, eos; the alphabet follows.
const FIRST_ID: u32 = 4;

const GENDERS: [Gender; 3] = [Gender::Masculine, Gender::Feminine, Gender::Neuter];

/// The grammar's pieces: words and stems (each read after `▁`), and endings.
pub fn pieces() -> (Vec<String>, Vec<String>) {
    let mut words: Vec<String> = Vec::new();
    let mut endings: Vec<String> = Vec::new();
    let push = |list: &mut Vec<String>, piece: &str| {
        if !piece.is_empty() && !list.iter().any(|p| p == piece) {
            list.push(piece.to_string());
        }
    };
    let adjectives = Size::ALL
        .iter()
        .map(|s| GENDERS.map(|g| s.adjective(g).to_string()))
        .chain(Colour::ALL.iter().map(|c| GENDERS.map(|g| c.adjective(g))));
    for forms in adjectives {
        let stem = common_prefix(&forms);
        push(&mut words, &stem);
        for form in &forms {
            push(&mut endings, &form[stem.len()..]);
        }
    }
    let phrases = Shape::ALL
        .iter()
        .map(|s| s.noun())
        .chain(Position::ALL.iter().map(|p| p.phrase()))
        .chain(Background::ALL.iter().map(|b| b.phrase()))
        .chain(["на", "фоне"]);
    for phrase in phrases {
        for word in phrase.split(' ') {
            push(&mut words, word);
        }
    }
    (words, endings)
}

fn common_prefix(forms: &[String]) -> String {
    let first: Vec<char> = forms[0].chars().collect();
    let n = forms
        .iter()
        .map(|f| f.chars().zip(&first).take_while(|(a, b)| a == *b).count())
        .min()
        .unwrap_or(0);
    first[..n].iter().collect()
}

/// The world's `bpe.model`.
pub fn world_bpe() -> TrainedBpe {
    let (words, endings) = pieces();
    let mut alphabet = vec![SPACE];
    for c in words.iter().chain(&endings).flat_map(|p| p.chars()) {
        if !alphabet.contains(&c) {
            alphabet.push(c);
        }
    }
    let first_id = FIRST_ID;
    let mut ids: HashMap<String, u32> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), first_id + i as u32))
        .collect();
    let mut merges = Vec::new();
    // Each piece left to right: ▁-words first, then the endings.
    let spelled = words
        .iter()
        .map(|w| format!("{}{w}", SPACE))
        .chain(endings.iter().cloned());
    for piece in spelled {
        let chars: Vec<char> = piece.chars().collect();
        let mut prefix = chars[0].to_string();
        for &c in &chars[1..] {
            let longer = format!("{prefix}{c}");
            if !ids.contains_key(&longer) {
                let z = first_id + (alphabet.len() + merges.len()) as u32;
                merges.push((ids[&prefix], ids[&c.to_string()], z));
                ids.insert(longer.clone(), z);
            }
            prefix = longer;
        }
    }
    bpe_from_merges(&alphabet, &merges).expect("the world's merges are well formed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::Scene;
    use std::collections::HashSet;

    fn every_caption() -> Vec<(Scene, String)> {
        Scene::every().map(|s| (s, s.caption())).collect()
    }

    #[test]
    fn adjectives_are_stem_and_ending_and_other_words_whole() {
        let bpe = world_bpe().to_bpe().unwrap();
        let pieces = |t: &str| bpe.encode_pieces(t);
        assert_eq!(pieces("оранжевая"), ["▁оранжев", "ая"]);
        assert_eq!(pieces("синее"), ["▁син", "ее"]);
        assert_eq!(pieces("маленький"), ["▁маленьк", "ий"]);
        assert_eq!(pieces("большой"), ["▁больш", "ой"]);
        assert_eq!(
            pieces("треугольник в центре"),
            ["▁треугольник", "▁в", "▁центре"]
        );
        for (_, caption) in every_caption() {
            let p = pieces(&caption);
            // Two adjectives of two pieces, every other word one.
            assert_eq!(p.len(), caption.split(' ').count() + 2, "{caption}: {p:?}");
            assert_eq!(bpe.decode(&bpe.encode(&caption), &[]).unwrap(), caption);
        }
    }

    #[test]
    fn held_out_captions_use_only_pieces_of_seen_ones() {
        let bpe = world_bpe().to_bpe().unwrap();
        let (seen, held): (Vec<_>, Vec<_>) = every_caption()
            .into_iter()
            .partition(|(s, _)| !s.is_held_out());
        let used: HashSet<u32> = seen.iter().flat_map(|(_, c)| bpe.encode(c)).collect();
        for (_, caption) in held {
            for id in bpe.encode(&caption) {
                assert!(
                    used.contains(&id),
                    "{caption}: id {id} is in no seen caption"
                );
            }
        }
    }
}
