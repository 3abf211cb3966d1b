//! The `rudolph` command line: one file per command, each a thin layer over the library.

mod convert;
mod vae;

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
    /// Convert a checkpoint (torch zip, legacy torch or safetensors) to safetensors.
    Convert(convert::ConvertArgs),
    /// Encode a picture into VQGAN image codes (centre crop, PIL-bilinear resize, argmax codes).
    EncodeImage(vae::EncodeImageArgs),
    /// Decode VQGAN image codes (JSON) into a PNG; several code lists make a grid.
    DecodeCodes(vae::DecodeCodesArgs),
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
        Command::Convert(args) => convert::run(args),
        Command::EncodeImage(args) => vae::encode_image(args),
        Command::DecodeCodes(args) => vae::decode_codes(args),
    }
}
