//! The `rudolph` command line: one file per command, each a thin layer over the library.

mod bench;
mod caption;
mod classify;
mod common;
mod convert;
mod image;
mod inspect;
mod progress;
mod rerank;
mod serve;
mod text;
mod tokenize;
mod tokenizer_train;
mod train;
mod vae;
mod world;
mod world_train;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rudolph",
    version,
    about = "RuDOLPH, the hyper-modal transformer, in Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a configuration preset (or a config.json) as the original constructor arguments.
    Config(ConfigArgs),
    /// Generate texts (left-text continuations of a template), ranked by perplexity.
    Text(text::TextArgs),
    /// Draw pictures from a text: generate candidates, rerank them by the text, save the best.
    Image(image::ImageArgs),
    /// Caption a picture: generate captions and rank them by the picture.
    Caption(caption::CaptionArgs),
    /// Zero-shot classification of a picture among class names.
    Classify(classify::ClassifyArgs),
    /// Perplexity of a text given each candidate picture (or code grid), best first.
    Rerank(rerank::RerankArgs),
    /// Serve the model over HTTP with an OpenAI-compatible API (pictures, captions, texts,
    /// classification, reranking), batching concurrent requests.
    Serve(serve::ServeArgs),
    /// The shapes world the built-in model knows: sample scenes with captions, train the
    /// built-in model's recipe, evaluate a model on it (`world sample|train|eval`).
    World(world::WorldArgs),
    /// Time a task (image, caption, rerank, forward) on a preset with random weights.
    Bench(bench::BenchArgs),
    /// Encode texts with the YouTokenToMe tokenizer (ids and pieces).
    Tokenize(tokenize::TokenizeArgs),
    /// Decode token id lists back to text.
    Detokenize(tokenize::DetokenizeArgs),
    /// Tokenizer tools: `tokenizer train` learns a YouTokenToMe BPE model from texts.
    Tokenizer(tokenizer_train::TokenizerArgs),
    /// Show what a checkpoint file or model folder holds: preset, parameters, dtypes, mask version.
    Inspect(inspect::InspectArgs),
    /// Convert a checkpoint (torch zip, legacy torch or safetensors) to safetensors.
    Convert(convert::ConvertArgs),
    /// Encode a picture into VQGAN image codes (centre crop, PIL-bilinear resize, argmax codes).
    EncodeImage(vae::EncodeImageArgs),
    /// Decode VQGAN image codes (JSON) into a PNG; several code lists make a grid.
    DecodeCodes(vae::DecodeCodesArgs),
    /// Fine-tune (or train from scratch) on a JSONL of pictures and texts.
    Train(train::TrainArgs),
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// A preset name (350m, 350m-v2, 1.3b, 2.7b, 2.7b-fbc2) or a path to a config.json.
    pub name: String,
}

impl Cli {
    /// Worker threads asked for tensor work (`bench --threads`), which `main` sets before any
    /// thread starts.
    pub fn threads(&self) -> Option<usize> {
        match &self.command {
            Command::Bench(args) => args.threads,
            _ => None,
        }
    }
}

impl Cli {
    /// Whether the command is the long-running server.
    pub fn serves(&self) -> bool {
        matches!(self.command, Command::Serve(_))
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config(args) => {
            let cfg = rudolph::config::Config::from_name_or_path(&args.name)?;
            println!("{}", cfg.to_original_json());
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::World(args) => world::run(args),
        Command::Text(args) => text::run(args),
        Command::Image(args) => image::run(args),
        Command::Caption(args) => caption::run(args),
        Command::Classify(args) => classify::run(args),
        Command::Rerank(args) => rerank::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Tokenize(args) => tokenize::tokenize(args),
        Command::Detokenize(args) => tokenize::detokenize(args),
        Command::Tokenizer(args) => tokenizer_train::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::EncodeImage(args) => vae::encode_image(args),
        Command::DecodeCodes(args) => vae::decode_codes(args),
        Command::Train(args) => train::run(args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
