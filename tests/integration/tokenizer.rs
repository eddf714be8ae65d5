//! Tokenize, and fidelity to the real Phi-3 tokenizer when its reference data is present.

use std::path::{Path, PathBuf};

use phi3d_proto::v1::TokenizeRequest;
use phi3d_tests::harness::DaemonBuilder;
use phi3d_tests::model_gen::{ModelSpec, VocabSource, ensure_model};

use crate::common::{PHI3D, daemon};

#[tokio::test]
async fn tokenize_knows_the_phi3_special_tokens() {
    let daemon = daemon().await;
    let mut client = daemon.inference().await;
    let tokenize = |text: &str, add_special, parse_special| TokenizeRequest { text: text.into(), add_special, parse_special };
    let special = client.tokenize(tokenize("<|user|>", false, true)).await.unwrap().into_inner();
    assert_eq!(special.tokens, vec![32010]);
    assert_eq!(special.pieces, vec!["<|user|>"]);
    let literal = client.tokenize(tokenize("<|user|>", false, false)).await.unwrap().into_inner();
    assert!(literal.tokens.len() > 1, "without parse_special it is plain text: {literal:?}");
    let with_bos = client.tokenize(tokenize("hello world", true, false)).await.unwrap().into_inner();
    assert_eq!(with_bos.tokens[0], 1, "<s> first: {with_bos:?}");
    assert_eq!(with_bos.pieces.concat().replace("<s>", "").trim_start(), "hello world");
}

/// The real Phi-3 tokenizer (vocab only) and llama.cpp's test strings, outside the repo.
fn reference_data() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    dir.join("ggml-vocab-phi-3.gguf").is_file().then_some(dir)
}

#[tokio::test]
async fn tokenizes_exactly_like_phi3() {
    let Some(data) = reference_data() else {
        phi3d_tests::skip_outside_repository("../shared/data/ggml-vocab-phi-3.gguf is absent (the reference tokenizer)");
        return;
    };
    let spec = ModelSpec { name: "phi3-test-realvocab".into(), vocab: VocabSource::CopyFrom(data.join("ggml-vocab-phi-3.gguf")), ..ModelSpec::tiny() };
    let model = ensure_model(Path::new(env!("CARGO_TARGET_TMPDIR")), &spec).unwrap();
    let daemon = DaemonBuilder::new(PHI3D, model).start().await;
    let mut client = daemon.inference().await;
    let inputs = std::fs::read_to_string(data.join("ggml-vocab-phi-3.gguf.inp")).unwrap();
    let outputs = std::fs::read_to_string(data.join("ggml-vocab-phi-3.gguf.out")).unwrap();
    let inputs: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<&str> = outputs.lines().collect();
    let mut checked = 0;
    for (text, ids) in inputs.iter().zip(&expected) {
        let expected: Vec<u32> = ids.split_whitespace().map(|id| id.parse().unwrap()).collect();
        let request = TokenizeRequest { text: (*text).to_owned(), add_special: false, parse_special: false };
        let got = client.tokenize(request).await.unwrap().into_inner().tokens;
        assert_eq!(got, expected, "tokenizing {text:?}");
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} reference strings");
}
