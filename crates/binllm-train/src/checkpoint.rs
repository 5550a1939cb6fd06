//! Checkpoints: every parameter, the optimizer state and the trainer's position, in one
//! safetensors file written atomically (temp file, fsync, rename, fsync of the directory),
//! so a crash at any moment leaves either the old checkpoint or the new one, never half.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// A checkpoint in memory: named f32 tensors (on the CPU) and JSON metadata.
pub struct Checkpoint {
    pub tensors: BTreeMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl Checkpoint {
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> =
            Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            let cpu = t
                .detach()
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu)
                .contiguous();
            let shape: Vec<usize> = cpu.size().iter().map(|&d| d as usize).collect();
            let values = Vec::<f32>::try_from(cpu.flatten(0, -1))
                .with_context(|| format!("tensor '{name}'"))?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            entries.push((name.clone(), shape, bytes));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = entries
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| anyhow::anyhow!("tensor '{name}': {e}"))
            })
            .collect::<Result<_>>()?;
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("binllm_checkpoint".to_string(), self.meta.to_string());
        let bytes = safetensors::tensor::serialize(views, Some(metadata))
            .map_err(|e| anyhow::anyhow!("serializing checkpoint: {e}"))?;
        binllm_format::atomic::write_atomically(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: corrupt checkpoint (not a complete safetensors file): {e}",
                path.display()
            )
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: corrupt checkpoint header: {e}", path.display()))?;
        let meta_text = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("binllm_checkpoint"))
            .with_context(|| {
                format!(
                    "{}: not a binllm checkpoint (no binllm_checkpoint metadata)",
                    path.display()
                )
            })?;
        let meta: serde_json::Value = serde_json::from_str(meta_text)
            .with_context(|| format!("{}: corrupt checkpoint metadata", path.display()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                bail!(
                    "{}: tensor '{name}' is {:?}, expected F32",
                    path.display(),
                    view.dtype()
                );
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            tensors.insert(
                name.to_string(),
                Tensor::from_data_size(view.data(), &shape, Kind::Float),
            );
        }
        Ok(Checkpoint { tensors, meta })
    }
}

/// `RUN/checkpoints/step-000123.safetensors`.
pub fn checkpoint_path(run_dir: &Path, step: usize) -> PathBuf {
    run_dir
        .join("checkpoints")
        .join(format!("step-{step:07}.safetensors"))
}

/// The newest checkpoint of a run, by step number.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    let dir = run_dir.join("checkpoints");
    if !dir.exists() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".safetensors"))
        else {
            continue;
        };
        if let Ok(step) = step.parse::<usize>() {
            if best.as_ref().is_none_or(|(b, _)| step > *b) {
                best = Some((step, path));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Keeps the `keep` newest checkpoints plus every phase-boundary one named in `pinned`.
pub fn prune_checkpoints(run_dir: &Path, keep: usize, pinned: &[usize]) -> Result<()> {
    let dir = run_dir.join("checkpoints");
    let mut steps: Vec<usize> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort_unstable();
    let cut = steps.len().saturating_sub(keep);
    for &step in &steps[..cut] {
        if !pinned.contains(&step) {
            std::fs::remove_file(checkpoint_path(run_dir, step)).ok();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            Tensor::from_slice(&[1.0f32, -2.5, 3.25]).view([3, 1]),
        );
        Checkpoint {
            tensors,
            meta: serde_json::json!({"step": 7}),
        }
        .save(&path)
        .unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.meta["step"], 7);
        assert_eq!(
            Vec::<f32>::try_from(back.tensors["w"].flatten(0, -1)).unwrap(),
            vec![1.0, -2.5, 3.25]
        );

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = format!("{:#}", Checkpoint::load(&path).err().unwrap());
        assert!(
            err.contains("c.safetensors") && err.contains("corrupt"),
            "{err}"
        );
    }
}
