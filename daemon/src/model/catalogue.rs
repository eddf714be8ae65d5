//! The built-in catalogue: the Phi-3 family GGUF files phi3d knows how to fetch by name.
//!
//! Each entry names one file in one Hugging Face repository, so `phi3d pull NAME` needs no
//! further choice from the user. Microsoft publishes an official GGUF only for
//! Phi-3-mini-4k-instruct; the other entries point at widely used community quantisations of
//! Microsoft's weights. All are 4-bit (Q4_K_M class) files of about 2.2 to 2.5 GB, which is
//! what fits, with room for a KV cache, in the memory of a 4 to 8 GB Raspberry Pi.

/// One downloadable model: where it lives on the hub and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogueEntry {
    /// The short name users type, e.g. `phi-3-mini-4k-instruct`.
    pub name: &'static str,
    /// The Hugging Face repository, `owner/name`.
    pub repo: &'static str,
    /// The GGUF file inside the repository; also the file name in the model directory.
    pub file: &'static str,
    /// The context length, in tokens, the model was trained for.
    pub context_length: u32,
    /// The llama.cpp quantisation of the file.
    pub quantization: &'static str,
    /// One line for listings.
    pub description: &'static str,
}

/// The model phi3d uses when none is named.
pub const DEFAULT_MODEL: &str = "phi-3-mini-4k-instruct";

static ENTRIES: [CatalogueEntry; 4] = [
    CatalogueEntry {
        name: DEFAULT_MODEL,
        repo: "microsoft/Phi-3-mini-4k-instruct-gguf",
        file: "Phi-3-mini-4k-instruct-q4.gguf",
        context_length: 4096,
        quantization: "Q4_K_M",
        description: "Phi-3 mini, 3.8B, 4K context; Microsoft's own GGUF (the default)",
    },
    CatalogueEntry {
        name: "phi-3-mini-128k-instruct",
        repo: "bartowski/Phi-3.1-mini-128k-instruct-GGUF",
        file: "Phi-3.1-mini-128k-instruct-Q4_K_M.gguf",
        context_length: 131_072,
        quantization: "Q4_K_M",
        description: "Phi-3 mini, 3.8B, 128K context (mid-2024 update); bartowski's GGUF",
    },
    CatalogueEntry {
        name: "phi-3.5-mini-instruct",
        repo: "bartowski/Phi-3.5-mini-instruct-GGUF",
        file: "Phi-3.5-mini-instruct-Q4_K_M.gguf",
        context_length: 131_072,
        quantization: "Q4_K_M",
        description: "Phi-3.5 mini, 3.8B, 128K context, multilingual; bartowski's GGUF",
    },
    CatalogueEntry {
        name: "phi-4-mini-instruct",
        repo: "bartowski/microsoft_Phi-4-mini-instruct-GGUF",
        file: "microsoft_Phi-4-mini-instruct-Q4_K_M.gguf",
        context_length: 131_072,
        quantization: "Q4_K_M",
        description: "Phi-4 mini, 3.8B, 128K context, 200K vocabulary; bartowski's GGUF",
    },
];

/// Every catalogue entry, the default first.
pub fn entries() -> &'static [CatalogueEntry] {
    &ENTRIES
}

/// The entry called `name`, ignoring ASCII case (people type `Phi-3-mini-4k-instruct` too).
pub fn lookup(name: &str) -> Option<&'static CatalogueEntry> {
    ENTRIES.iter().find(|e| e.name.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_model_is_the_official_phi3_mini_4k_gguf() {
        let entry = lookup(DEFAULT_MODEL).expect("the default model is in the catalogue");
        assert_eq!(entry.name, DEFAULT_MODEL);
        assert_eq!(entry.repo, "microsoft/Phi-3-mini-4k-instruct-gguf");
        assert_eq!(entry.file, "Phi-3-mini-4k-instruct-q4.gguf");
        assert_eq!(entry.context_length, 4096);
        assert_eq!(entries()[0], *entry, "the default is listed first");
    }

    #[test]
    fn entries_are_well_formed_and_unique() {
        for (i, e) in entries().iter().enumerate() {
            assert_eq!(
                e.repo.matches('/').count(),
                1,
                "{}: repo must be owner/name",
                e.name
            );
            assert!(e.file.ends_with(".gguf"), "{}: not a GGUF file", e.name);
            // `--model` reads anything with a `/` or a `.gguf` ending as a path.
            assert!(
                !e.name.contains('/') && !e.name.ends_with(".gguf"),
                "{}",
                e.name
            );
            assert!(
                !e.file.contains('/'),
                "{}: file must be at the repo root",
                e.name
            );
            assert!(e.context_length >= 4096, "{}", e.name);
            assert!(!e.description.is_empty() && !e.description.contains('\n'));
            assert!(!e.quantization.is_empty());
            for other in &entries()[i + 1..] {
                assert!(
                    !e.name.eq_ignore_ascii_case(other.name),
                    "duplicate {}",
                    e.name
                );
                assert_ne!(e.file, other.file, "two entries would share one local file");
            }
        }
    }

    #[test]
    fn lookup_ignores_case_and_rejects_unknown_names() {
        assert_eq!(
            lookup("PHI-3.5-Mini-Instruct").unwrap().name,
            "phi-3.5-mini-instruct"
        );
        assert!(lookup("phi-2").is_none());
        assert!(lookup("").is_none());
    }
}
