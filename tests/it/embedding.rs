//! The real model against reference scores from sentence-transformers, on every backend.

use clap::ValueEnum;
use semcache::embed::{cosine, Backend};

use crate::support::{embedder, embedder_on};

/// Reference values: sentence-transformers' all-MiniLM-L6-v2, cosine of the pooled vectors.
const REFERENCE: [(&str, &str, f32); 3] = [
    ("The new movie is awesome", "The new movie is so great", 0.8939),
    ("The cat sits outside", "The cat plays in the garden", 0.6788),
    ("I love pasta", "Do you like pizza?", 0.5096),
];

/// How far a backend's scores may be from the reference: the weights as trained reproduce
/// them, int8 weights come close.
fn tolerance(backend: Backend) -> f32 {
    #[cfg(feature = "onnx")]
    if backend == Backend::Onnx {
        return 0.01;
    }
    let _ = backend;
    0.002
}

#[test]
fn scores_match_sentence_transformers() {
    for &backend in Backend::value_variants() {
        let model = embedder_on(backend);
        for (a, b, expected) in REFERENCE {
            let vectors = model.embed(&[a, b]).unwrap();
            let got = cosine(&vectors[0], &vectors[1]);
            assert!(
                (got - expected).abs() <= tolerance(backend),
                "{backend:?}: {a:?} / {b:?}: got {got:.4}, expected {expected}"
            );
        }
    }
}

/// The backends embed the same text alike: a store could not be served by another backend's
/// vectors otherwise (it is refused at start), but the threshold's meaning must carry over.
#[test]
fn backends_agree() {
    let texts = [
        "How can I reset my password?",
        "Summarise the attached contract and list every deadline it sets.",
        "Write a Python function that parses ISO 8601 dates, with tests.",
        "¿Dónde está mi pedido?",
    ];
    let backends = Backend::value_variants();
    for (i, &a) in backends.iter().enumerate() {
        for &b in &backends[i + 1..] {
            let (va, vb) = (
                embedder_on(a).embed(&texts).unwrap(),
                embedder_on(b).embed(&texts).unwrap(),
            );
            for ((text, x), y) in texts.iter().zip(&va).zip(&vb) {
                let agreement = cosine(x, y);
                assert!(agreement >= 0.99, "{a:?} / {b:?} on {text:?}: {agreement:.4}");
            }
        }
    }
}

#[test]
fn vectors_are_unit_length_and_independent_of_batching() {
    let texts = [
        "short",
        "a somewhat longer sentence that pads the batch",
        "third one",
    ];
    for &backend in Backend::value_variants() {
        let model = embedder_on(backend);
        let batched = model.embed(&texts).unwrap();
        for (text, vector) in texts.iter().zip(&batched) {
            assert_eq!(vector.len(), model.dimensions());
            let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{backend:?}: {text}: norm {norm}");
            let alone = model.embed(&[text]).unwrap().remove(0);
            let same = cosine(vector, &alone);
            assert!(
                same > 0.9999,
                "{backend:?}: {text}: batching changed the vector ({same})"
            );
        }
    }
}

#[test]
fn long_prompts_are_truncated_not_rejected() {
    let long = "word ".repeat(5_000);
    let vectors = embedder().embed(&[&long, "word"]).unwrap();
    assert_eq!(vectors.len(), 2);
    assert!(vectors[0].iter().all(|x| x.is_finite()));
}

#[test]
fn seen_len_marks_where_the_model_stops_reading() {
    let model = embedder();
    assert_eq!(model.seen_len("A short question?"), None);
    let text = "Reservoir levels recovered after the spring rains in the north. ".repeat(40);
    let seen = model.seen_len(&text).expect("about 500 tokens do not fit in 256");
    assert!(seen > 500 && seen < text.len(), "{seen} of {}", text.len());
    // Everything past that point is invisible, on every backend: cutting it off changes nothing.
    for &backend in Backend::value_variants() {
        let model = embedder_on(backend);
        assert_eq!(model.seen_len(&text), Some(seen), "{backend:?}");
        let whole = model.embed(&[&text]).unwrap();
        let cut = model.embed(&[&text[..seen]]).unwrap();
        assert!(cosine(&whole[0], &cut[0]) > 0.9999, "{backend:?}");
    }
    assert_eq!(model.seen_len(&text[..seen]), None);
}
