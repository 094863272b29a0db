//! The upstream HTTP/1.1 response parser: head, then the body's framing
//! (length, chunked with extensions and trailers, until close), fed in the
//! pieces the input's first byte chooses, with the headers in a map or
//! left raw (its second bit). Must never panic, and a body may never yield
//! more bytes than the input held.
#![no_main]

use bosun_proxy::h1::{Step, parse_head_as};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split).max(1);
    let mut buf = BytesMut::new();
    let mut chunks = rest.chunks(piece);
    let head = loop {
        match parse_head_as(&mut buf, split & 1 == 1, split & 2 == 2) {
            Ok(Some(h)) => break h,
            Ok(None) => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => return,
            },
            Err(_) => return,
        }
    };
    if let Some(r) = head.raw {
        // Every span lies inside the head it was cut from.
        assert!(r.iter().count() <= 100);
        r.recycle();
    }
    let mut state = head.state;
    let mut out = 0usize;
    loop {
        match state.decode(&mut buf) {
            Ok(Step::Data(d)) => {
                out += d.len();
                assert!(out <= rest.len(), "decoded more than was read");
            }
            Ok(Step::Trailers(_)) | Ok(Step::End) | Err(_) => return,
            Ok(Step::NeedMore) => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => return,
            },
        }
    }
});
