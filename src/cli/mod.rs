//! The `rudolph` command line: one file per command, each a thin layer over the library.

use clap::{Parser, Subcommand};

mod tokenize;

#[derive(Debug, Parser)]
#[command(name = "rudolph", version, about = "RuDOLPH, the hyper-modal transformer, in Rust")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a configuration preset (or a config.json) as the original constructor arguments.
    Config(ConfigArgs),
    /// Encode texts with the YouTokenToMe tokenizer (ids and pieces).
    Tokenize(tokenize::TokenizeArgs),
    /// Decode token id lists back to text.
    Detokenize(tokenize::DetokenizeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// A preset name (350m, 350m-v2, 1.3b, 2.7b, 2.7b-fbc2) or a path to a config.json.
    pub name: String,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config(args) => {
            let cfg = crate::config::Config::from_name_or_path(&args.name)?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            Ok(())
        }
        Command::Tokenize(args) => tokenize::tokenize(args),
        Command::Detokenize(args) => tokenize::detokenize(args),
    }
}
