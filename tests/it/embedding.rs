//! The real model against reference scores from sentence-transformers.

use semcache::embed::cosine;

use crate::support::embedder;

fn similarity(a: &str, b: &str) -> f32 {
    let vectors = embedder().embed(&[a, b]).unwrap();
    cosine(&vectors[0], &vectors[1])
}

#[test]
fn scores_match_sentence_transformers() {
    // Reference values: sentence-transformers' all-MiniLM-L6-v2, cosine of the pooled vectors.
    let cases = [
        ("The new movie is awesome", "The new movie is so great", 0.8939),
        ("The cat sits outside", "The cat plays in the garden", 0.6788),
        ("I love pasta", "Do you like pizza?", 0.5096),
    ];
    for (a, b, expected) in cases {
        let got = similarity(a, b);
        assert!(
            (got - expected).abs() <= 0.002,
            "{a:?} / {b:?}: got {got:.4}, expected {expected}"
        );
    }
}

#[test]
fn vectors_are_unit_length_and_independent_of_batching() {
    let texts = [
        "short",
        "a somewhat longer sentence that pads the batch",
        "third one",
    ];
    let batched = embedder().embed(&texts).unwrap();
    for (text, vector) in texts.iter().zip(&batched) {
        assert_eq!(vector.len(), embedder().dimensions());
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{text}: norm {norm}");
        let alone = embedder().embed(&[text]).unwrap().remove(0);
        assert!(
            cosine(vector, &alone) > 0.9999,
            "{text}: padding changed the vector"
        );
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
    // Everything past that point is invisible: cutting it off changes nothing.
    let whole = model.embed(&[&text]).unwrap();
    let cut = model.embed(&[&text[..seen]]).unwrap();
    assert!(cosine(&whole[0], &cut[0]) > 0.9999);
    assert_eq!(model.seen_len(&text[..seen]), None);
}
