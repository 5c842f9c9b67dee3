//! `cacheroute kv ...`: command-line tools over the LMCache key scheme.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::keys::{chunk_keys, HashAlgorithm, KeyParams, KeyScheme};

/// `cacheroute kv <command>`.
#[derive(Debug, Clone, Subcommand)]
pub enum KvCommand {
    /// Print LMCache's chunk keys for a prompt's token ids, one per line.
    ///
    /// Token ids come as a JSON array on stdin (e.g. `[128000, 791, 6460]`),
    /// or from --text tokenized with --tokenizer. Every parameter must match
    /// the vLLM + LMCache instance that will read the keys.
    Keys(KvKeysArgs),
}

/// Arguments of `cacheroute kv keys`.
#[derive(Debug, Clone, Args)]
pub struct KvKeysArgs {
    /// LMCache key scheme: lmcache-0.3.13 (releases 0.3.13-0.3.15), lmcache-0.4
    /// (0.4.1-0.4.5), lmcache-0.5 (0.4.6-0.5.6), or the exact release, e.g.
    /// lmcache-0.3.15 (preferred).
    #[arg(long, value_parser = parse_scheme)]
    pub scheme: KeyScheme,
    /// vLLM's --model argument exactly as given (HF id or local path).
    #[arg(long)]
    pub model: String,
    /// Tensor-parallel × pipeline-parallel size of the instance.
    #[arg(long)]
    pub world_size: u32,
    /// The rank whose keys to print (0-based).
    #[arg(long)]
    pub worker_id: u32,
    /// LMCache chunk_size (LMCache's default is 256).
    #[arg(long)]
    pub chunk_size: usize,
    /// KV cache dtype as LMCache names it: bfloat16, half (float16 is
    /// accepted), float, fp8_e4m3fn, ...
    #[arg(long)]
    pub dtype: String,
    /// The PYTHONHASHSEED value of every vLLM process, exactly ("0" differs
    /// from "00"). Required: without it keys are random per process.
    #[arg(long)]
    pub hash_seed: Option<String>,
    /// LMCache pre_caching_hash_algorithm (only sha256_cbor is reproducible).
    #[arg(long, default_value = "sha256_cbor")]
    pub hash_algorithm: String,
    /// LMCache save_unfull_chunk: also key a trailing partial chunk.
    #[arg(long)]
    pub save_unfull_chunk: bool,
    /// Tokenize this text instead of reading token ids from stdin (needs
    /// --tokenizer). Render the full prompt prefix (chat template, BOS) first.
    #[arg(long, requires = "tokenizer")]
    pub text: Option<String>,
    /// HuggingFace tokenizer.json of the model, for --text.
    #[arg(long, requires = "text")]
    pub tokenizer: Option<PathBuf>,
    /// With --text: let the tokenizer add its special tokens (e.g. BOS), as
    /// vLLM's /v1/completions does. Leave off when the text already carries
    /// them, as a rendered chat template does.
    #[arg(long)]
    pub add_special_tokens: bool,
}

fn parse_scheme(s: &str) -> Result<KeyScheme, crate::keys::KeyError> {
    s.parse()
}

impl KvKeysArgs {
    /// The key parameters these arguments describe.
    pub fn key_params(&self) -> KeyParams {
        KeyParams {
            scheme: self.scheme,
            hash_algorithm: self
                .hash_algorithm
                .parse::<HashAlgorithm>()
                .unwrap_or_else(|never| match never {}),
            model: self.model.clone(),
            world_size: self.world_size,
            worker_id: self.worker_id,
            chunk_size: self.chunk_size,
            dtype: self.dtype.clone(),
            hash_seed: self.hash_seed.clone(),
            save_unfull_chunk: self.save_unfull_chunk,
        }
    }
}

/// Token ids from a JSON array, e.g. `[128000, 791, 6460]`.
pub fn parse_token_ids(input: &str) -> Result<Vec<u32>> {
    if input.trim().is_empty() {
        bail!(
            "no token ids on stdin: expected a JSON array of token ids, e.g. [128000, 791, 6460]"
        );
    }
    serde_json::from_str(input).with_context(|| {
        "stdin must be a JSON array of token ids (integers 0..=4294967295), e.g. [128000, 791, 6460]"
    })
}

/// Tokenize `text` with a HuggingFace `tokenizer.json`.
pub fn tokenize(
    tokenizer: &std::path::Path,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<u32>> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", tokenizer.display()))?;
    let enc = tok
        .encode(text, add_special_tokens)
        .map_err(|e| anyhow::anyhow!("tokenizing --text failed: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// `cacheroute kv keys`: read token ids (stdin, or --text with --tokenizer)
/// and write one LMCache key per line.
pub fn run_kv_keys(args: &KvKeysArgs, mut stdin: impl Read, mut stdout: impl Write) -> Result<()> {
    let tokens = match (&args.text, &args.tokenizer) {
        (Some(text), Some(path)) => tokenize(path, text, args.add_special_tokens)?,
        (None, None) => {
            let mut input = String::new();
            stdin
                .read_to_string(&mut input)
                .context("reading token ids from stdin")?;
            parse_token_ids(&input)?
        }
        (Some(_), None) => {
            bail!("--text needs --tokenizer FILE (the model's HuggingFace tokenizer.json)")
        }
        (None, Some(_)) => {
            bail!("--tokenizer needs --text TEXT (or drop it and give token ids on stdin)")
        }
    };
    let keys = chunk_keys(&args.key_params(), &tokens)?;
    for k in &keys {
        writeln!(stdout, "{}", k.key)?;
    }
    stdout.flush()?;
    Ok(())
}

/// Run a `cacheroute kv` command on the process's stdin and stdout.
pub fn run_kv(cmd: KvCommand) -> Result<()> {
    match cmd {
        KvCommand::Keys(args) => {
            run_kv_keys(&args, std::io::stdin().lock(), std::io::stdout().lock())
        }
    }
}
