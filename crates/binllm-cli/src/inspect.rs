//! `binllm inspect MODEL`.

use std::path::PathBuf;

use anyhow::Result;
use binllm_format::{LoadOptions, PretrainedModel};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face directory, a GGUF file or a llama2.c checkpoint.
    pub model: PathBuf,
    /// Tokenizer file, when it is not beside the model (llama2.c: tok*.bin or .model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let options = LoadOptions {
        tokenizer: args.tokenizer.clone(),
    };
    let model = PretrainedModel::load(&args.model, &options)?;
    let c = &model.config;
    let counts = model.parameter_counts();
    let total: usize = counts.values().sum();
    if args.json {
        let report = serde_json::json!({
            "path": model.path,
            "format": model.format.label(),
            "config": c,
            "parameters": counts.iter().map(|(g, n)| (g.label(), n)).collect::<std::collections::BTreeMap<_, _>>(),
            "total_parameters": total,
            "tensor_types": model.stored_types(),
            "tokenizer": model.tokenizer.as_ref().map(|t| serde_json::json!({
                "kind": t.kind.label(), "vocab_size": t.vocab_size(), "bos": t.bos_id, "eos": t.eos_ids})),
            "chat_template": model.chat_template.is_some(),
            "notes": model.notes,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model          {}", model.path.display());
    println!("format         {}", model.format.label());
    println!("architecture   {}", c.architecture);
    println!(
        "shape          {} layers, hidden {}, mlp {}, {} heads / {} kv heads, head dim {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("vocabulary     {}", c.vocab_size);
    println!("context        {}", c.max_position_embeddings);
    println!(
        "rope           theta {}{}",
        c.rope_theta,
        c.rope_scaling
            .map_or(String::new(), |s| format!(", llama3 scaling x{}", s.factor))
    );
    println!("norm eps       {:e}", c.rms_norm_eps);
    println!(
        "head           {}",
        if c.tie_word_embeddings {
            "tied to the embedding"
        } else {
            "separate"
        }
    );
    if c.attention_bias {
        println!("attention      q/k/v bias");
    }
    if c.qk_norm {
        println!("attention      q/k RMSNorm");
    }
    println!("parameters     {total} ({:.1} M)", total as f64 / 1e6);
    for (group, n) in &counts {
        println!(
            "  {:<13}{n:>12}  {:5.1} %",
            group.label(),
            100.0 * *n as f64 / total as f64
        );
    }
    let types: Vec<String> = model
        .stored_types()
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!("tensor types   {}", types.join(", "));
    match &model.tokenizer {
        Some(t) => println!(
            "tokenizer      {}, {} tokens, bos {:?}, eos {:?}",
            t.kind.label(),
            t.vocab_size(),
            t.bos_id,
            t.eos_ids
        ),
        None => println!("tokenizer      none found"),
    }
    println!(
        "chat template  {}",
        if model.chat_template.is_some() {
            "yes"
        } else {
            "no"
        }
    );
    for note in &model.notes {
        println!("note           {note}");
    }
    Ok(())
}
