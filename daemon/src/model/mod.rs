//! Models: the built-in catalogue, the hub download, and resolving `--model` to a GGUF file.

pub mod catalogue;
pub mod hub;

use std::path::{Path, PathBuf};

use catalogue::CatalogueEntry;

/// What `--model` names.
#[derive(Debug, Clone, Copy)]
pub enum ModelRef<'a> {
    File(&'a Path),
    Catalogue(&'static CatalogueEntry),
}

impl<'a> ModelRef<'a> {
    /// A path (anything with a `/` or a `.gguf` ending) or a catalogue name.
    pub fn parse(model: &'a str) -> Result<ModelRef<'a>, String> {
        if model.contains('/') || model.ends_with(".gguf") {
            return Ok(ModelRef::File(Path::new(model)));
        }
        catalogue::lookup(model).map(ModelRef::Catalogue).ok_or_else(|| {
            let names: Vec<&str> = catalogue::entries().iter().map(|entry| entry.name).collect();
            format!(
                "model: `{model}` is neither a GGUF path nor a catalogue name; use a path to a .gguf file \
                 or one of: {}",
                names.join(", ")
            )
        })
    }
}

/// Turns the configured model into a local file, downloading a catalogue model on first use
/// unless `offline`.
pub async fn resolve(model: &str, model_dir: &Path, offline: bool) -> Result<PathBuf, String> {
    match ModelRef::parse(model)? {
        ModelRef::File(path) => {
            if path.is_file() {
                Ok(path.to_path_buf())
            } else {
                Err(format!(
                    "model: {} does not exist; pass --model with the path of a GGUF file or a catalogue name",
                    path.display()
                ))
            }
        }
        ModelRef::Catalogue(entry) => fetch(entry, model_dir, offline).await,
    }
}

/// The local copy of a catalogue model, downloaded if missing.
pub async fn fetch(entry: &'static CatalogueEntry, model_dir: &Path, offline: bool) -> Result<PathBuf, String> {
    let local = hub::local_path(entry, model_dir);
    if local.is_file() {
        return Ok(local);
    }
    if offline {
        return Err(format!(
            "model: {} is not in {} and offline is set; run `phi3d pull {}` where there is a network, \
             or copy {} there",
            entry.name,
            model_dir.display(),
            entry.name,
            entry.file
        ));
    }
    tracing::info!(model = entry.name, repo = entry.repo, file = entry.file, dir = %model_dir.display(), "downloading model");
    hub::download(entry, model_dir, &hub::HubOptions::from_env()).await.map_err(|err| format!("model: {err}"))
}
