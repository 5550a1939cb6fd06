//! The synthetic weight generator against the values Python recorded, the synthetic HF
//! directories against the digests transformers saw, and the reference fixtures'
//! self-consistency. The fixtures come from `tools/reference/forward_fixtures.py`.

use std::path::PathBuf;

use binllm_format::{Architecture, LoadOptions, PretrainedModel};
use binllm_testing::shared::reference_fixtures_dir;
use binllm_testing::synthetic::{
    fnv1a64, read_reference_fixture, relative_l2, splitmix64_output, synthetic_tensor,
    synthetic_uniform, synthetic_value, tensor_digest, write_hf_dir, ReferenceFixture,
    SyntheticInit, GENERATOR_ID,
};
use serde_json::Value;

fn fixture_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(reference_fixtures_dir())
        .expect("tests/fixtures/reference exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected 4 synthetic fixtures and SmolLM2's, got {files:?}"
    );
    files
}

fn hex_u64(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap(), 16).unwrap()
}

fn hex_u32(v: &Value) -> u32 {
    u32::from_str_radix(v.as_str().unwrap(), 16).unwrap()
}

#[test]
fn generator_matches_python_samples() {
    let text = std::fs::read_to_string(reference_fixtures_dir().join("generator.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["generator"], GENERATOR_ID);

    for (name, hash) in json["fnv1a64_of_name"].as_object().unwrap() {
        assert_eq!(fnv1a64(name.as_bytes()), hex_u64(hash), "fnv1a64({name:?})");
    }
    let samples = json["samples"].as_array().unwrap();
    assert!(samples.len() > 20);
    for s in samples {
        let name = s["name"].as_str().unwrap();
        let index = s["index"].as_u64().unwrap();
        let ctx = format!("{name:?}[{index}]");
        assert_eq!(
            splitmix64_output(fnv1a64(name.as_bytes()), index),
            hex_u64(&s["splitmix64"]),
            "{ctx}"
        );
        let u = synthetic_uniform(name, index as usize);
        assert_eq!(u.to_bits(), hex_u32(&s["uniform_f32_bits"]), "{ctx}");
        let init = SyntheticInit::for_tensor(name);
        assert_eq!(init.scale.to_bits(), hex_u32(&s["scale_f32_bits"]), "{ctx}");
        assert_eq!(
            f64::from(init.offset),
            s["offset"].as_f64().unwrap(),
            "{ctx}"
        );
        let value = init.apply(u);
        assert_eq!(value.to_bits(), hex_u32(&s["value_f32_bits"]), "{ctx}");
        if init.offset == 0.0 {
            let direct = synthetic_value(name, index as usize, init.scale);
            assert_eq!(direct.to_bits(), value.to_bits(), "{ctx}");
        }
    }
    for d in json["tensor_digests"].as_array().unwrap() {
        let name = d["name"].as_str().unwrap();
        let shape: Vec<usize> = d["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let tensor = synthetic_tensor(name, &shape);
        assert_eq!(
            tensor_digest(&tensor.to_f32_vec()),
            hex_u64(&d["fnv1a64_le_f32"]),
            "{name}"
        );
    }
}

#[test]
fn uniform_stays_in_range_and_on_the_grid() {
    for i in 0..10_000 {
        let u = synthetic_uniform("range check", i);
        assert!((-1.0..1.0).contains(&u));
        assert_eq!((u * 8_388_608.0).fract(), 0.0);
    }
}

fn synthetic_fixtures() -> Vec<ReferenceFixture> {
    let fixtures: Vec<ReferenceFixture> = fixture_files()
        .iter()
        .map(|p| read_reference_fixture(p).unwrap())
        .filter(|f| f.kind == "synthetic")
        .collect();
    assert_eq!(fixtures.len(), 4);
    fixtures
}

/// The directory binllm writes for a fixture's config holds exactly the tensors transformers
/// saved and reloaded, bit for bit, and loads through the ordinary HF reader.
#[test]
fn written_hf_dirs_match_the_models_transformers_ran() {
    for fixture in synthetic_fixtures() {
        assert_eq!(fixture.metadata["generator"], GENERATOR_ID);
        let dir = tempfile::tempdir().unwrap();
        write_hf_dir(&fixture.config_json, dir.path()).unwrap();
        let model = PretrainedModel::load(dir.path(), &LoadOptions::default()).unwrap();
        assert_eq!(
            model.config,
            fixture.model_config().unwrap(),
            "{}",
            fixture.name
        );

        let names: Vec<&String> = model.tensors.keys().collect();
        let expected: Vec<&String> = fixture.weights_digest.keys().collect();
        assert_eq!(names, expected, "{}: tensor names", fixture.name);
        for (name, digest) in &fixture.weights_digest {
            let tensor = &model.tensors[name];
            assert_eq!(tensor.shape, digest.shape, "{}: {name}", fixture.name);
            assert_eq!(tensor.stored_as, "F32");
            let values = tensor.to_f32_vec();
            assert_eq!(
                tensor_digest(&values),
                digest.fnv1a64,
                "{}: {name} differs from the tensor transformers used",
                fixture.name
            );
            let init = SyntheticInit::for_tensor(name);
            for i in [0, values.len() / 2, values.len() - 1] {
                assert_eq!(values[i], init.apply(synthetic_uniform(name, i)));
            }
        }

        let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&weights).unwrap();
        let meta = header.metadata().clone().unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    }
}

/// What transformers 5 wrote parses into the model each fixture claims to be.
#[test]
fn fixture_configs_parse_as_intended() {
    for fixture in synthetic_fixtures() {
        let c = fixture.model_config().unwrap();
        c.validate().unwrap();
        match fixture.name.as_str() {
            "tiny_llama_gqa" => {
                assert_eq!(c.architecture, Architecture::Llama);
                assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
                assert!(!c.tie_word_embeddings && c.rope_scaling.is_none());
                assert_eq!(c.rope_theta, 10000.0);
                assert_eq!(c.rms_norm_eps, 1e-5);
            }
            "tiny_llama3_rope_tied" => {
                assert_eq!(c.architecture, Architecture::Llama);
                assert!(c.tie_word_embeddings);
                let s = c.rope_scaling.expect("llama3 rope scaling");
                assert_eq!(
                    (s.factor, s.low_freq_factor, s.high_freq_factor),
                    (8.0, 1.0, 4.0)
                );
                assert_eq!(s.original_max_position_embeddings, 32);
                // One frequency in each llama3 band: kept, smoothed, divided by the factor.
                let base = ModelConfigNoScaling(&c).inv_freq();
                let scaled = c.rope_inv_freq();
                assert_eq!(scaled[0], base[0]);
                assert!(scaled[1] < base[1] && scaled[1] > base[1] / 8.0);
                assert_eq!(scaled[2], base[2] / 8.0);
            }
            "tiny_qwen2_bias" => {
                assert_eq!(c.architecture, Architecture::Qwen2);
                assert!(c.attention_bias && !c.qk_norm && !c.tie_word_embeddings);
                assert_eq!(c.rope_theta, 1e6);
            }
            "tiny_qwen3_qknorm_tied" => {
                assert_eq!(c.architecture, Architecture::Qwen3);
                assert!(c.qk_norm && !c.attention_bias && c.tie_word_embeddings);
                assert_eq!((c.hidden_size, c.num_heads, c.head_dim), (64, 4, 24));
                assert_eq!(c.num_layers, 3);
            }
            other => panic!("unexpected synthetic fixture {other}"),
        }
    }
}

struct ModelConfigNoScaling<'a>(&'a binllm_format::ModelConfig);

impl ModelConfigNoScaling<'_> {
    fn inv_freq(&self) -> Vec<f64> {
        let mut c = self.0.clone();
        c.rope_scaling = None;
        c.rope_inv_freq()
    }
}

/// Every fixture file opens and its parts agree with each other: ids inside the vocabulary,
/// finite logits, top-k consistent with the stored columns and the per-position statistics.
#[test]
fn fixtures_are_self_consistent() {
    let mut total_bytes = std::fs::metadata(reference_fixtures_dir().join("generator.json"))
        .unwrap()
        .len();
    for path in fixture_files() {
        total_bytes += std::fs::metadata(&path).unwrap().len();
        let f = read_reference_fixture(&path).unwrap();
        let ctx = f.name.clone();
        assert!(["synthetic", "gguf"].contains(&f.kind.as_str()), "{ctx}");
        assert!(f.metadata.contains_key("transformers_version"), "{ctx}");
        assert!(!f.sequences.is_empty(), "{ctx}");
        f.model_config().unwrap();
        assert!(
            f.columns.windows(2).all(|w| w[0] < w[1]),
            "{ctx}: columns sorted"
        );

        for (i, s) in f.sequences.iter().enumerate() {
            let ctx = format!("{ctx} sequence {i}");
            assert!(s.positions > 0 && s.positions <= s.ids.len(), "{ctx}");
            assert!(
                s.ids.iter().all(|&id| (id as usize) < f.vocab_size),
                "{ctx}"
            );
            assert_eq!(s.logits_shape(), [s.positions, f.columns.len()], "{ctx}");
            assert!(s.logits.iter().all(|v| v.is_finite()), "{ctx}");
            if let Some(l64) = &s.logits_f64 {
                let as32: Vec<f32> = l64.iter().map(|&v| v as f32).collect();
                assert!(relative_l2(&as32, &s.logits) < 1e-5, "{ctx}: f32 vs f64");
            }
            if f.kind == "synthetic" {
                assert_eq!(f.columns.len(), f.vocab_size, "{ctx}: synthetic stores all");
                assert!(s.logits_f64.is_some(), "{ctx}");
                assert!(!f.weights_digest.is_empty(), "{ctx}");
            } else {
                check_subset_summaries(&f, i);
            }
        }
    }
    assert!(
        total_bytes < 2_000_000,
        "reference fixtures grew to {total_bytes} bytes"
    );
}

fn check_subset_summaries(f: &ReferenceFixture, i: usize) {
    let s = &f.sequences[i];
    let ctx = format!("{} sequence {i}", f.name);
    let top = s.top.as_ref().expect("subset fixtures store top-k");
    let l2 = s.l2_norm.as_ref().expect("subset fixtures store L2 norms");
    let lse = s
        .logsumexp
        .as_ref()
        .expect("subset fixtures store logsumexp");
    let width = f.columns.len();
    for p in 0..s.positions {
        let row = &s.logits[p * width..(p + 1) * width];
        let ids = &top.ids[p * top.k..(p + 1) * top.k];
        let logits = &top.logits[p * top.k..(p + 1) * top.k];
        assert!(ids.iter().all(|&id| (id as usize) < f.vocab_size), "{ctx}");
        assert!(
            logits.windows(2).all(|w| w[0] >= w[1]),
            "{ctx}: top-k order"
        );
        // A top-k id that is also a stored column must carry the same logit there, and no
        // stored column may beat the k-th largest logit unless it is itself in the top-k.
        for (&id, &logit) in ids.iter().zip(logits) {
            if let Ok(j) = f.columns.binary_search(&(id as usize)) {
                assert_eq!(row[j], logit, "{ctx} position {p} id {id}");
            }
        }
        let kth = logits[top.k - 1];
        for (j, &v) in row.iter().enumerate() {
            assert!(
                v <= kth || ids.contains(&(f.columns[j] as u32)),
                "{ctx} position {p}: column {} ({v}) above the top-k",
                f.columns[j]
            );
        }
        let row_norm = row
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            f64::from(l2[p]) >= row_norm * (1.0 - 1e-6),
            "{ctx}: L2 norm"
        );
        let max = f64::from(logits[0]);
        let top_lse = max
            + logits
                .iter()
                .map(|&v| (f64::from(v) - max).exp())
                .sum::<f64>()
                .ln();
        assert!(f64::from(lse[p]) >= top_lse - 1e-4, "{ctx}: logsumexp");
        assert!(
            f64::from(lse[p]) <= max + (f.vocab_size as f64).ln() + 1e-4,
            "{ctx}: logsumexp"
        );
    }
}

/// The column selection helper lays full logits out like the stored subset.
#[test]
fn select_columns_matches_the_stored_layout() {
    for path in fixture_files() {
        let f = read_reference_fixture(&path).unwrap();
        let full: Vec<f32> = (0..2 * f.vocab_size).map(|v| v as f32).collect();
        let picked = f.select_columns(&full).unwrap();
        assert_eq!(picked.len(), 2 * f.columns.len());
        assert_eq!(picked[0], f.columns[0] as f32);
        assert_eq!(
            picked[f.columns.len()],
            (f.vocab_size + f.columns[0]) as f32
        );
    }
}
