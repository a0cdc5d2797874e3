//! What the fuzz targets in `fuzz/` run, and `make test` replays over their corpus: each
//! function takes any bytes, must never panic, and asserts the round trips that must hold.

use bytes::Bytes;

use crate::cache::{Protocol, Replay, StreamItem};
use crate::openai::embeddings::EmbeddingsRequest;
use crate::openai::request::ChatRequest;
use crate::openai::sse::{self, Assembler, Parser};
use crate::openai::{CompletionRequest, Completions};
use crate::store::Record;

/// A request body, read by each surface: parsing and fingerprinting are deterministic, and the
/// body semcache sends upstream is a valid request with the same cache key.
pub fn request(bytes: &[u8]) {
    completion_request(bytes);
    embeddings_request(bytes);
    let Ok(request) = ChatRequest::parse(bytes) else {
        return;
    };
    let input = request.cache_input();
    let again = ChatRequest::parse(bytes).expect("it parsed once").cache_input();
    assert_eq!(input, again, "fingerprinting is deterministic");
    let upstream = ChatRequest::parse(&request.body_with_usage()).expect("the upstream body parses");
    assert_eq!(upstream.cache_input(), input, "asking for usage changes no key");
}

fn completion_request(bytes: &[u8]) {
    let Ok(request) = CompletionRequest::parse(bytes) else {
        return;
    };
    let input = request.cache_input();
    assert_eq!(
        CompletionRequest::parse(bytes)
            .expect("it parsed once")
            .cache_input(),
        input,
        "fingerprinting is deterministic"
    );
    let upstream = Completions.miss_body(&request, Bytes::copy_from_slice(bytes));
    let upstream = CompletionRequest::parse(&upstream).expect("the upstream body parses");
    assert_eq!(upstream.cache_input(), input, "asking for usage changes no key");
}

fn embeddings_request(bytes: &[u8]) {
    let Ok(request) = EmbeddingsRequest::parse(bytes) else {
        return;
    };
    let Some(items) = request.items() else {
        return;
    };
    let texts: Vec<&str> = items.iter().map(String::as_str).collect();
    let upstream =
        EmbeddingsRequest::parse(&request.upstream_body(&texts)).expect("the upstream body parses");
    assert_eq!(
        upstream.fingerprint(),
        request.fingerprint(),
        "the input is not context"
    );
    assert_eq!(upstream.items(), request.items());
}

/// A stream from the upstream, cut into pieces of any size: the parser and assembler never
/// panic, and an answer they assemble replays as a stream that assembles to the same answer.
pub fn stream(bytes: &[u8]) {
    let Some((&piece, bytes)) = bytes.split_first() else {
        return;
    };
    completion_stream(bytes, usize::from(piece % 64) + 1);
    let Some(completion) = assemble(bytes, usize::from(piece % 64) + 1) else {
        return;
    };
    let replayed: Vec<u8> = sse::replay(&completion, true).concat();
    let again = assemble(&replayed, 7).expect("a replayed answer assembles");
    assert_eq!(
        again["choices"], completion["choices"],
        "replay keeps the choices"
    );
}

/// The same bytes as a legacy completions stream: what its reader assembles replays as a
/// stream that assembles to the same answer.
fn completion_stream(bytes: &[u8], piece: usize) {
    let request = CompletionRequest::parse(br#"{"model": "m", "prompt": "x", "stream": true}"#)
        .expect("a valid request");
    let Some(answer) = read_completion(&request, bytes, piece) else {
        return;
    };
    let Replay::Events(events) = Completions.replay(&request, &answer) else {
        panic!("a streamed request replays as events");
    };
    let again = read_completion(&request, &events.concat(), 7).expect("a replayed answer assembles");
    let choices =
        |answer: &[u8]| serde_json::from_slice::<serde_json::Value>(answer).expect("JSON")["choices"].clone();
    assert_eq!(choices(&again), choices(&answer), "replay keeps the choices");
}

fn read_completion(request: &CompletionRequest, bytes: &[u8], piece: usize) -> Option<Bytes> {
    let mut reader = Completions.stream_reader(request);
    for chunk in bytes.chunks(piece) {
        for item in reader.feed(chunk) {
            match item {
                StreamItem::End => return reader.finish().ok().map(|(answer, _)| answer),
                StreamItem::Broken(_) => return None,
                StreamItem::Event(_) => {}
            }
        }
    }
    None
}

fn assemble(bytes: &[u8], piece: usize) -> Option<serde_json::Value> {
    let mut parser = Parser::default();
    let mut assembler = Assembler::default();
    for chunk in bytes.chunks(piece) {
        for data in parser.feed(chunk) {
            if data == sse::DONE {
                return assembler.finish().ok();
            }
            assembler.push(&data);
        }
    }
    None
}

/// A stored record: whatever decodes, encodes and decodes to the same bytes.
pub fn record(bytes: &[u8]) {
    let Ok(record) = Record::decode(bytes) else {
        return;
    };
    let encoded = record.encode();
    let again = Record::decode(&encoded).expect("an encoded record decodes");
    assert_eq!(again.encode(), encoded, "encoding is stable");
}
