//! What the fuzz targets in `fuzz/` run, and `make test` replays over their corpus: each
//! function takes any bytes, must never panic, and asserts the round trips that must hold.

use crate::openai::request::ChatRequest;
use crate::openai::sse::{self, Assembler, Parser};
use crate::store::Record;

/// A request body: parsing and fingerprinting are deterministic, and the body semcache sends
/// upstream is a valid request with the same cache key.
pub fn request(bytes: &[u8]) {
    let Ok(request) = ChatRequest::parse(bytes) else {
        return;
    };
    let input = request.cache_input();
    let again = ChatRequest::parse(bytes).expect("it parsed once").cache_input();
    assert_eq!(input, again, "fingerprinting is deterministic");
    let upstream = ChatRequest::parse(&request.body_with_usage()).expect("the upstream body parses");
    assert_eq!(upstream.cache_input(), input, "asking for usage changes no key");
}

/// A stream from the upstream, cut into pieces of any size: the parser and assembler never
/// panic, and an answer they assemble replays as a stream that assembles to the same answer.
pub fn stream(bytes: &[u8]) {
    let Some((&piece, bytes)) = bytes.split_first() else {
        return;
    };
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
