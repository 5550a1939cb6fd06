//! `write_gguf` and the GGUF-to-sign-bits reader with the packed runtime: the round trip gives
//! the packed file's logits, folding into the GGUF is exact against the unfolded model, what
//! cannot fold is refused, a model whose widths are multiples of 128 is all Q1_0, and Q1_0
//! blocks with their own scales (llama-quantize's files) give the float model's logits.

use binllm_format::gguf::{read_packed, write_gguf, GgufFile};
use binllm_format::names::{self, BlockLinear};
use binllm_format::packed::{
    export, BlockScales, ExportOptions, HeadFormat, PackedModel, QuantTensors,
};
use binllm_format::{Architecture, PretrainedModel};
use binllm_infer::ptq::{ptq_sign_model, InputScales};
use binllm_infer::{KvCache, Model, RuntimeOptions};
use binllm_kernels::Kernel;
use binllm_testing::synthetic::{set_q1_0_block_scale, synthetic_llama};

fn logits(packed: &PackedModel, quantized: &QuantTensors, ids: &[u32]) -> Vec<f32> {
    let options = RuntimeOptions {
        threads: 1,
        ..Default::default()
    };
    let model = Model::new(packed, quantized, &options).unwrap();
    let mut cache = KvCache::new(&model.config);
    model.forward_all(&mut cache, ids).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// stories260K's first tokens of a sentence (its SentencePiece tokenizer from tok512.bin).
fn stories_ids(model: &PretrainedModel) -> Vec<u32> {
    model
        .tokenizer()
        .unwrap()
        .encode("Once upon a time, there was a dog named", true)
        .unwrap()
}

#[test]
fn gguf_round_trip_gives_the_packed_logits_and_tokenizer() {
    let pretrained = binllm_testing::shared::stories260k_with_tok512_bin();
    let ids = stories_ids(&pretrained);
    let sign = ptq_sign_model(&pretrained, InputScales::Foldable { seed: 7 }).unwrap();
    for head in [HeadFormat::F16, HeadFormat::Q8, HeadFormat::Q4] {
        let exported = export(
            &sign,
            &ExportOptions {
                head,
                ..Default::default()
            },
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stories-1bit.gguf");
        let report = write_gguf(&exported.model, &exported.quantized, &path).unwrap();
        // 64 columns are Q2_0; down_proj's 172 fit no block type and are F16.
        let types: Vec<&str> = report.block_types.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(types, ["F16", "Q2_0"], "{report:?}");

        let (read, quantized) = read_packed(&path).unwrap();
        assert_eq!(read.linears, exported.model.linears, "head {head:?}");
        assert_eq!(quantized, exported.quantized, "head {head:?}");
        let want = logits(&exported.model, &exported.quantized, &ids);
        let got = logits(&read, &quantized, &ids);
        assert!(
            max_abs_diff(&want, &got) <= 1e-6,
            "head {head:?}: {}",
            max_abs_diff(&want, &got)
        );

        // The tokenizer and template travel in the metadata and tokenize the same.
        let text = "Lily saw a big, red ball in the park. 123";
        let original = exported.model.tokenizer().unwrap().unwrap();
        let again = read.tokenizer().unwrap().unwrap();
        assert_eq!(
            again.encode(text, true).unwrap(),
            original.encode(text, true).unwrap()
        );
        assert_eq!(read.chat_template, exported.model.chat_template);
        // The packed readers take the file like a .b1.
        assert!(binllm_format::packed::is_packed_file(&path));
        let (via_packed, _) = PackedModel::read_parts(&path).unwrap();
        assert_eq!(via_packed.linears, read.linears);
    }
}

/// Rounds to the nearest power of two, so that multiplying by it is exact in f16 and f32.
fn power_of_two(v: f32) -> f32 {
    2f32.powi(v.log2().round() as i32)
}

#[test]
fn folding_into_the_gguf_is_exact_against_the_unfolded_model() {
    let pretrained = binllm_testing::shared::stories260k_with_tok512_bin();
    let ids = stories_ids(&pretrained);
    // The unfolded reference: input scales applied at run time. Scales are powers of two and
    // the other vectors f16 values, so folding them (products) loses nothing in f16: any
    // difference would be a folding error, not rounding.
    let mut sign = ptq_sign_model(&pretrained, InputScales::Foldable { seed: 3 }).unwrap();
    let to_f16 = |v: &mut Vec<f32>| {
        v.iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32())
    };
    for l in sign.linears.values_mut() {
        to_f16(&mut l.row_scale);
        if let Some(s) = &mut l.input_scale {
            s.iter_mut().for_each(|x| *x = power_of_two(*x));
        }
    }
    for t in sign.dense.values_mut() {
        let mut v = t.to_f32_vec();
        to_f16(&mut v);
        *t = binllm_format::HostTensor::from_f32(t.shape.clone(), v);
    }
    assert!(sign.linears.values().all(|l| l.input_scale.is_some()));
    let reference = logits(&sign, &Default::default(), &ids);

    let exported = export(&sign, &ExportOptions::default()).unwrap();
    assert_eq!(exported.report.folded.len(), 4 * sign.config.num_layers);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("folded.gguf");
    write_gguf(&exported.model, &exported.quantized, &path).unwrap();
    let (read, quantized) = read_packed(&path).unwrap();
    assert!(read.linears.values().all(|l| l.input_scale.is_none()));
    let got = logits(&read, &quantized, &ids);
    let spread = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&reference, &got);
    assert!(
        diff <= 1e-5 * spread,
        "folded GGUF logits differ from the unfolded model by {diff} (max |logit| {spread})"
    );
}

#[test]
fn input_scales_that_cannot_fold_are_refused() {
    let pretrained = binllm_testing::shared::stories260k_with_tok512_bin();
    let sign = ptq_sign_model(&pretrained, InputScales::Independent { seed: 1 }).unwrap();
    let exported = export(&sign, &ExportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refused.gguf");
    let err = write_gguf(&exported.model, &exported.quantized, &path).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("did not fold"), "{err}");
    assert!(err.contains("layer 0 self_attn.q_proj"), "{err}");
    assert!(!path.exists());
}

/// A Llama with every width a multiple of 128, synthetic weights.
fn wide_model() -> PretrainedModel {
    synthetic_llama(256, 768, 4, 2, 64)
}

#[test]
fn widths_of_multiples_of_128_are_all_q1_0_and_read_back() {
    let sign = ptq_sign_model(&wide_model(), InputScales::Foldable { seed: 5 }).unwrap();
    let exported = export(
        &sign,
        &ExportOptions {
            head: HeadFormat::Q8,
            ..Default::default()
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.gguf");
    let report = write_gguf(&exported.model, &exported.quantized, &path).unwrap();
    assert_eq!(report.block_types.len(), 1);
    assert_eq!(report.block_types[0].0, "Q1_0");
    assert_eq!(report.body_bits_per_weight, 1.125);
    assert_eq!(report.head_type, "Q8_0");

    let file = GgufFile::open(&path).unwrap();
    for layer in 0..2 {
        for (gguf, which) in [
            ("attn_q", BlockLinear::Q),
            ("attn_output", BlockLinear::O),
            ("ffn_down", BlockLinear::Down),
        ] {
            let info = file
                .tensor_info(&format!("blk.{layer}.{gguf}.weight"))
                .unwrap();
            assert_eq!(info.ggml_type.name, "Q1_0");
            assert_eq!(info.shape(), which.shape(&sign.config));
        }
    }
    assert_eq!(
        file.tensor_info("output.weight").unwrap().ggml_type.name,
        "Q8_0"
    );
    assert_eq!(
        file.get("general.file_type").and_then(|v| v.as_u64()),
        Some(40)
    );

    let (read, quantized) = read_packed(&path).unwrap();
    assert_eq!(read.linears, exported.model.linears);
    assert_eq!(
        read.dense[names::LM_HEAD].to_f32_vec(),
        exported.model.dense[names::LM_HEAD].to_f32_vec()
    );
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 320) as u32).collect();
    let want = logits(&exported.model, &exported.quantized, &ids);
    let got = logits(&read, &quantized, &ids);
    assert!(max_abs_diff(&want, &got) <= 1e-6);
}

#[test]
fn a_damaged_q1_0_tensor_is_refused_naming_file_and_tensor() {
    let sign = ptq_sign_model(&wide_model(), InputScales::None).unwrap();
    let exported = export(&sign, &ExportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.gguf");
    write_gguf(&exported.model, &exported.quantized, &path).unwrap();
    let at = {
        let file = GgufFile::open(&path).unwrap();
        let info = file.tensor_info("blk.1.ffn_up.weight").unwrap();
        (file.data_offset + info.offset) as usize
    };
    // Cut inside the tensor data: the file and a tensor are named, no panic.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &std::fs::read(&path).unwrap()[..at + 100]).unwrap();
    let err = format!("{:#}", read_packed(&cut).unwrap_err());
    assert!(
        err.contains("cut.gguf") && err.contains("runs past the end"),
        "{err}"
    );
}

/// The sign model with every block linear scaled as llama-quantize scales Q1_0: each block
/// of 128 weights of a row gets its mean |w| (as f16), the row scale is 1.
fn with_llama_quantize_block_scales(
    sign: &PackedModel,
    pretrained: &PretrainedModel,
) -> PackedModel {
    let mut model = sign.clone();
    for (&(layer, which), l) in model.linears.iter_mut() {
        let w = pretrained.tensors[&names::linear_weight(layer, which)].to_f32_vec();
        let scales = w
            .chunks_exact(128)
            .map(|block| half::f16::from_f32(block.iter().map(|v| v.abs()).sum::<f32>() / 128.0))
            .collect();
        l.row_scale = vec![1.0; l.rows];
        l.block_scales = Some(BlockScales::new(128, l.cols, scales));
    }
    model
}

/// The float64 reference logits of `path` read as floats (dequantised, an independent
/// reading of the file), and the largest |logit|, the scale of the tolerances.
fn f64_reference(path: &std::path::Path, ids: &[u32]) -> (Vec<f64>, f64) {
    let floats = PretrainedModel::load(path, &Default::default()).unwrap();
    let reference = binllm_testing::reference::llama_logits_f64(&floats, ids);
    let spread = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
    (reference, spread)
}

fn max_abs_diff_f64(got: &[f32], reference: &[f64]) -> f64 {
    got.iter()
        .zip(reference)
        .map(|(&g, r)| (g as f64 - r).abs())
        .fold(0.0, f64::max)
}

/// Logits of the packed runtime with `threads` and the 1-bit `kernel`.
fn logits_on(
    packed: &PackedModel,
    quantized: &QuantTensors,
    ids: &[u32],
    threads: usize,
    kernel: Kernel,
) -> Vec<f32> {
    let options = RuntimeOptions {
        threads,
        kernel: Some(kernel),
        ..Default::default()
    };
    let model = Model::new(packed, quantized, &options).unwrap();
    let mut cache = KvCache::new(&model.config);
    model.forward_all(&mut cache, ids).unwrap()
}

/// llama-quantize's Q1_0 files give each block of 128 its own scale. Such a file runs on the
/// 1-bit kernels, block scales and all, and gives the logits of the float model the float
/// loader reads from it (dequantised), computed in float64: on the one-pass LUT kernels and
/// on a kernel that goes block by block, with one and two threads.
#[test]
fn q1_0_blocks_with_their_own_scales_run_on_the_1_bit_kernels() {
    let pretrained = wide_model();
    let sign = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    let per_block = with_llama_quantize_block_scales(&sign, &pretrained);
    let exported = export(&per_block, &ExportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("per-block.gguf");
    let report = write_gguf(&exported.model, &exported.quantized, &path).unwrap();
    assert_eq!(report.block_types[0].0, "Q1_0", "{report:?}");

    let (read, quantized) = read_packed(&path).unwrap();
    assert_eq!(read.linears, exported.model.linears);
    assert!(read.linears.values().all(|l| l.block_cols() == Some(128)));
    let ids: Vec<u32> = (0..12).map(|i| (i * 41 % 320) as u32).collect();
    let (reference, spread) = f64_reference(&path, &ids);
    let max_diff = |got: &[f32]| max_abs_diff_f64(got, &reference);
    let block_by_block = [Kernel::Scalar, Kernel::best_row_major()];
    for kernel in [Kernel::best(), Kernel::LutScalar]
        .into_iter()
        .chain(block_by_block)
    {
        for threads in [1, 2] {
            let diff = max_diff(&logits_on(&read, &quantized, &ids, threads, kernel));
            assert!(
                diff <= 2e-5 * spread,
                "{kernel}, {threads} threads: logits differ from the float64 reference by \
                 {diff} (max |logit| {spread})"
            );
        }
    }
    // The check can fail: the same signs with one scale per row (the blocks' mean) are far
    // off the reference.
    let mut row_scaled = read.clone();
    for l in row_scaled.linears.values_mut() {
        let b = l.block_scales.take().unwrap();
        l.row_scale = b
            .scales
            .chunks_exact(b.blocks_per_row)
            .map(|row| row.iter().map(|s| s.to_f32()).sum::<f32>() / row.len() as f32)
            .collect();
    }
    let diff = max_diff(&logits_on(&row_scaled, &quantized, &ids, 1, Kernel::best()));
    assert!(diff > 1e-3 * spread, "row scales alone came within {diff}");
}

/// binllm's own export with one block of one row given another scale (a hand-edited file):
/// that tensor alone reads with block scales, the others keep one scale per row, and the
/// logits are the float model's.
#[test]
fn one_edited_block_scale_makes_only_its_tensor_block_scaled() {
    let sign = ptq_sign_model(&wide_model(), InputScales::None).unwrap();
    let exported = export(&sign, &ExportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited.gguf");
    write_gguf(&exported.model, &exported.quantized, &path).unwrap();
    let scale = half::f16::from_f32(0.75).to_le_bytes();
    set_q1_0_block_scale(&path, "blk.1.ffn_up.weight", 1, scale);

    let (read, quantized) = read_packed(&path).unwrap();
    for (&(layer, which), l) in &read.linears {
        let edited = (layer, which) == (1, BlockLinear::Up);
        assert_eq!(l.block_scales.is_some(), edited, "layer {layer} {which:?}");
    }
    let up = &read.linears[&(1, BlockLinear::Up)];
    let b = up.block_scales.as_ref().unwrap();
    assert_eq!(b.row(0)[1].to_f32(), 0.75);
    assert_eq!(up.dense_weight()[128].abs(), 0.75);
    assert!(up.row_scale.iter().all(|&s| s == 1.0));

    let ids: Vec<u32> = (0..10).map(|i| (i * 23 % 320) as u32).collect();
    let (reference, spread) = f64_reference(&path, &ids);
    let diff = max_abs_diff_f64(&logits(&read, &quantized, &ids), &reference);
    assert!(diff <= 2e-5 * spread, "{diff} (max |logit| {spread})");
}

/// The float64 reference is the runtime's own function: on binllm's row-scaled export the two
/// agree as closely as on the per-block files (so those tests measure the block scales, not
/// the reference).
#[test]
fn the_float64_reference_matches_the_runtime_on_a_row_scaled_gguf() {
    let sign = ptq_sign_model(&wide_model(), InputScales::None).unwrap();
    let exported = export(&sign, &ExportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.gguf");
    write_gguf(&exported.model, &exported.quantized, &path).unwrap();
    let ids: Vec<u32> = (0..10).map(|i| (i * 23 % 320) as u32).collect();
    let (reference, spread) = f64_reference(&path, &ids);
    let diff = max_abs_diff_f64(
        &logits(&exported.model, &exported.quantized, &ids),
        &reference,
    );
    assert!(diff <= 2e-5 * spread, "{diff} (max |logit| {spread})");
}

#[test]
fn rows_of_a_multiple_of_32_only_are_q4_0_and_read_back() {
    // Hidden 96 (3 x 32): q/k/v/o/gate/up rows fit neither Q1_0 nor Q2_0; down's 256 fit Q1_0.
    let sign = ptq_sign_model(&synthetic_llama(96, 256, 3, 1, 32), InputScales::None).unwrap();
    let exported = export(&sign, &ExportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("narrow.gguf");
    let report = write_gguf(&exported.model, &exported.quantized, &path).unwrap();
    let types: Vec<(&str, usize)> = report
        .block_types
        .iter()
        .map(|t| (t.0.as_str(), t.1))
        .collect();
    assert_eq!(types, [("Q1_0", 2), ("Q4_0", 12)]);
    let (read, quantized) = read_packed(&path).unwrap();
    assert_eq!(read.linears, exported.model.linears);
    let ids: Vec<u32> = (0..12).map(|i| (i * 53 % 320) as u32).collect();
    let want = logits(&exported.model, &exported.quantized, &ids);
    assert!(max_abs_diff(&want, &logits(&read, &quantized, &ids)) <= 1e-6);
}

#[test]
fn qwen2_biases_and_qwen3_qk_norms_round_trip() {
    for (architecture, attention_bias, qk_norm) in [
        (Architecture::Qwen2, true, false),
        (Architecture::Qwen3, false, true),
    ] {
        let mut model = wide_model();
        model.config.architecture = architecture;
        model.config.attention_bias = attention_bias;
        model.config.qk_norm = qk_norm;
        model.tensors = binllm_testing::synthetic::synthetic_tensors(&model.config);
        let sign = ptq_sign_model(&model, InputScales::Foldable { seed: 9 }).unwrap();
        let exported = export(&sign, &ExportOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qwen.gguf");
        write_gguf(&exported.model, &exported.quantized, &path).unwrap();
        let (read, quantized) = read_packed(&path).unwrap();
        assert_eq!(read.config.architecture, architecture);
        assert_eq!(read.linears, exported.model.linears, "{architecture:?}");
        let ids: Vec<u32> = (0..16).map(|i| (i * 29 % 320) as u32).collect();
        let want = logits(&exported.model, &exported.quantized, &ids);
        let got = logits(&read, &quantized, &ids);
        assert!(max_abs_diff(&want, &got) <= 1e-6, "{architecture:?}");
    }
}
