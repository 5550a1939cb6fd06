//! `binllm inspect MODEL`.

use std::path::PathBuf;

use anyhow::Result;
use binllm_format::{LoadOptions, PretrainedModel, TextTokenizer};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face directory, a GGUF file, a llama2.c checkpoint or a packed 1-bit model.
    pub model: PathBuf,
    /// Tokenizer file, when it is not beside the model (llama2.c: tok*.bin or .model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if binllm_format::packed::is_packed_file(&args.model) {
        match inspect_packed(&args) {
            // A GGUF the 1-bit reader refuses (e.g. ternary weights with zeros) is still
            // described, as the float loader reads it.
            Err(e) if !binllm_format::detect::is_packed_container(&args.model) => {
                eprintln!("note: {e:#}\nnote: described as the float loader reads it");
            }
            done => return done,
        }
    }
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
    print_tokenizer(
        model.tokenizer.as_ref(),
        "none found",
        model.chat_template.is_some(),
    );
    for note in &model.notes {
        println!("note           {note}");
    }
    Ok(())
}

/// A packed 1-bit model (sign model or exported file).
fn inspect_packed(args: &Args) -> Result<()> {
    use binllm_format::packed::PackedModel;
    let (model, q8) = PackedModel::read_parts(&args.model)?;
    let c = &model.config;
    let bpw = model.bits_per_weight();
    let vectors = model
        .linears
        .values()
        .filter(|l| l.input_scale.is_some())
        .count();
    let size = std::fs::metadata(&args.model)?.len();
    // A 1-bit GGUF is read into the same model; say what the file itself holds.
    let format = if binllm_format::gguf::is_sign_gguf(&args.model) {
        let types = model.provenance.details["gguf"]
            .as_str()
            .unwrap_or_default();
        format!("GGUF with 1-bit block linears, read as sign bits ({types})")
    } else {
        "binllm packed 1-bit".to_string()
    };
    let tokenizer = model.tokenizer()?;
    let mut dense_types = std::collections::BTreeMap::new();
    for t in model.dense.values() {
        *dense_types.entry(t.stored_as.clone()).or_insert(0usize) += 1;
    }
    if args.json {
        let report = serde_json::json!({
            "path": args.model,
            "format": format,
            "file_bytes": size,
            "config": c,
            "precision": model.precision,
            "bits_per_weight": bpw,
            "block_linears": model.linears.len(),
            "input_scale_vectors": vectors,
            "block_scaled_linears": model.linears.values().filter(|l| l.block_scales.is_some()).count(),
            "dense_tensor_types": dense_types,
            "q8_tensors": q8.keys().collect::<Vec<_>>(),
            "provenance": model.provenance,
            "tokenizer": tokenizer.as_ref().map(|t| serde_json::json!({
                "kind": t.kind.label(), "vocab_size": t.vocab_size(), "bos": t.bos_id, "eos": t.eos_ids})),
            "chat_template": model.chat_template.is_some(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model          {}", args.model.display());
    println!(
        "format         {format} ({:.2} MiB)",
        size as f64 / (1 << 20) as f64
    );
    println!("architecture   {}", c.architecture);
    println!(
        "shape          {} layers, hidden {}, mlp {}, {} heads / {} kv heads, head dim {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("vocabulary     {}", c.vocab_size);
    println!(
        "head           {}",
        if c.tie_word_embeddings {
            "tied to the embedding"
        } else {
            "separate"
        }
    );
    println!("precision      {:?} vectors", model.precision);
    println!(
        "block linears  {} (1-bit), {vectors} with an input-scale vector",
        model.linears.len()
    );
    let mut block_scaled = std::collections::BTreeMap::new();
    for cols in model.linears.values().filter_map(|l| l.block_cols()) {
        *block_scaled.entry(cols).or_insert(0usize) += 1;
    }
    for (cols, n) in &block_scaled {
        println!(
            "  {n} with a scale per block of {cols} columns (as the file holds them; the 1-bit \
             kernels take them as they are)"
        );
    }
    let types: Vec<String> = dense_types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!("dense tensors  {}", types.join(", "));
    for (name, t) in &q8 {
        println!(
            "  {name}: {} ({} bits/weight)",
            t.stored_as(),
            t.bits_per_weight()
        );
    }
    println!(
        "bits/weight    body {:.4}, embeddings+head {:.3}, whole model {:.4}{}",
        bpw.body,
        bpw.embeddings_and_head,
        bpw.whole_model,
        if format.starts_with("GGUF") {
            " (as binllm holds it; the file's own block types are listed above)"
        } else {
            ""
        }
    );
    println!(
        "provenance     {} from {}",
        model.provenance.method, model.provenance.source_model
    );
    print_tokenizer(tokenizer.as_ref(), "none", model.chat_template.is_some());
    Ok(())
}

/// The tokenizer and chat-template lines, the same for every format.
fn print_tokenizer(tokenizer: Option<&TextTokenizer>, missing: &str, chat_template: bool) {
    match tokenizer {
        Some(t) => println!(
            "tokenizer      {}, {} tokens, bos {:?}, eos {:?}",
            t.kind.label(),
            t.vocab_size(),
            t.bos_id,
            t.eos_ids
        ),
        None => println!("tokenizer      {missing}"),
    }
    println!(
        "chat template  {}",
        if chat_template { "yes" } else { "no" }
    );
}
