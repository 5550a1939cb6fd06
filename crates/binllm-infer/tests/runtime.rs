//! The packed runtime on stories260K (a real 260K-parameter Llama): file errors, decode
//! through the KV cache against the whole-sequence forward, thread counts, export folding.
//! The comparison with the libtorch engine is in binllm-cli's tests (it needs libtorch).

use std::path::PathBuf;

use binllm_format::packed::{export, ExportOptions, HeadFormat, PackedModel, Precision};
use binllm_format::PretrainedModel;
use binllm_infer::generate::{generate, GenerateOptions};
use binllm_infer::ptq::{ptq_sign_model, InputScales};
use binllm_infer::sampling::SamplingParams;
use binllm_infer::{DenseKernel, KvCache, Model, RuntimeOptions};

fn stories() -> PretrainedModel {
    binllm_testing::shared::stories260k_with_tok512_bin()
}

fn options(threads: usize) -> RuntimeOptions {
    RuntimeOptions {
        threads,
        ..Default::default()
    }
}

fn runtime(packed: &PackedModel, threads: usize) -> Model {
    Model::new(packed, &Default::default(), &options(threads)).unwrap()
}

fn prompt_ids(model: &PretrainedModel, text: &str) -> Vec<u32> {
    model.tokenizer().unwrap().encode(text, true).unwrap()
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

#[test]
fn corrupt_and_truncated_files_name_the_file() {
    let pretrained = stories();
    let packed = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.b1");
    packed.write(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.b1");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.b1");
    std::fs::write(&garbage, b"definitely not a safetensors file").unwrap();
    let missing = dir.path().join("missing.b1");
    let mut wrong_magic = bytes.clone();
    let pos = bytes
        .windows(13)
        .position(|w| w == b"binllm-packed")
        .unwrap();
    wrong_magic[pos] = b'X';
    let relabelled = dir.path().join("relabelled.b1");
    std::fs::write(&relabelled, &wrong_magic).unwrap();

    for path in [&truncated, &garbage, &missing, &relabelled] {
        let err = match Model::load(path, &options(1)) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&path.display().to_string()),
            "error does not name the file: {err}"
        );
    }
    let err = format!("{:#}", Model::load(&truncated, &options(1)).err().unwrap());
    assert!(err.contains("truncated"), "{err}");
    assert!(Model::load(&good, &options(1)).is_ok());
}

#[test]
fn decoding_through_the_cache_matches_the_whole_sequence() {
    let pretrained = stories();
    let packed = ptq_sign_model(&pretrained, InputScales::Independent { seed: 3 }).unwrap();
    let model = runtime(&packed, 1);
    let ids = prompt_ids(
        &pretrained,
        "Once upon a time, there was a little girl named Lily.",
    );
    let vocab = model.config.vocab_size;
    let all = model
        .forward_all(&mut KvCache::new(&model.config), &ids)
        .unwrap();
    assert_eq!(all.len(), ids.len() * vocab);
    // Prompt of 5 tokens through GEMM, then the rest one at a time through GEMV.
    let mut cache = KvCache::new(&model.config);
    let first = model.forward(&mut cache, &ids[..5]).unwrap();
    assert!(relative_l2(&first, &all[4 * vocab..5 * vocab]) < 1e-5);
    for t in 5..ids.len() {
        let step = model.forward(&mut cache, &ids[t..t + 1]).unwrap();
        let err = relative_l2(&step, &all[t * vocab..(t + 1) * vocab]);
        assert!(err < 1e-5, "position {t}: relative L2 {err}");
    }
    assert_eq!(cache.tokens(), &ids[..]);
}

#[test]
fn thread_counts_give_the_same_logits() {
    let pretrained = stories();
    let packed = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    let ids = prompt_ids(&pretrained, "The cat sat on the mat and");
    let one = runtime(&packed, 1);
    let two = runtime(&packed, 2);
    let a = one
        .forward_all(&mut KvCache::new(&one.config), &ids)
        .unwrap();
    let b = two
        .forward_all(&mut KvCache::new(&two.config), &ids)
        .unwrap();
    assert!(relative_l2(&a, &b) < 1e-6);
}

#[test]
fn a_longer_prompt_reuses_the_cached_prefix() {
    let pretrained = stories();
    let packed = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    let model = runtime(&packed, 1);
    let options = GenerateOptions {
        max_tokens: 8,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    let first = prompt_ids(&pretrained, "Tom had a red ball.");
    let mut cache = KvCache::new(&model.config);
    let mut reply = Vec::new();
    generate(&model, &mut cache, &first, &options, |id| {
        reply.push(id);
        Ok(true)
    })
    .unwrap();
    assert_eq!(cache.len(), first.len() + reply.len() - 1);
    // The next turn: everything so far plus more text. Only the new part runs.
    let mut second = first.clone();
    second.extend(&reply);
    second.extend(&prompt_ids(&pretrained, "He")[1..]);
    let mut fresh_reply = Vec::new();
    let stats = generate(&model, &mut cache, &second, &options, |id| {
        fresh_reply.push(id);
        Ok(true)
    })
    .unwrap();
    assert_eq!(
        stats.prompt_tokens,
        second.len() - (first.len() + reply.len() - 1)
    );
    let mut expected = Vec::new();
    generate(
        &model,
        &mut KvCache::new(&model.config),
        &second,
        &options,
        |id| {
            expected.push(id);
            Ok(true)
        },
    )
    .unwrap();
    assert_eq!(fresh_reply, expected);
}

fn logits_of(
    packed: &PackedModel,
    quantized: &binllm_format::packed::QuantTensors,
    ids: &[u32],
) -> Vec<f32> {
    logits_with_head_kernel(packed, quantized, ids, None)
}

fn logits_with_head_kernel(
    packed: &PackedModel,
    quantized: &binllm_format::packed::QuantTensors,
    ids: &[u32],
    head_kernel: Option<DenseKernel>,
) -> Vec<f32> {
    let options = RuntimeOptions {
        head_kernel,
        ..options(1)
    };
    let model = Model::new(packed, quantized, &options).unwrap();
    model
        .forward_all(&mut KvCache::new(&model.config), ids)
        .unwrap()
}

#[test]
fn export_folds_tied_input_scales_exactly() {
    let pretrained = stories();
    let sign = ptq_sign_model(&pretrained, InputScales::Foldable { seed: 11 }).unwrap();
    let ids = prompt_ids(&pretrained, "One day, a little bird flew over the big tree");
    let reference = logits_of(&sign, &Default::default(), &ids);

    // Folding alone (f32) is exact up to f32 rounding, and every vector folds.
    let exact = export(
        &sign,
        &ExportOptions {
            head: HeadFormat::F16,
            precision: Precision::F32,
        },
    )
    .unwrap();
    assert!(
        exact
            .model
            .linears
            .values()
            .all(|l| l.input_scale.is_none()),
        "{:?}",
        exact.report.kept
    );
    assert!(exact.report.kept.is_empty());
    assert_eq!(exact.report.folded.len(), 4 * sign.config.num_layers);
    let err_fold = relative_l2(&logits_of(&exact.model, &exact.quantized, &ids), &reference);
    assert!(err_fold < 1e-5, "folding changed the logits by {err_fold}");

    // The f16 file: what folding adds is within f16 rounding, the error of storing the
    // unfolded model in f16.
    let deployed = export(&sign, &ExportOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.b1");
    deployed.write(&path).unwrap();
    let (read, q8) = PackedModel::read_parts(&path).unwrap();
    let err_f16 = relative_l2(&logits_of(&read, &q8, &ids), &reference);
    let mut unfolded_f16 = sign.clone();
    for l in unfolded_f16.linears.values_mut() {
        for v in [Some(&mut l.row_scale), l.input_scale.as_mut()]
            .into_iter()
            .flatten()
        {
            v.iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        }
    }
    for t in unfolded_f16.dense.values_mut() {
        let rounded = t
            .to_f32_vec()
            .iter()
            .map(|x| half::f16::from_f32(*x).to_f32())
            .collect();
        *t = binllm_format::HostTensor::from_f32(t.shape.clone(), rounded);
    }
    let err_rounding = relative_l2(
        &logits_of(&unfolded_f16, &Default::default(), &ids),
        &reference,
    );
    eprintln!("relative L2 vs the f32 sign model: folded f16 file {err_f16:.2e}, unfolded f16 {err_rounding:.2e}");
    assert!(
        err_f16 < 3.0 * err_rounding + 1e-4,
        "folded f16 {err_f16} vs f16 rounding {err_rounding}"
    );
    assert!(err_f16 < 1e-2);
    // Nothing left but one f16 row scale per row on top of the sign bits.
    let rows: usize = read.linears.values().map(|l| l.rows).sum();
    let weights: usize = read.linears.values().map(|l| l.rows * l.cols).sum();
    let body = read.bits_per_weight().body;
    assert!(
        (body - (1.0 + 16.0 * rows as f64 / weights as f64)).abs() < 1e-12,
        "{body}"
    );
}

#[test]
fn export_keeps_untied_input_scales() {
    let pretrained = stories();
    let sign = ptq_sign_model(&pretrained, InputScales::Independent { seed: 5 }).unwrap();
    let ids = prompt_ids(&pretrained, "Sara found a shiny stone");
    let exported = export(
        &sign,
        &ExportOptions {
            head: HeadFormat::F16,
            precision: Precision::F32,
        },
    )
    .unwrap();
    for ((layer, which), l) in &exported.model.linears {
        use binllm_format::names::BlockLinear::*;
        let grouped = sign.config.num_heads != sign.config.num_kv_heads;
        let expect_kept = matches!(which, Q | K | V | Gate | Up) || (*which == O && grouped);
        assert_eq!(
            l.input_scale.is_some(),
            expect_kept,
            "layer {layer} {which:?}"
        );
        if expect_kept {
            assert_eq!(l.input_scale, sign.linears[&(*layer, *which)].input_scale);
        }
    }
    let err = relative_l2(
        &logits_of(&exported.model, &exported.quantized, &ids),
        &logits_of(&sign, &Default::default(), &ids),
    );
    assert!(err < 1e-5, "{err}");
    // The kept vectors count in the bits per weight.
    assert!(exported.model.bits_per_weight().body > sign_bpw_without_vectors(&exported.model));
}

fn sign_bpw_without_vectors(m: &PackedModel) -> f64 {
    let weights: usize = m.linears.values().map(|l| l.rows * l.cols).sum();
    let rows: usize = m.linears.values().map(|l| l.rows).sum();
    1.0 + 32.0 * rows as f64 / weights as f64
}

#[test]
fn q8_head_round_trips_and_stays_close() {
    let pretrained = stories();
    let sign = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    let ids = prompt_ids(&pretrained, "The dog ran to the park");
    let exported = export(
        &sign,
        &ExportOptions {
            head: HeadFormat::Q8,
            precision: Precision::F16,
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("q8.b1");
    exported.write(&path).unwrap();
    let (read, q8) = PackedModel::read_parts(&path).unwrap();
    assert_eq!(q8, exported.quantized, "q8 tensors change through the file");
    // Re-writing a model read from a q8 file keeps the tensors exactly.
    let again = dir.path().join("again.b1");
    read.write(&again).unwrap();
    assert_eq!(PackedModel::read_parts(&again).unwrap().1, q8);
    let err = relative_l2(
        &logits_of(&read, &q8, &ids),
        &logits_of(&sign, &Default::default(), &ids),
    );
    assert!(err < 2e-2, "{err}");
}

/// The 4-bit head: the file round-trips, and the runtime's q4 product gives the logits of the
/// dequantized head computed in f32 (an independent path: the dense f32 GEMV) up to the
/// activation rounding (int16, or int8 per block on VNNI CPUs).
#[test]
fn q4_head_round_trips_and_matches_its_dequantized_head() {
    let pretrained = stories();
    let sign = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    let ids = prompt_ids(&pretrained, "The dog ran to the park");
    let exported = export(
        &sign,
        &ExportOptions {
            head: HeadFormat::Q4,
            precision: Precision::F16,
        },
    )
    .unwrap();
    let bpw = exported.model.bits_per_weight().embeddings_and_head;
    assert!((bpw - 4.5).abs() < 0.3, "{bpw}");
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("q4.b1");
    exported.write(&path).unwrap();
    let (read, q4) = PackedModel::read_parts(&path).unwrap();
    assert_eq!(q4, exported.quantized, "q4 tensors change through the file");
    assert!(q4
        .values()
        .all(|t| matches!(t, binllm_format::packed::QuantTensor::Q4(_))));
    let again = dir.path().join("again.b1");
    read.write(&again).unwrap();
    assert_eq!(PackedModel::read_parts(&again).unwrap().1, q4);
    // `read.dense` holds the dequantized head in f32: without the quantized map the runtime
    // takes the dense f32 path.
    let dense = logits_of(&read, &Default::default(), &ids);
    // int16 activations (the portable path runs everywhere): only their rounding is left.
    let int16 = logits_with_head_kernel(&read, &q4, &ids, Some(DenseKernel::Portable));
    let err = relative_l2(&int16, &dense);
    assert!(
        err < 1e-3,
        "q4 kernel (int16 activations) vs dequantized f32 head: {err}"
    );
    // int8 activations per block of 32 (every int8 kernel this CPU has): each activation moves
    // by up to 1/254 of its block's largest, which stories260K's 64-wide rows feel most.
    for kernel in DenseKernel::available()
        .into_iter()
        .filter(|k| k.int8_activations())
    {
        let int8 = logits_with_head_kernel(&read, &q4, &ids, Some(kernel));
        let err = relative_l2(&int8, &dense);
        assert!(
            err < 1e-2,
            "q4 kernel {} (int8 activations) vs dequantized f32 head: {err}",
            kernel.name()
        );
        println!(
            "q4 head, {}: {err:.2e} vs its dequantized head",
            kernel.name()
        );
    }
    let q4_logits = logits_of(&read, &q4, &ids);
    let err_vs_sign = relative_l2(&q4_logits, &logits_of(&sign, &Default::default(), &ids));
    assert!(
        err_vs_sign < 0.2,
        "q4 head vs f32 sign model: {err_vs_sign}"
    );
    println!("q4 head: {err:.2e} vs its dequantized head, {err_vs_sign:.3e} vs the sign model");
}

#[test]
fn long_prompts_run_in_chunks_with_the_same_result() {
    let pretrained = stories();
    let packed = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    let model = runtime(&packed, 2);
    let vocab = model.config.vocab_size;
    // 300 tokens: one call goes through the 256-token chunks, the other is split by hand.
    let ids: Vec<u32> = (0..300).map(|i| (i * 7 + 3) % vocab as u32).collect();
    let all = model
        .forward_all(&mut KvCache::new(&model.config), &ids)
        .unwrap();
    let mut cache = KvCache::new(&model.config);
    model.forward(&mut cache, &ids[..100]).unwrap();
    let last = model.forward(&mut cache, &ids[100..]).unwrap();
    assert!(relative_l2(&last, &all[299 * vocab..]) < 1e-5);
    // Out-of-vocabulary ids are refused, not read past the table.
    assert!(model.forward(&mut cache, &[vocab as u32]).is_err());
}

/// `binllm eval`'s scorer on the packed engine: log-probabilities equal a float64
/// log-softmax of the engine's own logits from a fresh cache, also when a request reuses the
/// cached context of the previous one (choices of one question), and pass the consistency
/// checks every engine must.
#[test]
fn scorer_log_probabilities_match_a_float64_log_softmax() {
    use binllm_eval::{LanguageModel, ScoreRequest};
    let pretrained = stories();
    let packed = ptq_sign_model(&pretrained, InputScales::None).unwrap();
    let tokenizer = packed.tokenizer().unwrap().unwrap();
    let context = prompt_ids(
        &pretrained,
        "Once upon a time, there was a little girl named",
    );
    let mut requests = Vec::new();
    for ending in [" Lily.", " Tom and a big dog.", " Sue"] {
        let mut tokens = context.clone();
        tokens.extend(tokenizer.encode(ending, false).unwrap());
        requests.push(ScoreRequest {
            score_from: context.len(),
            tokens,
        });
    }
    requests.push(ScoreRequest {
        tokens: prompt_ids(
            &pretrained,
            "The sun was shining and the birds were singing.",
        ),
        score_from: 1,
    });
    let reference = runtime(&packed, 1);
    let vocab = reference.config.vocab_size;
    let mut scorer = binllm_infer::PackedScorer::new(runtime(&packed, 2), tokenizer);
    let scores = scorer.score(&requests).unwrap();
    let mut positions = 0;
    for (request, scores) in requests.iter().zip(&scores) {
        let inputs = &request.tokens[..request.tokens.len() - 1];
        let logits = reference
            .forward_all(&mut KvCache::new(&reference.config), inputs)
            .unwrap();
        assert_eq!(scores.len(), request.scored_len());
        for (k, p) in (request.score_from..request.tokens.len()).enumerate() {
            let row: Vec<f64> = logits[(p - 1) * vocab..p * vocab]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            let target = request.tokens[p] as usize;
            let expected = row[target] - log_sum;
            assert!(
                (scores[k].logprob as f64 - expected).abs() < 1e-5,
                "position {p}: {} vs {expected}",
                scores[k].logprob
            );
            let is_max = row.iter().all(|&v| v <= row[target]);
            assert_eq!(scores[k].is_greedy, is_max, "position {p}");
            positions += 1;
        }
    }
    assert!(positions > 15);
    let consistency = binllm_testing::language_model::check_language_model(
        &mut scorer,
        &[
            "Lily and Ben played with a red ball in the garden.",
            "One day, a little bird",
        ],
        1e-4,
    )
    .unwrap();
    assert!(consistency.positions > 10);
}

#[test]
fn a_batched_step_matches_each_sequence_stepped_alone() {
    // Three sequences at different positions, each with its own cache, advanced together.
    let pretrained = stories();
    let packed = ptq_sign_model(&pretrained, InputScales::Independent { seed: 3 }).unwrap();
    let model = runtime(&packed, 2);
    let prompts: Vec<Vec<u32>> = [
        "Once upon a time, there was a little girl named Lily.",
        "The cat",
        "Tom and his dog went to the park. They",
    ]
    .iter()
    .map(|p| prompt_ids(&pretrained, p))
    .collect();
    let next_tokens = [[10u32, 11, 12], [20, 21, 22], [30, 31, 32]];
    let mut alone: Vec<KvCache> = Vec::new();
    let mut batched: Vec<KvCache> = Vec::new();
    for ids in &prompts {
        let mut cache = KvCache::new(&model.config);
        model.forward(&mut cache, ids).unwrap();
        alone.push(cache.clone());
        batched.push(cache);
    }
    for step in 0..3 {
        let tokens: Vec<u32> = next_tokens.iter().map(|t| t[step]).collect();
        let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
        let together = model.forward_batch(&mut refs, &tokens).unwrap();
        assert_eq!(together.len(), 3);
        for (s, cache) in alone.iter_mut().enumerate() {
            let single = model.forward(cache, &[tokens[s]]).unwrap();
            let err = relative_l2(&together[s], &single);
            assert!(err < 1e-5, "step {step}, sequence {s}: relative L2 {err}");
        }
    }
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a.tokens(), b.tokens());
    }
    // Mismatched lengths are an error, not a panic.
    let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
    assert!(model.forward_batch(&mut refs, &[1, 2]).is_err());
}
