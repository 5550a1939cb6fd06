//! `binllm export SIGN_MODEL_OR_RUN_DIR --out model.b1`: the deployment file. Folds the
//! Stage-1 input scales where that is exact, stores vectors and dense tensors in f16 and the
//! head in f16, q8_0 or q4_0, and reports bits per weight and the file size. With
//! `--format gguf` the same model is written as a GGUF file llama.cpp runs (block linears
//! Q1_0 / Q2_0, every input scale folded or the export is refused).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use binllm_format::gguf::write_gguf;
use binllm_format::packed::{
    export, is_packed_file, ExportOptions, HeadFormat, PackedModel, Precision,
};
use binllm_format::{LoadOptions, PretrainedModel};
use binllm_infer::ptq::{ptq_sign_model, InputScales};

/// What `binllm export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// binllm's packed safetensors file (`docs/FORMAT.md`).
    Packed,
    /// A GGUF v3 file for llama.cpp: block linears Q1_0 (rows a multiple of 128), else Q2_0
    /// (64), else Q4_0, each exactly sign × row scale.
    Gguf,
}

#[derive(clap::Args)]
pub struct Args {
    /// A sign model (`binllm convert` output) or a run directory holding
    /// `sign-model.safetensors`; with --ptq, a pretrained model (HF directory, GGUF, llama2.c).
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// The file format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Packed)]
    pub format: ExportFormat,
    /// LM head (and, when tied, embedding) storage.
    #[arg(long, value_enum, default_value_t = HeadFormat::F16)]
    pub head: HeadFormat,
    /// Vectors and dense tensors: f16 (deployment) or f32 (the exact folded model).
    #[arg(long, value_enum, default_value_t = Precision::F16)]
    pub precision: Precision,
    /// Binarize a pretrained model by PTQ first (sign(W), mean|W| row scales, no training):
    /// poor quality, but the exact size and speed of a converted model.
    #[arg(long)]
    pub ptq: bool,
    /// Tokenizer file for --ptq, when it is not beside the model (llama2.c).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

fn sign_model_path(input: &Path) -> PathBuf {
    if input.is_dir() {
        input.join("sign-model.safetensors")
    } else {
        input.to_path_buf()
    }
}

pub fn run(args: Args) -> Result<()> {
    let (head, precision) = (args.head, args.precision);
    let sign = if args.ptq {
        let pretrained = PretrainedModel::load(
            &args.input,
            &LoadOptions {
                tokenizer: args.tokenizer.clone(),
            },
        )?;
        ptq_sign_model(&pretrained, InputScales::None)?
    } else {
        let path = sign_model_path(&args.input);
        if !is_packed_file(&path) {
            bail!(
                "{}: not a binllm sign model (a packed safetensors file; for a pretrained model add --ptq)",
                path.display()
            );
        }
        PackedModel::read(&path)?
    };
    if args.format == ExportFormat::Gguf && precision != Precision::F16 {
        bail!("--format gguf stores every scale as f16: drop --precision f32");
    }
    let exported = export(&sign, &ExportOptions { head, precision })?;
    if args.format == ExportFormat::Gguf {
        let report = write_gguf(&exported.model, &exported.quantized, &args.out)
            .with_context(|| format!("{}: cannot export as GGUF", args.out.display()))?;
        println!(
            "exported {} -> {} (GGUF v3)",
            args.input.display(),
            args.out.display()
        );
        println!(
            "input scales   {} folded, none left",
            exported.report.folded.len()
        );
        for (name, count, bpw) in &report.block_types {
            println!("block linears  {count} as {name} ({bpw} bits/weight)");
        }
        println!(
            "bits/weight    body {:.4}, whole model {:.4}",
            report.body_bits_per_weight, report.whole_bits_per_weight
        );
        println!("head           {}", report.head_type);
        if let Some(t) = &report.tokenizer {
            println!("tokenizer      {t}");
        }
        let size = std::fs::metadata(&args.out)?.len();
        println!(
            "file size      {size} bytes ({:.2} MiB)",
            size as f64 / (1 << 20) as f64
        );
        return Ok(());
    }
    exported
        .write(&args.out)
        .with_context(|| format!("{}: cannot write the exported model", args.out.display()))?;

    let r = &exported.report;
    println!(
        "exported {} -> {}",
        args.input.display(),
        args.out.display()
    );
    println!(
        "input scales   {} folded, {} kept as {} vectors",
        r.folded.len(),
        r.kept.len(),
        precision.label()
    );
    for line in &r.kept {
        println!("  kept: {line}");
    }
    let bpw = exported.model.bits_per_weight();
    println!(
        "bits/weight    body {:.4}, embeddings+head {:.3}, whole model {:.4}",
        bpw.body, bpw.embeddings_and_head, bpw.whole_model
    );
    println!("head           {}", head.label());
    let size = std::fs::metadata(&args.out)?.len();
    println!(
        "file size      {size} bytes ({:.2} MiB)",
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}
